"""samplers.py: solver orders on analytic Gaussian data, path conversions, the timestep MDP."""
import pytest
import torch

import policy
import samplers as S


@pytest.mark.parametrize("path,grid,low,high", [("flow", "uniform", 1.75, 2.3), ("vp", "sqrt", 1.85, 2.3)])
def test_solver_orders(path, grid, low, high):
    """Final error against the exact ODE solution falls as T^-1 (Euler) and T^-2 (Heun, DPM-Solver++(2S))."""
    orders = S.measured_orders(path, (8, 16, 32, 64), grid)
    assert 0.9 < orders["euler"] < 1.1
    assert low < orders["heun"] < high and low < orders["dpmpp2s"] < high


def test_fine_heun_reaches_the_exact_solution():
    """The closed forms agree with each other: a fine solve of the exact network lands on the exact map."""
    for path in ("flow", "vp"):
        assert S.solver_errors(path, "heun", (512,), "sqrt")[0] < 1e-5


@pytest.mark.parametrize("name", ["flow", "vp"])
def test_x0_conversion_inverts_the_forward_process(name):
    path = S.PATHS[name]
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([1e-3, 0.1, 0.3, 0.5, 0.9, 0.999])
    x = path.x_t(x0, eps, t)
    x0_hat, eps_hat = path.x0_eps(path.target(x0, eps, t), x, t)
    assert torch.allclose(x0_hat, x0, atol=1e-3) and torch.allclose(eps_hat, eps, atol=1e-4)
    a, s = path.alpha(t), path.sigma(t)
    assert torch.allclose(path.t_of_lam(torch.log(a) - torch.log(s)), t, atol=1e-5)   # lambda is invertible
    da, ds = path.derivatives(t)                                                   # against finite differences
    h = 1e-3
    assert torch.allclose(da, (path.alpha(t + h) - path.alpha(t - h)) / (2 * h), rtol=1e-2, atol=1e-3)
    assert torch.allclose(ds[1:], ((path.sigma(t + h) - path.sigma(t - h)) / (2 * h))[1:], rtol=1e-2, atol=1e-3)


def _record_times(schedule, T, B=5, solver="euler"):
    times = []

    def fn(x, t, y):
        times.append(t.clone())
        return torch.zeros_like(x)
    S.sample(fn, torch.randn(B, 2), torch.zeros(B, dtype=torch.long), T, schedule, solver)
    return torch.stack(times + [torch.zeros(B)])          # (T + 1, B) for Euler: every evaluation time + the end


def test_any_action_sequence_gives_a_valid_grid():
    """Random, even extreme, per-sample actions: strictly decreasing times, > 0 until the last step, 0 at the end."""
    g = torch.Generator().manual_seed(0)
    T, B = 6, 7
    pre = torch.randn(T, B, generator=g) * 20                                      # sigmoid saturates either way

    def schedule(k, state):
        f = torch.sigmoid(pre[k])
        return S.next_time(state.t, f, k == T - 1), torch.zeros(B)
    t = _record_times(schedule, T, B)
    assert (t[1:] < t[:-1]).all() and (t[:-1] > 0).all() and (t[-1] == 0).all() and (t[0] == 1).all()


@pytest.mark.parametrize("grid_name", list(S.GRIDS))
@pytest.mark.parametrize("kind", ["adaptive", "static"])
def test_untrained_policy_reproduces_the_heuristic_grid(grid_name, kind):
    """policy.py's residual on h = [fractions(grid), w] with a zero output follows the grid."""
    T, B = 5, 4
    for path in ("flow", "vp"):
        grid = S.GRIDS[grid_name](T, S.PATHS[path])
        assert grid[0] == 1 and grid[-1] == 0 and (grid[1:] < grid[:-1]).all()
        w = S.guidance_table(grid, 2.0, (0.1, 0.8))                                 # guidance in an interval
        h_pre = policy.inverse_activation(torch.stack([S.fractions(grid), w], 1), policy.FLOW_ACTIONS)   # (T, 2)
        pi = (policy.AdaptivePolicy(T, 8, 16, width=8, hidden=8, out_dim=2) if kind == "adaptive"
              else policy.StaticPolicy(T, out_dim=2))
        sched = policy.PolicySchedule(pi, h_pre, spec=policy.FLOW_ACTIONS, to_step=S.actions_to_step(T))
        feats = torch.randn(B, 16, 8)
        t_table = _record_times(S.heuristic_schedule(grid), T, B)
        t_policy = _record_times(lambda k, st: sched(k, S.FlowState(k, st.x, st.t, feats, st.labels)), T, B)
        assert torch.allclose(t_policy, t_table, rtol=1e-5, atol=1e-7)
        assert torch.allclose(t_table[:, 0], grid, atol=1e-7)
        executed_w = torch.stack(sched.executed)[:, :, 1]                          # (T, B)
        assert torch.allclose(executed_w, w[:, None].expand(T, B), atol=2e-3)     # w = 0 -> softplus(inverse(EPS))


def test_guidance_zero_equals_conditional_only():
    def fn(x, t, y):                                                               # the null class moves elsewhere
        return x * (1 + y.float()[:, None]) + t[:, None]
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 3])
    for solver in S.SOLVERS:
        sched = S.heuristic_schedule(S.uniform_grid(3), w_0=0.0)
        a = S.sample(fn, x, y, 3, sched, solver, null_label=9)
        b = S.sample(fn, x, y, 3, sched, solver, null_label=None)
        assert torch.equal(a, b)
        c = S.sample(fn, x, y, 3, S.heuristic_schedule(S.uniform_grid(3), w_0=1.0), solver, null_label=9)
        assert not torch.allclose(a, c)


def test_nfe_and_the_last_step():
    """Euler T evaluations, Heun and DPM-Solver++(2S) 2T - 1 (first-order last step); a schedule that
    stops short of t = 0 or does not decrease is refused."""
    fn = lambda x, t, y: x
    x, y = torch.randn(3, 2), torch.zeros(3, dtype=torch.long)
    for solver in S.SOLVERS:
        nfe = []
        S.sample(fn, x, y, 4, S.heuristic_schedule(S.uniform_grid(4)), solver, nfe=nfe)
        assert len(nfe) == (4 if solver == "euler" else 7)
    short = S.table_schedule(S.grid_table(torch.tensor([1.0, 0.5, 0.1]), 0.0))
    with pytest.raises(ValueError, match="land on t = 0"):
        S.sample(fn, x, y, 2, short, "euler")
    up = S.table_schedule(S.grid_table(torch.tensor([1.0, 1.0, 0.0]), 0.0))
    with pytest.raises(ValueError, match="t_next < t"):
        S.sample(fn, x, y, 2, up, "heun")


def test_flow_sampling_is_finite_at_both_ends():
    """The flow starts at alpha = 0 (lambda = -inf) and ends at sigma = 0 (lambda = +inf): no NaN."""
    data = S.GaussianData(torch.zeros(4), torch.ones(4) * 0.5)
    for path in ("flow", "vp"):
        fn = data.network(S.PATHS[path])
        x = S.sample(lambda x, t, y: fn(x, t).float(), torch.randn(8, 4), torch.zeros(8, dtype=torch.long), 2,
                     S.heuristic_schedule(S.uniform_grid(2)), "dpmpp2s", path=path)
        assert torch.isfinite(x).all()


def test_interleaved_tables():
    """(C, T, 2) tables: row b follows table[b % C], the same as each table alone."""
    fn = lambda x, t, y: x * t[:, None]
    tables = torch.stack([S.grid_table(S.uniform_grid(3), 0.0), S.grid_table(S.edm_grid(3), 0.0)])
    x, y = torch.randn(4, 2), torch.zeros(4, dtype=torch.long)
    both = S.sample(fn, x, y, 3, S.table_schedule(tables), "heun")
    for c in range(2):
        alone = S.sample(fn, x[c::2], y[c::2], 3, S.table_schedule(tables[c]), "heun")
        assert torch.allclose(both[c::2], alone)


def test_training_loss_prefers_the_exact_network():
    g = torch.Generator().manual_seed(0)
    data = S.GaussianData(torch.randn(8, generator=g), 0.3 + torch.rand(8, generator=g))
    x0 = (data.mu + data.s * torch.randn(4096, 8, generator=g, dtype=torch.float64)).float()
    for name in ("flow", "vp"):
        path = S.PATHS[name]
        exact = lambda x, t, y: data.network(path)(x, t).float()
        off = lambda x, t, y: exact(x, t, y) + 0.1
        y = torch.zeros(4096, dtype=torch.long)
        l_exact = S.training_loss(exact, path, x0, y, torch.Generator().manual_seed(1))
        l_off = S.training_loss(off, path, x0, y, torch.Generator().manual_seed(1))
        assert torch.isfinite(l_exact) and l_exact < l_off
