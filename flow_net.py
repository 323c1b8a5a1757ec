"""The continuous generator of AdaGen's rectified-flow / diffusion paradigm (AdaGen §III-A): a
class-conditional transformer on pixel patches that predicts the velocity v = eps - x0 of the
rectified-flow path x_t = (1 - t) x0 + t eps (or the noise eps of the VP path; samplers.py holds the
paths, solvers and guidance). Time and class enter as two extra tokens (U-ViT); the final
LayerNorm's patch features are the state AdaGen's policy observes.

Usage:
    import nat
    net = FlowTransformer(FlowConfig(), block=nat.Block)          # any (B, L, C) -> (B, L, C) block
    v, features = net(x, t, labels)                                 # (B, 1, 32, 32), (B, 64, 128)
    loss = samplers.training_loss(flow_net_fn(net, class_drop=0.1), path, x, labels, g)
"""
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn


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
