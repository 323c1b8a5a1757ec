"""The run's configuration: TrainConfig (every key a stage reads), the presets, and the command
line's config handling: a run folder's config.json, --set KEY=VALUE and --steps on top, checked.

TrainConfig reads by stage: each stage's keys share its prefix (vq_*, backbone_*, featnet_*, ...,
nat_*, pi_*), the experiments' keys come last; STAGE_KEYS maps every stage to its steps, learning-rate
and batch keys; `validate` checks the stages that run. Each model has its own @dataclass config in its
concept file (vqgan.VQConfig, nat.NATConfig, ...), built here from a TrainConfig (`vq_config`,
`nat_config`). A run folder is one experiment: once a stage has written a checkpoint, the keys that
shaped it may no longer change (FREE_PREFIXES may: each of their checkpoints carries its own copy).
Older run folders load: RENAMED maps their keys to the current names.
"""
import argparse
import dataclasses
import os
from dataclasses import dataclass

import models
import nat
import runs
import samplers
import schedules
import vqgan


@dataclass
class TrainConfig:
    """Everything a run depends on, by stage (each stage's keys share its prefix; STAGE_KEYS below names
    every stage's steps, learning-rate and batch keys). Presets (below) override the defaults by name."""

    preset: str = "small"
    data: str | None = None          # None: Fashion-MNIST (./data, Debian package, download); a folder; "synthetic"
    img_size: int = 32
    channels: int = 1
    seed: int = 0
    bf16: bool = True                # bf16 autocast for the transformer on CUDA (ignored on CPU)
    compile: bool = False            # torch.compile the generators' training forward (--compile)
    gen_rows: int = 0                # rows per generator forward in generation (0: the chunk size); lower it after an
                                     # out-of-memory error: the random numbers are keyed by chunk, the samples do not change
    ckpt_every_s: float = 300.0      # seconds between checkpoints inside a stage
    log_every: int = 50              # steps between log.jsonl records
    # --- vq: the tokenizer
    vq_steps: int = 5000
    vq_batch: int = 128
    vq_lr: float = 1e-3
    vq_ch: int = 32
    vq_ch_mult: tuple = (1, 2)
    vq_n_res: int = 2
    vq_codebook_size: int = 512
    vq_code_dim: int = 32
    vq_warmup: int = 100
    vq_restart_every: int = 100      # dead-code restart period (steps); off in the last 20% of training
    vq_gan_weight: float = 0.0          # hinge patch-GAN generator weight (0: off)
    vq_gan_start: int = 0               # steps of plain reconstruction before the GAN starts
    vq_perceptual: float = 0.5       # weight of the perceptual loss L_P on the backbone classifier's
                                     # feature maps (never the FID network's); > 0 needs the backbone stage first
    # --- the frozen networks (frozen_nets.py): every classifier trains with feat_batch, feat_lr, feat_warmup
    feat_batch: int = 128
    feat_lr: float = 2e-3
    feat_warmup: int = 50
    # backbone: a classifier, the frozen backbone of the tokenizer's perceptual loss and of the discriminator
    backbone_steps: int = 400
    backbone_width: int = 16
    backbone_dim: int = 64
    # featnet: the FID network, which every choice reads (training statistics)
    featnet_steps: int = 1500
    featnet_width: int = 32
    featnet_dim: int = 128
    # featnet2: a held-out judge, an independent FID network (another architecture and seed) trained as
    # long and as wide as featnet; no choice (w_0, searches, checkpoints) ever reads it
    featnet2_steps: int = 1500
    featnet2_width: int = 32
    featnet2_dim: int = 96
    featnet2_convs: int = 2             # conv layers per stage (featnet: 2, max pooling; featnet2: average pooling)
    # featssl: the self-supervised held-out judge (SimCLR, simclr.py); dssl: a second SimCLR network
    # (one conv per stage, average pooling, another seed), a candidate backbone of the discriminator
    ssl_steps: int = 800
    ssl_batch: int = 256             # images per step (two views each)
    ssl_lr: float = 2e-3
    ssl_tau: float = 0.2             # NT-Xent temperature
    ssl_width: int = 32
    ssl_dim: int = 128               # the FID features (f's penultimate layer)
    ssl_proj: int = 64               # the projection head's output z
    # dnet: the backbone classifier trained wider and longer, a candidate backbone of the discriminator
    dnet_steps: int = 1500
    dnet_width: int = 32
    dnet_dim: int = 128
    # --- nat: the generator
    nat_steps: int = 1500
    nat_batch: int = 256
    nat_lr: float = 1e-3
    nat_warmup: int = 100
    nat_wd: float = 0.05
    nat_dim: int = 128
    nat_depth: int = 4
    nat_heads: int = 4
    nat_dropout: float = 0.0
    nat_mask_dist: str = "cosine"        # training p(r): "cosine" (MaskGIT) or "beta" (AutoNAT)
    nat_mask_alpha: float = 1.0
    nat_mask_beta: float = 1.0
    nat_ema_decay: float = 0.995         # EMA of the NAT weights used for sampling
    # --- policy / static / smooth / fidelity: generation policies trained by PPO (keys pi_*; each policy
    # checkpoint carries its own copy, so these may change after the generator is trained)
    pi_T: tuple = (4, 8)             # decoding step counts to train a policy for (one checkpoint each)
    pi_iters: int = 300              # PPO iterations of a T = 4 policy (each: rollout, PPO epochs, D steps); a policy
                                     # for T steps runs pi_iters * 4 / T (the same generator forwards)
    pi_batch: int = 256              # trajectories per iteration
    pi_group: int = 4                # G > 1: groups of G trajectories share label and generation randomness and
                                     # differ only in exploration; advantage = reward - group mean (GRPO-style)
    pi_recipe: str = "ours"          # "official": the AdaNAT release's PPO (OFFICIAL_RECIPE overrides those keys)
    pi_lr: float = 1e-4              # Adam lr of the adaptive policy and its critic (AdaNAT: 1e-5 at 4096 traj.)
    pi_static_lr: float = 3e-3       # Adam lr of the static table and its per-step values
    pi_epochs: int = 5               # PPO epochs per iteration (K)
    pi_minibatches: int = 4          # minibatches per epoch
    pi_target_kl: float = 0.03       # stop the epochs of an iteration once approx_kl passes this (0: off)
    pi_grad_clip: float = 1.0        # gradient-norm clip of the PPO steps (0: off)
    pi_clip: float = 0.2
    pi_vf_coef: float = 0.5
    pi_ent_coef: float = 0.01
    pi_anchor: float = 1.0           # anchor: + pi_anchor * mean ||eta(s)||^2 (active knobs) keeps the residual
                                     # near its start (an L2 penalty; a KL to the start up to 1 / (2 sigma^2))
    pi_adv_floor: float = 0.05       # advantages / returns divided by max(batch std, this): a weak D gives small steps
    pi_sigma0: float = 0.15          # exploration std in pre-activation space (~ the search's epsilon: 0.15 moves m
    pi_sigma1: float = 0.1           # by ~0.04 = 2.4 of 64 tokens, w by ~0.15), annealed to pi_sigma1 ...
    pi_sigma_schedule: str = "linear"   # ... linearly over the iterations, or "step": pi_sigma1 from the half on
    pi_beta_ema: float = 0.5         # action smoothing of the `smooth` stage (AdaGen Eq. 12)
    pi_width: int = 128              # adaptive policy: features -> width, conv, -> hidden
    pi_hidden: int = 256
    pi_d_nets: str = "backbone"      # the frozen network(s) D's heads sit on: backbone, dnet, dssl, or several joined by
                                     # "+" (heads on each); never a judge (featnet, featnet2, featssl)
    pi_d_taps: tuple = (0, 1, 2)     # ... at these pooling stages (0: 16x16, 1: 8x8, 2: 4x4 positions)
    pi_d_lr: float = 1e-3            # discriminator: Adam(lr, betas (0.5, 0.999)) (AdaNAT: 1e-4 over 1000 iterations)
    pi_d_steps: int = 4              # D steps per iteration at the start ...
    pi_d_acc_band: tuple = (0.6, 0.8)   # ... then one more while D's accuracy (held-out reals vs current fakes) is
                                     # below the band, one fewer (at least 1) above it; () keeps pi_d_steps
    pi_d_steps_max: int = 8
    pi_d_replay: int = 4             # ... each on pi_batch fakes drawn from the last pi_d_replay iterations' rollouts
    pi_d_fresh: bool = False         # ... or each on a fresh rollout of the current policy (the AdaNAT release)
    pi_d_warmup: int = 5             # first iterations train D only (the reward must mean something) ...
    pi_d_warmup_steps: int = 20      # ... with this many D steps each; D then is saved as "disc_warmup"
    pi_d_real: str = "raw"           # reals for D: "raw" training images, or "recon" (their tokenizer reconstructions)
    pi_fid_every: int = 25           # iterations between FID checks (training-set statistics on every network; the best
                                     # on the FID network kept beside the last iterate)
    pi_fid_samples: int = 2000       # samples per FID check
    pi_sweep_samples: int = 2000     # samples per w_0 candidate of the heuristic the residual starts from
    pi_reward: str = "adversarial"   # the policy's reward (AdaGen §III-D): "adversarial" (D, trained alongside),
                                     # "fixed" (log p(y|x) under the frozen backbone classifier), or "fid" (minus the
                                     # FID vs training statistics of the trajectory's chunk); --reward; files *_<reward>_T*
    pi_fid_chunk: int = 64           # "fid" reward: trajectories per FID chunk (a group's members go to different chunks)
    pi_start: str = "heuristic"      # the residual's zero point: AdaNAT's heuristic, or the finished AutoNAT
                                     # "search" / "param" table of the same T (files <kind>_<start>_T{T}.pt)
    # ===== the experiments' stages (experiments/); their keys are free after the core stages (each of
    # their checkpoints carries its own copy)
    # --- search / param-search / flow-search: AutoNAT's finite-difference schedule search
    search_T: tuple = (4, 8)         # step counts to search a schedule for (search_T{T}.pt, param_T{T}.pt)
    search_updates: int = 12         # gradient-descent updates of the free T x 4 table
    search_param_updates: int = 12   # ... of the parametric family
    search_samples: int = 500        # samples per candidate schedule: FID against training statistics
    search_seed: int = 0             # one seed for every candidate (common random numbers); eval uses 1, 2, 3
    search_eps_m: float = 0.03       # finite-difference step of the mask ratios (~2 of 64 tokens; paper 0.01 of 256)
    search_eps: float = 0.1          # ... of tau1, tau2, w and of the parametric family (paper 0.1)
    search_lr_m: float = 3e-4        # learning rate of the mask ratios (paper 1e-3; our FID gradients are larger)
    search_lr: float = 0.01          # ... of tau1, tau2, w and the parametric family (paper 0.1)
    search_momentum: float = 0.5     # heavy-ball momentum
    search_clip: float = 30.0        # gradient-norm clip (0: off; paper: 10 on ImageNet-512)
    # --- pr-search: AutoNAT's training-strategy search, p(r) = Beta(alpha, beta) (optional stage)
    pr_budget: int = 6               # proxy NAT trainings the line search may spend
    pr_steps: int = 600              # steps of each proxy training (the short-training proxy)
    pr_T: int = 4                    # the candidates are judged at this T, with its searched schedule if there is one
    pr_samples: int = 1000           # samples per candidate FID (training-set statistics, seed search_seed)
    pr_final: bool = True            # then train the chosen p(r) for nat_steps in <run>/beta and search its schedule
    # --- flow, flow-policy, flow-static, flow-smooth, flow-search: the continuous generator (AdaGen's
    # rectified-flow / diffusion paradigm) on pixels, and its policies (pi_* keys as the NAT's)
    flow_path: str = "flow"          # "flow" (rectified flow, predicts v) or "vp" (VP diffusion, predicts eps); --path
    flow_steps: int = 3000
    flow_batch: int = 128
    flow_lr: float = 1e-3
    flow_warmup: int = 100
    flow_wd: float = 0.0
    flow_dim: int = 128
    flow_depth: int = 4
    flow_heads: int = 4
    flow_patch: int = 4              # 32x32 -> 64 patches of 4x4 (the policy sees (B, 64, C) features)
    flow_pi_nfe: tuple = (4, 8)      # flow-policy / -static / -smooth: one policy per NFE budget (pi_* keys as the NAT's)
    flow_pi_solver: str = "euler"    # ... with this solver and the most steps that fit (Heun, DPM-Solver++(2S): 2T - 1)
    flow_ema_decay: float = 0.995    # EMA of the flow's weights used for sampling

    def fault_keys(self, loop: str) -> tuple[str, str]:
        """(learning-rate key, batch key) of a training loop's stage (runs.train_loop's advice on a fault)."""
        return STAGE_KEYS[stage_of(loop)][1:]


PRESETS: dict[str, dict] = {
    # seconds on a CPU, synthetic data: for CI and the end-to-end test
    "test": dict(data="synthetic", vq_steps=30, vq_warmup=5, feat_warmup=5, vq_batch=32, vq_ch=8, vq_n_res=1, vq_codebook_size=32, vq_code_dim=8,
                 vq_restart_every=10, featnet_steps=30, feat_batch=32, featnet_width=8, featnet_dim=16, backbone_steps=20, backbone_width=4, backbone_dim=8,
                 nat_steps=30, nat_batch=32, nat_dim=32, nat_depth=1, nat_heads=2, nat_warmup=5,
                 log_every=10, nat_ema_decay=0.9, flow_ema_decay=0.9, pi_T=(4,), pi_iters=4, pi_batch=16, pi_width=16, pi_hidden=16,
                 pi_d_warmup=1, pi_d_steps=1, pi_d_warmup_steps=2, pi_fid_every=2, pi_fid_samples=40, pi_sweep_samples=20,
                 search_T=(4,), search_updates=2, search_param_updates=2, search_samples=40,
                 pr_budget=2, pr_steps=5, pr_samples=40,
                 flow_steps=20, flow_batch=16, flow_dim=32, flow_depth=1, flow_heads=2, flow_warmup=5, flow_pi_nfe=(4,),
                 featnet2_steps=30, featnet2_width=8, featnet2_dim=16, featnet2_convs=1,
                 ssl_steps=20, ssl_batch=32, ssl_width=8, ssl_dim=16, ssl_proj=8, dnet_steps=20, dnet_width=8, dnet_dim=16, pi_fid_chunk=4, vq_perceptual=0.1),
    # the default, for 2 CPU cores (stage times in the README)
    "small": dict(),
    # a first look in about 10 minutes on a laptop CPU: Fashion-MNIST, every default stage at T = 4, smaller and
    # shorter (its numbers are far from small's: the tokenizer and the NAT are undertrained)
    "laptop": dict(vq_steps=600, vq_ch=16, vq_n_res=1, featnet_steps=300, featnet2_steps=300, backbone_steps=150, ssl_steps=150,
                   ssl_batch=128, nat_steps=500, nat_dim=64, nat_depth=2, search_T=(4,), search_updates=2,
                   search_param_updates=2, search_samples=200, pi_T=(4,), pi_iters=12, pi_batch=64, pi_d_warmup=2,
                   pi_fid_every=6, pi_fid_samples=500, pi_sweep_samples=500),
    # one GPU, a few minutes to an hour
    "base": dict(vq_steps=8000, vq_ch=64, vq_codebook_size=512, vq_gan_weight=0.1, vq_gan_start=4000,
                 featnet_steps=4000, featnet_width=48, nat_steps=30000, nat_batch=512, nat_lr=6e-4,
                 nat_warmup=1000, nat_dim=384, nat_depth=8, nat_heads=6, nat_dropout=0.1, nat_ema_decay=0.9995, flow_ema_decay=0.9995,
                 search_samples=2000, search_updates=30, search_param_updates=30, pr_steps=5000,
                 flow_steps=30000, flow_batch=512, flow_lr=6e-4, flow_warmup=1000, flow_dim=384, flow_depth=8,
                 flow_heads=6, featnet2_steps=4000),
}
# the AdaNAT release's PPO (`--set pi_recipe=official`): lr 1e-5, K = 5 full-batch epochs, sigma 0.6 then 0.3
# from the half on, no KL stop, no gradient clip, advantages divided by the batch std, no anchor
OFFICIAL_RECIPE = dict(pi_lr=1e-5, pi_static_lr=1e-5, pi_epochs=5, pi_minibatches=1, pi_sigma0=0.6, pi_sigma1=0.3,
                       pi_sigma_schedule="step", pi_target_kl=0.0, pi_grad_clip=0.0, pi_anchor=0.0, pi_adv_floor=0.0)


def vq_config(c: TrainConfig) -> vqgan.VQConfig:
    return vqgan.VQConfig(in_ch=c.channels, img_size=c.img_size, ch=c.vq_ch, ch_mult=tuple(c.vq_ch_mult),
                          n_res=c.vq_n_res, codebook_size=c.vq_codebook_size, code_dim=c.vq_code_dim,
                          gan_weight=c.vq_gan_weight, gan_start=c.vq_gan_start)


def nat_config(c: TrainConfig, num_classes: int, num_tokens: int, vocab_size: int) -> nat.NATConfig:
    return nat.NATConfig(vocab_size=vocab_size, num_tokens=num_tokens, num_classes=num_classes,
                         dim=c.nat_dim, depth=c.nat_depth, heads=c.nat_heads, dropout=c.nat_dropout,
                         mask_dist=c.nat_mask_dist, alpha=c.nat_mask_alpha, beta=c.nat_mask_beta)


def recipe(c: TrainConfig) -> TrainConfig:
    """The config a policy stage trains with: c, or c with OFFICIAL_RECIPE's keys when pi_recipe = official."""
    return dataclasses.replace(c, **OFFICIAL_RECIPE) if c.pi_recipe == "official" else c


POLICY_STAGES = ("policy", "static", "smooth", "fidelity")            # the stages Algorithm 1 trains (train.py)
FLOW_POLICY_STAGES = ("flow-policy", "flow-static", "flow-smooth")    # ... on the ODE sampler (experiments/flow_train.py)
# every stage's (steps, learning rate, batch) keys: --steps sets the first, a run fault's advice names the others
STAGE_KEYS = {"backbone": ("backbone_steps", "feat_lr", "feat_batch"), "vq": ("vq_steps", "vq_lr", "vq_batch"),
              "featnet": ("featnet_steps", "feat_lr", "feat_batch"), "featnet2": ("featnet2_steps", "feat_lr", "feat_batch"),
              "featssl": ("ssl_steps", "ssl_lr", "ssl_batch"), "dnet": ("dnet_steps", "feat_lr", "feat_batch"),
              "dssl": ("ssl_steps", "ssl_lr", "ssl_batch"), "nat": ("nat_steps", "nat_lr", "nat_batch"),
              **dict.fromkeys(("policy", "smooth", "fidelity", "flow-policy", "flow-smooth"), ("pi_iters", "pi_lr", "pi_batch")),
              **dict.fromkeys(("static", "flow-static"), ("pi_iters", "pi_static_lr", "pi_batch")),
              "search": ("search_updates", "search_lr", "gen_rows"), "param-search": ("search_param_updates", "search_lr", "gen_rows"),
              "flow-search": ("search_updates", "search_lr", "gen_rows"), "pr-search": ("pr_steps", "nat_lr", "nat_batch"),
              "flow": ("flow_steps", "flow_lr", "flow_batch")}
FREE_PREFIXES = ("pi_", "search_", "pr_", "flow_", "featnet2_", "ssl_", "dnet_")   # may change after the core stages:
                                                   # each of their checkpoints carries (and on resume checks) its own copy
# keys renamed since older run folders were written: their config.json still loads
RENAMED = {"bb_steps": "backbone_steps", "bb_width": "backbone_width", "bb_dim": "backbone_dim",
           "feat_steps": "featnet_steps", "feat_width": "featnet_width", "feat_dim": "featnet_dim",
           "feat2_steps": "featnet2_steps", "feat2_width": "featnet2_width", "feat2_dim": "featnet2_dim",
           "feat2_convs": "featnet2_convs", "codebook_size": "vq_codebook_size", "code_dim": "vq_code_dim",
           "gan_weight": "vq_gan_weight", "gan_start": "vq_gan_start", "mask_dist": "nat_mask_dist",
           "mask_alpha": "nat_mask_alpha", "mask_beta": "nat_mask_beta", "ema_decay": ("nat_ema_decay", "flow_ema_decay")}


def stage_of(loop: str) -> str:
    """The stage of a training loop's name (runs.train_loop): "policy_T4", "static_search_T8" and
    "flow_policy_nfe4" are policy stages, "search_T4" / "param_T8" / "flow_search_nfe4" searches, "vp" the flow."""
    parts = loop.split("_")
    kind = parts[1] if parts[0] in ("flow", "vp") and len(parts) > 2 else parts[0]
    if kind in POLICY_STAGES:
        return ("flow-" if parts[0] in ("flow", "vp") and len(parts) > 2 else "") + kind
    if kind in ("search", "param"):
        return {"search": "search", "param": "param-search"}[kind] if parts[0] not in ("flow", "vp") else "flow-search"
    return "flow" if loop == "vp" else loop


def upgrade(saved: dict) -> dict:
    """An older config.json's keys under their current names (RENAMED)."""
    out = {}
    for k, v in saved.items():
        for new in (RENAMED.get(k, k),) if not isinstance(RENAMED.get(k), tuple) else RENAMED[k]:
            out.setdefault(new, v)
    return out


def parse_value(field_type, text: str):
    """Parse a --set value by the config field's type."""
    if field_type is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if field_type is int:
        return int(text)
    if field_type is float:
        return float(text)
    if field_type is tuple:                                           # "4,8" -> (4, 8); "0.6,0.8" -> floats; "" -> ()
        return tuple(int(v) if v.strip().lstrip("-").isdigit() else float(v) for v in text.split(",") if v.strip())
    return None if text.lower() == "none" else text


def validate(c: TrainConfig, stages: list[str]) -> None:
    """One clear line (UserError) for a config value that cannot work in the stages that run."""
    run = set(stages)
    for s in run:                                               # every running stage's steps and batch
        for key in (STAGE_KEYS[s][0], STAGE_KEYS[s][2]):
            if key != "gen_rows" and getattr(c, key) <= 0:
                raise runs.UserError(f"{key} = {getattr(c, key)}: must be positive")
    if c.vq_perceptual < 0:
        raise runs.UserError("vq_perceptual must be >= 0")
    if run & {"nat", "pr-search"} and c.nat_mask_dist not in ("cosine", "beta"):
        raise runs.UserError(f"nat_mask_dist {c.nat_mask_dist!r}: use cosine or beta")
    if run & {*POLICY_STAGES, *FLOW_POLICY_STAGES}:
        validate_policy(c, stages)
    if run & {"search", "param-search", "flow-search", "pr-search"}:
        if c.search_samples <= 0 or c.search_eps_m <= 0 or c.search_eps <= 0:
            raise runs.UserError("search_samples, search_eps_m and search_eps must be positive")
        if not c.search_T or any(T < 2 for T in c.search_T):
            raise runs.UserError(f"search_T {c.search_T}: decoding step counts of at least 2, e.g. --set search_T=4,8")
        if not (0 <= c.search_momentum < 1 and c.search_lr >= 0 and c.search_lr_m >= 0 and c.search_clip >= 0):
            raise runs.UserError("search_momentum must be in [0, 1), search_lr, search_lr_m and search_clip >= 0")
    if "pr-search" in run and (c.pr_budget < 1 or c.pr_steps < 1 or c.pr_T < 2 or c.pr_samples < 1):
        raise runs.UserError("pr_budget, pr_steps and pr_samples must be positive and pr_T >= 2")
    if run & {"flow", "flow-search", *FLOW_POLICY_STAGES}:
        if c.flow_path not in samplers.PATHS:
            raise runs.UserError(f"flow_path {c.flow_path!r}: use one of {', '.join(samplers.PATHS)}")
        if c.img_size % c.flow_patch:
            raise runs.UserError(f"flow_patch {c.flow_patch} must divide img_size {c.img_size}")
        if c.flow_pi_solver not in samplers.SOLVERS:
            raise runs.UserError(f"flow_pi_solver {c.flow_pi_solver!r}: use one of {', '.join(samplers.SOLVERS)}")
        if not c.flow_pi_nfe or any(n < 2 or samplers.steps_for_nfe(c.flow_pi_solver, n) < 2 for n in c.flow_pi_nfe):
            raise runs.UserError(f"flow_pi_nfe {c.flow_pi_nfe}: budgets of at least 2 solver steps ({c.flow_pi_solver})")


def validate_policy(c: TrainConfig, stages: list[str]) -> None:
    """The policy stages' keys (pi_*)."""
    if c.pi_fid_every <= 0 or c.pi_fid_samples <= 0 or c.pi_epochs <= 0 or c.pi_minibatches <= 0:
        raise runs.UserError("pi_fid_every, pi_fid_samples, pi_epochs and pi_minibatches must be positive")
    if c.pi_group < 1 or c.pi_batch % c.pi_group:
        raise runs.UserError(f"pi_group {c.pi_group} must be >= 1 and divide pi_batch {c.pi_batch}")
    if c.pi_start not in schedules.PI_STARTS:
        raise runs.UserError(f"pi_start {c.pi_start!r}: use one of {', '.join(schedules.PI_STARTS)}")
    if c.pi_reward not in schedules.PI_REWARDS:
        raise runs.UserError(f"pi_reward {c.pi_reward!r}: use one of {', '.join(schedules.PI_REWARDS)}")
    if "fidelity" in stages and c.pi_reward != "adversarial":
        raise runs.UserError(f"--stage fidelity --reward {c.pi_reward}: the fidelity policy's reward is the blend of "
                             f"the adversarial and the fixed reward (Eq. 15); drop --reward")
    if c.pi_fid_chunk < 2:
        raise runs.UserError(f"pi_fid_chunk {c.pi_fid_chunk}: an FID needs at least 2 samples per chunk")
    bad = [n for n in c.pi_d_nets.split("+") if n not in models.D_NETS]
    if bad:
        judge = " (a judge: D never sits on one)" if set(bad) & set(models.JUDGES) else ""
        raise runs.UserError(f"pi_d_nets {c.pi_d_nets!r}: {', '.join(bad)}{judge}; use one or more of "
                             f"{', '.join(models.D_NETS)} joined by +")
    if not c.pi_d_taps or len(set(c.pi_d_taps)) != len(c.pi_d_taps) or not set(c.pi_d_taps) <= {0, 1, 2}:
        raise runs.UserError(f"pi_d_taps {c.pi_d_taps}: distinct pooling stages among 0, 1, 2, e.g. --set pi_d_taps=1,2")
    if c.pi_d_acc_band and not (len(c.pi_d_acc_band) == 2 and 0 < c.pi_d_acc_band[0] < c.pi_d_acc_band[1] < 1) \
            or min(c.pi_d_steps_max, c.pi_d_steps, c.pi_d_warmup_steps) < 1:
        raise runs.UserError(f"pi_d_acc_band {c.pi_d_acc_band}: two accuracies lo,hi with 0 < lo < hi < 1 (or empty: fixed "
                             f"pi_d_steps), and pi_d_steps, pi_d_warmup_steps, pi_d_steps_max >= 1")
    if c.pi_d_real not in ("recon", "raw"):
        raise runs.UserError(f"pi_d_real {c.pi_d_real!r}: use raw or recon")
    if c.pi_recipe not in ("ours", "official") or c.pi_sigma_schedule not in ("linear", "step"):
        raise runs.UserError(f"pi_recipe {c.pi_recipe!r} / pi_sigma_schedule {c.pi_sigma_schedule!r}: use ours or official / "
                             f"linear or step")
    if c.pi_d_replay < 1 or c.pi_anchor < 0 or c.pi_adv_floor < 0:
        raise runs.UserError("pi_d_replay must be >= 1 and pi_anchor, pi_adv_floor >= 0")
    if not c.pi_T or any(T < 2 for T in c.pi_T):
        raise runs.UserError(f"pi_T {c.pi_T}: decoding step counts of at least 2, e.g. --set pi_T=4,8")
    if not (c.pi_sigma0 > 0 and c.pi_sigma1 > 0 and 0 <= c.pi_beta_ema < 1):
        raise runs.UserError("pi_sigma0 and pi_sigma1 must be positive and pi_beta_ema in [0, 1)")


def from_saved(saved: dict, preset: str) -> TrainConfig:
    """A TrainConfig from a config.json's keys (renamed keys upgraded, missing ones the preset's)."""
    fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    c = TrainConfig(**{**PRESETS.get(preset, {}), **{k: v for k, v in upgrade(saved).items() if k in fields}})
    for k, t in fields.items():                                # JSON lists back to tuples
        if t is tuple:
            setattr(c, k, tuple(getattr(c, k)))
    return c


def load_config(run_dir: str) -> TrainConfig:
    """A run folder's TrainConfig from its config.json."""
    saved = runs.read_json(os.path.join(run_dir, "config.json"))
    if not isinstance(saved, dict):
        raise runs.UserError(f"{run_dir}/config.json is missing or unreadable: train first with python train.py --run-dir {run_dir}")
    return from_saved(saved, saved.get("preset"))


def build_config(args: argparse.Namespace, stages: list[str]) -> tuple[TrainConfig, str]:
    """The run folder's config.json (else the preset), with the flags applied on top.

    Once a stage has written a checkpoint, the config may no longer change: a run folder is
    one experiment. Before that (e.g. after a wrong --data) anything may be fixed. `stages`: the
    stages `--stage all` runs, in order; their checkpoints lock the config."""
    run_dir = args.run_dir or os.path.join("runs", args.preset or "small")
    config_path = os.path.join(run_dir, "config.json")
    saved = runs.read_json(config_path) if os.path.exists(config_path) else None
    if os.path.exists(config_path) and not isinstance(saved, dict):
        raise runs.UserError(f"{config_path} is unreadable; delete it (and the run folder's checkpoints) to start over")
    saved = upgrade(saved) if saved is not None else None
    fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    preset = args.preset or (saved or {}).get("preset", "small")
    if preset not in PRESETS:
        raise runs.UserError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    same = saved is not None and saved.get("preset") == preset          # keys missing from an older config: the preset's
    c = from_saved(saved, preset) if same else TrainConfig(**{**PRESETS[preset], "preset": preset})
    for item in args.set or []:
        key, _, value = item.partition("=")
        if key in RENAMED:
            raise runs.UserError(f"--set {item}: {key} is now called {RENAMED[key] if isinstance(RENAMED[key], str) else ' and '.join(RENAMED[key])}")
        if key not in fields or key == "preset":
            raise runs.UserError(f"--set {item}: unknown config key {key!r}; keys: {', '.join(k for k in fields if k != 'preset')}")
        try:
            setattr(c, key, parse_value(fields[key], value))
        except ValueError as e:
            raise runs.UserError(f"--set {item}: {e}") from None
    if args.data is not None:
        c.data = args.data
    set_keys = {item.partition("=")[0] for item in args.set or []}
    for key, flag, given, default in (("flow_path", "--path", args.path, "flow"), ("pi_reward", "--reward", args.reward,
                                      "adversarial"), ("compile", "--compile", args.compile, False)):
        if given is not None and key in set_keys and getattr(c, key) != given:   # a flag and its key never contradict
            raise runs.UserError(f"--set {key}={getattr(c, key)} contradicts {flag} {given}: give one of them")
        if given is not None or key not in set_keys:                   # the flag, else --set, else the flag's default
            setattr(c, key, given if given is not None else default)
    if args.seed is not None:
        c.seed = args.seed
    running = stages if args.stage == "all" else [args.stage]
    if args.steps is not None:
        if args.steps <= 0:
            raise runs.UserError(f"--steps {args.steps}: must be a positive number of training steps")
        for s in running:
            setattr(c, STAGE_KEYS[s][0], args.steps)
    validate(c, running)
    trained = [s for s in stages if os.path.exists(os.path.join(run_dir, f"{s}.pt"))]
    if saved is not None and trained:
        now = runs.to_plain(c)
        diff = sorted(k for k in now if k in saved and not k.startswith(FREE_PREFIXES)
                      and k not in ("ckpt_every_s", "log_every", "compile", "gen_rows") and saved[k] != now[k])
        if diff:
            raise runs.UserError(f"{run_dir} was trained with another config (differs in {', '.join(diff)}); "
                                 f"use another --run-dir, or the same flags as before")
    return c, run_dir
