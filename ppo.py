"""Proximal policy optimisation for the generation MDP (Schulman et al. 2017; AdaNAT §4.2, Eq. 10-12;
AdaNAT App. A).

The reward arrives only at the end of a trajectory and gamma = 1, so every step t of
trajectory b has the same return R_b. Returns are normalised over the batch,
R_hat = (R - mean R) / std R, the critic regresses R_hat, and the advantage is
A_t = R_hat - V_old(s_t) (no GAE: one terminal reward). The loss:

    rho  = exp(log pi(o|s) - log pi_old(o|s))
    loss = -mean(min(rho A, clip(rho, 1-c, 1+c) A)) + vf_coef mean((V - R_hat)^2) - ent_coef mean(H)

`ppo_update` runs K epochs over shuffled minibatches and stops early when the approximate
KL, mean((rho - 1) - log rho) (Schulman's k3 estimator, as CleanRL logs it), passes
`target_kl`. Health statistics: approx_kl, clipfrac, explained variance, entropy. `evaluate`
may return a fourth term, a penalty added to the loss as it is (e.g. an anchor
c ||eta(s)||^2 that keeps a residual policy near its start; logged as "penalty").
`normalise(R, floor)` divides by max(std R, floor): with a floor, a batch whose rewards barely
differ (a weak discriminator) takes a small step instead of one as large as a strong signal's.

Usage:
    R_hat = normalise(R)                                              # (B,) terminal rewards
    ret = R_hat.repeat(T); adv = ret - value_old                      # (T*B,) step-major
    stats = ppo_update(evaluate, logp_old, adv, ret, optimizer, params, epochs=5, minibatches=4)
    # evaluate(idx) -> (logp_new (n,), value (n,), entropy (n,)) for the transitions idx
"""
import math
from typing import Callable, Optional

import torch


def ppo_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, value: torch.Tensor,
             ret: torch.Tensor, entropy: torch.Tensor, clip: float = 0.2, vf_coef: float = 0.5,
             ent_coef: float = 0.01) -> tuple[torch.Tensor, dict]:
    """The clipped PPO objective (to minimise) for n transitions, every argument (n,)."""
    log_rho = logp_new - logp_old
    rho = log_rho.exp()
    pg_loss = -torch.min(rho * adv, rho.clamp(1 - clip, 1 + clip) * adv).mean()
    v_loss = ((value - ret) ** 2).mean()
    ent = entropy.mean()
    loss = pg_loss + vf_coef * v_loss - ent_coef * ent
    with torch.no_grad():
        stats = {"pg_loss": pg_loss.item(), "v_loss": v_loss.item(), "entropy": ent.item(),
                 "approx_kl": ((rho - 1) - log_rho).mean().item(),
                 "clipfrac": ((rho - 1).abs() > clip).float().mean().item()}
    return loss, stats


def normalise(R: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """(R - mean) / max(std, floor) over the batch (the returns PPO regresses and the advantages build on)."""
    return (R - R.mean()) / (R.std().clamp_min(floor) + 1e-8)


def explained_variance(value: torch.Tensor, ret: torch.Tensor) -> float:
    """1 - Var(ret - V) / Var(ret): 1 is a perfect critic, 0 no better than a constant."""
    var = ret.var()
    return float("nan") if var == 0 else (1 - (ret - value).var() / var).item()


def ppo_update(evaluate: Callable, logp_old: torch.Tensor, adv: torch.Tensor, ret: torch.Tensor,
               optimizer: torch.optim.Optimizer, params: list, epochs: int = 5, minibatches: int = 1,
               target_kl: Optional[float] = 0.02, clip: float = 0.2, vf_coef: float = 0.5,
               ent_coef: float = 0.01, max_grad_norm: Optional[float] = 1.0,
               generator: Optional[torch.Generator] = None,
               mean_over_ranks: Callable[[float], float] = lambda x: x) -> dict:
    """K epochs of minibatch PPO over n transitions; returns the last minibatch's stats plus
    `epochs_run` and `stopped_early`.

    evaluate(idx (n',) long) -> (logp_new, value, entropy), each (n',), with gradients, or
    (logp_new, value, entropy, penalty) with a scalar penalty added to the loss.
    target_kl, max_grad_norm: None (or 0) turns the KL stop and the gradient clip off.
    A non-finite loss term or gradient norm raises FloatingPointError before the optimiser step.
    Data-parallel (each rank its own n transitions, gradients averaged by DDP):
    mean_over_ranks averages a float over the ranks, so the target-KL stop is decided on the
    global approx_kl, the same on every rank, and the stats returned are global."""
    n = logp_old.shape[0]
    size = (n + minibatches - 1) // minibatches
    stats: dict = {}
    stopped, epochs_run = False, 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator).to(logp_old.device)
        kls = []
        for i in range(0, n, size):
            idx = perm[i:i + size]
            logp_new, value, entropy, *penalty = evaluate(idx)
            loss, stats = ppo_loss(logp_new, logp_old[idx], adv[idx], value, ret[idx], entropy, clip, vf_coef, ent_coef)
            if penalty:
                loss = loss + penalty[0]
                stats["penalty"] = penalty[0].item()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf")).item()
            bad = [k for k in ("pg_loss", "v_loss", "penalty", "grad_norm") if not math.isfinite(stats.get(k, 0.0))]
            if bad:                                                     # before the step: the parameters stay finite
                raise FloatingPointError(f"PPO {bad[0]} ({stats[bad[0]]})")
            optimizer.step()
            kls.append(stats["approx_kl"])
        epochs_run += 1
        kl = mean_over_ranks(sum(kls) / len(kls))
        if target_kl and kl > target_kl:
            stopped = True
            break
    stats = {k: mean_over_ranks(v) for k, v in stats.items() if k != "approx_kl"}
    return {**stats, "approx_kl": kl, "epochs_run": epochs_run, "stopped_early": stopped}


if __name__ == "__main__":
    # one-parameter bandit: action o ~ N(mu, 1), reward -(o - 2)^2; PPO should move mu to 2
    torch.manual_seed(0)
    mu = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([mu], lr=0.05)
    for it in range(60):
        o = mu.detach() + torch.randn(256)
        logp_old = -0.5 * (o - mu.detach()) ** 2
        adv = normalise(-(o - 2) ** 2)
        ppo_update(lambda idx: (-0.5 * (o[idx] - mu) ** 2, torch.zeros(len(idx)), torch.zeros(len(idx))),
                   logp_old, adv, adv, opt, [mu], epochs=4, minibatches=2, target_kl=None)
    print(f"mu after 60 PPO iterations: {mu.item():.2f} (optimum 2)")
    assert abs(mu.item() - 2) < 0.3
