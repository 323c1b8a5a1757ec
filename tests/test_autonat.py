"""AutoNAT search: the finite-difference estimator, projection, parametric family, Beta line search."""
import math

import pytest
import torch

import autonat
import nat


def test_xi_table_round_trip_and_layout():
    table = nat.heuristic_table(4, 1.0, 5.0)                                # (4, 4)
    xi = autonat.table_to_xi(table)
    assert torch.equal(xi[:4], table[:, 0]) and torch.equal(xi[12:], table[:, 3])   # [m..., ..., w...]
    assert torch.equal(autonat.xi_to_table(xi), table)


def test_fd_gradient_recovers_known_gradient():
    # F(xi) = sum a_i xi_i^2 + b . xi: forward differences have error a_i eps_i, exact in the limit.
    T = 3
    torch.manual_seed(0)
    a, b = torch.rand(4 * T), torch.randn(4 * T)
    F = lambda X: (a * X ** 2).sum(1) + X @ b                               # (C, D) -> (C,)
    xi = torch.randn(4 * T)
    active = autonat.free_coordinates(T)
    for eps_scale in (1e-2, 1e-3):
        eps = autonat.step_sizes(T, eps_scale, 2 * eps_scale)
        g = autonat.fd_gradient(F(autonat.candidates(xi, eps, active)), eps, active)
        exact = 2 * a * xi + b
        assert torch.allclose(g[active], (exact + a * eps)[active], atol=1e-3)   # the known O(eps) bias
        assert (g[~active] == 0).all()
    assert active.sum() == 4 * T - 2


def test_candidates_perturb_one_coordinate_each():
    xi, eps = torch.zeros(8), torch.arange(1.0, 9.0)
    active = autonat.free_coordinates(2)                                    # m_1 and tau2_1 fixed
    C = autonat.candidates(xi, eps, active)
    assert C.shape == (1 + 6, 8) and (C[0] == 0).all()
    assert ((C[1:] != 0).sum(1) == 1).all()
    assert set(C[1:].nonzero()[:, 1].tolist()) == set(active.nonzero()[:, 0].tolist())


def test_projection_keeps_every_schedule_valid():
    torch.manual_seed(0)
    for T in (2, 4, 8):
        for _ in range(50):
            table = autonat.project_table(torch.randn(T, 4) * 3)
            m = table[:, 0]
            assert (m[:-1] > 0).all() and (m[:-1] < 1).all() and m[-1] == 0
            assert (m[1:] < m[:-1]).all()
            assert (table[:, 1:] >= 0).all()
    valid = nat.heuristic_table(8, 1.0, 5.0)
    assert torch.allclose(autonat.project_table(valid), valid, atol=1e-6)                # valid points are fixed points


def test_parametric_family_starts_at_the_heuristic():
    for T in (4, 8):
        table = autonat.parametric_table(autonat.parametric_init(1.0, 5.0), T)
        assert torch.allclose(table, nat.heuristic_table(T, 1.0, 5.0), atol=1e-6)
    theta = autonat.project_params(torch.tensor([-1.0, -2.0, 3.0, 0.0, 1.0, -1.0]))
    assert theta[0] >= 0.05 and theta[1] == 0 and theta[3] >= 0.05 and theta[5] == 0


def test_fd_search_descends_a_quadratic_and_respects_projection():
    target = torch.tensor([0.5, 2.0, -1.0])                                  # the last coordinate is clamped at 0
    F = lambda X: ((X - target) ** 2).sum(1)
    best, curve = autonat.fd_search(F, torch.zeros(3), eps=torch.full((3,), 1e-3), lr=torch.full((3,), 0.2),
                                    project=lambda x: x.clamp_min(0), updates=40, momentum=0.5)
    assert torch.allclose(best, torch.tensor([0.5, 2.0, 0.0]), atol=1e-2)
    assert curve[-1] < curve[0] and curve[-1] <= min(curve) + 1e-4


def test_momentum_step_and_clip():
    xi, v = torch.zeros(2), torch.tensor([1.0, 0.0])
    g = torch.tensor([30.0, 40.0])                                          # norm 50 -> clipped to 5
    xi2, v2 = autonat.momentum_step(xi, v, g, torch.tensor([1.0, 0.1]), momentum=0.5, clip=5.0)
    assert torch.allclose(v2, torch.tensor([0.5 + 3.0, 4.0]))
    assert torch.allclose(xi2, torch.tensor([-3.5, -0.4]))


def test_beta_line_search_finds_the_grid_minimum_and_replays_from_cache():
    calls = []

    def F(alpha, beta):                                                     # minimum at ratio 3, beta 2
        calls.append((alpha, beta))
        return (alpha / beta - 3) ** 2 + (beta - 2) ** 2

    (alpha, beta), cache = autonat.beta_line_search(F, budget=20)
    assert math.isclose(alpha / beta, 3) and math.isclose(beta, 2)
    n = len(calls)
    assert n == len(cache) <= 20
    again, _ = autonat.beta_line_search(F, budget=20, cache=dict(cache))    # resume: nothing re-trained
    assert again == (alpha, beta) and len(calls) == n
    (a2, b2), small = autonat.beta_line_search(F, budget=2)                 # the budget caps trainings
    assert len(small) == 2


def test_interleaved_candidates_equal_one_at_a_time_and_dedup_is_exact():
    """One search update as one batch: candidate c of the interleaved batch (group = C) decodes
    exactly as table c alone with the same seed (common random numbers), and running the
    generator once per distinct row (nat.dedup_logits_fn) changes nothing but the cost."""
    torch.manual_seed(0)
    cfg = nat.NATConfig(vocab_size=16, num_tokens=16, dim=32, depth=1, heads=2)
    net = nat.NAT(cfg).eval()
    T, n = 3, 5
    X = autonat.candidates(autonat.table_to_xi(nat.heuristic_table(T, 1.0, 2.0)), autonat.step_sizes(T, 0.2, 0.5),
                           autonat.free_coordinates(T))
    tables = torch.stack([autonat.xi_to_table(x) for x in X])             # (C, T, 4)
    C = len(tables)
    labels = torch.arange(n) % 10
    rows = []

    def counting(tok, y):
        rows.append(len(tok))
        return net(tok, y)

    def gen(fn, y, sched, group):
        return nat.generate(fn, y, T, sched, cfg.mask_id, 16, cfg.null_label, torch.Generator().manual_seed(3), group)

    batched = gen(counting, labels.repeat_interleave(C), nat.table_schedule(tables), C).view(n, C, 16)
    plain = sum(rows)
    rows.clear()
    deduped = gen(nat.dedup_logits_fn(counting), labels.repeat_interleave(C), nat.table_schedule(tables), C)
    assert torch.equal(deduped.view(n, C, 16), batched) and sum(rows) < plain / 2
    for c in range(C):
        alone = gen(net, labels, nat.table_schedule(tables[c]), 1)
        assert torch.equal(alone, batched[:, c])


def test_signed_steps_keep_every_candidate_valid():
    T = 4
    table = autonat.project_table(torch.tensor([[0.98, 1, 1, 0], [0.90, 1, 1, 1], [0.88, 1, 1, 2], [0.0, 1, 1, 3]]))
    xi, eps = autonat.table_to_xi(table), autonat.step_sizes(T, 0.03, 0.1)
    e = autonat.signed_steps(xi, eps)
    assert e[0] < 0 and e[1] > 0 and e[2] < 0                               # no room above m_0 (1) and m_2 (m_1)
    assert (e[T:] == eps[T:]).all()
    for cand in autonat.candidates(xi, e, autonat.free_coordinates(T)):
        t = autonat.xi_to_table(cand)
        assert torch.allclose(autonat.project_table(t), t, atol=1e-6)     # already valid
    g = autonat.fd_gradient(torch.tensor([1.0] + [1.0 + 0.5 * i for i in range(1, 15)]), e, autonat.free_coordinates(T))
    assert g[0] == pytest.approx(0.5 / -0.03)                               # divided by the signed step
