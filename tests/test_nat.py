"""nat.py: decode_step invariants, schedules, generate, the masked-token loss."""
import math

import torch

import nat
import sample

K, N, MASK = 12, 16, 12


def _setup(B=6, seed=0, frac_masked=0.6):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, K, (B, N), generator=g)
    tokens[torch.rand(B, N, generator=g) < frac_masked] = MASK
    lc = torch.randn(B, N, K, generator=g)
    lu = torch.randn(B, N, K, generator=g)
    return tokens, lc, lu


def _full(v, B=6):
    return torch.full((B,), float(v))


def test_decode_step_masked_count_and_frozen_tokens():
    tokens, lc, lu = _setup()
    m = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
    out = nat.decode_step(tokens, lc, lu, m, _full(1.0), _full(2.0), _full(1.5), MASK,
                          torch.Generator().manual_seed(1))
    masked_before = (tokens == MASK).sum(1)
    expect = torch.minimum(torch.floor(N * m).long(), (masked_before - 1).clamp_min(0))
    assert torch.equal((out == MASK).sum(1), expect)
    decoded = tokens != MASK
    assert torch.equal(out[decoded], tokens[decoded])              # decoded tokens never change
    assert ((out == MASK) <= (tokens == MASK)).all()               # nothing decoded is re-masked
    assert (out[out != MASK] < K).all()


def test_decode_step_decodes_at_least_one_and_m0_decodes_all():
    tokens, lc, _ = _setup()
    out = nat.decode_step(tokens, lc, None, _full(1.0), _full(1.0), _full(0.0), _full(0.0), MASK)
    assert torch.equal((out == MASK).sum(1), ((tokens == MASK).sum(1) - 1).clamp_min(0))
    out0 = nat.decode_step(tokens, lc, None, _full(0.0), _full(1.0), _full(3.0), _full(0.0), MASK)
    assert (out0 != MASK).all()


def test_lowest_confidence_remasked_when_tau2_zero():
    tokens, lc, _ = _setup(frac_masked=1.0)
    tokens[:] = MASK
    out = nat.decode_step(tokens, lc, None, _full(0.5), _full(0.0), _full(0.0), _full(0.0), MASK)
    # tau1 = 0: argmax tokens; confidence = max log-prob; the N/2 least confident stay masked
    conf = torch.log_softmax(lc, -1).max(-1).values
    for b in range(tokens.shape[0]):
        remasked = set(torch.nonzero(out[b] == MASK).flatten().tolist())
        lowest = set(conf[b].argsort()[: N // 2].tolist())
        assert remasked == lowest


def test_tiny_tau1_gives_argmax_and_w0_equals_conditional():
    tokens, lc, lu = _setup()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    out = nat.decode_step(tokens, lc, lu, _full(0.0), _full(1e-6), _full(0.0), _full(0.0), MASK, g1)
    out_c = nat.decode_step(tokens, lc, None, _full(0.0), _full(1e-6), _full(0.0), _full(0.0), MASK, g2)
    masked = tokens == MASK
    assert torch.equal(out[masked], lc.argmax(-1)[masked])          # tiny tau1 -> argmax
    assert torch.equal(out, out_c)                                  # w = 0 -> conditional only
    # with w != 0 the guided logits l_c + w (l_c - l_u) decide
    out_w = nat.decode_step(tokens, lc, lu, _full(0.0), _full(0.0), _full(0.0), _full(2.0), MASK)
    assert torch.equal(out_w[masked], (lc + 2.0 * (lc - lu)).argmax(-1)[masked])


def test_sampling_follows_tempered_softmax():
    """At tau1 = 2 the empirical token frequencies match softmax(l / 2)."""
    l = torch.tensor([2.0, 0.0, -1.0, 1.0])
    B = 20000
    tokens = torch.full((B, 1), 4)
    logits = l.expand(B, 1, 4)
    out = nat.decode_step(tokens, logits, None, _full(0.0, B), _full(2.0, B), _full(0.0, B), _full(0.0, B), 4,
                          torch.Generator().manual_seed(0))
    freq = torch.bincount(out[:, 0], minlength=4).float() / B
    assert torch.allclose(freq, torch.softmax(l / 2, 0), atol=0.015)


def test_per_sample_actions_are_independent():
    """Row b of a batched step equals the same step run on row b alone (for deterministic actions)."""
    tokens, lc, lu = _setup()
    m = torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 0.5])
    w = torch.tensor([0.0, 1.0, 2.0, 0.5, 3.0, 1.0])
    out = nat.decode_step(tokens, lc, lu, m, _full(0.0), _full(0.0), w, MASK)
    for b in range(6):
        one = nat.decode_step(tokens[b:b + 1], lc[b:b + 1], lu[b:b + 1], m[b:b + 1], _full(0.0, 1), _full(0.0, 1),
                              w[b:b + 1], MASK)
        assert torch.equal(out[b:b + 1], one)


def test_heuristics_known_values():
    T = 4
    t = torch.arange(T)
    assert torch.allclose(nat.cosine_mask(t, T), torch.cos(math.pi / 2 * (t + 1) / T))
    assert abs(nat.cosine_mask(3, 4).item()) < 1e-6
    assert torch.allclose(nat.linear_tau2(t, T, 4.5), torch.tensor([3.375, 2.25, 1.125, 0.0]))
    assert torch.allclose(nat.linear_w(t, T, 2.0), torch.tensor([0.0, 0.5, 1.0, 1.5]))
    table = nat.heuristic_table(T, tau2_0=1.0, w_0=2.0)
    assert table.shape == (T, 4) and torch.allclose(table[:, 1], torch.ones(T))


def _net():
    torch.manual_seed(0)
    cfg = nat.NATConfig(vocab_size=K, num_tokens=N, num_classes=3, dim=32, depth=1, heads=2)
    return nat.NAT(cfg).eval(), cfg


def test_forward_shapes_and_loss():
    net, cfg = _net()
    v = torch.randint(0, K, (5, N))
    y = torch.tensor([0, 1, 2, 3, 0])                 # 3 = null class
    logits, feats = net(v, y)
    assert logits.shape == (5, N, K) and feats.shape == (5, N, cfg.dim)
    net.train()
    loss = nat.masked_token_loss(net, v, y)
    assert loss.ndim == 0 and math.isfinite(loss.item())
    # an untrained net predicts ~uniform: loss ~ log K
    assert abs(loss.item() - math.log(K)) < 0.5


def test_mask_tokens_counts_and_beta():
    v = torch.randint(0, K, (8, N))
    r = torch.linspace(0, 1, 8)
    masked, is_m = nat.mask_tokens(v, r, MASK)
    assert torch.equal(is_m.sum(1), torch.ceil(r * N).long().clamp(1, N))
    assert torch.equal(masked[~is_m], v[~is_m])
    cfg = nat.NATConfig(mask_dist="beta", alpha=2.0, beta=5.0)
    r = nat.sample_mask_ratio(20000, cfg)
    assert abs(r.mean().item() - 2 / 7) < 0.01


def test_generate_finishes_and_guidance_is_one_batched_forward():
    net, cfg = _net()
    calls = []

    def logits_fn(tokens, labels):
        calls.append(tokens.shape[0])
        return net(tokens, labels)

    y = torch.tensor([0, 1, 2, 1])
    out = nat.generate(logits_fn, y, 4, nat.heuristic_schedule(4, 1.0, 2.0), cfg.mask_id, N, cfg.null_label,
                       torch.Generator().manual_seed(0))
    assert out.shape == (4, N) and (out != cfg.mask_id).all()
    assert calls == [8, 8, 8, 8]                          # [cond; null] in one forward per step
    calls.clear()
    nat.generate(logits_fn, y, 3, nat.heuristic_schedule(3), cfg.mask_id, N, None)
    assert calls == [4, 4, 4]
    # same seed, same tokens
    a = nat.generate(net, y, 4, nat.heuristic_schedule(4, 1.0, 2.0), cfg.mask_id, N, cfg.null_label,
                     torch.Generator().manual_seed(5))
    b = nat.generate(net, y, 4, nat.heuristic_schedule(4, 1.0, 2.0), cfg.mask_id, N, cfg.null_label,
                     torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_generate_follows_cosine_masked_counts():
    net, cfg = _net()
    seen = []

    def schedule(t, state):
        seen.append((state.tokens == cfg.mask_id).sum(1))
        return nat.heuristic_schedule(4, 4.5, 0.0)(t, state)

    nat.generate(net, torch.zeros(3, dtype=torch.long), 4, schedule, cfg.mask_id, N, None)
    expected = [N] + [math.floor(N * math.cos(math.pi / 2 * (t + 1) / 4) + 1e-6) for t in range(3)]
    assert [s[0].item() for s in seen] == expected


def test_random_numbers_do_not_depend_on_other_samples():
    """Changing sample 0's action leaves sample 1's stochastic step unchanged (same seed)."""
    tokens, lc, lu = _setup()
    m1 = torch.tensor([0.2, 0.5, 0.5, 0.5, 0.5, 0.5])
    m2 = torch.tensor([0.9, 0.5, 0.5, 0.5, 0.5, 0.5])
    tokens2 = tokens.clone()
    tokens2[0] = MASK                                       # a different mask pattern in row 0
    a = nat.decode_step(tokens, lc, lu, m1, _full(1.0), _full(1.0), _full(1.0), MASK, torch.Generator().manual_seed(7))
    b = nat.decode_step(tokens2, lc, lu, m2, _full(1.0), _full(1.0), _full(1.0), MASK, torch.Generator().manual_seed(7))
    assert torch.equal(a[1:], b[1:])


def test_groups_share_their_random_numbers():
    """group = G: rows of one group with the same label and actions generate the same tokens;
    different groups differ."""
    torch.manual_seed(0)
    cfg = nat.NATConfig(vocab_size=16, num_tokens=16, num_classes=3, dim=32, depth=1, heads=2)
    net = nat.NAT(cfg).eval()
    labels = torch.tensor([1, 1, 1, 2, 2, 2])
    out = nat.generate(net, labels, 4, nat.heuristic_schedule(4, 1.0, 2.0), cfg.mask_id, 16, cfg.null_label,
                       torch.Generator().manual_seed(0), group=3)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2]) and torch.equal(out[3], out[5])
    assert not torch.equal(out[0], out[3])


def test_lookahead_one_is_plain_sampling_and_k_keeps_the_best_scored_candidate():
    """lookahead = 1 gives the same tokens as plain generation; lookahead = k equals a hand-written
    loop (k candidates per transition, the score_fn's argmax kept, its forward reused), and costs
    1 + k (T - 1) forwards per sample."""
    net, cfg = _net()
    y = torch.tensor([0, 1, 2, 1])
    B, T, k = 4, 3, 3
    sched = nat.heuristic_schedule(T, 1.0, 2.0)
    run = lambda **kw: nat.generate(net, y, T, sched, cfg.mask_id, N, cfg.null_label, torch.Generator().manual_seed(3), **kw)
    score = lambda feats, t: feats.float().mean((1, 2)) + t                 # any function of the state
    assert torch.equal(run(), run(lookahead=1, score_fn=score))

    calls, seen_t = [], []

    def logits_fn(tokens, labels):
        calls.append(tokens.shape[0])
        return net(tokens, labels)

    def score_t(feats, t):
        seen_t.append(t.unique().tolist())
        return score(feats, t)

    got = nat.generate(logits_fn, y, T, sched, cfg.mask_id, N, cfg.null_label, torch.Generator().manual_seed(3),
                       lookahead=k, score_fn=score_t)
    assert calls == [2 * B] + [2 * B * k] * (T - 1) and seen_t == [[1], [2]]

    g = torch.Generator().manual_seed(3)                                    # the reference loop
    tokens = torch.full((B, N), cfg.mask_id)
    both, feats = net(tokens.repeat(2, 1), torch.cat([y, torch.full_like(y, cfg.null_label)]))
    for t in range(T):
        m, tau1, tau2, w = sched(t, nat.NATState(t, tokens, feats, y))
        lc, lu = both[:B], both[B:]
        if t == T - 1:
            tokens = nat.decode_step(tokens, lc, lu, torch.zeros_like(m), tau1, tau2, w, cfg.mask_id, g)
            break
        r = lambda x: x.repeat_interleave(k, 0)
        cand = nat.decode_step(r(tokens), r(lc), r(lu), r(m), r(tau1), r(tau2), r(w), cfg.mask_id, g)   # (B*k, N)
        yk = r(y)
        both_k, feats_k = net(cand.repeat(2, 1), torch.cat([yk, torch.full_like(yk, cfg.null_label)]))
        best = score(feats_k[:B * k], torch.full((B * k,), t + 1)).view(B, k).argmax(1)
        keep = torch.arange(B) * k + best
        tokens, feats = cand[keep], feats_k[:B * k][keep]
        both = torch.cat([both_k[:B * k][keep], both_k[B * k:][keep]])
    assert torch.equal(got, tokens)
    picked = run(lookahead=k, score_fn="random")                           # the control: picks from the stream
    assert torch.equal(picked, run(lookahead=k, score_fn="random")) and not torch.equal(picked, got)
    try:
        nat.generate(net, y, T, sched, cfg.mask_id, N, cfg.null_label, lookahead=2)
        assert False, "lookahead without a score_fn must be refused"
    except ValueError:
        pass
