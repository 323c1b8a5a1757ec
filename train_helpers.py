"""What train.py's stages and the experiments' stages share: the learning-rate schedule, the flip
augmentation of every trained network, and the generators' optimiser step (NAT and flow)."""
import math

import torch

import ddp
import runs


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flip, per sample. x (B, C, H, W)."""
    flip = torch.rand(x.shape[0], generator=g, device="cpu").to(x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def generator_step(model: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor,
                   step: int, decay: float) -> dict:
    """Backward, clip the gradient norm to 1, check loss and norm for finite values, step, update
    the EMA weights (decay warmed up as (1 + step) / (10 + step)); returns {"loss" (mean over
    ranks), "grad_norm" (before clipping)}."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    out = {"loss": ddp.all_mean(loss.detach()).item(), "grad_norm": gn.item()}
    runs.check_finite(**out)                                                   # before the update, no extra synchronisation
    opt.step()
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.lerp_(p, 1 - d)
    return out
