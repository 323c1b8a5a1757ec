"""VQ-VAE / VQGAN image tokenizer (van den Oord et al. 2017; Esser et al. 2021).

A conv encoder E maps an image x (B, C, 32, 32) to a grid of vectors z_e (B, D, H, W)
(H = W = 32 / 2**len(ch_mult), 8 by default: 64 tokens per image). Each vector is
replaced by its nearest codebook entry e_k (K entries of dimension D), giving the token
map k (B, H, W) that the NAT generator models, and a conv decoder G maps z_q back to
the image. Losses (the training loop lives in train.py):

    k_ij     = argmin_k ||z_e,ij - e_k||^2             (cosine if l2_norm_codes, ViT-VQGAN)
    z_q      = z_e + sg[e_k - z_e]                     straight-through: forward = e_k,
                                                       backward d/dz_q passes to z_e unchanged
    L_vq     = ||sg[z_e] - z_q||^2 + beta ||z_e - sg[z_q]||^2     (codebook + commitment;
               its forward value is (1 + beta) * mse(z_e, z_q))
    L_rec    = |x - G(z_q)|  or  (x - G(z_q))^2        (the caller picks)
    L_P      = perceptual distance of x and G(z_q) on a frozen classifier's feature maps
               (`perceptual_loss`, LPIPS-style; VQGAN §3.1 uses LPIPS)
    hinge GAN (optional, patch discriminator D, after gan_start steps, weight gan_weight):
    L_D      = 1/2 [ mean relu(1 - D(x)) + mean relu(1 + D(x_rec)) ]
    L_G      = -mean D(x_rec)

Dead-code restart: the quantizer counts how often each code is chosen (`usage`, training
mode only). Every N steps (e.g. 100, stopping well before the end of training so the
decoder can adapt to the last restarts) the trainer calls `restart_dead_codes(z_e_flat)`:
every code used fewer than `min_usage` times since the last restart is re-seeded with a
random row of the current batch's encoder outputs (detached, plus tiny noise), so that
no code stays dead. The codebook itself starts from uniform(-1/K, 1/K) and is replaced by
random encoder outputs at the first training-mode forward (data-dependent init).

The decoder output is raw (no tanh); images live in [-1, 1], `detokenize` clamps. The
project's `small` tokenizer (512 codes, 32 channels, 2 residual blocks) is measured in the README.

Usage:
    model = VQModel(VQConfig())                          # 1x32x32 -> 8x8 tokens, K = 256
    x_rec, codes, vq_loss, z_e = model(x)                # x (B, 1, 32, 32) in [-1, 1]
    loss = (x_rec - x).abs().mean() + vq_loss; loss.backward()
    model.vq.restart_dead_codes(z_e.detach().permute(0, 2, 3, 1).reshape(-1, z_e.shape[1]))
    tokens = model.tokenize(x); images = model.detokenize(tokens)   # (B, 64), (B, 1, 32, 32)
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VQConfig:
    """Tokenizer hyper-parameters (the defaults are the CPU-sized `small` tokenizer)."""

    in_ch: int = 1  # image channels
    img_size: int = 32  # input resolution (square)
    ch: int = 24  # base width; level i has ch * ch_mult[i] channels
    ch_mult: tuple = (1, 2)  # one stride-2 downsample per entry: (1, 2) -> 32x32 to 8x8
    n_res: int = 1  # residual blocks per level
    codebook_size: int = 256  # K
    code_dim: int = 32  # D
    beta: float = 0.25  # commitment weight
    l2_norm_codes: bool = False  # cosine-similarity lookup on l2-normalised vectors
    gan_weight: float = 0.0  # weight of the hinge generator loss; 0 disables the GAN
    gan_start: int = 0  # steps of plain reconstruction before the GAN loss starts
    disc_ch: int = 32  # width of the patch discriminator


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _broadcast(t: torch.Tensor) -> None:
    """Copy rank 0's tensor to every rank (no-op without torch.distributed)."""
    if _distributed():
        torch.distributed.broadcast(t, src=0)


def _all_reduce(t: torch.Tensor) -> None:
    """Sum a tensor over ranks in place (no-op without torch.distributed)."""
    if _distributed():
        torch.distributed.all_reduce(t)


def _norm(c: int) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups that divide c."""
    return nn.GroupNorm(math.gcd(c, 8), c)


class ResBlock(nn.Module):
    """Pre-activation residual block: x + conv(SiLU(GN(conv(SiLU(GN(x))))))."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """x (B, C, S, S) -> z_e (B, D, S/2^L, S/2^L), L = len(ch_mult).

    Every level starts with a stride-2 3x3 conv (the first one reads the image directly,
    so no conv runs at full resolution) and then n_res residual blocks.
    """

    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        layers, c_prev = [], cfg.in_ch
        for c in widths:
            layers.append(nn.Conv2d(c_prev, c, 3, stride=2, padding=1))
            layers += [ResBlock(c, c) for _ in range(cfg.n_res)]
            c_prev = c
        layers += [_norm(c_prev), nn.SiLU(), nn.Conv2d(c_prev, cfg.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """z_q (B, D, h, w) -> x_rec (B, C, h*2^L, w*2^L), the encoder's mirror image.

    Every level has n_res residual blocks and then a nearest-upsample + 3x3 conv (the
    last one writes the image directly; raw output, no tanh).
    """

    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        layers = [nn.Conv2d(cfg.code_dim, widths[-1], 3, padding=1)]
        for i in reversed(range(len(widths))):
            c = widths[i]
            layers += [ResBlock(c, c) for _ in range(cfg.n_res)]
            if i > 0:
                layers.append(Upsample(c, widths[i - 1]))
        layers += [_norm(widths[0]), nn.SiLU(), Upsample(widths[0], cfg.in_ch)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with a straight-through gradient.

    `embedding` (K, D) is the codebook e; `usage` (K,) counts code assignments made in
    training mode since the last restart; `initialized` turns true once the codebook has
    been seeded from data (first training-mode forward; set it yourself to keep a
    hand-made codebook).
    """

    def __init__(self, codebook_size: int, code_dim: int, beta: float = 0.25,
                 l2_norm_codes: bool = False):
        super().__init__()
        self.K, self.D, self.beta, self.l2_norm_codes = codebook_size, code_dim, beta, l2_norm_codes
        self.embedding = nn.Embedding(codebook_size, code_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        self.register_buffer("usage", torch.zeros(codebook_size))
        self.register_buffer("initialized", torch.tensor(False))

    def _codebook(self) -> torch.Tensor:
        e = self.embedding.weight  # (K, D)
        return F.normalize(e, dim=1) if self.l2_norm_codes else e

    def _prep(self, z_e: torch.Tensor) -> torch.Tensor:
        return F.normalize(z_e, dim=1) if self.l2_norm_codes else z_e

    def nearest(self, z_e: torch.Tensor) -> torch.Tensor:
        """Codes of the nearest codebook entries, no side effects: (B,D,H,W) -> (B,H,W) long."""
        B, D, H, W = z_e.shape
        z = self._prep(z_e).permute(0, 2, 3, 1).reshape(-1, D)  # (M, D), M = B*H*W
        e = self._codebook()  # (K, D)
        d = z.pow(2).sum(1, keepdim=True) - 2 * z @ e.t() + e.pow(2).sum(1)  # (M, K)
        return d.argmin(1).view(B, H, W)

    def codes_to_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook vectors of a code map: (B, H, W) long -> (B, D, H, W)."""
        return self._codebook()[codes].permute(0, 3, 1, 2).contiguous()

    def forward(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z_e (B,D,H,W) -> (z_q_st (B,D,H,W), codes (B,H,W) long, loss scalar)."""
        z_e = self._prep(z_e)
        if self.training and not bool(self.initialized):
            self._init_from(z_e.detach().permute(0, 2, 3, 1).reshape(-1, self.D))
        codes = self.nearest(z_e)  # (B, H, W)
        z_q = self.codes_to_vectors(codes)  # (B, D, H, W)
        loss = F.mse_loss(z_q, z_e.detach()) + self.beta * F.mse_loss(z_e, z_q.detach())
        z_q_st = z_e + (z_q - z_e).detach()  # straight-through estimator
        if self.training:
            with torch.no_grad():
                self.usage += torch.bincount(codes.flatten(), minlength=self.K).to(self.usage)
        return z_q_st, codes, loss

    @torch.no_grad()
    def _seed(self, idx: torch.Tensor, z_e_flat: torch.Tensor) -> None:
        """Overwrite codes idx with random rows of z_e_flat (M, D) plus tiny noise."""
        z = z_e_flat.detach().to(self.embedding.weight)
        rows = (torch.randperm(z.shape[0], device=z.device)[: len(idx)] if z.shape[0] >= len(idx)
                else torch.randint(0, z.shape[0], (len(idx),), device=z.device))
        scale = z.std() if z.numel() > 1 else z.new_zeros(())
        self.embedding.weight[idx] = z[rows] + 1e-3 * scale * torch.randn(len(idx), self.D, device=z.device)

    @torch.no_grad()
    def _init_from(self, z_e_flat: torch.Tensor) -> None:
        """Data-dependent init: every code becomes a random encoder output."""
        self._seed(torch.arange(self.K, device=self.embedding.weight.device), z_e_flat)
        _broadcast(self.embedding.weight.data)
        self.initialized.fill_(True)

    @torch.no_grad()
    def restart_dead_codes(self, z_e_flat: torch.Tensor, min_usage: float = 1.0) -> int:
        """Re-seed codes used < min_usage times since the last restart; reset usage.

        z_e_flat (M, D): the current batch's encoder outputs. Returns how many codes
        were restarted. Under torch.distributed every rank must call it at the same step:
        usage is summed over ranks and rank 0's new codebook is broadcast.
        """
        _all_reduce(self.usage)
        dead = (self.usage < min_usage).nonzero().flatten()  # (n_dead,)
        if len(dead) > 0:
            self._seed(dead, self._prep(z_e_flat.detach()))
        _broadcast(self.embedding.weight.data)
        self.usage.zero_()
        return len(dead)


class VQModel(nn.Module):
    """Encoder -> VectorQuantizer -> Decoder; `tokenize` / `detokenize` for the generator."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.vq = VectorQuantizer(cfg.codebook_size, cfg.code_dim, cfg.beta, cfg.l2_norm_codes)
        self.decoder = Decoder(cfg)
        self.grid = cfg.img_size // 2 ** len(cfg.ch_mult)  # H = W of the token map
        self.num_tokens = self.grid * self.grid  # N
        self.to(memory_format=torch.channels_last)  # ~20% faster oneDNN convs on CPU

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B,C,S,S) -> (z_q_st (B,D,H,W), codes (B,H,W), vq_loss, z_e (B,D,H,W))."""
        z_e = self.encoder(x)
        z_q, codes, vq_loss = self.vq(z_e)
        return z_q, codes, vq_loss, z_e

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """z_q (B,D,H,W) -> x_rec (B,C,S,S), raw (not clamped)."""
        return self.decoder(z_q)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B,C,S,S) -> (x_rec (B,C,S,S), codes (B,H,W), vq_loss, z_e (B,D,H,W))."""
        z_q, codes, vq_loss, z_e = self.encode(x)
        return self.decode(z_q), codes, vq_loss, z_e

    @torch.no_grad()
    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """x (B,C,S,S) -> codes (B, N) long, row-major; never touches `usage`."""
        return self.vq.nearest(self.encoder(x)).flatten(1)

    @torch.no_grad()
    def detokenize(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, N) long -> images (B,C,S,S) clamped to [-1, 1]."""
        codes = codes.view(codes.shape[0], self.grid, self.grid)  # (B, H, W)
        return self.decode(self.vq.codes_to_vectors(codes)).clamp(-1, 1)


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): stride-2 4x4 convs with LeakyReLU 0.2 -> (B,1,h,w) logits.

    GroupNorm instead of BatchNorm (small batches, DDP). 32x32 input, 2 layers -> 8x8 logits.
    """

    def __init__(self, in_ch: int = 1, ch: int = 32, n_layers: int = 2):
        super().__init__()
        layers, c_prev = [], in_ch
        for i in range(n_layers):
            c = ch * 2 ** i
            layers.append(nn.Conv2d(c_prev, c, 4, stride=2, padding=1))
            if i > 0:
                layers.append(_norm(c))
            layers.append(nn.LeakyReLU(0.2))
            c_prev = c
        layers.append(nn.Conv2d(c_prev, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 1, h, w)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 1/2 [mean relu(1 - D(x)) + mean relu(1 + D(x_rec))]."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator (decoder) hinge loss: -mean D(x_rec)."""
    return -logits_fake.mean()


def perceptual_loss(feats_x: list[torch.Tensor], feats_rec: list[torch.Tensor]) -> torch.Tensor:
    """LPIPS-style perceptual loss (Zhang et al. 2018, unweighted; VQGAN's L_P) on a frozen
    classifier's feature maps: each map unit-normalised over channels, squared distance summed
    over channels, averaged over positions, then over the L maps:

        L_P = 1/L sum_l mean_{ij} || n(f_l(x))_ij - n(f_l(x_rec))_ij ||^2,   n(f) = f / ||f||_channels

    feats_x, feats_rec: lists of (B, C_l, H_l, W_l) maps of x (no gradient needed) and of x_rec."""
    loss = 0.0
    for a, b in zip(feats_x, feats_rec):
        a = a / (a.norm(dim=1, keepdim=True) + 1e-8)
        b = b / (b.norm(dim=1, keepdim=True) + 1e-8)
        loss = loss + ((a - b) ** 2).sum(1).mean()
    return loss / len(feats_x)


def codebook_stats(codes: torch.Tensor, K: int) -> dict:
    """Code histogram summary: usage = fraction of the K codes used at least once,
    perplexity = exp(entropy of the histogram) (K if uniform over all codes)."""
    hist = torch.bincount(codes.flatten().long().cpu(), minlength=K).double()  # (K,)
    p = hist / hist.sum().clamp_min(1)
    p = p[p > 0]
    return {"usage": float((hist > 0).double().mean()),
            "perplexity": float(torch.exp(-(p * p.log()).sum()))}


if __name__ == "__main__":
    torch.manual_seed(0)
    cfg = VQConfig()
    model = VQModel(cfg)
    disc = PatchDiscriminator(cfg.in_ch, cfg.disc_ch)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"VQModel: {n_params / 1e6:.3f}M params, grid {model.grid}x{model.grid} = {model.num_tokens} tokens")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(128, cfg.in_ch, cfg.img_size, cfg.img_size) * 2 - 1  # (B, C, 32, 32)
    for step in range(4):
        x_rec, codes, vq_loss, z_e = model(x)
        loss = (x_rec - x).abs().mean() + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    print(f"4 training steps at batch 128, loss {loss.item():.3f}")
    assert x_rec.shape == x.shape and codes.shape == (128, model.grid, model.grid)
    n = model.vq.restart_dead_codes(z_e.detach().permute(0, 2, 3, 1).reshape(-1, cfg.code_dim))
    print(f"restarted {n} dead codes; stats {codebook_stats(codes, cfg.codebook_size)}")
    logits = disc(x)
    print(f"discriminator logits {tuple(logits.shape)}, d loss {hinge_d_loss(logits, disc(x_rec)).item():.3f}")
    model.eval()
    tokens = model.tokenize(x[:4])
    assert tokens.shape == (4, model.num_tokens)
    assert torch.allclose(model.detokenize(tokens), model.decode(model.encode(x[:4])[0]).clamp(-1, 1), atol=1e-5)
    print("ok")
