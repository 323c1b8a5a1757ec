"""var.py (VAR's multi-scale tokenizer, the next-scale transformer, sampling with per-sample knobs): the
block-causal mask, the quantizer's sums, the filters' limits, guidance only where w != 0, batch = loop."""
import torch
import torch.nn.functional as F

import var


def small_var(V: int = 16, C: int = 4, classes: int = 3) -> tuple[var.MultiScaleQuantizer, var.VAR]:
    torch.manual_seed(0)
    return var.MultiScaleQuantizer(V, C), var.VAR(var.VARConfig(V, C, classes, dim=16, depth=2, heads=2))


def smooth_maps(B: int = 4, C: int = 4) -> torch.Tensor:
    """Feature maps (B, C, 8, 8) with most energy at low frequencies, like an encoder's."""
    return F.interpolate(torch.randn(B, C, 3, 3), size=(8, 8), mode="bicubic") + 0.1 * torch.randn(B, C, 8, 8)


def test_offsets_count_155_tokens():
    assert var.offsets() == [0, 1, 5, 14, 30, 55, 91, 155]


def test_block_causal_mask_later_scales_never_reach_earlier_logits():
    quant, net = small_var()
    codes = torch.randint(0, 16, (2, 155))
    labels = torch.tensor([0, 2])
    x_in = quant.next_inputs(codes)                                           # (2, 154, 4)
    logits = net(x_in, labels)[0]
    o = var.offsets()
    for k in range(1, len(var.SCALES)):                                        # change scale k's inputs (and all later)
        x2 = x_in.clone()
        x2[:, o[k] - 1:] = torch.randn_like(x2[:, o[k] - 1:])
        l2 = net(x2, labels)[0]
        assert torch.equal(l2[:, :o[k]], logits[:, :o[k]])                    # scales < k: bit-equal
        assert not torch.allclose(l2[:, o[k]:o[k + 1]], logits[:, o[k]:o[k + 1]])
    assert torch.equal(net(x_in[:, :o[3] - 1], labels)[0], logits[:, :o[3]])   # a prefix alone: the same logits


def test_quantizer_f_hat_is_the_sum_of_its_scales_and_the_residual_shrinks():
    torch.manual_seed(1)
    quant = var.MultiScaleQuantizer(4096, 4)
    f = smooth_maps()
    with torch.no_grad():                                                     # a codebook dense at every magnitude
        quant.embedding.weight.copy_(torch.randn(4096, 4) * torch.rand(4096, 1))
    f_hat, codes, loss = quant(f)
    sums = quant.partial_sums(codes, 8)
    contributions = [quant.contribution(codes[:, a:b], k, 8) for k, (a, b) in enumerate(zip(var.offsets(), var.offsets()[1:]))]
    assert torch.allclose(f_hat, sum(contributions), atol=1e-5) and torch.allclose(f_hat, sums[-1], atol=1e-5)
    residual = [(f - s).norm().item() for s in sums]
    assert all(b < a for a, b in zip([f.norm().item()] + residual, residual)), residual
    assert torch.isfinite(loss) and codes.shape == (4, 155)


def test_top_k_one_and_top_p_zero_give_the_argmax():
    torch.manual_seed(2)
    l = torch.randn(3, 5, 20)
    one = torch.ones(3)
    for k_frac, p in ((torch.full((3,), 1e-3), one), (one, torch.full((3,), 1e-6))):
        kept = var.filter_logits(l, k_frac, p, one)
        assert torch.equal(torch.isfinite(kept), F.one_hot(l.argmax(-1), 20).bool())
        g = -torch.log(-torch.log(torch.rand(3, 5, 20)))
        assert torch.equal((kept + g).argmax(-1), l.argmax(-1))


def test_top_k_and_top_p_keep_what_they_say():
    l = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]]))                   # probabilities, sorted
    one = torch.ones(1)
    count = lambda k_frac, p: torch.isfinite(var.filter_logits(l, torch.tensor([k_frac]), torch.tensor([p]), one)).sum().item()
    assert [count(k / 4, 1.0) for k in (1, 2, 3, 4)] == [1, 2, 3, 4]
    assert [count(1.0, p) for p in (0.4, 0.6, 0.8, 0.9, 0.99)] == [1, 2, 2, 3, 4]   # the smallest prefix with mass >= p
    assert count(0.5, 0.99) == 2                                             # top-k first, then the nucleus


def test_sampling_follows_the_softmax_of_the_kept_logits():
    """4 000 draws of scale 1's token: frequencies near softmax(l / tau) over the kept tokens (here the top half)."""
    quant, net = small_var()
    labels = torch.zeros(4000, dtype=torch.long)
    table = var.default_table(w_max=0.0, k_frac=0.5, p=1.0, tau=0.7)
    with torch.no_grad():
        codes, _ = var.generate(net, quant, labels, var.table_schedule(table), null_label=3,
                                generator=torch.Generator().manual_seed(0))
        l = net(torch.zeros(1, 0, 4), labels[:1])[0][0, 0]                          # (V,) scale 1's logits
    expect = var.filter_logits(l.view(1, 1, -1), torch.tensor([0.5]), torch.ones(1), torch.tensor([0.7])).view(-1).softmax(0)
    freq = torch.bincount(codes[:, 0], minlength=16).float() / 4000
    assert (expect > 0).sum() == 8 and (freq[expect == 0] == 0).all()
    assert (freq - expect).abs().max() < 0.03, (freq, expect)


def test_guidance_runs_the_null_class_only_where_w_is_not_zero():
    quant, net = small_var()
    null_rows = []

    def logits_fn(x_in, labels, past):
        null_rows.append(int((labels == 3).sum()))
        return net(x_in, labels, past)
    labels = torch.tensor([0, 1, 2, 0])
    w = torch.tensor([0.0, 1.0, 0.0, 2.0])                                    # two guided rows
    sched = lambda k, state: (w, 0.5, 0.9, 1.0)
    var.generate(logits_fn, quant, labels, sched, null_label=3, generator=torch.Generator().manual_seed(0))
    assert null_rows == [0, 2] * len(var.SCALES)                              # a conditional forward, then 2 null rows
    null_rows.clear()
    var.generate(logits_fn, quant, labels, var.table_schedule(var.default_table(w_max=0.0)), null_label=3)
    assert null_rows == [0] * len(var.SCALES)


def test_per_sample_knobs_equal_a_loop_over_samples():
    """Each row's own [w, k_frac, p, tau] (per-class tables): the batch gives what each row gives alone."""
    quant, net = small_var()
    tables = torch.stack([var.default_table(w_max=w, k_frac=kf, p=p, tau=t)
                          for w, kf, p, t in ((0.0, 1.0, 1.0, 1.0), (2.0, 1 / 16, 0.9, 0.5), (1.0, 0.5, 1e-6, 2.0))])
    sched = var.table_schedule(tables)                                        # (3 classes, K, 4)
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        l = net(torch.zeros(3, 0, 4), labels)[0]                              # the first scale's logits
    tau = tables[labels, 0, 3]
    kept = var.filter_logits(l, tables[labels, 0, 1], tables[labels, 0, 2], tau)
    for i in range(3):
        alone = var.filter_logits(l[i:i + 1], tables[i:i + 1, 0, 1], tables[i:i + 1, 0, 2], tau[i:i + 1])
        assert torch.equal(kept[i:i + 1], alone)
    # whole generations: top-k = 1 everywhere (no sampling noise), guidance per row
    greedy = tables.clone()
    greedy[:, :, 1] = 1e-3
    with torch.no_grad():
        batch, f_hat = var.generate(net, quant, labels, var.table_schedule(greedy), null_label=3)
        for i in range(3):
            alone, f_i = var.generate(net, quant, labels[i:i + 1], var.table_schedule(greedy), null_label=3)
            assert torch.equal(batch[i:i + 1], alone) and torch.allclose(f_hat[i:i + 1], f_i, atol=1e-5)


def test_kv_cache_gives_the_whole_prefix_logits():
    """Scale by scale with the cache = one call on the whole prefix (the block-causal mask)."""
    quant, net = small_var()
    codes, labels = torch.randint(0, 16, (2, 155)), torch.tensor([1, 0])
    x_in, o = quant.next_inputs(codes), var.offsets()
    with torch.no_grad():
        whole = net(x_in, labels)[0]
        cache, parts = None, []
        for k in range(len(var.SCALES)):
            logits, _, cache = net(x_in[:, max(0, o[k] - 1):o[k + 1] - 1], labels, cache)
            parts.append(logits)
    assert torch.allclose(torch.cat(parts, 1), whole, atol=1e-5)


def test_generate_equals_a_whole_prefix_loop_when_guidance_switches_on_and_off():
    """Greedy decoding (top-k = 1) with w switching per row and scale (rows whose null-class cache is stale run on
    the whole prefix) against a plain loop that runs both classes on the whole prefix at every scale."""
    quant, net = small_var()
    w = torch.tensor([[0, 1, 0, 2, 0, 1, 1], [0] * 7, [1] * 7], dtype=torch.float)        # per class, per scale
    tables = var.default_table().repeat(3, 1, 1)
    tables[:, :, 0], tables[:, :, 1] = w, 1e-3
    labels = torch.tensor([0, 1, 2, 0, 2])
    with torch.no_grad():
        codes, f_hat = var.generate(net, quant, labels, var.table_schedule(tables), null_label=3)
        x_all, f_ref, ref = torch.zeros(5, 0, 4), torch.zeros(5, 4, 8, 8), []
        for k, s in enumerate(var.SCALES):
            l_c, l_u = (net(x_all, y)[0][:, -s * s:] for y in (labels, torch.full_like(labels, 3)))
            wk = w[labels, k].view(-1, 1, 1)
            q = ((1 + wk) * l_c - wk * l_u).argmax(-1)
            ref.append(q)
            f_ref = f_ref + quant.contribution(q, k, 8)
            if k + 1 < len(var.SCALES):
                x_all = torch.cat([x_all, F.interpolate(f_ref, size=var.SCALES[k + 1], mode="area").flatten(2).transpose(1, 2)], 1)
    assert torch.equal(codes, torch.cat(ref, 1)) and torch.allclose(f_hat, f_ref, atol=1e-5)


def test_group_rows_share_the_noise_and_training_loss_is_finite():
    quant, net = small_var()
    labels = torch.tensor([1, 1, 2, 2])
    codes, _ = var.generate(net, quant, labels, var.table_schedule(var.default_table()), null_label=3,
                            generator=torch.Generator().manual_seed(0), group=2)
    assert torch.equal(codes[0], codes[1]) and torch.equal(codes[2], codes[3])
    loss = var.var_loss(net, codes, quant.next_inputs(codes), labels, null_label=3)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in net.parameters())
