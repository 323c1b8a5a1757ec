"""Fréchet distance (FID), KID and k-NN precision/recall on features of a small network, and SimCLR.

FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a
local Nash equilibrium") fits a Gaussian to the features of real and of generated images
and measures the Fréchet (2-Wasserstein) distance between the two Gaussians:

    FID = ||mu_r - mu_g||^2 + Tr(S_r) + Tr(S_g) - 2 Tr( (S_r S_g)^(1/2) )

Tr((S_r S_g)^(1/2)) needs no matrix square root of the product: S_r S_g has the
eigenvalues of the symmetric S_r^(1/2) S_g S_r^(1/2), so it is the sum of their square
roots (symmetric eigen-solvers only; exact for singular covariances, where pytorch-fid's
sqrtm adds eps * I). Covariances that are not positive semi-definite raise.

Precision and recall (Kynkäänniemi et al. 2019, "Improved precision and recall metric
for assessing generative models") approximate each manifold by the union of hyperspheres
around its samples, the radius of a sample being the distance to its k-th nearest
neighbour in the same set. Precision = fraction of generated samples inside the real
manifold (fidelity); recall = fraction of real samples inside the generated manifold
(diversity).

KID (Binkowski et al. 2018, `kid`) is the unbiased estimate of the squared MMD between the two
feature sets under a cubic polynomial kernel, with its standard error: unlike the Fréchet
distance it carries no sample-size bias, so rows of different sizes and their intervals compare.

The self-supervised judge (SimCLR, Chen et al. 2020, §2.1 and Eq. 1; `views`, `nt_xent`,
`knn_accuracy`): a classifier's features reward class-typical images; features learned without
labels, by telling augmented views of one image from views of the others, also keep what varies
inside a class. Two views of each of B images pass through the network, z = g(f(x)); with
sim(u, v) = u.v / (|u| |v|) and temperature tau the loss of the positive pair (i, j) among the 2B
views is  l_{i,j} = -log exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau).

Features: InceptionV3 weights cannot be assumed, so `FeatureNet` is a small CNN trained
as a classifier on the data set itself (stage `featnet` in train.py) and its penultimate
features are used. These FIDs are therefore comparable only with each other (same
feature network, same data set), NOT with published ImageNet/Inception FIDs.

Usage:
    net = FeatureNet(FeatureNetConfig())          # trained by train.py, stage featnet
    f_real, _ = extract(net, real_images)          # (N, D), images in [-1, 1], (N, 1, 32, 32)
    mu_r, sigma_r = statistics(f_real)
    f_fake, _ = extract(net, fake_images)
    fid = fid_from_features(f_fake, mu_r, sigma_r); p, r = precision_recall(f_real, f_fake, k=3)
    kid_value, kid_se = kid(f_real, f_fake)
"""

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- Fréchet distance

def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^(1/2)) for positive semi-definite S1, S2 (D, D).

    S1 S2 = R (R S2) with R = S1^(1/2) has the eigenvalues of the symmetric PSD R S2 R, so the
    trace of its principal square root is the sum of their square roots. Only symmetric
    eigen-solvers run: singular covariances (fewer samples than dimensions) need no eps offset,
    and rounding's tiny negative eigenvalues are clipped to 0."""
    w, Q = np.linalg.eigh(sigma1)
    R = (Q * np.sqrt(np.clip(w, 0.0, None))) @ Q.T                      # (D, D) S1^(1/2)
    lam = np.linalg.eigvalsh(R @ sigma2 @ R)                             # (D,) eigenvalues of S1 S2
    return float(np.sqrt(np.clip(lam, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrtm(S1 S2)) between N(mu1, S1) and N(mu2, S2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be vectors of the same length, got {mu1.shape} and {mu2.shape}")
    D = mu1.shape[0]
    if sigma1.shape != (D, D) or sigma2.shape != (D, D):
        raise ValueError(f"covariances must be ({D}, {D}), got {sigma1.shape} and {sigma2.shape}")
    for name, S in (("S1", sigma1), ("S2", sigma2)):
        if not np.isfinite(S).all():
            raise ValueError(f"{name} is not finite")
        w = np.linalg.eigvalsh(S)
        if w[0] < -1e-6 * max(1.0, w[-1]):                              # rounding stays far below this
            raise ValueError(f"{name} is not positive semi-definite (eigenvalue {w[0]:.3g}): sqrtm(S1 S2) would "
                             f"have a large imaginary component")

    diff = mu1 - mu2                                                  # (D,)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * _trace_sqrt_product(sigma1, sigma2))


# ----------------------------------------------------------------------------- feature network

@dataclass
class FeatureNetConfig:
    in_ch: int = 1          # image channels
    num_classes: int = 10   # classifier outputs
    width: int = 32         # channels of the first stage; stages use width, 2 width, 4 width
    feat_dim: int = 128     # D, the penultimate (FID) feature size
    img_size: int = 32      # input resolution, divisible by 8 (three 2x poolings)
    convs: int = 2          # conv-BN-ReLU layers per stage
    pool: str = "max"       # "max" or "avg" pooling between stages (the independent FID network differs here)


class FeatureNet(nn.Module):
    """Small VGG-style CNN classifier; its penultimate activations are the FID features.

    3 stages of [conv3x3-BN-ReLU] x convs + max or average pool 2 (widths w, 2w, 4w), global average pool,
    Linear(4w, D) + ReLU = features, dropout 0.3 (training only), Linear(D, K) = logits.
    Expects images in [-1, 1], (B, in_ch, img_size, img_size).
    """

    def __init__(self, cfg: FeatureNetConfig):
        super().__init__()
        if cfg.img_size % 8 != 0:
            raise ValueError(f"img_size must be divisible by 8, got {cfg.img_size}")
        self.cfg = cfg
        layers, c_in = [], cfg.in_ch
        for c_out in (cfg.width, 2 * cfg.width, 4 * cfg.width):
            for _ in range(cfg.convs):
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c_in = c_out
            layers.append(nn.MaxPool2d(2) if cfg.pool == "max" else nn.AvgPool2d(2))
        self.body = nn.Sequential(*layers)
        self.fc_feat = nn.Linear(c_in, cfg.feat_dim)
        self.dropout = nn.Dropout(0.3)
        self.fc_out = nn.Linear(cfg.feat_dim, cfg.num_classes)

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, K), features (B, D)) in one pass."""
        return self.head(self.body(x))

    def head(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The body's last feature map h (B, 4w, H/8, W/8) -> (logits (B, K), features (B, D))."""
        feats = F.relu(self.fc_feat(h.mean(dim=(2, 3))))  # (B, D)
        logits = self.fc_out(self.dropout(feats))         # (B, K)
        return logits, feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, K)."""
        return self.forward_both(x)[0]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, D)."""
        return self.forward_both(x)[1]


@torch.no_grad()
def extract(net: nn.Module, images: torch.Tensor, batch_size: int = 500,
            device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) and logits (N, K) of `images` (N, C, H, W), both float32 on CPU.

    Runs `net.forward_both` in eval mode, batch by batch on `device` (default: the net's),
    and restores the net's previous train/eval mode.
    """
    if device is None:
        device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    try:
        feats, logits = [], []
        for i in range(0, images.shape[0], batch_size):
            x = images[i:i + batch_size].to(device, torch.float32, non_blocking=True)  # (b, C, H, W)
            l, f = net.forward_both(x)                                                  # (b, K), (b, D)
            feats.append(f.float().cpu())
            logits.append(l.float().cpu())
    finally:
        net.train(was_training)
    return torch.cat(feats), torch.cat(logits)


# ----------------------------------------------------------------------------- statistics

def statistics(feats: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D), float64 numpy, of features (N, D)."""
    if isinstance(feats, torch.Tensor):
        feats = feats.detach().cpu().double().numpy()
    feats = np.asarray(feats, np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got {feats.shape}")
    mu = feats.mean(axis=0)                   # (D,)
    sigma = np.cov(feats, rowvar=False)       # (D, D)
    return mu, np.atleast_2d(sigma)


def fid_from_features(feats_fake: torch.Tensor | np.ndarray, mu_real: np.ndarray, sigma_real: np.ndarray) -> float:
    """FID of generated features (N, D) against precomputed real statistics."""
    mu_fake, sigma_fake = statistics(feats_fake)
    return frechet_distance(mu_fake, sigma_fake, mu_real, sigma_real)


# ----------------------------------------------------------------------------- precision / recall

def _knn_radii(x: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance (N,) from each row of x (N, D) to its k-th nearest other row."""
    radii = []
    for i in range(0, x.shape[0], batch_size):
        d = torch.cdist(x[i:i + batch_size], x)                     # (b, N)
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])  # index 0 is the point itself
    return torch.cat(radii)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    """Fraction of points (M, D) inside at least one hypersphere (centres (N, D), radii (N,))."""
    inside = 0
    for i in range(0, points.shape[0], batch_size):
        d = torch.cdist(points[i:i + batch_size], centres)          # (b, N)
        inside += (d <= radii[None, :]).any(dim=1).sum().item()
    return inside / points.shape[0]


@torch.no_grad()
def precision_recall(real_feats: torch.Tensor, fake_feats: torch.Tensor, k: int = 3,
                     batch_size: int = 1000, device: torch.device | str | None = None) -> tuple[float, float]:
    """k-NN precision and recall (Kynkäänniemi et al. 2019) of fake (M, D) against real (N, D) features.

    device: where the distances are computed (default: real_feats'). On a GPU in float64, which
    TF32 matrix products never touch (cdist runs on them), so a radius compares as on the CPU."""
    real = torch.as_tensor(real_feats)
    device = torch.device(device) if device is not None else real.device
    dtype = torch.float64 if device.type == "cuda" else torch.float32
    real = real.to(device, dtype)                                   # (N, D)
    fake = torch.as_tensor(fake_feats).to(device, dtype)            # (M, D)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D), got {tuple(real.shape)} and {tuple(fake.shape)}")
    if not 1 <= k < min(real.shape[0], fake.shape[0]):
        raise ValueError(f"need 1 <= k < number of samples in each set, got k={k}")
    centre = real.mean(dim=0, keepdim=True)                         # distances are shift-invariant;
    real, fake = real - centre, fake - centre                       # centring improves float32 cdist
    r_real = _knn_radii(real, k, batch_size)                        # (N,)
    r_fake = _knn_radii(fake, k, batch_size)                        # (M,)
    precision = _coverage(fake, real, r_real, batch_size)
    recall = _coverage(real, fake, r_fake, batch_size)
    return precision, recall


# ----------------------------------------------------------------------------- self-check


def views(x: torch.Tensor, g: Optional[torch.Generator] = None, s_min: float = 0.4, jitter: float = 0.4,
          cutout: float = 0.5) -> torch.Tensor:
    """One random view per image: x (B, C, H, W) in [-1, 1] -> (B, C, H, W) in [-1, 1].

    Crop of area s ~ U(s_min, 1) of the image at aspect ratio r ~ exp(U(log 3/4, log 4/3)), resized
    back (bilinear); flip with p = 0.5; contrast and brightness (x01 * c + b, c ~ U(1 - jitter, 1 + jitter),
    b ~ U(-jitter/2, jitter/2)); with p = 0.5 a square cutout of side cutout * H filled with the view's mean."""
    B, C, H, W = x.shape
    u = lambda *shape: torch.rand(*shape, generator=g, device="cpu").to(x.device)
    s = s_min + (1 - s_min) * u(B)                                          # (B,) area kept
    r = torch.exp(math.log(3 / 4) + math.log(16 / 9) * u(B))                # (B,) aspect ratio
    sx, sy = (s * r).sqrt().clamp(max=1), (s / r).sqrt().clamp(max=1)       # (B,) half-widths in [-1, 1] units
    tx, ty = (1 - sx) * (2 * u(B) - 1), (1 - sy) * (2 * u(B) - 1)           # (B,) crop centre, inside the image
    flip = torch.where(u(B) < 0.5, -1.0, 1.0).to(x.device)
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx * flip, zero, tx], 1), torch.stack([zero, sy, ty], 1)], 1)   # (B, 2, 3)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)                    # (B, H, W, 2)
    v = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)         # (B, C, H, W)
    c = (1 - jitter + 2 * jitter * u(B)).view(B, 1, 1, 1)
    b = (jitter * (u(B) - 0.5)).view(B, 1, 1, 1)
    v = (((v + 1) / 2 * c + b).clamp(0, 1)) * 2 - 1
    side = int(H * cutout)
    cy, cx = (u(B) * (H - side)).long().view(B, 1, 1), (u(B) * (W - side)).long().view(B, 1, 1)
    yy, xx = torch.arange(H, device=x.device).view(1, H, 1), torch.arange(W, device=x.device).view(1, 1, W)
    hole = (yy >= cy) & (yy < cy + side) & (xx >= cx) & (xx < cx + side) & (u(B) < 0.5).view(B, 1, 1)   # (B, H, W)
    return torch.where(hole[:, None], v.mean((1, 2, 3), keepdim=True), v)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float = 0.2) -> torch.Tensor:
    """SimCLR Eq. 1 averaged over the 2B positive pairs: z1, z2 (B, d) projections of two views."""
    B = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)                     # (2B, d)
    sim = z @ z.T / tau                                                    # (2B, 2B)
    sim = sim.masked_fill(torch.eye(2 * B, dtype=torch.bool, device=z.device), float("-inf"))   # k != i
    pos = torch.cat([torch.arange(B, 2 * B), torch.arange(0, B)]).to(z.device)                  # i's partner
    return F.cross_entropy(sim, pos)


@torch.no_grad()
def knn_accuracy(f_train: torch.Tensor, y_train: torch.Tensor, f_test: torch.Tensor, y_test: torch.Tensor,
                 k: int = 20, batch: int = 1000) -> float:
    """Accuracy of a k-nearest-neighbour vote (cosine similarity) of f_test (M, D) among f_train (N, D):
    how much of the class a self-supervised feature space holds (it never saw a label)."""
    a, b = F.normalize(f_train.float(), dim=1), F.normalize(f_test.float(), dim=1)
    num_classes = int(y_train.max()) + 1
    correct = 0
    for i in range(0, len(b), batch):
        idx = (b[i:i + batch] @ a.T).topk(k, dim=1).indices                 # (m, k)
        votes = F.one_hot(y_train[idx], num_classes).sum(1)                  # (m, classes)
        correct += (votes.argmax(1) == y_test[i:i + batch]).sum().item()
    return correct / len(b)


def _check_simclr() -> None:
    """Self-check: NT-Xent's closed form, views in range, a tiny encoder that learns."""
    # known answer: B orthogonal unit projections, views identical -> each row's logits are 1/tau at its
    # partner and 0 at the 2B - 2 others, so the loss is log(1 + (2B - 2) exp(-1/tau))
    B, tau = 4, 0.5
    z = torch.eye(8)[:B]
    expect = math.log(1 + (2 * B - 2) * math.exp(-1 / tau))
    print(f"nt_xent of identical orthogonal views {nt_xent(z, z, tau).item():.6f}, closed form {expect:.6f}")
    assert abs(nt_xent(z, z, tau).item() - expect) < 1e-6
    x = torch.rand(16, 1, 32, 32) * 2 - 1
    v = views(x, torch.Generator().manual_seed(0))
    assert v.shape == x.shape and v.min() >= -1 and v.max() <= 1
    # a tiny encoder learns to tell 16 smooth random images apart through their views
    torch.manual_seed(0)
    x = F.interpolate(torch.rand(16, 1, 4, 4) * 2 - 1, size=32, mode="bilinear")
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 5, 2), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(32))
    net(x)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    g = torch.Generator().manual_seed(1)
    first = None
    for _ in range(100):
        loss = nt_xent(net(views(x, g)), net(views(x, g)))
        opt.zero_grad(); loss.backward(); opt.step()
        first = first if first is not None else loss.item()
    print(f"NT-Xent {first:.3f} -> {loss.item():.3f} (chance log(2B - 1) = {math.log(31):.3f})")
    assert loss.item() < first


# ----------------------------------------------------------------------------- KID (Binkowski et al. 2018)

def _poly_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """k(a_i, b_j) = (a_i . b_j / D + 1)^3: (len(a), len(b))."""
    return (a @ b.T / a.shape[1] + 1) ** 3


def _kernel_both_sums(a: torch.Tensor, b: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums over j of k(a_i, b_j) (len(a),), sums over i (len(b),)): each kernel block computed once."""
    rows, cols = [], torch.zeros(len(b), dtype=a.dtype, device=a.device)
    for i in range(0, len(a), batch_size):
        block = _poly_kernel(a[i:i + batch_size], b)                           # (batch, len(b))
        rows.append(block.sum(1))
        cols += block.sum(0)
    return torch.cat(rows), cols


def kid_self_sums(feats: torch.Tensor, batch_size: int = 2000) -> torch.Tensor:
    """(m,) sum_{i' != i} k(x_i, x_i') of one feature set (m, D): a reference set's own term, computed once
    and passed to `kid` as real_sums when many sets are measured against it."""
    x = torch.as_tensor(feats).double()
    return _kernel_both_sums(x, x, batch_size)[0] - (x.pow(2).sum(1) / x.shape[1] + 1) ** 3


def kid(real_feats: torch.Tensor, fake_feats: torch.Tensor, batch_size: int = 2000,
        real_sums: torch.Tensor | None = None) -> tuple[float, float]:
    """Kernel inception distance: the unbiased estimate of MMD^2 between real (m, D) and generated (n, D)
    features under the polynomial kernel k(x, y) = (x.y / D + 1)^3 (Binkowski et al. 2018, §3),

        KID = sum_{i != i'} k(x_i, x_i') / (m (m - 1)) + sum_{j != j'} k(y_j, y_j') / (n (n - 1))
              - 2 sum_{i, j} k(x_i, y_j) / (m n),

    and its standard error from the U-statistic's first-order (Hoeffding) variance,
    Var ~ 4 Var_i(a_i) / m + 4 Var_j(b_j) / n with a_i = mean_{i'} k(x_i, x_i') - mean_j k(x_i, y_j) and
    b_j = mean_{j'} k(y_j, y_j') - mean_i k(x_i, y_j) (conservative near KID = 0, where that first-order
    term vanishes: 1.5 x the spread over draws there, in the self-check). Unbiased: its mean over draws is the true MMD^2,
    so it can be negative and does not grow with fewer samples as the Fréchet distance does.
    real_sums: kid_self_sums(real_feats), when it is already known."""
    x, y = (torch.as_tensor(f).double() for f in (real_feats, fake_feats))      # (m, D), (n, D)
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {m} and {n}")
    kxx = kid_self_sums(x, batch_size) if real_sums is None else torch.as_tensor(real_sums).double()   # (m,)
    kyy = kid_self_sums(y, batch_size)                                                                # (n,)
    kxy, kyx = _kernel_both_sums(x, y, batch_size)                                  # (m,), (n,)
    value = kxx.sum() / (m * (m - 1)) + kyy.sum() / (n * (n - 1)) - 2 * kxy.sum() / (m * n)
    a, b = kxx / (m - 1) - kxy / n, kyy / (n - 1) - kyx / m
    se = (4 * a.var() / m + 4 * b.var() / n).sqrt()
    return value.item(), se.item()


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    D, N = 8, 20000
    mu1, mu2 = rng.normal(size=D), rng.normal(size=D)
    s1, s2 = rng.uniform(0.5, 2.0, D), rng.uniform(0.5, 2.0, D)     # diagonal variances
    exact = float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2))
    closed = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    x1 = mu1 + rng.normal(size=(N, D)) * np.sqrt(s1)
    x2 = mu2 + rng.normal(size=(N, D)) * np.sqrt(s2)
    sampled = frechet_distance(*statistics(x1), *statistics(x2))
    print(f"FID closed form {exact:.4f}  from exact moments {closed:.4f}  from {N} samples {sampled:.4f}")
    assert math.isclose(closed, exact, rel_tol=1e-8) and abs(sampled - exact) < 0.05 * exact + 0.05

    p, r = precision_recall(torch.from_numpy(x1[:2000]), torch.from_numpy(x1[:2000]))
    print(f"precision/recall of a set against itself: {p:.3f} / {r:.3f}")
    assert p == 1.0 and r == 1.0

    net = FeatureNet(FeatureNetConfig())
    f, l = extract(net, torch.rand(4, 1, 32, 32) * 2 - 1)
    print(f"FeatureNet: {sum(q.numel() for q in net.parameters())} params, features {tuple(f.shape)}, logits {tuple(l.shape)}")
    rng_t = torch.Generator().manual_seed(0)
    a, b = torch.randn(60, 5, generator=rng_t).double(), torch.randn(50, 5, generator=rng_t).double() + 0.5
    brute = lambda u, v, same: sum(((u[i] @ v[j]) / 5 + 1) ** 3 for i in range(len(u)) for j in range(len(v))
                                   if not (same and i == j)).item() / (len(u) * (len(v) - same))
    expect = brute(a, a, 1) + brute(b, b, 1) - 2 * brute(a, b, 0)
    value, se = kid(a, b)
    print(f"KID {value:.5f} +- {se:.5f}, by loops {expect:.5f}")
    assert math.isclose(value, expect, rel_tol=1e-9) and (value, se) == kid(a, b, real_sums=kid_self_sums(a))
    draws = [kid(torch.randn(200, 5, generator=rng_t), torch.randn(200, 5, generator=rng_t)) for _ in range(40)]
    vals, ses = torch.tensor([d[0] for d in draws]), torch.tensor([d[1] for d in draws])
    print(f"KID of two draws of one distribution: mean {vals.mean():.5f} (0 expected), sd over draws {vals.std():.5f}, "
          f"mean standard error {ses.mean():.5f}")
    assert abs(vals.mean()) < 3 * vals.std() / 40 ** 0.5 and 0.5 < ses.mean() / vals.std() < 2
    _check_simclr()
    print("ok")
