"""Non-autoregressive Transformer (NAT, MaskGIT-style) and its parallel-decoding generation.

Implements
- the class-conditional masked-token transformer and its training objective
  (AdaNAT §3.1; AutoNAT §3.1 "training strategy"): ceil(r * N) tokens are replaced by
  [MASK] with r ~ p(r), either MaskGIT's cosine law r = cos(pi/2 * u), u ~ U(0, 1), i.e.
  p(r) = 2 / (pi sqrt(1 - r^2)), or AutoNAT's Beta(alpha, beta) (AutoNAT §4.3, Eq. 6);
  cross-entropy with label smoothing on the masked positions; the class token is replaced
  by a null class 10% of the time so that classifier-free guidance works at sampling;
- one parallel-decoding step with per-sample actions a_t = (m, tau1, tau2, w) (AdaNAT §3.2,
  whose decoding equations are unnumbered, and the §4.2 action, Eq. 5): guided logits l = l_c + w (l_c - l_u); every [MASK]
  position is sampled from softmax(l / tau1); confidence c_i = log p(v_i = v_hat_i) under
  softmax(l) (+inf for tokens decoded earlier); the floor(N m) least confident positions,
  ranked by c + tau2 * Gumbel (the Gumbel-top-k trick), are masked again;
- the hand-written schedules (MaskGIT cosine m, linear tau2, constant tau1, linear w ramp)
  and `generate`, which runs T steps with any schedule(t, state) -> four (B,) actions:
  a heuristic, a searched table, or a learned policy.

Usage:
    cfg = NATConfig(vocab_size=256, num_tokens=64, num_classes=10)
    net = NAT(cfg)
    loss = masked_token_loss(net, tokens, labels)                      # training
    sched = heuristic_schedule(T=8, tau2_0=1.0, w_0=2.0)
    tokens = generate(net, labels, T=8, schedule=sched, mask_id=cfg.mask_id,
                      num_tokens=64, null_label=cfg.num_classes, generator=g)
"""
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class NATConfig:
    vocab_size: int = 256        # K, codebook size of the tokenizer; [MASK] has id K
    num_tokens: int = 64         # N, tokens per image (8x8)
    num_classes: int = 10        # class c in [0, num_classes); num_classes is the null class
    dim: int = 128               # C, transformer width
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    class_drop: float = 0.1      # probability of the null class in training (for CFG)
    label_smoothing: float = 0.1
    mask_dist: str = "cosine"    # p(r): "cosine" (MaskGIT) or "beta" (AutoNAT)
    alpha: float = 1.0           # Beta(alpha, beta) parameters when mask_dist == "beta"
    beta: float = 1.0

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    @property
    def null_label(self) -> int:
        return self.num_classes


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + Attn(LN(x)), x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, H, L, C/H)
        x = x + F.dropout(self.proj(a.transpose(1, 2).reshape(B, L, C)), p, self.training)
        return x + F.dropout(self.mlp(self.norm2(x)), p, self.training)


class NAT(nn.Module):
    """Bidirectional transformer over [class token, v_1 .. v_N].

    forward(tokens (B,N) long, labels (B,) long) -> (logits (B,N,K), features (B,N,C)),
    features being the final LayerNorm's output at the N image positions (the state the
    AdaNAT policy observes).
    """

    def __init__(self, cfg: NATConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size + 1, cfg.dim)     # + [MASK]
        self.cls_emb = nn.Embedding(cfg.num_classes + 1, cfg.dim)    # + null class
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.num_tokens + 1, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size)
        self.apply(self._init)
        nn.init.trunc_normal_(self.pos_emb, std=0.02)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([self.cls_emb(labels)[:, None], self.tok_emb(tokens)], dim=1) + self.pos_emb  # (B, N+1, C)
        for blk in self.blocks:
            x = blk(x)
        h = self.norm(x[:, 1:]).float()                            # (B, N, C)
        with torch.autocast(h.device.type, enabled=False):         # fp32 logits: guidance amplifies rounding
            return self.head(h), h                                 # (B, N, K), (B, N, C)


# ----------------------------------------------------------------------------- training

def sample_mask_ratio(B: int, cfg: NATConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """r ~ p(r), (B,): MaskGIT's r = cos(pi/2 u) or AutoNAT's Beta(alpha, beta)."""
    if cfg.mask_dist == "cosine":
        return torch.cos(math.pi / 2 * torch.rand(B, device=device))
    if cfg.mask_dist == "beta":
        return torch.distributions.Beta(torch.tensor(cfg.alpha), torch.tensor(cfg.beta)).sample((B,)).to(device)
    raise ValueError(f"unknown mask_dist {cfg.mask_dist!r}: use 'cosine' or 'beta'")


def mask_tokens(tokens: torch.Tensor, r: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace ceil(r N) random positions per sample (at least one) by [MASK].

    tokens (B,N), r (B,) -> (masked tokens (B,N), is_masked (B,N) bool)."""
    B, N = tokens.shape
    n = torch.ceil(r * N).long().clamp(1, N)                                  # (B,)
    rank = torch.rand(B, N, device=tokens.device).argsort(dim=1).argsort(dim=1)  # random permutation ranks
    is_masked = rank < n[:, None]
    return tokens.masked_fill(is_masked, mask_id), is_masked


def masked_token_loss(net: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (label-smoothed) on masked positions; class dropped to null w.p. class_drop."""
    cfg = net.cfg
    r = sample_mask_ratio(tokens.shape[0], cfg, tokens.device)
    inp, is_masked = mask_tokens(tokens, r, cfg.mask_id)
    drop = torch.rand(labels.shape, device=labels.device) < cfg.class_drop
    labels = labels.masked_fill(drop, cfg.null_label)
    logits, _ = net(inp, labels)                                             # (B, N, K)
    return F.cross_entropy(logits[is_masked], tokens[is_masked], label_smoothing=cfg.label_smoothing)


# ----------------------------------------------------------------------------- decoding

def gumbel(shape: tuple, device: torch.device, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Standard Gumbel noise -log(-log U)."""
    u = torch.rand(shape, device=device, generator=generator)
    e = -torch.log(u.clamp_min(1e-20))                # Exp(1), > 0
    return -torch.log(e.clamp_min(1e-20))


def decode_step(tokens: torch.Tensor, logits_c: torch.Tensor, logits_u: Optional[torch.Tensor],
                m: torch.Tensor, tau1: torch.Tensor, tau2: torch.Tensor, w: torch.Tensor,
                mask_id: int, generator: Optional[torch.Generator] = None, group: int = 1) -> torch.Tensor:
    """One parallel-decoding step (AdaNAT §3.2, unnumbered equations) with per-sample actions.

    tokens (B,N) long with mask_id at masked positions; logits_c, logits_u (B,N,K) or
    logits_u None (no guidance); m, tau1, tau2, w (B,). Returns the new tokens (B,N):
    floor(N m_b) positions stay masked (at most masked_b - 1, so each step decodes at
    least one token), the rest of the masked positions get their sampled token, and
    tokens decoded earlier never change. group = G > 1: consecutive blocks of G rows share
    their random numbers (policy training compares actions on the same generation luck).
    """
    B, N = tokens.shape
    K = logits_c.shape[-1]
    # One uniform per position for the categorical draw and one Gumbel per position for the
    # re-masking, drawn for all (B, N) whatever is masked: a sample's random numbers do not
    # depend on the other samples or on earlier actions (common random numbers).
    u = torch.rand(B // group, N, device=tokens.device, generator=generator).repeat_interleave(group, 0)
    g = gumbel((B // group, N), tokens.device, generator).repeat_interleave(group, 0)
    is_masked = tokens == mask_id                                            # (B, N)
    b, n = is_masked.nonzero(as_tuple=True)                                  # the M masked positions
    l = logits_c[b, n].float()                                               # (M, K), only where needed
    if logits_u is not None:
        l = l + w[b, None] * (l - logits_u[b, n].float())                    # guided logits
    # Sample v ~ softmax(l / tau1) by inverting the CDF at u; tau1 = 0 is the argmax.
    t1 = tau1.float()[b]                                                     # (M,)
    cdf = torch.softmax(l / t1.clamp_min(1e-6)[:, None], dim=-1).cumsum(-1)  # (M, K)
    v = (cdf < u[b, n, None]).sum(-1).clamp_max(K - 1)
    v = torch.where(t1 > 0, v, l.argmax(-1))                                 # (M,)
    logp = l.gather(-1, v[:, None])[:, 0] - torch.logsumexp(l, dim=-1)      # (M,), untempered
    v_hat = tokens.clone()
    v_hat[b, n] = v                                                          # (B, N)
    c = torch.full((B, N), math.inf, device=tokens.device)                   # +inf: decoded earlier
    c[b, n] = logp
    c = c + tau2.view(B, 1) * g                                              # +inf stays +inf
    n_masked = is_masked.sum(dim=1)                                          # (B,)
    n_keep_masked = torch.floor(N * m.float() + 1e-4).long()                # 1e-4: float32 round-off, e.g. cos(pi/3) < 0.5
    n_keep_masked = torch.minimum(n_keep_masked.clamp_min(0), (n_masked - 1).clamp_min(0))
    rank = c.argsort(dim=1).argsort(dim=1)                                   # 0 = least confident
    remask = rank < n_keep_masked[:, None]                                   # (B, N)
    return v_hat.masked_fill(remask, mask_id)


# ----------------------------------------------------------------------------- schedules

def cosine_mask(t, T: int):
    """m_t = cos(pi/2 * (t+1)/T): the fraction still masked after step t (0 at t = T-1)."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return torch.cos(math.pi / 2 * (t + 1) / T)


def linear_tau2(t, T: int, tau2_0: float):
    """tau2_t = tau2_0 * (1 - (t+1)/T): re-masking randomness annealed to 0."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return tau2_0 * (1 - (t + 1) / T)


def constant_tau1(t, T: int, tau1: float = 1.0):
    """tau1_t = tau1 (1 in MaskGIT)."""
    return torch.full_like(torch.as_tensor(t, dtype=torch.float32), tau1)


def linear_w(t, T: int, w_0: float):
    """w_t = w_0 * t / T: guidance ramped up as the image forms."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return w_0 * t / T


MASKGIT = dict(tau2_0=4.5, w_0=0.0)                  # MaskGIT's heuristic: linear tau2 from 4.5, no guidance


ADANAT_TAU2_0 = 1.0                                  # AdaNAT's heuristic: tau2 from 1, w_0 swept



def heuristic_table(T: int, tau2_0: float = 4.5, w_0: float = 0.0, tau1: float = 1.0) -> torch.Tensor:
    """(T, 4) table of [m, tau1, tau2, w] from the hand-written rules.

    MaskGIT: tau2_0 = 4.5, w_0 = 0. AdaNAT's heuristic: tau2_0 = 1, w_0 > 0."""
    t = torch.arange(T)
    return torch.stack([cosine_mask(t, T), constant_tau1(t, T, tau1), linear_tau2(t, T, tau2_0), linear_w(t, T, w_0)], 1)


@dataclass
class NATState:
    """What a schedule may look at before choosing step t's actions."""
    t: int
    tokens: torch.Tensor      # (B, N) current token map v^(t)
    features: torch.Tensor    # (B, N, C) generator's final-LayerNorm features of v^(t), conditional branch
    labels: torch.Tensor      # (B,)


Schedule = Callable[[int, NATState], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def table_schedule(table: torch.Tensor) -> Schedule:
    """A static schedule from a table of [m, tau1, tau2, w]: (T, 4), shared by all samples, or
    (C, T, 4), C schedules interleaved: row b follows table[b % C] (one batch evaluates C
    candidates, e.g. an AutoNAT search update; B must be a multiple of C)."""
    tables = table if table.dim() == 3 else table[None]                     # (C, T, 4)
    C = tables.shape[0]

    def row_table(state: NATState) -> torch.Tensor:                        # (B,) which table each row follows
        if state.tokens.shape[0] % C:
            raise ValueError(f"batch of {state.tokens.shape[0]} rows is not a multiple of the {C} interleaved schedules")
        return torch.arange(state.tokens.shape[0], device=state.tokens.device) % C
    return indexed_schedule(tables, row_table)


def class_table_schedule(tables: torch.Tensor) -> Schedule:
    """A static schedule that knows only the class: row b follows tables[labels[b]], tables (K, T, 4)."""
    return indexed_schedule(tables, lambda state: state.labels)


def indexed_schedule(tables: torch.Tensor, row_table: Callable) -> Schedule:
    """Step t's actions of row b from tables[row_table(state)[b], t], tables (C, T, 4)."""
    def schedule(t: int, state: NATState):
        rows = tables[:, t].to(state.tokens.device, torch.float32)[row_table(state)]   # (B, 4)
        return tuple(rows[:, j] for j in range(4))
    return schedule


def heuristic_schedule(T: int, tau2_0: float = 4.5, w_0: float = 0.0, tau1: float = 1.0) -> Schedule:
    return table_schedule(heuristic_table(T, tau2_0, w_0, tau1))


def dedup_logits_fn(logits_fn: Callable) -> Callable:
    """logits_fn run once per distinct (tokens, label) row, its outputs copied to the duplicates: the same
    numbers (tested bit for bit), fewer forwards. From the all-[MASK] map a row depends on its label alone, so
    the first step costs one row per class (1/T of a policy rollout's forwards saved); in an AutoNAT search
    update the candidates that perturb step t decode steps 0..t-1 alike (same random numbers): about half."""
    def fn(tokens: torch.Tensor, labels: torch.Tensor):
        uniq, inv = torch.unique(torch.cat([tokens, labels[:, None]], 1), dim=0, return_inverse=True)   # (U, N+1), (B,)
        logits, feats = logits_fn(uniq[:, :-1], uniq[:, -1])
        return logits[inv], feats[inv]
    return fn


@torch.no_grad()
def generate(logits_fn: Callable, labels: torch.Tensor, T: int, schedule: Schedule, mask_id: int,
             num_tokens: int, null_label: Optional[int] = None,
             generator: Optional[torch.Generator] = None, group: int = 1,
             lookahead: int = 1, score_fn: Optional[Callable] = None) -> torch.Tensor:
    """Run T parallel-decoding steps from the all-[MASK] map; returns tokens (B, N).

    logits_fn(tokens (B',N), labels (B',)) -> (logits (B',N,K), features (B',N,C)).
    With null_label given, each step costs one batched forward of [cond; null] (2B rows)
    and the schedule's w is applied; with null_label None there is no guidance (w ignored).
    group: see decode_step (B must be a multiple of it).

    Look-ahead sampling (AdaGen §III-F1, Eq. 13, Algorithm 2): with lookahead = k > 1, each
    transition t -> t+1 before the last draws k candidate next maps v^(t+1)_1..k (independent
    random numbers, the same actions), runs the generator on all of them and keeps, per sample,
    the candidate with the highest score_fn(features (B*k, N, C), t+1 (B*k,)) -> (B*k,) (the
    critic V(s_{t+1})). The kept candidate's forward is the next step's forward, so a step
    costs k forwards instead of 1: 1 + k (T - 1) per image in all (x2 rows with guidance).
    score_fn = "random" is the control: a uniform pick drawn from `generator`, so the picks
    follow the generation's own random stream (the same per chunk on any number of processes).
    """
    if lookahead > 1 and (score_fn is None or group != 1):
        raise ValueError("lookahead > 1 needs a score_fn (or 'random') and group = 1")
    B = labels.shape[0]

    def forward(tok: torch.Tensor, y: torch.Tensor):                     # -> logits_c, logits_u, features
        if null_label is None:
            logits_c, feats = logits_fn(tok, y)
            return logits_c, None, feats
        n = tok.shape[0]
        both, feats = logits_fn(tok.repeat(2, 1), torch.cat([y, torch.full_like(y, null_label)]))
        return both[:n], both[n:], feats[:n]

    tokens = torch.full((B, num_tokens), mask_id, dtype=torch.long, device=labels.device)
    out = forward(tokens, labels)
    for t in range(T):
        logits_c, logits_u, feats = out
        m, tau1, tau2, w = schedule(t, NATState(t, tokens, feats, labels))
        if t == T - 1:
            m = torch.zeros_like(m)                                          # the last step decodes everything
            return decode_step(tokens, logits_c, logits_u, m, tau1, tau2, w, mask_id, generator, group)
        k = lookahead
        rep = lambda x: None if x is None else x.repeat_interleave(k, 0)     # (B, ...) -> (B*k, ...)
        cand = decode_step(rep(tokens), rep(logits_c), rep(logits_u), rep(m), rep(tau1), rep(tau2), rep(w),
                           mask_id, generator, group)                        # (B*k, N)
        out = forward(cand, rep(labels))
        if k == 1:
            tokens = cand
            continue
        if score_fn == "random":
            scores = torch.rand(B * k, generator=generator, device=cand.device)                      # (B*k,)
        else:
            scores = score_fn(out[2], torch.full((B * k,), t + 1, dtype=torch.long, device=cand.device))   # (B*k,)
        keep = torch.arange(B, device=cand.device) * k + scores.view(B, k).argmax(1)                 # (B,)
        tokens = cand[keep]
        out = tuple(None if x is None else x[keep] for x in out)
    return tokens


if __name__ == "__main__":
    torch.manual_seed(0)
    cfg = NATConfig(vocab_size=16, num_tokens=16, dim=32, depth=1, heads=2)
    net = NAT(cfg)
    x = torch.randint(0, 16, (4, 16))
    y = torch.randint(0, 10, (4,))
    print("loss", masked_token_loss(net, x, y).item(), "(log K =", math.log(16), ")")
    out = generate(net, y, 4, heuristic_schedule(4, 1.0, 2.0), cfg.mask_id, 16, cfg.null_label)
    assert (out != cfg.mask_id).all()
    print("generated", out.shape, "ok")
