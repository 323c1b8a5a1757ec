"""Generation policies for the NAT and ODE-sampler MDPs (AdaNAT §4.2, Eq. 4-9; AdaGen §III-C,
§III-E Eq. 12, §III-F2 Eq. 14, App. B).

The MDP: state s_t = (t, v^(t)) observed through the frozen generator's final-LayerNorm
features f_theta(v^(t)) (B, N, C); action a_t = step t's knobs, described by an ActionSpec:
the NAT's four [m, tau1, tau2, w] (the columns of nat.heuristic_table), or an ODE sampler's two
[f, w] (the fraction of the remaining time crossed and the guidance scale, samplers.py);
reward only at the end (a discriminator's score of the finished image, reward.py);
deterministic generator, stochastic agent pi_phi(a_t | s_t) = N(eta_phi(s_t), sigma^2 I) in
pre-activation space, the mean at test time.

Heuristic residual (AdaGen App. B): the network eta_phi outputs o_t, added to the
pre-activation of the hand-written schedule h_t, then squashed by each knob's activation

    a_t = act(h_pre_t + r_t),   h_pre_t = act^{-1}(heuristic_t),
    act = [sigmoid, softplus x 3] (NAT) or [sigmoid, softplus] (ODE sampler)

so a network whose (zero-initialised) output layer still outputs 0 reproduces the heuristic.
Fidelity blend (AdaGen §III-F2, Eq. 14): a second, fidelity-oriented policy o_fid is mixed
with the frozen main policy's o_main in pre-activation space, (1 - lam) o_main + lam o_fid on
the same h_pre (`blend`; PolicySchedule(fid_policy, h_pre, base=main_policy, lam=lam)).

EMA action smoothing (AdaGen Eq. 12) filters the residual causally,
r_t = beta_ema r_{t-1} + (1 - beta_ema) o_t (r_0 = o_0), which is the same as smoothing
the executed pre-activations with the heuristic pre-compensated: o = 0 still gives the
heuristic exactly, and beta_ema = 0 is the unsmoothed policy.

Usage (policy.py imports torch only; the generator arrives as a callable):
    pi, V = AdaptivePolicy(T, C, N), AdaptivePolicy(T, C, N, out_dim=1)   # or StaticPolicy(T)
    h_pre = inverse_activation(nat.heuristic_table(T, 1.0, 5.0))          # (T, 4)
    gen = lambda labels, schedule: nat.generate(logits_fn, labels, T, schedule, mask_id, N, null, g)
    ro = rollout(pi, V, gen, labels, h_pre, sigma=0.6)                     # ro.tokens -> reward
    tokens = gen(labels, PolicySchedule(pi, h_pre))                        # evaluation: the mean action
"""
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-3                               # heuristics are clamped into (EPS, 1-EPS) / [EPS, inf) before inversion


@dataclass(frozen=True)
class ActionSpec:
    """The knobs of one step: names and squashing ("sigmoid" -> (0, 1), "softplus" -> (0, inf)),
    and the knobs that change nothing at the last step (`dead_last`: the NAT's m, forced to 0, and
    tau2, with nothing left to rank; the ODE sampler's f, since t' = 0 there)."""
    names: tuple
    squash: tuple
    dead_last: tuple = ()

    @property
    def dim(self) -> int:
        return len(self.names)

    def active(self, T: int, device=None) -> torch.Tensor:
        """(T, D) bool: which knobs of which step act on the generation. Dead ones get no
        exploration noise and stay out of the log-probabilities, the entropy and the anchor."""
        mask = torch.ones(T, self.dim, dtype=torch.bool, device=device)
        for name in self.dead_last:
            mask[T - 1, self.names.index(name)] = False
        return mask

    def is_sigmoid(self, device=None) -> torch.Tensor:
        return torch.tensor([s == "sigmoid" for s in self.squash], device=device)


NAT_ACTIONS = ActionSpec(("m", "tau1", "tau2", "w"), ("sigmoid", "softplus", "softplus", "softplus"), ("m", "tau2"))
FLOW_ACTIONS = ActionSpec(("f", "w"), ("sigmoid", "softplus"), ("f",))   # samplers.py: t' = t (1 - f), guidance w
VAR_ACTIONS = ActionSpec(("w", "k_frac", "p", "tau"), ("softplus", "sigmoid", "sigmoid", "softplus"))   # var.py: every
                                        # knob acts at every scale (each scale samples its tokens), so none is dead
ACTIONS = NAT_ACTIONS.names             # column order of nat.heuristic_table and of every (.., 4) NAT tensor


def activation(pre: torch.Tensor, spec: ActionSpec = NAT_ACTIONS) -> torch.Tensor:
    """(..., D) pre-activations -> actions (NAT: m = sigmoid, tau1 = tau2 = w = softplus)."""
    return torch.where(spec.is_sigmoid(pre.device), torch.sigmoid(pre), F.softplus(pre))


def inverse_activation(a: torch.Tensor, spec: ActionSpec = NAT_ACTIONS) -> torch.Tensor:
    """(..., D) actions -> pre-activations. Sigmoid knobs are clamped to [EPS, 1-EPS] and softplus
    knobs to >= EPS first, because heuristics reach m = 0, f = 1 and tau2 = w = 0 (the inverse
    would be infinite)."""
    a = a.float()
    p = a.clamp(EPS, 1 - EPS)
    q = a.clamp_min(EPS)
    return torch.where(spec.is_sigmoid(a.device), torch.log(p) - torch.log1p(-p), q + torch.log(-torch.expm1(-q)))


def gaussian_logp(a: torch.Tensor, mu: torch.Tensor, sigma: float, active: Optional[torch.Tensor] = None) -> torch.Tensor:
    """log N(a; mu, sigma^2 I) summed over the last dim: (B, D), (B, D) -> (B,); with `active`
    (B, D) bool, over the active dimensions only (the density of the knobs that act)."""
    w = torch.ones_like(a) if active is None else active.to(a.dtype)
    D = w.sum(-1)                                                       # (B,) active dimensions
    return -(w * (a - mu) ** 2).sum(-1) / (2 * sigma ** 2) - D * (math.log(sigma) + 0.5 * math.log(2 * math.pi))


def gaussian_entropy(sigma: float, D=len(ACTIONS)):
    """Entropy of N(mu, sigma^2 I_D): D (1/2 + 1/2 log 2 pi + log sigma); D an int or a (B,) tensor."""
    return D * (0.5 + 0.5 * math.log(2 * math.pi) + math.log(sigma))


# ----------------------------------------------------------------------------- networks

class AdaLN(nn.Module):
    """LayerNorm whose shift and scale come from the step embedding (zero-initialised: starts as plain LN)."""

    def __init__(self, dim: int, emb: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.mod = nn.Linear(emb, 2 * dim)
        nn.init.zeros_(self.mod.weight)
        nn.init.zeros_(self.mod.bias)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = self.mod(e).chunk(2, dim=-1)                 # (B, dim) each
        if x.dim() == 3:
            shift, scale = shift[:, None], scale[:, None]
        return self.norm(x) * (1 + scale) + shift


class AdaptivePolicy(nn.Module):
    """eta_phi(s_t): features (B, N, C) and step t (B,) -> (B, out_dim) (AdaNAT App. A, scaled down).

    Linear C -> width, AdaLN(t), as the sqrt(N) x sqrt(N) grid: depthwise 3x3 stride-2 conv,
    GELU, pointwise conv to `conv_out` channels, flatten, Linear -> hidden, AdaLN(t), GELU,
    zero-initialised Linear -> out_dim. out_dim = 4 is the policy (residuals o_t), out_dim = 1
    the critic V(s_t) (same trunk, separate weights).
    """

    def __init__(self, T: int, C: int, N: int, width: int = 128, conv_out: int = 32, hidden: int = 256,
                 out_dim: int = len(ACTIONS)):
        super().__init__()
        self.side = int(round(math.sqrt(N)))
        if self.side ** 2 != N:
            raise ValueError(f"AdaptivePolicy needs a square token grid, got N = {N}")
        self.T, self.out_dim = T, out_dim
        self.t_emb = nn.Sequential(nn.Embedding(T, width), nn.SiLU())
        self.inp = nn.Linear(C, width)
        self.ada1 = AdaLN(width, width)
        self.dw = nn.Conv2d(width, width, 3, stride=2, padding=1, groups=width)
        self.pw = nn.Conv2d(width, conv_out, 1)
        side2 = (self.side + 1) // 2
        self.fc = nn.Linear(conv_out * side2 * side2, hidden)
        self.ada2 = AdaLN(hidden, width)
        self.out = nn.Linear(hidden, out_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, features: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B, N, C = features.shape
        e = self.t_emb(t)                                               # (B, width)
        x = self.ada1(self.inp(features.float()), e)                    # (B, N, width)
        x = x.transpose(1, 2).reshape(B, -1, self.side, self.side)      # (B, width, s, s)
        x = self.pw(F.gelu(self.dw(x))).flatten(1)                      # (B, conv_out * s/2 * s/2)
        x = F.gelu(self.ada2(self.fc(x), e))                            # (B, hidden)
        out = self.out(x)                                               # (B, out_dim)
        return out[:, 0] if self.out_dim == 1 else out


class StaticPolicy(nn.Module):
    """The learnable, non-adaptive ablation: a (T, out_dim) table, the state ignored.

    out_dim = 4: residuals o_t (zeros: the heuristic); out_dim = 1: a per-step value V_t."""

    def __init__(self, T: int, out_dim: int = len(ACTIONS)):
        super().__init__()
        self.T, self.out_dim = T, out_dim
        self.table = nn.Parameter(torch.zeros(T, out_dim))

    def forward(self, features: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.table[t]                                             # (B, out_dim)
        return out[:, 0] if self.out_dim == 1 else out


# ----------------------------------------------------------------------------- acting

class PolicySchedule:
    """A schedule driven by a policy: schedule(t, state) -> step t's actions, each (B,).

    With `base` (the frozen main policy) and `lam` (a float or (B,)), `policy` is AdaGen's
    fidelity policy and the executed residual is blend(base's mean, policy's o, lam) (Eq. 14).

    For nat.generate the actions are (m, tau1, tau2, w); for samplers.sample, `to_step` turns
    the executed (B, 2) actions [f, w] into (t_next, w) (to_step(t, state, a) -> tuple; by
    default the columns of a). sigma > 0 samples o_t ~ N(eta(s_t), sigma^2) on the knobs that
    act at step t (spec.active; the others take the mean) for training rollouts, sigma = 0 takes
    the mean. With `record` a list, each step appends (features, t, o, logp) for PPO. Resets
    its EMA at t = 0. state needs only `.features` (B, N, C), and `.labels` (B,) when h_pre is
    (K, T, D): a start schedule per class (the class-only schedule), else h_pre is (T, D).
    """

    def __init__(self, policy: nn.Module, h_pre: torch.Tensor, sigma: float = 0.0, beta_ema: float = 0.0,
                 generator: Optional[torch.Generator] = None, record: Optional[list] = None,
                 spec: ActionSpec = NAT_ACTIONS, to_step: Optional[Callable] = None,
                 base: Optional[nn.Module] = None, lam=None):
        self.policy, self.h_pre, self.sigma, self.beta_ema = policy, h_pre, sigma, beta_ema
        self.generator, self.record, self.spec, self.to_step = generator, record, spec, to_step
        self.base, self.lam = base, lam                                 # the fidelity blend (Eq. 14), see blend()
        self.active = spec.active(h_pre.shape[-2], h_pre.device)        # (T, D) knobs that act: the noise's mask
        self.r: Optional[torch.Tensor] = None                          # (B, D) smoothed residual r_{t-1}
        self.executed: list[torch.Tensor] = []                          # (B, D) actions per step of this batch
        self.finished: list[torch.Tensor] = []                          # (T, B, D) of earlier batches

    @torch.no_grad()
    def __call__(self, t: int, state) -> tuple[torch.Tensor, ...]:
        feats = state.features                                          # (B, N, C)
        B = feats.shape[0]
        tt = torch.full((B,), t, dtype=torch.long, device=feats.device)
        mu = self.policy(feats, tt)                                     # (B, D)
        o = mu
        if self.sigma > 0:
            active = self.active.to(mu.device)[tt]                      # (B, D)
            o = mu + self.sigma * torch.randn(mu.shape, device=mu.device, generator=self.generator) * active
        if self.record is not None:
            self.record.append((feats, tt, o, gaussian_logp(o, mu, self.sigma, active) if self.sigma > 0 else None))
        if self.base is not None:                                       # policy = the fidelity policy
            o = blend(self.base(feats, tt), o, self.lam)
        if t == 0:
            if self.executed:
                self.finished.append(torch.stack(self.executed).cpu())
            self.r, self.executed = o, []
        else:
            self.r = self.beta_ema * self.r + (1 - self.beta_ema) * o
        h_t = self.h_pre[t] if self.h_pre.dim() == 2 else self.h_pre[state.labels, t]   # (D,) or per class (B, D)
        a = activation(h_t.to(o.device) + self.r, self.spec)            # (B, D)
        self.executed.append(a)
        if self.to_step is not None:
            return self.to_step(t, state, a)
        return tuple(a[:, j] for j in range(a.shape[1]))


    def actions(self) -> torch.Tensor:
        """(T, n, D) executed actions of every sample generated so far (for plots and spreads)."""
        return torch.cat(self.finished + [torch.stack(self.executed).cpu()], dim=1)


def blend(o_main: torch.Tensor, o_fid: torch.Tensor, lam) -> torch.Tensor:
    """AdaGen Eq. 14 in pre-activation space: (1 - lam) o_main + lam o_fid, (B, D) each, lam a
    float or (B,). Both residuals sit on the same h_pre, so this is the blend of the two policies'
    pre-activations; lam = 0 is the main policy exactly, lam = 1 the fidelity policy."""
    lam = torch.as_tensor(lam, dtype=o_main.dtype, device=o_main.device)
    lam = lam[:, None] if lam.dim() == 1 else lam
    return (1 - lam) * o_main + lam * o_fid


@dataclass
class Rollout:
    """One batch of B trajectories of T steps (transitions flattened step-major: index t * B + b)."""
    features: torch.Tensor    # (T*B, N, C) observations f(v^(t))
    t: torch.Tensor           # (T*B,) step index
    o: torch.Tensor           # (T*B, D) sampled raw actions (pre-activation residuals)
    logp: torch.Tensor        # (T*B,) log pi_old(o | s)
    value: torch.Tensor       # (T*B,) V_old(s)
    actions: torch.Tensor     # (T, B, D) executed actions (NAT: [m, tau1, tau2, w])
    final: torch.Tensor       # what generate_fn returned: the finished token maps (B, N) or images


@torch.no_grad()
def rollout(policy: nn.Module, critic: nn.Module, generate_fn: Callable, labels: torch.Tensor,
            h_pre: torch.Tensor, sigma: float, beta_ema: float = 0.0,
            generator: Optional[torch.Generator] = None, spec: ActionSpec = NAT_ACTIONS,
            to_step: Optional[Callable] = None, base: Optional[nn.Module] = None, lam=None) -> Rollout:
    """Generate with the stochastic policy and keep what PPO needs.

    generate_fn(labels (B,), schedule) -> tokens (B, N) or images runs the frozen generator
    (e.g. nat.generate or samplers.sample partially applied); the schedule sees each step's features.
    base, lam: the fidelity blend (PolicySchedule); PPO then trains `policy` only."""
    record: list = []
    sched = PolicySchedule(policy, h_pre, sigma, beta_ema, generator, record, spec, to_step, base, lam)
    final = generate_fn(labels, sched)
    feats, t, o, logp = (torch.cat(x) for x in zip(*record))
    return Rollout(features=feats, t=t, o=o, logp=logp, value=critic(feats, t), actions=torch.stack(sched.executed),
                   final=final)


if __name__ == "__main__":
    T, N, C, B = 4, 64, 16, 3
    h = torch.tensor([[0.9, 1.0, 0.8, 0.1], [0.6, 1.0, 0.5, 1.0], [0.3, 1.0, 0.2, 2.0], [0.1, 1.0, 0.1, 3.0]])
    s = PolicySchedule(AdaptivePolicy(T, C, N), inverse_activation(h), beta_ema=0.5)
    state = type("State", (), {"features": torch.randn(B, N, C)})()
    got = torch.stack([torch.stack(s(t, state), 1) for t in range(T)])     # (T, B, 4)
    assert torch.allclose(got, h[:, None].expand(T, B, 4), atol=1e-5), got
    print("untrained policy reproduces the heuristic:", got[:, 0].tolist())
