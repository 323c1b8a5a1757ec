"""AutoNAT (Ni et al., CVPR 2024): searching a NAT's generation strategy and its training strategy.

Generation strategy (§4.2, appendix A.2). For T steps the schedule is one vector
    xi = [r, tau1, tau2, s] = [m_0..m_{T-1}, tau1_0..tau1_{T-1}, tau2_0..tau2_{T-1}, w_0..w_{T-1}]
(the paper's mask ratio r and guidance scale s are our m and w; as a table it is (T, 4) with
columns [m, tau1, tau2, w], nat.heuristic_table's layout). FID F is not differentiable in xi,
so its gradient is estimated by forward finite differences (Eq. 4)
    dF/dxi_i ~ (F(xi + eps_i e_i) - F(xi)) / eps_i,
with common random numbers (every candidate decodes with the same seed; a backward difference
where a forward step would leave the valid set), and xi follows
gradient descent with momentum (Eq. 5 plus a heavy ball), projected back onto the valid set
(m strictly decreasing in (0, 1); tau1, tau2, w >= 0) after every update. Two coordinates are
never perturbed: m_{T-1} (the last step decodes everything: m = 0) and tau2_{T-1} (with
nothing left masked, re-masking noise changes nothing), so one update costs 4T - 1 FIDs.

A parametric family (not in the paper; a user's tuned hand-written rule):
    m_t = cos(pi/2 * r_t^p), tau1_t = tau1_start + (tau1_end - tau1_start) t/(T-1),
    tau2_t = tau2_0 (1 - r_t), w_t = w_max (t/T)^q, with r_t = (t+1)/T,
searched with the same estimator over theta = [p, tau2_0, w_max, q, tau1_start, tau1_end];
p = q = 1, tau1 = 1 is the AdaNAT heuristic.

The same search serves an ODE sampler's schedule (AdaGen's continuous paradigm; the
Align-Your-Steps-style optimised grid): a (T, 2) table [t_next, w] whose first column plays
m's part (strictly decreasing in (0, 1), exactly 0 at the last step), so every helper below
takes the number of columns K (4: the NAT, 2: the sampler) and one update costs 2T - 1 FIDs.

Training strategy (§4.3): the mask ratio distribution p(r) = Beta(alpha, beta), chosen by a
greedy line search in (alpha/beta, beta) with step 1 (appendix A.2), one coordinate at a
time until neither improves (`beta_line_search`).

Only torch is imported: the objective F arrives as a callable.
"""
import math
from typing import Callable

import torch

COLUMNS = ("m", "tau1", "tau2", "w")
PARAMS = ("p", "tau2_0", "w_max", "q", "tau1_start", "tau1_end")


# ----------------------------------------------------------------------------- the free schedule xi

def table_to_xi(table: torch.Tensor) -> torch.Tensor:
    """(T, K) table -> xi (KT,) = [m, tau1, tau2, w] (or [t_next, w]), each block over t."""
    return table.t().reshape(-1).clone()


def xi_to_table(xi: torch.Tensor, K: int = 4) -> torch.Tensor:
    """xi (KT,) -> (T, K) table."""
    return xi.view(K, -1).t().clone()


def free_coordinates(T: int, K: int = 4) -> torch.Tensor:
    """(KT,) bool: the coordinates that change the generation: all but the first column's last
    entry (m_{T-1} = 0, t_T = 0: forced), and for the NAT tau2_{T-1} (nothing is re-masked)."""
    active = torch.ones(K, T, dtype=torch.bool)
    active[0, T - 1] = False          # m / t_next at the last step is forced to 0
    if K == 4:
        active[2, T - 1] = False      # tau2 at the last step: nothing is re-masked
    return active.reshape(-1)


def project_table(table: torch.Tensor, gap: float = 1e-3) -> torch.Tensor:
    """The nearest-by-clamping valid schedule: first column (m, or the sampler's t_next) below 1,
    strictly decreasing by >= gap down to exactly 0 at the last step (room is left for the later
    steps), every other column >= 0."""
    T = table.shape[0]
    out = table.clone().float()
    out[:, 1:] = out[:, 1:].clamp_min(0.0)
    prev = 1.0
    for t in range(T - 1):
        lo = gap * (T - 1 - t)                                  # m_t must leave room for T-1-t more steps
        out[t, 0] = min(max(out[t, 0].item(), lo), prev - gap)
        prev = out[t, 0].item()
    out[T - 1, 0] = 0.0
    return out


def signed_steps(xi: torch.Tensor, eps: torch.Tensor, gap: float = 1e-3, K: int = 4) -> torch.Tensor:
    """eps with the sign of a mask-ratio step flipped where m_t + eps would leave the valid set
    (m_t + eps > m_{t-1} - gap, or m_0 + eps > 1 - gap) and there is more room below: a backward
    difference there, so the candidates stay valid schedules whenever either side has room.
    The other columns have no upper bound and keep +eps."""
    T = len(xi) // K
    m = xi[:T]                                                               # m_{T-1} = 0 is never perturbed
    room_up = torch.cat([torch.ones(1), m[:-1]]) - gap - m                   # (T,)
    room_down = m - torch.cat([m[1:], torch.zeros(1)]) - gap
    flip = (room_up < eps[:T]) & (room_down > room_up)
    out = eps.clone()
    out[:T] = torch.where(flip, -eps[:T], eps[:T])
    return out


def step_sizes(T: int, eps_m: float, eps: float, K: int = 4) -> torch.Tensor:
    """(KT,) finite-difference steps: eps_m for the first column (mask ratios; appendix: 0.01),
    eps for the others (0.1)."""
    return torch.tensor([eps_m] * T + [eps] * ((K - 1) * T))


# ----------------------------------------------------------------------------- the parametric family

def parametric_table(theta: torch.Tensor, T: int) -> torch.Tensor:
    """theta (6,) = [p, tau2_0, w_max, q, tau1_start, tau1_end] -> (T, 4) table."""
    p, tau2_0, w_max, q, tau1_start, tau1_end = theta.float().tolist()
    t = torch.arange(T, dtype=torch.float32)
    r = (t + 1) / T
    m = torch.cos(math.pi / 2 * r ** p)
    m[-1] = 0.0
    tau1 = tau1_start + (tau1_end - tau1_start) * t / max(T - 1, 1)
    tau2 = tau2_0 * (1 - r)
    w = w_max * (t / T) ** q
    return torch.stack([m, tau1, tau2, w], 1)


def parametric_init(tau2_0: float, w_0: float) -> torch.Tensor:
    """theta that reproduces nat.heuristic_table(T, tau2_0, w_0, tau1=1) for every T."""
    return torch.tensor([1.0, tau2_0, w_0, 1.0, 1.0, 1.0])


def project_params(theta: torch.Tensor) -> torch.Tensor:
    """p, q >= 0.05 (a ramp, not a step); tau2_0, w_max, tau1 >= 0."""
    lo = torch.tensor([0.05, 0.0, 0.0, 0.05, 0.0, 0.0])
    return torch.maximum(theta, lo)


# ----------------------------------------------------------------------------- the estimator and the update

def candidates(xi: torch.Tensor, eps: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """(1 + A, D): xi, then xi + eps_i e_i for each of the A active coordinates i."""
    idx = active.nonzero()[:, 0]                                          # (A,)
    out = xi.repeat(1 + len(idx), 1)                                      # (1+A, D)
    out[1 + torch.arange(len(idx)), idx] += eps[idx]
    return out


def fd_gradient(F: torch.Tensor, eps: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """F (1 + A,): F(xi) then F(xi + eps_i e_i) in `candidates` order -> gradient (D,), 0 off `active`."""
    g = torch.zeros(len(eps))
    idx = active.nonzero()[:, 0]
    g[idx] = (F[1:].float() - F[0]) / eps[idx]
    return g


def momentum_step(xi: torch.Tensor, v: torch.Tensor, g: torch.Tensor, lr: torch.Tensor, momentum: float,
                  clip: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """v <- mu v + g (g rescaled to norm <= clip when clip > 0); xi <- xi - lr * v. Returns (xi, v);
    the caller projects xi."""
    if clip > 0 and g.norm() > clip:
        g = g * (clip / g.norm())
    v = momentum * v + g
    return xi - lr * v, v


def fd_update(F: Callable[[torch.Tensor], torch.Tensor], xi: torch.Tensor, v: torch.Tensor, eps: torch.Tensor,
              lr: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor], momentum: float = 0.0,
              active: torch.Tensor | None = None, clip: float = 0.0):
    """One update: F on xi and its 1 + A perturbations (one call: F maps (C, D) -> (C,)), the
    finite-difference gradient, a momentum step, the projection.
    Returns (new xi, new velocity, F values (C,) with F(xi) first, gradient (D,))."""
    active = torch.ones(len(xi), dtype=torch.bool) if active is None else active
    values = F(candidates(xi, eps, active))
    g = fd_gradient(values, eps, active)
    xi, v = momentum_step(xi, v, g, lr, momentum, clip)
    return project(xi), v, values, g


def fd_search(F: Callable[[torch.Tensor], torch.Tensor], xi: torch.Tensor, eps: torch.Tensor, lr: torch.Tensor,
              project: Callable[[torch.Tensor], torch.Tensor], updates: int, momentum: float = 0.0,
              active: torch.Tensor | None = None, clip: float = 0.0) -> tuple[torch.Tensor, list[float]]:
    """The whole search in one call (train.py runs the same updates with checkpoints and a progress bar).
    Returns the best xi seen and F(xi) per update."""
    v = torch.zeros_like(xi)
    best, best_F, curve = xi, math.inf, []
    for _ in range(updates):
        new, v, values, _ = fd_update(F, xi, v, eps, lr, project, momentum, active, clip)
        curve.append(float(values[0]))
        if values[0] < best_F:
            best, best_F = xi, float(values[0])
        xi = new
    return best, curve


# ----------------------------------------------------------------------------- the Beta mask-ratio line search

def beta_line_search(F: Callable[[float, float], float], ratio: float = 1.0, beta: float = 1.0, step: float = 1.0,
                     budget: int = 8, cache: dict | None = None) -> tuple[tuple[float, float], dict]:
    """Greedy coordinate line search over (alpha/beta, beta) (AutoNAT §4.3, appendix A.2).

    F(alpha, beta) trains a generator with p(r) = Beta(alpha, beta) and returns its FID. Starting
    from (ratio, beta), walk one coordinate by +-step while F improves, then the other; stop when a
    round over both coordinates improves nothing or `budget` evaluations are spent. A value that
    would be <= 0 is halved instead. `cache` maps "ratio,beta" -> F and is filled in place, so a
    search re-run with the same cache replays its finished evaluations (resume).
    Returns ((alpha, beta) of the best point, cache)."""
    cache = {} if cache is None else cache

    def f(x: tuple[float, float]):
        key = f"{x[0]:g},{x[1]:g}"
        if key not in cache:
            if sum(1 for _ in cache) >= budget:
                return None                                             # out of budget
            cache[key] = float(F(x[0] * x[1], x[1]))
        return cache[key]

    best = (ratio, beta)
    best_F = f(best)
    improved_any = True
    while improved_any and best_F is not None:
        improved_any = False
        for coord in (0, 1):
            for direction in (+1, -1):
                moved = False
                while True:
                    x = list(best)
                    x[coord] = x[coord] + direction * step if x[coord] + direction * step > 0 else x[coord] / 2
                    x = tuple(x)
                    value = f(x)
                    if value is None or value >= best_F:
                        break
                    best, best_F, moved = x, value, True
                if moved:
                    improved_any = True
                    break                                               # this direction helped: next coordinate
        if len(cache) >= budget:
            break
    return (best[0] * best[1], best[1]), cache


if __name__ == "__main__":
    # the search on a known answer: F(xi) = |xi - (0.3, 0.6, 0.9)|^2, projected onto xi >= 0
    target = torch.tensor([0.3, 0.6, 0.9])
    F = lambda X: ((X - target) ** 2).sum(1)                               # (C, 3) candidates -> (C,)
    best, curve = fd_search(F, torch.zeros(3), eps=torch.full((3,), 1e-3), lr=torch.full((3,), 0.2),
                            project=lambda x: x.clamp_min(0), updates=30, momentum=0.5)
    print(f"F per update: {curve[0]:.3f} -> {curve[-1]:.5f}; best xi {[round(v, 3) for v in best.tolist()]}")
    assert curve[-1] < 1e-3 and torch.allclose(best, target, atol=0.03)
