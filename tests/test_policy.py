"""policy.py: activations, Gaussian closed forms, heuristic residual, smoothing, rollout."""
import math

import pytest
import torch

import nat
import policy


def tiny_nat():
    torch.manual_seed(0)
    cfg = nat.NATConfig(vocab_size=16, num_tokens=16, num_classes=3, dim=32, depth=1, heads=2)
    return nat.NAT(cfg).eval(), cfg


def test_activation_inverts():
    a = torch.tensor([[0.3, 0.5, 2.0, 7.0], [0.99, 1.0, 0.01, 0.2]])
    assert torch.allclose(policy.activation(policy.inverse_activation(a)), a, rtol=1e-5, atol=1e-6)
    # the heuristic's end points are clamped, not -inf
    pre = policy.inverse_activation(torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    assert torch.isfinite(pre).all()
    assert torch.allclose(policy.activation(pre), torch.tensor([[policy.EPS, 1.0, policy.EPS, policy.EPS]]), atol=1e-7)
    # the ODE sampler's two knobs: f = sigmoid (f = 1 on the last step is clamped), w = softplus
    f = torch.tensor([[0.25, 3.0], [1.0, 0.0]])
    back = policy.activation(policy.inverse_activation(f, policy.FLOW_ACTIONS), policy.FLOW_ACTIONS)
    assert torch.allclose(back, torch.tensor([[0.25, 3.0], [1 - policy.EPS, policy.EPS]]), atol=1e-6)
    assert torch.allclose(policy.activation(torch.zeros(2), policy.FLOW_ACTIONS), torch.tensor([0.5, math.log(2)]))


def test_gaussian_closed_forms():
    mu, a, sigma = torch.randn(5, 4), torch.randn(5, 4), 0.37
    ref = torch.distributions.Normal(mu, sigma)
    assert torch.allclose(policy.gaussian_logp(a, mu, sigma), ref.log_prob(a).sum(-1), atol=1e-5)
    assert policy.gaussian_entropy(sigma) == pytest.approx(ref.entropy().sum(-1)[0].item(), abs=1e-5)


@pytest.mark.parametrize("kind", ["adaptive", "static"])
@pytest.mark.parametrize("beta_ema", [0.0, 0.6])
def test_untrained_policy_is_the_heuristic(kind, beta_ema):
    """Zero residual: the actions equal the heuristic's and so do the generated tokens."""
    net, cfg = tiny_nat()
    T = 4
    h = nat.heuristic_table(T, tau2_0=1.0, w_0=3.0)
    h_pre = policy.inverse_activation(h)
    pi = policy.AdaptivePolicy(T, cfg.dim, cfg.num_tokens, width=16, hidden=16) if kind == "adaptive" else policy.StaticPolicy(T)
    labels = torch.tensor([0, 1, 2, 1])
    sched = policy.PolicySchedule(pi, h_pre, beta_ema=beta_ema)
    run = lambda s: nat.generate(net, labels, T, s, cfg.mask_id, cfg.num_tokens, cfg.null_label,
                                 torch.Generator().manual_seed(1))
    got = run(sched)
    executed = torch.stack(sched.executed)                                   # (T, B, 4)
    clamped = policy.activation(h_pre)                                       # the heuristic with its ends clamped
    assert torch.allclose(executed, clamped[:, None].expand_as(executed), atol=1e-6)
    assert torch.equal(got, run(nat.table_schedule(clamped)))
    assert torch.equal(got, run(nat.table_schedule(h)))                      # the clamp changes no token here


def test_untrained_policy_on_a_per_class_start_is_the_class_only_schedule():
    """h_pre (K, T, D): each sample starts from its class's table; zero residual makes the class-only schedule."""
    net, cfg = tiny_nat()
    T = 4
    tables = torch.stack([nat.heuristic_table(T, tau2, w) for w, tau2 in ((0.0, 1.0), (3.0, 4.5), (8.0, 0.25))])   # (K, T, 4)
    labels = torch.tensor([0, 1, 2, 1])
    sched = policy.PolicySchedule(policy.AdaptivePolicy(T, cfg.dim, cfg.num_tokens, width=16, hidden=16),
                                  policy.inverse_activation(tables))
    run = lambda s: nat.generate(net, labels, T, s, cfg.mask_id, cfg.num_tokens, cfg.null_label, torch.Generator().manual_seed(1))
    got = run(sched)
    executed = torch.stack(sched.executed)                                   # (T, B, 4)
    assert torch.allclose(executed, policy.activation(policy.inverse_activation(tables))[labels].transpose(0, 1), atol=1e-6)
    assert torch.equal(got, run(nat.class_table_schedule(tables)))


class Scripted(torch.nn.Module):
    """A 'policy' whose output at step t is a given row: o_t = outs[t]."""

    def __init__(self, outs):
        super().__init__()
        self.outs = outs

    def forward(self, features, t):
        return self.outs[int(t[0])]                                          # t (B,): one step for all


def test_smoothing_is_a_causal_ema_of_the_residual():
    T, B = 5, 3
    outs = torch.randn(T, B, 4)
    h_pre = torch.randn(T, 4)
    state = type("S", (), {"features": torch.zeros(B, 16, 8)})()
    beta = 0.7

    def executed(o):
        s = policy.PolicySchedule(Scripted(o), h_pre, beta_ema=beta)
        return torch.stack([torch.stack(s(t, state), 1) for t in range(T)])  # (T, B, 4)

    a = executed(outs)
    r = outs[0]
    for t in range(T):                                                       # r_t = beta r_{t-1} + (1 - beta) o_t
        r = outs[0] if t == 0 else beta * r + (1 - beta) * outs[t]
        assert torch.allclose(a[t], policy.activation(h_pre[t] + r), atol=1e-6)
    later = outs.clone()
    later[3:] += 5.0                                                         # change the future only
    assert torch.allclose(executed(later)[:3], a[:3])
    assert not torch.allclose(executed(later)[3:], a[3:])


def test_rollout_records_what_ppo_needs():
    net, cfg = tiny_nat()
    T, B = 3, 6
    pi = policy.AdaptivePolicy(T, cfg.dim, cfg.num_tokens, width=16, hidden=16)
    torch.nn.init.normal_(pi.out.weight, std=0.1)                            # a non-trivial policy
    V = policy.AdaptivePolicy(T, cfg.dim, cfg.num_tokens, width=16, hidden=16, out_dim=1)
    h_pre = policy.inverse_activation(nat.heuristic_table(T, 1.0, 2.0))
    g = torch.Generator().manual_seed(0)
    gen = lambda y, s: nat.generate(net, y, T, s, cfg.mask_id, cfg.num_tokens, cfg.null_label, g)
    ro = policy.rollout(pi, V, gen, torch.arange(B) % 3, h_pre, sigma=0.5, generator=g)
    assert ro.features.shape == (T * B, cfg.num_tokens, cfg.dim) and ro.o.shape == (T * B, 4)
    assert torch.equal(ro.t, torch.arange(T).repeat_interleave(B))
    assert ro.actions.shape == (T, B, 4) and (ro.final != cfg.mask_id).all()
    with torch.no_grad():
        mu = pi(ro.features, ro.t)
        active = policy.NAT_ACTIONS.active(T)[ro.t]                          # (T*B, 4)
        assert torch.allclose(ro.logp, policy.gaussian_logp(ro.o, mu, 0.5, active), atol=1e-5)
        assert torch.allclose(ro.value, V(ro.features, ro.t))
        last = ro.t == T - 1                                                 # m and tau2 change nothing there:
        assert torch.allclose(ro.o[last][:, [0, 2]], mu[last][:, [0, 2]], atol=1e-6)   # no noise on them
    assert ro.o.std() > 0.3                                                  # exploration noise is there


def test_dead_knobs_are_masked_out_of_the_log_probability():
    spec = policy.NAT_ACTIONS
    active = spec.active(3)
    assert active[:2].all() and active[2].tolist() == [False, True, False, True]
    assert policy.FLOW_ACTIONS.active(2).tolist() == [[True, True], [False, True]]
    a, mu = torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.zeros(1, 4)
    # by hand: only tau1 and w count, sigma = 1: -(4 + 16) / 2 - 2 * 0.5 log(2 pi)
    want = -(4.0 + 16.0) / 2 - 2 * 0.5 * math.log(2 * math.pi)
    assert policy.gaussian_logp(a, mu, 1.0, active[2:3]).item() == pytest.approx(want)
    assert policy.gaussian_entropy(1.0, active.sum(-1)).tolist() == pytest.approx(
        [4 * (0.5 + 0.5 * math.log(2 * math.pi))] * 2 + [2 * (0.5 + 0.5 * math.log(2 * math.pi))])


def test_policy_rejects_non_square_grids():
    with pytest.raises(ValueError, match="square"):
        policy.AdaptivePolicy(4, 8, 10)


def test_blend_lam0_is_the_main_policy_and_lam1_the_fidelity_policy():
    """AdaGen Eq. 14: executed residual (1 - lam) o_main + lam o_fid; lam = 0 reproduces the main
    policy's actions bit for bit, lam = 1 the fidelity policy's; per-sample lam mixes rows."""
    T, C, N, B = 3, 8, 16, 4
    torch.manual_seed(0)
    main, fid_pi = (policy.AdaptivePolicy(T, C, N, width=8, hidden=8) for _ in range(2))
    for p in (main, fid_pi):                                                 # non-zero residuals
        torch.nn.init.normal_(p.out.weight, std=0.5)
    h_pre = policy.inverse_activation(nat.heuristic_table(T, 1.0, 2.0))
    state = type("S", (), {"features": torch.randn(B, N, C)})()

    def actions(sched):
        return torch.stack([torch.stack(sched(t, state), 1) for t in range(T)])   # (T, B, 4)

    a_main, a_fid = actions(policy.PolicySchedule(main, h_pre)), actions(policy.PolicySchedule(fid_pi, h_pre))
    assert not torch.allclose(a_main, a_fid)
    assert torch.equal(actions(policy.PolicySchedule(fid_pi, h_pre, base=main, lam=0.0)), a_main)
    assert torch.allclose(actions(policy.PolicySchedule(fid_pi, h_pre, base=main, lam=1.0)), a_fid, atol=1e-6)
    mixed = actions(policy.PolicySchedule(fid_pi, h_pre, base=main, lam=torch.tensor([0.0, 1.0, 0.0, 1.0])))
    assert torch.equal(mixed[:, 0], a_main[:, 0]) and torch.allclose(mixed[:, 1], a_fid[:, 1], atol=1e-6)
    half = actions(policy.PolicySchedule(fid_pi, h_pre, base=main, lam=0.5))
    o_m = torch.stack([main(state.features, torch.full((B,), t)) for t in range(T)])
    o_f = torch.stack([fid_pi(state.features, torch.full((B,), t)) for t in range(T)])
    assert torch.allclose(half, policy.activation(h_pre[:, None] + 0.5 * (o_m + o_f)), atol=1e-6)
