"""The adversarial reward model r_psi (AdaNAT §4.3, Eq. 13-14; AdaGen §III-D): a projected discriminator;
and the rest of AdaGen's rewards: the fixed fidelity reward and its blend (§III-F2, Eq. 15), and
the discriminator as the ranker of repeated sampling (§III-F1, Algorithm 2).

A GAN discriminator trained at the same time as the policy, so the reward keeps moving and
the policy cannot overfit it (a fixed FID or classifier reward gets hacked). Following
StyleGAN-T / Projected GAN, D is small trainable heads on the feature maps of a *frozen*
pretrained backbone (a callable; here a separately trained classifier, never the FID feature
network), one logit per spatial position per head, with a class projection:

    logit_{h,p} = phi_h(F_h(x))_p + <psi_h(F_h(x))_p, e(y)> / sqrt(d)      (per head h, position p)
    L_D = 1/H sum_h [mean_p softplus(-logit_h(real)) + mean_p softplus(logit_h(fake))]   (non-saturating BCE)
    r(x, y) = sigmoid(1/H sum_h mean_p logit_{h,p})                        (the policy's reward, per sample)

Every head weighs the same in the loss and the reward, whatever its number of positions (a
16x16 map would otherwise outvote a 4x4 one 16 to 1). D's reals are real training images.
Heads: spectral-normalised 1x1 conv -> LeakyReLU(0.2) -> residual spectral-normalised 3x3
conv -> LeakyReLU, then the 1x1 logit and projection convs. Score with D in eval mode (in
training mode every forward also advances the spectral norms' power iteration). Real and fake
images pass through differentiable augmentation before the backbone, so D cannot memorise the
real set (DiffAugment: translation by up to 1/8 of the size, and optionally a cutout of half the
size; the policy stages use translation only).

Usage:
    D = ProjectedDiscriminator(channels=[24, 48, 32], num_classes=10)
    feats = backbone(diff_augment(x, g))                 # list of (B, C_h, H_h, W_h)
    loss = d_loss(D(backbone(aug(real)), y_r), D(backbone(aug(fake)), y_f)); loss.backward()
    D.eval(); r = reward(D(backbone(fake), y))           # (B,) in (0, 1)
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm


class Head(nn.Module):
    """One feature map (B, C, H, W) -> per-position logits (B, H*W), class-projected."""

    def __init__(self, C: int, num_classes: int, width: int = 64, cmap_dim: int = 32):
        super().__init__()
        self.inp = spectral_norm(nn.Conv2d(C, width, 1))
        self.res = spectral_norm(nn.Conv2d(width, width, 3, padding=1))
        self.logit = spectral_norm(nn.Conv2d(width, 1, 1))
        self.proj = spectral_norm(nn.Conv2d(width, cmap_dim, 1))
        self.embed = nn.Embedding(num_classes, cmap_dim)
        self.cmap_dim = cmap_dim

    def forward(self, f: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.inp(f.float()), 0.2)                         # (B, width, H, W)
        x = F.leaky_relu(x + self.res(x), 0.2)
        cmap = self.embed(labels)[:, :, None, None]                        # (B, d, 1, 1)
        out = self.logit(x) + (self.proj(x) * cmap).sum(1, keepdim=True) / math.sqrt(self.cmap_dim)
        return out.flatten(1)                                              # (B, H*W)


class ProjectedDiscriminator(nn.Module):
    """Heads on several depths of a frozen backbone: features list -> per-head logits [(B, P_h)]."""

    def __init__(self, channels: list[int], num_classes: int, width: int = 64, cmap_dim: int = 32):
        super().__init__()
        self.heads = nn.ModuleList(Head(C, num_classes, width, cmap_dim) for C in channels)

    def forward(self, features: list[torch.Tensor], labels: torch.Tensor) -> list[torch.Tensor]:
        if len(features) != len(self.heads):
            raise ValueError(f"the backbone gave {len(features)} feature maps, the discriminator has {len(self.heads)} heads")
        return [h(f, labels) for h, f in zip(self.heads, features)]


def rows(logits: list[torch.Tensor], idx) -> list[torch.Tensor]:
    """The same rows (a slice or an index tensor) of every head's logits."""
    return [l[idx] for l in logits]


def score(logits: list[torch.Tensor]) -> torch.Tensor:
    """[(B, P_h)] per-head position logits -> (B,) D's score: the mean over heads of each head's mean logit."""
    return torch.stack([l.float().mean(1) for l in logits], 1).mean(1)


def d_loss(logits_real: list[torch.Tensor], logits_fake: list[torch.Tensor]) -> torch.Tensor:
    """Non-saturating BCE over every position logit, softplus(-real) + softplus(fake), each head weighted equally."""
    return sum(F.softplus(-r).mean() + F.softplus(f).mean() for r, f in zip(logits_real, logits_fake)) / len(logits_real)


def reward(logits: list[torch.Tensor]) -> torch.Tensor:
    """[(B, P_h)] logits -> (B,) reward sigmoid(score), the probability D gives to 'real'."""
    return torch.sigmoid(score(logits))


def fidelity_reward(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The fixed reward r_fid (AdaGen §III-F2's fidelity reward; ImageReward's stand-in here):
    log p(y | x) of the requested class under a frozen classifier's logits (B, K) -> (B,)."""
    return F.log_softmax(logits.float(), dim=1).gather(1, labels[:, None])[:, 0]


def blended_reward(r_adv: torch.Tensor, r_fid: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """AdaGen Eq. 15: (1 - lam) r_adv + lam r_fid, each (B,); lam = 0 gives r_adv exactly."""
    return (1 - lam) * r_adv + lam * r_fid


def best_of(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Repeated sampling (AdaGen §III-F1, Algorithm 2): scores (n*k,) of k consecutive candidates
    per request -> (n,) flat indices of each request's highest-scored candidate."""
    n = scores.shape[0] // k
    return torch.arange(n, device=scores.device) * k + scores.view(n, k).argmax(1)


def accuracy(logits_real: list[torch.Tensor], logits_fake: list[torch.Tensor]) -> float:
    """Fraction of images D classifies right (score > 0 means 'real'), reals and fakes equally weighted."""
    return 0.5 * ((score(logits_real) > 0).float().mean() + (score(logits_fake) < 0).float().mean()).item()


def diff_augment(x: torch.Tensor, generator: Optional[torch.Generator] = None, shift: float = 0.125,
                 cutout: float = 0.5) -> torch.Tensor:
    """DiffAugment (Zhao et al. 2020): per-sample translation (zero fill) and one square cutout.

    x (B, C, H, W) -> same shape; built from indexing and masks, so it is differentiable."""
    B, C, H, W = x.shape
    dev = x.device
    p = max(1, int(H * shift))
    d = torch.randint(-p, p + 1, (2, B, 1), device=dev, generator=generator)   # (2, B, 1) shifts
    xp = F.pad(x, (p, p, p, p))                                                 # (B, C, H+2p, W+2p)
    rows = torch.arange(H, device=dev)[None] + p - d[0]                         # (B, H)
    cols = torch.arange(W, device=dev)[None] + p - d[1]                         # (B, W)
    b = torch.arange(B, device=dev)[:, None, None]
    x = xp[b, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)        # (B, C, H, W)
    ch, cw = int(H * cutout), int(W * cutout)
    cy = torch.randint(0, H, (B, 1, 1), device=dev, generator=generator)
    cx = torch.randint(0, W, (B, 1, 1), device=dev, generator=generator)
    yy = torch.arange(H, device=dev)[None, :, None]
    xx = torch.arange(W, device=dev)[None, None, :]
    keep = ((yy - cy).abs() >= ch // 2) | ((xx - cx).abs() >= cw // 2)          # (B, H, W)
    return x * keep[:, None].to(x.dtype)


if __name__ == "__main__":
    # real = smooth images (one level each), fake = pixel noise of the same mean and variance
    torch.manual_seed(0)
    B = 64
    real = torch.randn(B, 1, 1, 1).expand(B, 1, 16, 16)
    fake = torch.randn(B, 1, 16, 16)
    conv = nn.Conv2d(1, 8, 3, stride=2, padding=1).requires_grad_(False)
    backbone = lambda x: [x, conv(x)]                                           # (B,1,16,16), (B,8,8,8)
    D = ProjectedDiscriminator([1, 8], num_classes=2)
    opt = torch.optim.Adam(D.parameters(), 1e-3, betas=(0.5, 0.999))
    y = torch.randint(0, 2, (B,))
    for step in range(100):
        loss = d_loss(D(backbone(diff_augment(real)), y), D(backbone(diff_augment(fake)), y))
        opt.zero_grad(); loss.backward(); opt.step()
    D.eval()
    with torch.no_grad():
        acc = accuracy(D(backbone(real), y), D(backbone(fake), y))
    print(f"D loss {loss.item():.3f}, accuracy {acc:.2f}")
    assert acc > 0.9
