"""ODE samplers for rectified flow and VP diffusion over per-sample time grids, and their MDP.

Implements
- two probability paths x_t = alpha_t x0 + sigma_t eps on the same data, t = 1 noise, t = 0 data
  (AdaGen §III-A):
  * rectified flow (SiT's convention): alpha_t = 1 - t, sigma_t = t; the network predicts the
    velocity v = eps - x0 (the loss is ||v_theta(x_t, t) - (eps - x0)||^2);
  * VP diffusion with DDPM's linear beta schedule in continuous time (Song et al. 2021,
    beta_min = 0.1, beta_max = 20): log alpha_t = -beta_min t / 2 - (beta_max - beta_min) t^2 / 4,
    sigma_t = sqrt(1 - alpha_t^2); the network predicts eps (the loss is ||eps_theta - eps||^2);
  each with its conversion of the network output to the data prediction x0_hat and eps_hat,
  and the probability-flow ODE dx/dt = alpha'_t x0_hat + sigma'_t eps_hat (the flow's is v);
- three solvers over **per-sample** time grids (every time a (B,) tensor):
  * Euler: x_{t'} = x_t + (t' - t) dx/dt, one network evaluation (NFE) per step;
  * Heun (EDM's 2nd order): Euler predictor, trapezoidal corrector with dx/dt at t';
  * DPM-Solver++(2S) (Lu et al. 2022, Algorithm 1 with r = 1/2): in lambda = log(alpha/sigma),
    h = lambda_{t'} - lambda_t, the intermediate u at lambda_t + h/2,
        x_u  = (sigma_u / sigma_t) x_t - alpha_u (e^{-h/2} - 1) x0_hat(x_t, t)
        x_t' = (sigma_t' / sigma_t) x_t - alpha_t' (e^{-h} - 1) x0_hat(x_u, u);
    from the flow's t = 1 (alpha = 0, lambda = -inf, so h = inf) the lambda-midpoint does not
    exist: there the step is the integral of x0_hat over y = alpha/sigma = e^lambda in [0, y_t'],
    and u is put at its midpoint y_t'/2 (lambda_t' - log 2), exact for x0_hat linear in y;
  every solver's last step lands on t = 0 with a first-order step (sigma_0 = 0, lambda = +inf:
  DPM-Solver++ is unstable there, and Heun's corrector would need dx/dt at the data end), so
  Heun and DPM-Solver++(2S) cost 2T - 1 NFE for T steps and Euler T;
- classifier-free guidance on the network output, out = out_c + w (out_c - out_u), with a (B,)
  scale w, the conditional and null-class rows in one batched forward (counted as one NFE);
- heuristic grids (uniform in t, uniform in log-SNR, EDM's rho = 7 grid) and guidance
  (constant, or only inside an interval of t: Kynkaanniemi et al. 2024);
- the timestep MDP (AdaGen §III-C, Appendix B): step k's action is (a) the fraction
  f = sigmoid(a_f) of the remaining interval [0, t_k] to cross, clamped to [F_MIN, 1 - F_MIN],
  so t_{k+1} = t_k (1 - f) > 0 and strictly below t_k, and t_T = 0 on the last step whatever the
  action, and (b) the guidance scale w = softplus(a_w) (policy.FLOW_ACTIONS). A grid's fractions
  f_k = 1 - t_{k+1}/t_k are its zero-residual point: `table_schedule(grid_table(grid, w))` and a
  policy on h = [fractions(grid), w] whose residual is zero give the same grid (`actions_to_step`).

- the continuous generator (`FlowTransformer`): a class-conditional transformer on pixel patches
  that predicts v (or eps on the VP path); time and class enter as two extra tokens (U-ViT), any
  (B, L, C) -> (B, L, C) block (nat.Block here); its final patch features are the state the policy
  observes.

Usage:
    x0 = sample(velocity_fn, torch.randn(B, C, H, W), labels, T=4,
                schedule=heuristic_schedule(uniform_grid(4), w_0=1.5), solver="dpmpp2s",
                null_label=10)                                  # velocity_fn(x, t, labels) -> v
    python samplers.py                                          # the solvers' measured orders
"""
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

SOLVERS = ("euler", "heun", "dpmpp2s")
F_MIN = 1e-3                       # the time fraction of one step is clamped to [F_MIN, 1 - F_MIN]


# ----------------------------------------------------------------------------- probability paths

class Path:
    """x_t = alpha_t x0 + sigma_t eps for t in [0, 1]; t = 0 data, t = 1 (nearly) pure noise.

    A path (FlowPath, VPPath) defines `name`, `prediction` (what the network predicts: "v" or
    "eps"), alpha(t), sigma(t), derivatives(t) -> (alpha'_t, sigma'_t), target(x0, eps, t) (the
    network's regression target at (x_t, t)), x0_eps(out, x, t) -> (x0_hat, eps_hat) and
    t_of_lam(lambda); what follows is shared."""

    def x_t(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _b(self.alpha(t), x0) * x0 + _b(self.sigma(t), x0) * eps

    def ode_velocity(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """dx/dt of the probability-flow ODE = alpha'_t x0_hat + sigma'_t eps_hat."""
        x0, eps = self.x0_eps(out, x, t)
        da, ds = self.derivatives(t)
        return _b(da, x) * x0 + _b(ds, x) * eps

    def lam(self, t: torch.Tensor) -> torch.Tensor:
        """log-SNR lambda_t = log(alpha_t / sigma_t): -inf where alpha = 0, +inf at t = 0."""
        return torch.log(self.alpha(t)) - torch.log(self.sigma(t))


class FlowPath(Path):
    """Rectified flow: alpha_t = 1 - t, sigma_t = t, v = eps - x0."""
    name, prediction = "flow", "v"

    def alpha(self, t):
        return 1 - t

    def sigma(self, t):
        return t

    def derivatives(self, t):
        return -torch.ones_like(t), torch.ones_like(t)

    def target(self, x0, eps, t):
        return eps - x0

    def x0_eps(self, out, x, t):
        tb = _b(t, x)
        return x - tb * out, x + (1 - tb) * out

    def ode_velocity(self, out, x, t):
        return out

    def t_of_lam(self, lam):
        return torch.sigmoid(-lam)                                          # (1 - t) / t = e^lambda


class VPPath(Path):
    """VP diffusion, linear beta schedule in continuous time; the network predicts eps."""
    name, prediction = "vp", "eps"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.b0, self.b1 = beta_min, beta_max

    def log_alpha(self, t):
        return -0.5 * self.b0 * t - 0.25 * (self.b1 - self.b0) * t ** 2

    def alpha(self, t):
        return torch.exp(self.log_alpha(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2 * self.log_alpha(t)))              # sqrt(1 - alpha^2), exact near t = 0

    def derivatives(self, t):
        dlog = -0.5 * self.b0 - 0.5 * (self.b1 - self.b0) * t                # d log(alpha) / dt
        a, s = self.alpha(t), self.sigma(t)
        return a * dlog, -a * a * dlog / s.clamp_min(1e-12)                  # sigma' = -alpha alpha' / sigma

    def target(self, x0, eps, t):
        return eps

    def x0_eps(self, out, x, t):
        return (x - _b(self.sigma(t), x) * out) / _b(self.alpha(t), x), out

    def t_of_lam(self, lam):
        # log alpha^2 = -log(1 + e^{-2 lambda}) =: -c, solve (b1 - b0)/2 t^2 + b0 t - c = 0
        c = F.softplus(-2 * lam)
        a = 0.5 * (self.b1 - self.b0)
        return 2 * c / (self.b0 + torch.sqrt(self.b0 ** 2 + 4 * a * c))


PATHS = {"flow": FlowPath(), "vp": VPPath()}


def _b(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1), broadcastable against x (B, ...)."""
    return v.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def training_loss(net_fn: Callable, path: Path, x0: torch.Tensor, labels: torch.Tensor,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Mean squared error of the network's prediction at x_t, t ~ U(0, 1), eps ~ N(0, I)."""
    B = x0.shape[0]
    t = torch.rand(B, device=x0.device, generator=generator) * (1 - 1e-3) + 1e-3 * (path.name == "vp")  # (B,)
    eps = torch.randn(x0.shape, device=x0.device, generator=generator)
    return (net_fn(path.x_t(x0, eps, t), t, labels) - path.target(x0, eps, t)).pow(2).mean()


# ----------------------------------------------------------------------------- grids and schedules

def uniform_grid(T: int) -> torch.Tensor:
    """t_k = 1 - k/T, k = 0..T: (T + 1,)."""
    return torch.linspace(1, 0, T + 1)


def logsnr_grid(T: int, path: Path, t_min: float = 1e-3) -> torch.Tensor:
    """T + 1 points uniform in lambda from lambda(1) to lambda(t_min), the ends then set to 1 and 0:
    (T + 1,). The flow's lambda(1) = -inf, so it starts from -lambda(t_min) (= lambda(1 - t_min))."""
    hi = path.lam(torch.tensor(t_min, dtype=torch.float64))
    lo = path.lam(torch.tensor(1.0, dtype=torch.float64))
    lo = -hi if torch.isinf(lo) else lo
    t = path.t_of_lam(torch.linspace(0, 1, T + 1, dtype=torch.float64) * (hi - lo) + lo)
    t[0], t[-1] = 1.0, 0.0
    return t.float()


def edm_grid(T: int, rho: float = 7.0, t_min: float = 2e-3) -> torch.Tensor:
    """Karras et al.'s rho = 7 spacing, here in t from 1 to t_min, then the last step to 0:
    t_k = (1 + k/(T-1) (t_min^{1/rho} - 1))^rho, k = 0..T-1; (T + 1,). (EDM spaces sigma/alpha
    from sigma_max = 80; starting at t = 1 keeps every sampler on the same pure-noise start.)"""
    k = torch.arange(T, dtype=torch.float64)
    t = (1 + k / max(T - 1, 1) * (t_min ** (1 / rho) - 1)) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)]).float()


GRIDS = {"uniform": lambda T, path: uniform_grid(T), "logsnr": logsnr_grid, "edm": lambda T, path: edm_grid(T)}


def guidance_table(grid: torch.Tensor, w_0: float, interval: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """w_k = w_0 where the step starts inside (t_lo, t_hi] of the interval, else 0: (T,)."""
    t = grid[:-1]
    return torch.where((t > interval[0]) & (t <= interval[1]), torch.tensor(float(w_0)), torch.tensor(0.0))


def grid_table(grid: torch.Tensor, w: torch.Tensor | float) -> torch.Tensor:
    """A static schedule as a (T, 2) table of [t_next, w] per step (grid (T + 1,), w (T,) or scalar)."""
    T = len(grid) - 1
    w = torch.as_tensor(w, dtype=torch.float32).expand(T)
    return torch.stack([grid[1:].float(), w], 1)


def fractions(grid: torch.Tensor) -> torch.Tensor:
    """The MDP's first action of a grid: f_k = 1 - t_{k+1}/t_k, (T,) (the last is 1)."""
    return 1 - grid[1:] / grid[:-1]


def next_time(t: torch.Tensor, f: torch.Tensor, last: bool) -> torch.Tensor:
    """t_{k+1} = t_k (1 - f), f clamped to [F_MIN, 1 - F_MIN]: strictly inside (0, t_k); 0 on the last step."""
    if last:
        return torch.zeros_like(t)
    return t * (1 - f.clamp(F_MIN, 1 - F_MIN))


def grid_of_fractions(f: torch.Tensor) -> torch.Tensor:
    """The time grids that executed fractions f (T, n) give from t = 1: (T + 1, n), t_T = 0."""
    T = f.shape[0]
    t = [torch.ones_like(f[0])]
    for k in range(T):
        t.append(next_time(t[-1], f[k], k == T - 1))
    return torch.stack(t)


def actions_to_step(T: int) -> Callable:
    """The MDP's executed actions a (B, 2) = [f, w] at step k -> the schedule's (t_next, w):
    for policy.PolicySchedule(..., spec=policy.FLOW_ACTIONS, to_step=actions_to_step(T))."""
    def to_step(k: int, state: "FlowState", a: torch.Tensor):
        return next_time(state.t, a[:, 0].to(state.t.dtype), k == T - 1), a[:, 1].to(state.t.dtype)
    return to_step


@dataclass
class FlowState:
    """What a schedule may look at before choosing step k's actions."""
    k: int
    x: torch.Tensor           # (B, ...) current sample x_{t_k}
    t: torch.Tensor           # (B,) current time t_k
    features: Optional[torch.Tensor]   # (B, L, C) the network's final-LayerNorm features at (x, t), conditional
    labels: torch.Tensor      # (B,)


Schedule = Callable[[int, FlowState], tuple[torch.Tensor, torch.Tensor]]


def table_schedule(table: torch.Tensor) -> Schedule:
    """A static schedule from a (T, 2) table of [t_next, w] shared by all samples, or (C, T, 2):
    C schedules interleaved along the batch, row b follows table[b % C] (a search update)."""
    tables = table if table.dim() == 3 else table[None]                      # (C, T, 2)
    C = tables.shape[0]

    def schedule(k: int, state: FlowState):
        B = state.x.shape[0]
        if B % C:
            raise ValueError(f"batch of {B} rows is not a multiple of the {C} interleaved schedules")
        rows = tables[:, k].to(state.x.device, state.t.dtype).repeat(B // C, 1)   # (B, 2)
        return rows[:, 0], rows[:, 1]
    return schedule


FLOW_INTERVAL = (0.1, 0.8)           # guidance only for t in (0.1, 0.8] (Kynkaanniemi et al. 2024)


def heuristic_schedule(grid: torch.Tensor, w_0: float = 0.0, interval: tuple[float, float] = (0.0, 1.0)) -> Schedule:
    return table_schedule(grid_table(grid, guidance_table(grid, w_0, interval)))


# ----------------------------------------------------------------------------- sampling

def _net_outputs(velocity_fn: Callable, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                 null_label: Optional[int]) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(out_c, out_u or None, features of the conditional rows or None): one batched forward."""
    def call(xx, tt, yy):
        r = velocity_fn(xx, tt, yy)
        return r if isinstance(r, tuple) else (r, None)
    if null_label is None:
        out, feats = call(x, t, labels)
        return out, None, feats
    B = x.shape[0]
    out, feats = call(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, null_label)]))
    return out[:B], out[B:], (feats[:B] if feats is not None else None)


def _guided(out_c: torch.Tensor, out_u: Optional[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    return out_c if out_u is None else out_c + _b(w, out_c) * (out_c - out_u)


@torch.no_grad()
def sample(velocity_fn: Callable, x: torch.Tensor, labels: torch.Tensor, T: int, schedule: Schedule,
           solver: str = "euler", null_label: Optional[int] = None, path: Path | str = "flow",
           nfe: Optional[list] = None) -> torch.Tensor:
    """T solver steps from x (B, ...) at t = 1 to t = 0; returns x0 (B, ...).

    velocity_fn(x, t (B,), labels (B,)) -> the network output in the path's prediction (flow:
    the velocity v = eps - x0; VP: eps), or (output, features (B, L, C)). schedule(k, state) ->
    (t_next, w), both (B,), 0 <= t_next < t, t_next = 0 at k = T - 1 (checked). With null_label,
    guidance out = out_c + w (out_c - out_u) in one batched forward. nfe: a list that gets one
    entry per network evaluation (a guided pair counts once)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver {solver!r}: use one of {', '.join(SOLVERS)}")
    path = PATHS[path] if isinstance(path, str) else path
    B = x.shape[0]
    t = torch.ones(B, device=x.device, dtype=x.dtype)                       # (B,) times follow x's dtype
    for k in range(T):
        out_c, out_u, feats = _net_outputs(velocity_fn, x, t, labels, null_label)
        if nfe is not None:
            nfe.append(k)
        t_next, w = schedule(k, FlowState(k, x, t, feats, labels))
        t_next = t_next.to(x.device, x.dtype)
        last = k == T - 1
        if bool(((t_next >= t) | (t_next < 0) | ((t_next != 0) & last)).any()):   # one host sync per step
            if last and bool((t_next != 0).any()):
                raise ValueError(f"the schedule's last step must land on t = 0 (got max {t_next.max().item():.3g})")
            raise ValueError(f"step {k}: the schedule must give 0 <= t_next < t")
        out = _guided(out_c, out_u, w)
        if solver == "euler" or last:                                         # first order; lands on t = 0
            x = _first_order(path, solver, out, x, t, t_next)
        elif solver == "heun":
            d1 = path.ode_velocity(out, x, t)
            x_e = x + _b(t_next - t, x) * d1
            o2c, o2u, _ = _net_outputs(velocity_fn, x_e, t_next, labels, null_label)
            d2 = path.ode_velocity(_guided(o2c, o2u, w), x_e, t_next)
            x = x + _b(t_next - t, x) * 0.5 * (d1 + d2)
        else:
            x0_s, _ = path.x0_eps(out, x, t)
            u = _dpm_midpoint(path, t, t_next)
            x_u = _dpm_first_order(path, x, x0_s, t, u)
            o2c, o2u, _ = _net_outputs(velocity_fn, x_u, u, labels, null_label)
            x0_u, _ = path.x0_eps(_guided(o2c, o2u, w), x_u, u)
            x = _dpm_first_order(path, x, x0_u, t, t_next)
        if solver != "euler" and not last and nfe is not None:
            nfe.append(k)
        t = t_next
    return x


def _first_order(path: Path, solver: str, out, x, t, t_next):
    """Euler for Euler and Heun; for DPM-Solver++ its own first-order step (DDIM in data
    prediction), which on the flow path equals Euler. At t_next = 0 both land on the data end."""
    if solver == "dpmpp2s":
        x0, _ = path.x0_eps(out, x, t)
        return _dpm_first_order(path, x, x0, t, t_next)
    return x + _b(t_next - t, x) * path.ode_velocity(out, x, t)


def _dpm_first_order(path: Path, x, x0, s, t):
    """x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0, h = lambda_t - lambda_s, written as
    x_t = (sigma_t / sigma_s) x_s + (alpha_t - alpha_s sigma_t / sigma_s) x0: finite at t = 0 (sigma = 0)
    and at the flow's s = 1 (alpha = 0)."""
    ratio = path.sigma(t) / path.sigma(s)
    return _b(ratio, x) * x + _b(path.alpha(t) - path.alpha(s) * ratio, x) * x0


def _dpm_midpoint(path: Path, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The time u of DPM-Solver++(2S)'s intermediate point: lambda_u = (lambda_s + lambda_t)/2, or
    lambda_t - log 2 where lambda_s = -inf (the flow's t = 1; see the module docstring)."""
    ls, lt = path.lam(s.double()), path.lam(t.double())
    lu = torch.where(torch.isinf(ls), lt - math.log(2), 0.5 * (ls + lt))
    return path.t_of_lam(lu).to(s.dtype).clamp(max=1.0)


def steps_for_nfe(solver: str, nfe: int) -> int:
    """The most steps whose network evaluations fit in `nfe` (Heun and DPM-Solver++(2S): 2T - 1 <= nfe)."""
    return nfe if solver == "euler" else (nfe + 1) // 2


# ----------------------------------------------------------------------------- the analytic check

class GaussianData:
    """x0 ~ N(mu, diag(s^2)): the exact network outputs of both paths and the exact ODE solution.
    With x_t = alpha x0 + sigma eps, x_t ~ N(alpha mu, alpha^2 s^2 + sigma^2); the probability-flow
    ODE maps x_1 to x_t = alpha_t mu + std_t / std_1 (x_1 - alpha_1 mu) (an affine flow)."""

    def __init__(self, mu: torch.Tensor, s: torch.Tensor):
        self.mu, self.s = mu.double(), s.double()                             # (D,), (D,)

    def std(self, path: Path, t: torch.Tensor) -> torch.Tensor:               # (B,) -> (B, D)
        a, sg = path.alpha(t)[:, None], path.sigma(t)[:, None]
        return torch.sqrt(a ** 2 * self.s ** 2 + sg ** 2)

    def network(self, path: Path) -> Callable:
        """The exact E[target | x_t = x] of the path's prediction: (x (B, D), t (B,), labels) -> (B, D)."""
        def fn(x, t, labels=None):
            x, t = x.double(), t.double()
            a, sg = path.alpha(t)[:, None], path.sigma(t)[:, None]
            var = a ** 2 * self.s ** 2 + sg ** 2
            r = x - a * self.mu
            x0 = self.mu + a * self.s ** 2 / var * r                          # E[x0 | x_t]
            eps = sg / var * r                                                # E[eps | x_t]
            return (eps - x0) if path.prediction == "v" else eps
        return fn

    def solution(self, path: Path, x1: torch.Tensor) -> torch.Tensor:
        one = torch.ones(x1.shape[0], dtype=torch.float64)
        a1 = path.alpha(one)[:, None]
        return self.mu + self.s / self.std(path, one) * (x1.double() - a1 * self.mu)


def power_grid(T: int, p: float = 2.0) -> torch.Tensor:
    """t_k = (1 - k/T)^p: p = 2 is uniform in sqrt(t), where the VP path's ODE solution is smooth
    (sigma_t ~ sqrt(beta_min t) near the data end makes it ~ sqrt(t) there)."""
    return torch.linspace(1, 0, T + 1) ** p


ORDER_GRIDS = {"uniform": uniform_grid, "sqrt": power_grid}


def solver_errors(path: Path | str, solver: str, steps: tuple = (8, 16, 32, 64), grid: str = "uniform",
                  dim: int = 16, n: int = 256, seed: int = 0) -> list[float]:
    """Mean |x0_solver - x0_exact| on Gaussian data, per number of steps; grid in ORDER_GRIDS."""
    path = PATHS[path] if isinstance(path, str) else path
    g = torch.Generator().manual_seed(seed)
    data = GaussianData(torch.randn(dim, generator=g), 0.2 + 1.8 * torch.rand(dim, generator=g))
    x1 = torch.randn(n, dim, generator=g, dtype=torch.float64)
    labels = torch.zeros(n, dtype=torch.long)
    exact = data.solution(path, x1)
    errs = []
    for T in steps:
        sched = heuristic_schedule(ORDER_GRIDS[grid](T).double())
        x0 = sample(data.network(path), x1, labels, T, sched, solver, None, path)       # float64 throughout
        errs.append((x0 - exact).abs().mean().item())
    return errs


def measured_orders(path: Path | str, steps: tuple = (8, 16, 32, 64), grid: str = "uniform") -> dict:
    """solver -> least-squares slope of log(error) against log(1/T) (the convergence order)."""
    out = {}
    for solver in SOLVERS:
        e = torch.tensor(solver_errors(path, solver, steps, grid), dtype=torch.float64).log()
        x = -torch.tensor(steps, dtype=torch.float64).log()
        out[solver] = (((x - x.mean()) * (e - e.mean())).sum() / ((x - x.mean()) ** 2).sum()).item()
    return out


ORDER_CASES = (("flow", "uniform"), ("vp", "sqrt"), ("vp", "uniform"))   # (path, grid); the last shows VP's order loss



def init_weights(m: nn.Module) -> None:
    """Linear and embedding weights ~ truncated N(0, 0.02), biases 0 (as the NAT)."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.trunc_normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


@dataclass
class FlowConfig:
    img_size: int = 32
    channels: int = 1
    patch: int = 4               # 32x32 pixels -> 64 patches of 4x4
    num_classes: int = 10
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    class_drop: float = 0.1      # probability of the null class in training (for CFG)
    path: str = "flow"           # "flow" (predicts v = eps - x0) or "vp" (predicts eps); see samplers.py

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch) ** 2

    @property
    def null_label(self) -> int:
        return self.num_classes


def time_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000 as in DDPM/DiT): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    a = 1000 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(a), torch.sin(a)], dim=-1)


class FlowTransformer(nn.Module):
    """Transformer blocks over [time token, class token, 64 pixel patches] (U-ViT's conditioning as tokens).

    block(dim, heads, mlp_ratio, dropout) -> a (B, L, C) -> (B, L, C) module (this project: nat.Block,
    the NAT's pre-LayerNorm block). forward(x (B,C,H,W), t (B,), labels (B,)) -> (prediction (B,C,H,W),
    features (B,P,C)): the velocity (flow path) or the noise (VP path), and the final LayerNorm's output
    at the P patch positions (the state the AdaGen policy observes, as for the NAT)."""

    def __init__(self, cfg: FlowConfig, block: Callable[[int, int, float, float], nn.Module]):
        super().__init__()
        self.cfg = cfg
        pdim = cfg.channels * cfg.patch ** 2
        self.patch_in = nn.Linear(pdim, cfg.dim)
        self.time_mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.GELU(), nn.Linear(cfg.dim, cfg.dim))
        self.cls_emb = nn.Embedding(cfg.num_classes + 1, cfg.dim)    # + null class
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.num_patches + 2, cfg.dim))
        self.blocks = nn.ModuleList(block(cfg.dim, cfg.heads, cfg.mlp_ratio, 0.0) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, pdim)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.pos_emb, std=0.02)
        nn.init.zeros_(self.head.weight)                              # predicts 0 at initialisation

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, P, C p p)."""
        B, C, H, W = x.shape
        p = self.cfg.patch
        return x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)

    def unpatchify(self, y: torch.Tensor) -> torch.Tensor:
        """(B, P, C p p) -> (B, C, H, W)."""
        c, p, n = self.cfg.channels, self.cfg.patch, self.cfg.img_size // self.cfg.patch
        B = y.shape[0]
        return y.view(B, n, n, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, c, n * p, n * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tt = self.time_mlp(time_embedding(t, self.cfg.dim).to(self.patch_in.weight.dtype))      # (B, C)
        h = torch.cat([tt[:, None], self.cls_emb(labels)[:, None], self.patch_in(self.patchify(x))], 1) + self.pos_emb
        for blk in self.blocks:
            h = blk(h)                                                 # (B, P+2, C)
        f = self.norm(h[:, 2:]).float()                                # (B, P, C)
        with torch.autocast(f.device.type, enabled=False):            # fp32 output: guidance amplifies rounding
            return self.unpatchify(self.head(f)), f


def flow_net_fn(net: FlowTransformer, class_drop: float = 0.0):
    """(x, t, labels) -> prediction, for samplers.training_loss: labels dropped to the null class
    with probability class_drop (training for classifier-free guidance)."""
    def fn(x, t, labels):
        if class_drop > 0:
            drop = torch.rand(labels.shape, device=labels.device) < class_drop
            labels = labels.masked_fill(drop, net.cfg.null_label)
        return net(x, t, labels)[0]
    return fn

if __name__ == "__main__":
    steps = (8, 16, 32, 64)
    print(f"Solvers on Gaussian data (16 dims, exact network output, exact ODE solution), T = {steps}:")
    print("order = slope of log(mean |x0 - x0_exact|) against log T")
    for name, grid in ORDER_CASES:
        orders = measured_orders(name, steps, grid)
        for solver in SOLVERS:
            errs = solver_errors(name, solver, steps, grid)
            print(f"  {name:4s} {grid:7s} grid  {solver:8s} order {orders[solver]:.2f}   errors "
                  + "  ".join(f"{e:.2e}" for e in errs))
