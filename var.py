"""Next-scale prediction (VAR: Tian et al., NeurIPS 2024, §3) with AdaGen's per-scale, per-sample
sampling knobs (AdaGen §III, the autoregressive paradigm).

Multi-scale residual tokenizer (VAR §3.2, Algorithm 1; its quant.py). On an encoder's map
f = E(x) (B, C_vae, H, W), scales s_1 < ... < s_K = H (here (1, 2, 3, 4, 5, 6, 8): K = 7 and
L = sum s_k^2 = 155 tokens for the 8 x 8 latent), ONE shared codebook e (V, C_vae):

    r_1 = f,  f_hat_0 = 0
    q_k = argmin_v || area(r_k, s_k) - e_v ||             the (s_k, s_k) code map of scale k
    h_k = phi_k(bicubic(e[q_k], H))                       phi(h) = 1/2 h + 1/2 conv3x3(h)
    f_hat_k = f_hat_{k-1} + h_k,   r_{k+1} = r_k - h_k
    x_hat = G(f_hat_K);  L_vq = 1/K sum_k [ ||f_hat_k - sg f||^2 + beta ||sg f_hat_k - f||^2 ]

phi_k is one of a few shared convs, the one whose tick in (0, 1) is nearest k / (K - 1) (VAR's
PhiPartiallyShared); here each starts as the identity, so a trained single-scale VQ is the start.

Next-scale prediction (VAR §3.1, Eq. 6): p(q_1, ..., q_K | c) = prod_k p(q_k | q_<k, c). Scale 1's
input is a start token from the class c; scale k's input (k >= 2) is area(f_hat_{k-1}, s_k)
projected by a linear map, plus a scale embedding and per-position embeddings. A block-causal
mask lets a token see every token of its own and earlier scales, none of later ones; the class
also enters every block through AdaLN; a null class (dropped with probability 0.1 in training)
gives classifier-free guidance. Cross-entropy over all L tokens.

Sampling with per-sample knobs (AdaGen's MDP over the K scales): at scale k the schedule gives
each sample a_k = [w, k_frac, p, tau]:

    l = (1 + w) l_cond - w l_uncond;   l <- l / tau
    keep the top-k logits, k = max(1, round(k_frac * V)), then the nucleus of mass p; sample.

VAR's defaults: w ramped linearly over scales from 0 to 1.5, top-k = 900 / 4096 of the
vocabulary, top-p = 0.96, tau = 1 (`default_table`). Rows whose w is 0 run no null-class forward.
The transformer is re-run on the whole prefix at each scale (no KV cache: shorter to read; the
block-causal mask makes the logits the same).

Usage (imports torch only; the encoder / decoder arrive from outside, e.g. vqgan.VQModel's):
    quant = MultiScaleQuantizer(V=512, C_vae=32)                       # SCALES, 4 shared phi convs
    f_hat, codes, vq_loss = quant(encoder(x)); x_rec = decoder(f_hat)  # codes: (B, L)
    net = VAR(VARConfig(vocab_size=512, code_dim=32, num_classes=10))
    loss = var_loss(net, codes, quant.next_inputs(codes), labels, null_label=10)
    codes, f_hat = generate(net, quant, labels, table_schedule(default_table(7)), null_label=10)
"""
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

SCALES = (1, 2, 3, 4, 5, 6, 8)        # s_k: 155 tokens for an 8 x 8 latent
ACTIONS = ("w", "k_frac", "p", "tau")  # the columns of default_table and of every (.., 4) VAR schedule tensor


def offsets(scales: tuple = SCALES) -> list[int]:
    """Where each scale's tokens start in the flattened (B, L) sequence, and L last: [0, 1, 5, 14, ..., 155]."""
    out = [0]
    for s in scales:
        out.append(out[-1] + s * s)
    return out


def resize(z: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """(B, C, h, h) -> (B, C, size, size); the identity when the size already matches (VAR's last scale)."""
    return z if z.shape[-1] == size else F.interpolate(z, size=(size, size), mode=mode)


# ----------------------------------------------------------------------------- the multi-scale tokenizer

class Phi(nn.Conv2d):
    """phi(h) = 1/2 h + 1/2 conv3x3(h); the conv starts as the identity (dirac weights, zero bias)."""

    def __init__(self, C: int):
        super().__init__(C, C, 3, padding=1)
        nn.init.dirac_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return 0.5 * h + 0.5 * super().forward(h)


class MultiScaleQuantizer(nn.Module):
    """VAR's residual quantizer: f (B, C, H, W) -> (f_hat straight-through, codes (B, L), L_vq); `usage` (K, V)
    counts each scale's code choices in training mode since the last restart."""

    def __init__(self, V: int, C_vae: int, scales: tuple = SCALES, n_phi: int = 4, beta: float = 0.25):
        super().__init__()
        self.V, self.C, self.scales, self.beta = V, C_vae, tuple(scales), beta
        self.embedding = nn.Embedding(V, C_vae)
        self.phis = nn.ModuleList(Phi(C_vae) for _ in range(n_phi))
        self.ticks = [(2 * i + 1) / (2 * n_phi) for i in range(n_phi)]   # phi_i serves scales near its tick
        self.register_buffer("usage", torch.zeros(len(scales), V))

    def phi(self, k: int) -> Phi:
        r = k / max(1, len(self.scales) - 1)
        return self.phis[min(range(len(self.ticks)), key=lambda i: abs(self.ticks[i] - r))]

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Codes of the nearest entries: (B, C, s, s) -> (B, s * s) long."""
        z = z.permute(0, 2, 3, 1).reshape(z.shape[0], -1, self.C)         # (B, s*s, C)
        e = self.embedding.weight                                          # (V, C)
        d = z.pow(2).sum(-1, keepdim=True) - 2 * z @ e.t() + e.pow(2).sum(1)
        return d.argmin(-1)

    def contribution(self, q: torch.Tensor, k: int, H: int) -> torch.Tensor:
        """h_k = phi_k(bicubic(e[q_k], H)): codes (B, s_k * s_k) -> (B, C, H, H)."""
        s = self.scales[k]
        z = self.embedding(q).view(q.shape[0], s, s, self.C).permute(0, 3, 1, 2)   # (B, C, s, s)
        return self.phi(k)(resize(z, H, "bicubic"))

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        H = f.shape[-1]
        r, f_hat, loss, codes = f.detach(), torch.zeros_like(f), f.new_zeros(()), []
        for k, s in enumerate(self.scales):
            q = self.nearest(resize(r, s, "area"))                         # (B, s*s)
            h = self.contribution(q, k, H)
            f_hat, r = f_hat + h, r - h.detach()
            loss = loss + F.mse_loss(f_hat, f.detach()) + self.beta * F.mse_loss(f_hat.detach(), f)
            codes.append(q)
            if self.training:
                with torch.no_grad():
                    self.usage[k] += torch.bincount(q.flatten(), minlength=self.V).to(self.usage)
        f_hat_st = f + (f_hat - f).detach()                               # value f_hat; d/df = I (straight through)
        return f_hat_st, torch.cat(codes, 1), loss / len(self.scales)

    def partial_sums(self, codes: torch.Tensor, H: int) -> list[torch.Tensor]:
        """[f_hat_1, ..., f_hat_K] of codes (B, L), each (B, C, H, H)."""
        o, f_hat, out = offsets(self.scales), 0, []
        for k in range(len(self.scales)):
            f_hat = f_hat + self.contribution(codes[:, o[k]:o[k + 1]], k, H)
            out.append(f_hat)
        return out

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """f_hat_K (B, C, H, H) of codes (B, L)."""
        return self.partial_sums(codes, self.scales[-1])[-1]

    def next_inputs(self, codes: torch.Tensor) -> torch.Tensor:
        """The transformer's teacher-forcing inputs of scales 2..K: area(f_hat_{k-1}, s_k), (B, L - 1, C)."""
        sums = self.partial_sums(codes, self.scales[-1])
        return torch.cat([resize(sums[k - 1], s, "area").flatten(2).transpose(1, 2)
                          for k, s in enumerate(self.scales) if k > 0], 1)

    @torch.no_grad()
    def restart_dead_codes(self, z_flat: torch.Tensor) -> int:
        """Codes no scale chose since the last restart become random rows of z_flat (M, C) (the residuals being
        quantized); usage resets. Returns how many were restarted."""
        dead = (self.usage.sum(0) < 1).nonzero().flatten()
        if len(dead):
            rows = torch.randint(0, len(z_flat), (len(dead),), device=z_flat.device)
            self.embedding.weight[dead] = z_flat[rows].to(self.embedding.weight)
        self.usage.zero_()
        return len(dead)


# ----------------------------------------------------------------------------- the next-scale transformer

@dataclass
class VARConfig:
    vocab_size: int                  # V: the shared codebook
    code_dim: int                    # C_vae
    num_classes: int
    scales: tuple = SCALES
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    class_drop: float = 0.1          # the null class's training probability (guidance)

    @property
    def null_label(self) -> int:
        return self.num_classes


class AdaLNBlock(nn.Module):
    """x + g1 * Attn(LN(x)(1 + s1) + b1, mask), x + g2 * MLP(LN(x)(1 + s2) + b2); (b, s, g) from the class."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))
        self.ada = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask: Optional[torch.Tensor],
                past: Optional[tuple] = None) -> tuple[torch.Tensor, tuple]:
        """x (B, n, C) -> (x, (k, v) of the past and these n tokens, each (B, heads, l, C/heads))."""
        B, L, C = x.shape
        b1, s1, g1, b2, s2, g2 = self.ada(F.silu(cond))[:, None].chunk(6, -1)        # (B, 1, C) each
        q, k, v = self.qkv(self.norm(x) * (1 + s1) + b1).view(B, L, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if past is not None:                                                         # the cache of the earlier scales
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)                   # (B, heads, n, C/heads)
        x = x + g1 * self.proj(a.transpose(1, 2).reshape(B, L, C))
        return x + g2 * self.mlp(self.norm(x) * (1 + s2) + b2), (k, v)


class VAR(nn.Module):
    """forward(x_in (B, l - 1, C_vae), labels (B,)) -> (logits (B, l, V), features (B, l, dim), cache) for the first
    l tokens (l a scale boundary; x_in the inputs of scales 2.. up to it). Features: the final AdaLN's output.
    With `past` (the cache of an earlier call: each block's keys and values), x_in is one more scale's inputs
    alone and the outputs are its tokens' (VAR's KV cache: the block-causal mask makes them the same)."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.cfg, L = cfg, offsets(cfg.scales)[-1]
        self.class_emb = nn.Embedding(cfg.num_classes + 1, cfg.dim)                    # + null class
        self.word_embed = nn.Linear(cfg.code_dim, cfg.dim)
        self.pos = nn.Parameter(0.02 * torch.randn(1, L, cfg.dim))
        self.lvl_emb = nn.Embedding(len(cfg.scales), cfg.dim)
        level = torch.cat([torch.full((s * s,), k) for k, s in enumerate(cfg.scales)])  # (L,) each token's scale
        self.register_buffer("level", level, persistent=False)
        self.register_buffer("mask", level[:, None] >= level[None, :], persistent=False)  # (L, L) block-causal
        self.blocks = nn.ModuleList(AdaLNBlock(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.head_norm = nn.LayerNorm(cfg.dim, elementwise_affine=False)
        self.head_ada = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size)
        for m in [b.ada for b in self.blocks] + [self.head_ada]:                       # AdaLN starts as LN, gates at 0
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x_in: torch.Tensor, labels: torch.Tensor, past: Optional[list] = None):
        cond = self.class_emb(labels)                                                  # (B, dim)
        x = self.word_embed(x_in.float())                                              # (B, n, dim)
        if past is None:
            x, a, mask = torch.cat([cond[:, None], x], 1), 0, self.mask[:x.shape[1] + 1, :x.shape[1] + 1]
        else:                                                                          # one scale: sees all of it
            a, mask = past[0][0].shape[2], None
        x = x + self.pos[:, a:a + x.shape[1]] + self.lvl_emb(self.level[a:a + x.shape[1]])
        cache = []
        for j, blk in enumerate(self.blocks):
            x, kv = blk(x, cond, mask, None if past is None else past[j])
            cache.append(kv)
        shift, scale = self.head_ada(F.silu(cond))[:, None].chunk(2, -1)
        h = self.head_norm(x) * (1 + scale) + shift                                    # (B, n, dim)
        return self.head(h), h, cache


def var_loss(net: nn.Module, codes: torch.Tensor, x_in: torch.Tensor, labels: torch.Tensor, null_label: int,
             class_drop: float = 0.1, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Cross-entropy over all L tokens (codes (B, L), x_in (B, L - 1, C_vae)), the class replaced by the null class
    with probability class_drop."""
    drop = torch.rand(labels.shape, device=labels.device, generator=generator) < class_drop
    logits = net(x_in, torch.where(drop, torch.full_like(labels, null_label), labels))[0]
    return F.cross_entropy(logits.flatten(0, 1).float(), codes.flatten())


# ----------------------------------------------------------------------------- sampling with per-sample knobs

def default_table(K: int = len(SCALES), w_max: float = 1.5, k_frac: float = 900 / 4096, p: float = 0.96,
                  tau: float = 1.0) -> torch.Tensor:
    """VAR's sampling defaults as a (K, 4) table [w, k_frac, p, tau]: guidance ramped 0 -> w_max over the scales."""
    w = torch.tensor([w_max * k / max(1, K - 1) for k in range(K)])
    return torch.stack([w, torch.full((K,), k_frac), torch.full((K,), p), torch.full((K,), tau)], 1)


@dataclass
class VARState:
    """What a schedule sees before scale k is sampled."""
    k: int
    features: torch.Tensor   # (B, H*H, dim) the transformer's features of scale k's tokens, resized to the H x H grid
    labels: torch.Tensor     # (B,)
    f_hat: torch.Tensor      # (B, C_vae, H, H) the partial sum of the scales before k


Schedule = Callable[[int, VARState], tuple]   # (k, state) -> (w, k_frac, p, tau), each a float or (B,)


def table_schedule(table: torch.Tensor) -> Schedule:
    """A static (K, 4) table, or per-class tables (num_classes, K, 4) indexed by each row's label."""
    def schedule(k: int, state: VARState):
        row = table[k] if table.dim() == 2 else table.to(state.labels.device)[state.labels, k]   # (4,) or (B, 4)
        return tuple(row[..., j] for j in range(len(ACTIONS)))
    return schedule


def filter_logits(l: torch.Tensor, k_frac: torch.Tensor, p: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """l (B, n, V) / tau, then top-k (k = max(1, round(k_frac V))) and top-p per row: -inf outside (B, n, V).
    The most likely token is always kept, so top-k = 1 or p -> 0 leaves the argmax alone."""
    V = l.shape[-1]
    l = l.float() / tau.view(-1, 1, 1)
    srt, idx = l.sort(-1, descending=True)                                     # (B, n, V)
    rank = torch.arange(V, device=l.device)
    keep = rank < (k_frac * V).round().clamp(1, V).view(-1, 1, 1)
    prob = torch.where(keep, srt, -math.inf).softmax(-1)
    keep = keep & ((prob.cumsum(-1) - prob < p.view(-1, 1, 1)) | (rank == 0))   # the nucleus: mass before < p
    return torch.full_like(l, -math.inf).scatter(-1, idx, torch.where(keep, srt, -math.inf))


def rows_of(cache: list, idx: torch.Tensor) -> list:
    """The cache's rows idx."""
    return [(k[idx], v[idx]) for k, v in cache]


def generate(logits_fn: Callable, quant: MultiScaleQuantizer, labels: torch.Tensor, schedule: Schedule, null_label: int,
             generator: Optional[torch.Generator] = None, group: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (B, L) and f_hat (B, C_vae, H, H) of labels (B,) scale by scale. logits_fn(x_in, labels, past) ->
    (logits, features, cache) as VAR.forward: the class-conditional rows run with a KV cache; the null-class rows
    only where w != 0, cached where their cache is complete (their earlier scales were guided), else on the whole
    prefix. Sampling is the Gumbel-max trick on the filtered logits with noise from `generator`; group = G:
    consecutive blocks of G rows share the noise (common random numbers)."""
    B, scales, H, dev = len(labels), quant.scales, quant.scales[-1], labels.device
    f_hat = torch.zeros(B, quant.C, H, H, device=dev)
    x_all, codes, cache, cache_u = f_hat.new_zeros(B, 0, quant.C), [], None, None   # x_all: every scale's inputs so far
    has_u = torch.zeros(B, dtype=torch.bool, device=dev)                              # rows whose cache_u is complete
    full = lambda v: torch.as_tensor(v, dtype=torch.float, device=dev).expand(B)
    for k, s in enumerate(scales):
        x_new = x_all[:, x_all.shape[1] - (s * s if k else 0):]                        # (B, s*s, C); none at scale 1
        logits, feats, cache = logits_fn(x_new, labels, cache)
        l = logits.float()                                                             # (B, s*s, V)
        h = resize(feats.float().transpose(1, 2).reshape(B, -1, s, s), H, "nearest").flatten(2).transpose(1, 2)
        w, k_frac, p, tau = (full(v) for v in schedule(k, VARState(k, h, labels, f_hat)))   # h: (B, H*H, dim)
        guided = w != 0
        if guided.any():                                                               # the null class, where w != 0
            l_u, kv_u = l.clone(), None
            for cached in (True, False):                                               # cached / whole prefix
                idx = (guided & (has_u if cached else ~has_u)).nonzero()[:, 0]
                if len(idx) == 0:
                    continue
                y0 = torch.full_like(labels[idx], null_label)
                out = logits_fn(x_new[idx], y0, rows_of(cache_u, idx)) if cached else logits_fn(x_all[idx], y0, None)
                l_u[idx] = out[0][:, -s * s:].float()
                kv_u = kv_u or [(torch.zeros_like(kc), torch.zeros_like(vc)) for kc, vc in cache]
                for (ku, vu), (kn, vn) in zip(kv_u, out[2]):
                    ku[idx], vu[idx] = kn, vn
            cache_u, has_u = kv_u, guided.clone()
            wg = w[guided].view(-1, 1, 1)
            l[guided] = (1 + wg) * l[guided] - wg * l_u[guided]
        else:
            has_u = torch.zeros_like(has_u)
        u = torch.rand((B // group, s * s, l.shape[-1]), device=dev, generator=generator)
        gumbel = -torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20)).repeat_interleave(group, 0)
        q = (filter_logits(l, k_frac, p, tau) + gumbel).argmax(-1)                   # (B, s*s)
        codes.append(q)
        f_hat = f_hat + quant.contribution(q, k, H)
        if k + 1 < len(scales):
            x_all = torch.cat([x_all, resize(f_hat, scales[k + 1], "area").flatten(2).transpose(1, 2)], 1)
    return torch.cat(codes, 1), f_hat


if __name__ == "__main__":
    torch.manual_seed(0)
    quant = MultiScaleQuantizer(V=4096, C_vae=8)
    with torch.no_grad():
        quant.embedding.weight.copy_(torch.randn(4096, 8) * torch.rand(4096, 1))       # dense at every magnitude
    f = F.interpolate(torch.randn(2, 8, 3, 3), size=(8, 8), mode="bicubic")            # most energy at low frequencies
    f_hat, codes, _ = quant(f)
    sums = quant.partial_sums(codes, 8)
    assert torch.allclose(f_hat, sums[-1], atol=1e-5) and codes.shape == (2, offsets()[-1])
    print("residual norm by scale:", [round((f - s).norm().item(), 2) for s in sums])
    net = VAR(VARConfig(vocab_size=4096, code_dim=8, num_classes=3, dim=32, depth=2, heads=2))
    x_in = quant.next_inputs(codes)
    logits = net(x_in, torch.tensor([0, 1]))[0]
    x2 = x_in.clone()
    x2[:, -64:] += 1.0                                                                 # change the last scale's inputs
    assert torch.equal(net(x2, torch.tensor([0, 1]))[0][:, :offsets()[-2]], logits[:, :offsets()[-2]])
    out, _ = generate(net, quant, torch.tensor([0, 1, 2]), table_schedule(default_table()), null_label=3)
    print("block-causal mask holds; generated codes", tuple(out.shape))
