"""Train the method, top to bottom: backbone -> vq -> featnet -> featnet2 -> featssl -> nat -> policies.

    python train.py --preset laptop                          # the whole method, small, on a laptop CPU
    python train.py                                          # the `small` preset, CPU or GPU
    python train.py --stage policy --run-dir runs/small      # one stage; resumes what is there
    python train.py --stage static --set pi_T=4,8            # any TrainConfig key, by name
    torchrun --standalone --nproc_per_node 4 train.py --preset base   # data-parallel (docs/torchrun.md)

Stages, in pipeline order (each writes <stage>.pt into the run folder):
  backbone   a classifier: the frozen backbone of the tokenizer's perceptual loss and of the policy's
             discriminator (never a judge).
  vq         the VQ tokenizer (vqgan.py): 32x32 image -> 8x8 = 64 tokens.
  featnet    the FID network: a classifier whose penultimate features define FID here (fid.py); every
             choice (w_0, checkpoints) reads it on training statistics.
  featnet2   a held-out judge: an independent classifier (average pooling, another seed).
  featssl    a held-out judge: a self-supervised SimCLR network (fid.py: nt_xent, views).
  dnet, dssl (only when named) candidate backbones of the discriminator.
  nat        the class-conditional masked-token transformer (nat.py), with an EMA of its weights.
  policy, static, smooth, fidelity (only when named)
             AdaNAT's PPO-trained schedules through Algorithm 1 (`train_policy`): the adaptive
             policy, the learnable static table, the adaptive policy with EMA smoothing (AdaGen
             Eq. 12), AdaGen's fidelity policy (Eq. 14-15); {kind}_T{T}.pt for T in pi_T.

One PPO iteration of Algorithm 1 is `iteration` inside `train_policy`: # 1 rollout (policy.py,
nat.py), # 2 reward (reward.py), # 3 advantages + PPO (ppo.py), # 4 discriminator (reward.py).
The experiments (AutoNAT's searches, the continuous paradigm, the studies) are their own scripts
in experiments/, which call `main` with their stages.

A run folder holds config.json, log.jsonl (one JSON object per logged step) and one checkpoint per
stage: a dict of plain types and tensors {"model", "config", "step", ...}, written atomically
(temp file + os.replace), loadable with torch.load(path, weights_only=True), carrying its model's
config so that sample.py rebuilds any model from the file alone. Re-running a command resumes:
finished stages are skipped, an interrupted one continues from its last checkpoint. Bad input:
one line, exit code 2, nothing overwritten; a non-finite loss, a failed write or out of memory:
one line, exit code 3, the last good checkpoint kept.
"""
import argparse
import contextlib
import copy
import dataclasses
import glob
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import fid
import nat
import policy
import ppo
import reward
import samplers
import vqgan


# ============================================================================= configuration
# One dataclass per stage (its keys share its prefix); TrainConfig joins them into the flat set of
# keys that config.json, the presets and --set KEY=VALUE use.

@dataclass
class RunKeys:
    preset: str = "small"            # the named overrides it started from (PRESETS)
    data: str | None = None          # None: Fashion-MNIST (./data, Debian package, download); a folder; "synthetic"
    img_size: int = 32               # images are padded / resized to img_size x img_size
    channels: int = 1                # image channels (1: grey)
    seed: int = 0                    # every stage's seed derives from it
    bf16: bool = True                # bf16 autocast for the transformers on CUDA (ignored on CPU)
    compile: bool = False            # torch.compile the generators' training forward (this command only)
    ckpt_every_s: float = 300.0      # seconds between checkpoints inside a stage
    log_every: int = 50              # steps between log.jsonl records


@dataclass
class VQKeys:
    vq_steps: int = 5000             # training steps
    vq_batch: int = 128              # images per step
    vq_lr: float = 1e-3              # Adam lr, betas (0.5, 0.9); warm-up, then cosine to 10%
    vq_ch: int = 32                  # encoder / decoder width
    vq_ch_mult: tuple = (1, 2)       # width multipliers per resolution (one downsampling each but the last)
    vq_n_res: int = 2                # residual blocks per resolution
    vq_codebook_size: int = 512      # K codes
    vq_code_dim: int = 32            # code width
    vq_warmup: int = 100             # warm-up steps
    vq_restart_every: int = 100      # dead-code restart period (steps); off in the last 20% of training
    vq_gan_weight: float = 0.0       # hinge patch-GAN generator weight (0: off)
    vq_gan_start: int = 0            # steps of plain reconstruction before the GAN starts
    vq_perceptual: float = 0.5       # perceptual loss on the backbone classifier's maps (needs the backbone stage)


@dataclass
class FrozenNetKeys:
    feat_batch: int = 128            # every classifier trains with feat_batch, feat_lr, feat_warmup
    feat_lr: float = 2e-3            # Adam lr
    feat_warmup: int = 50            # warm-up steps
    backbone_steps: int = 400        # backbone: D's and the perceptual loss's frozen classifier
    backbone_width: int = 16         # first conv width (then 2x, 4x)
    backbone_dim: int = 64           # penultimate features
    featnet_steps: int = 1500        # featnet: the FID network (every choice reads it)
    featnet_width: int = 32          # first conv width
    featnet_dim: int = 128           # the FID features
    featnet2_steps: int = 1500       # featnet2: a held-out judge (no choice reads it)
    featnet2_width: int = 32         # first conv width
    featnet2_dim: int = 96           # its FID features
    featnet2_convs: int = 2          # conv layers per stage (featnet: 2 with max pooling; featnet2: average pooling)
    ssl_steps: int = 800             # featssl (the self-supervised judge) and dssl (a D candidate): SimCLR
    ssl_batch: int = 256             # images per step (two views each)
    ssl_lr: float = 2e-3             # Adam lr
    ssl_tau: float = 0.2             # NT-Xent temperature
    ssl_width: int = 32              # first conv width
    ssl_dim: int = 128               # the FID features (f's penultimate layer)
    ssl_proj: int = 64               # the projection head's output z
    dnet_steps: int = 1500           # dnet: the backbone classifier wider and longer (a D candidate)
    dnet_width: int = 32             # first conv width
    dnet_dim: int = 128              # penultimate features


@dataclass
class NATKeys:
    nat_steps: int = 1500            # training steps
    nat_batch: int = 256             # token maps per step
    nat_lr: float = 1e-3             # AdamW lr, betas (0.9, 0.95); warm-up, then cosine to 10%
    nat_warmup: int = 100            # warm-up steps
    nat_wd: float = 0.05             # weight decay of the matrices (not embeddings, norms, biases)
    nat_dim: int = 128               # transformer width
    nat_depth: int = 4               # blocks
    nat_heads: int = 4               # attention heads
    nat_dropout: float = 0.0         # dropout in the blocks
    nat_mask_dist: str = "cosine"    # training p(r): "cosine" (MaskGIT) or "beta" (AutoNAT)
    nat_mask_alpha: float = 1.0      # Beta(alpha, beta) of nat_mask_dist = beta
    nat_mask_beta: float = 1.0
    nat_ema_decay: float = 0.995     # EMA of the weights sampling uses


@dataclass
class PolicyKeys:                    # each policy checkpoint carries its own copy: they may change after the NAT
    pi_T: tuple = (4, 8)             # decoding step counts to train a policy for (one checkpoint each)
    pi_iters: int = 300              # PPO iterations at T = 4 (at T: pi_iters * 4 / T, the same generator forwards)
    pi_batch: int = 256              # trajectories per iteration
    pi_group: int = 4                # G > 1: groups of G share label and generation randomness; A = R - group mean
    pi_recipe: str = "ours"          # "official": the AdaNAT release's PPO (OFFICIAL_RECIPE)
    pi_lr: float = 1e-4              # Adam lr of the adaptive policy and its critic (AdaNAT: 1e-5 at 4096 traj.)
    pi_static_lr: float = 3e-3       # Adam lr of the static table
    pi_epochs: int = 5               # PPO epochs per iteration (K)
    pi_minibatches: int = 4          # minibatches per epoch
    pi_target_kl: float = 0.03       # stop an iteration's epochs once approx_kl passes this (0: off)
    pi_grad_clip: float = 1.0        # gradient-norm clip of the PPO steps (0: off)
    pi_clip: float = 0.2             # PPO's clip c
    pi_vf_coef: float = 0.5          # value-loss weight
    pi_ent_coef: float = 0.01        # entropy bonus weight
    pi_anchor: float = 1.0           # + pi_anchor * mean ||eta(s)||^2 on the knobs that act: the residual stays near h
    pi_adv_floor: float = 0.05       # advantages / returns divided by max(batch std, this)
    pi_sigma0: float = 0.15          # exploration std in pre-activation space, annealed to pi_sigma1 ...
    pi_sigma1: float = 0.1
    pi_sigma_schedule: str = "linear"   # ... linearly, or "step": pi_sigma1 from the half on
    pi_beta_ema: float = 0.5         # action smoothing of the `smooth` stage (AdaGen Eq. 12)
    pi_width: int = 128              # adaptive policy: features -> width, conv, -> hidden
    pi_hidden: int = 256
    pi_d_nets: str = "backbone"      # D's frozen network(s): backbone, dnet, dssl, or several joined by "+"; never a judge
    pi_d_taps: tuple = (0, 1, 2)     # ... its maps after these pooling stages (0: 16x16, 1: 8x8, 2: 4x4)
    pi_d_lr: float = 1e-3            # D's Adam lr, betas (0.5, 0.999)
    pi_d_steps: int = 4              # D steps per iteration at the start, then one more / fewer ...
    pi_d_acc_band: tuple = (0.6, 0.8)   # ... while D's held-out accuracy is below / above this band (): fixed
    pi_d_steps_max: int = 8
    pi_d_replay: int = 4             # D's fakes are drawn from the last pi_d_replay rollouts ...
    pi_d_fresh: bool = False         # ... or are fresh rollouts of the current policy (the AdaNAT release)
    pi_d_warmup: int = 5             # first iterations train D only ...
    pi_d_warmup_steps: int = 20      # ... with this many steps each
    pi_d_real: str = "raw"           # D's reals: "raw" training images or "recon" (their reconstructions)
    pi_fid_every: int = 25           # iterations between training-set FID checks (the best on featnet is kept)
    pi_fid_samples: int = 2000       # samples per FID check
    pi_sweep_samples: int = 2000     # samples per w_0 candidate of the heuristic the residual starts from
    pi_reward: str = "adversarial"   # "adversarial" (D), "fixed" (log p(y|x), backbone) or "fid" (minus a chunk's
                                     # FID) (AdaGen §III-D); this command only; files *_<reward>_T*
    pi_fid_chunk: int = 64           # "fid" reward: trajectories per FID chunk
    pi_seed: int = 0                 # a policy's training seed (its initial weights, exploration, D); files *_seed<k>
                                     # when k > 0: the tables' intervals span training seeds
    pi_start: str = "heuristic"      # the residual's zero point: AdaNAT's heuristic, a finished AutoNAT "search" / "param"
                                     # table, or "classonly" (game.py --headroom); files <kind>_<start>_T{T}


@dataclass
class ExperimentKeys:                # read by experiments/search.py and experiments/flow.py
    search_T: tuple = (4, 8)         # step counts to search a schedule for
    search_updates: int = 12         # gradient-descent updates of the free T x 4 table ...
    search_param_updates: int = 12   # ... and of the parametric family
    search_samples: int = 500        # samples per candidate (FID against training statistics)
    search_seed: int = 0             # one seed for every candidate (common random numbers)
    search_eps_m: float = 0.03       # finite-difference step of the mask ratios
    search_eps: float = 0.1          # ... of tau1, tau2, w and of the family
    search_lr_m: float = 3e-4        # learning rate of the mask ratios
    search_lr: float = 0.01          # ... of tau1, tau2, w and the family
    search_momentum: float = 0.5     # heavy-ball momentum
    search_clip: float = 30.0        # gradient-norm clip (0: off)
    pr_budget: int = 6               # pr-search: proxy NAT trainings the Beta line search may spend
    pr_steps: int = 600              # steps of each proxy training
    pr_T: int = 4                    # candidates judged at this T
    pr_samples: int = 1000           # samples per candidate FID
    pr_final: bool = True            # then train the chosen p(r) for nat_steps in <run>/beta
    flow_path: str = "flow"          # "flow" (rectified flow, predicts v) or "vp" (VP diffusion); this command only
    flow_steps: int = 3000           # the continuous generator: training steps
    flow_batch: int = 128            # images per step
    flow_lr: float = 1e-3            # AdamW lr, betas (0.9, 0.99)
    flow_warmup: int = 100           # warm-up steps
    flow_wd: float = 0.0             # weight decay
    flow_dim: int = 128              # transformer width
    flow_depth: int = 4              # blocks
    flow_heads: int = 4              # attention heads
    flow_patch: int = 4              # 32x32 -> 64 patches of 4x4 (the policy sees (B, 64, C) features)
    flow_pi_nfe: tuple = (4, 8)      # flow-policy / -static / -smooth: one policy per NFE budget
    flow_pi_solver: str = "euler"    # ... with this solver and the most steps that fit
    flow_ema_decay: float = 0.995    # EMA of the weights sampling uses
    var_msvq_steps: int = 1000       # VAR (experiments/var.py): the multi-scale tokenizer, fine-tuned from vq.pt
    var_msvq_lr: float = 3e-4        # ... Adam lr, betas (0.5, 0.9)
    var_steps: int = 1500            # the next-scale transformer: training steps
    var_batch: int = 128             # token maps per step
    var_lr: float = 1e-3             # AdamW lr, betas (0.9, 0.95); var_warmup steps, then cosine to 10%
    var_warmup: int = 100
    var_dim: int = 128               # transformer width, blocks, heads
    var_depth: int = 4
    var_heads: int = 4
    var_ema_decay: float = 0.995     # EMA of the weights sampling uses
    var_pi_width: int = 32           # the VAR policy's pi_width: its K forwards <= 3% of the transformer's (--bench)


@dataclass
class TrainConfig(ExperimentKeys, PolicyKeys, NATKeys, FrozenNetKeys, VQKeys, RunKeys):
    """Every key of a run, by stage; a preset overrides some by name."""


PRESETS: dict[str, dict] = {
    # seconds on a CPU, synthetic data: for CI and the end-to-end test
    "test": dict(data="synthetic", vq_steps=30, vq_warmup=5, feat_warmup=5, vq_batch=32, vq_ch=8, vq_n_res=1, vq_codebook_size=32,
                 vq_code_dim=8, vq_restart_every=10, featnet_steps=30, feat_batch=32, featnet_width=8, featnet_dim=16,
                 backbone_steps=20, backbone_width=4, backbone_dim=8, nat_steps=30, nat_batch=32, nat_dim=32, nat_depth=1,
                 nat_heads=2, nat_warmup=5, log_every=10, nat_ema_decay=0.9, flow_ema_decay=0.9, pi_T=(4,), pi_iters=4,
                 pi_batch=16, pi_width=16, pi_hidden=16, pi_d_warmup=1, pi_d_steps=1, pi_d_warmup_steps=2, pi_fid_every=2,
                 pi_fid_samples=40, pi_sweep_samples=20, search_T=(4,), search_updates=2, search_param_updates=2,
                 search_samples=40, pr_budget=2, pr_steps=5, pr_samples=40, flow_steps=20, flow_batch=16, flow_dim=32,
                 flow_depth=1, flow_heads=2, flow_warmup=5, flow_pi_nfe=(4,), featnet2_steps=30, featnet2_width=8,
                 featnet2_dim=16, featnet2_convs=1, ssl_steps=20, ssl_batch=32, ssl_width=8, ssl_dim=16, ssl_proj=8,
                 dnet_steps=20, dnet_width=8, dnet_dim=16, pi_fid_chunk=4, vq_perceptual=0.1, var_msvq_steps=10,
                 var_steps=10, var_batch=16, var_dim=32, var_depth=1, var_heads=2, var_warmup=2, var_ema_decay=0.9),
    # the default, for 2 CPU cores (stage times in the README)
    "small": dict(),
    # the whole method at T = 4 in about 15 minutes on 2 CPU cores (undertrained: far from small's numbers)
    "laptop": dict(vq_steps=600, vq_ch=16, vq_n_res=1, featnet_steps=300, featnet2_steps=300, backbone_steps=150, ssl_steps=150,
                   ssl_batch=128, nat_steps=500, nat_dim=64, nat_depth=2, search_T=(4,), search_updates=2,
                   search_param_updates=2, search_samples=200, pi_T=(4,), pi_iters=12, pi_batch=64, pi_d_warmup=2,
                   pi_fid_every=6, pi_fid_samples=500, pi_sweep_samples=500),
    # one GPU, a few minutes to an hour
    "base": dict(vq_steps=8000, vq_ch=64, vq_codebook_size=512, vq_gan_weight=0.1, vq_gan_start=4000,
                 featnet_steps=4000, featnet_width=48, nat_steps=30000, nat_batch=512, nat_lr=6e-4,
                 nat_warmup=1000, nat_dim=384, nat_depth=8, nat_heads=6, nat_dropout=0.1, nat_ema_decay=0.9995,
                 flow_ema_decay=0.9995, search_samples=2000, search_updates=30, search_param_updates=30, pr_steps=5000,
                 flow_steps=30000, flow_batch=512, flow_lr=6e-4, flow_warmup=1000, flow_dim=384, flow_depth=8,
                 flow_heads=6, featnet2_steps=4000),
}
# the AdaNAT release's PPO (--set pi_recipe=official): lr 1e-5, K = 5 full-batch epochs, sigma 0.6 then 0.3
# from the half on, no KL stop, no gradient clip, advantages divided by the batch std, no anchor
OFFICIAL_RECIPE = dict(pi_lr=1e-5, pi_static_lr=1e-5, pi_epochs=5, pi_minibatches=1, pi_sigma0=0.6, pi_sigma1=0.3,
                       pi_sigma_schedule="step", pi_target_kl=0.0, pi_grad_clip=0.0, pi_anchor=0.0, pi_adv_floor=0.0)
THIS_COMMAND = {"flow_path": "flow", "pi_reward": "adversarial", "pi_seed": 0, "pi_start": "heuristic", "compile": False}
# not kept in config.json's meaning: each command's --set, else this default (the policy file's name is the command's)
FREE_PREFIXES = ("pi_", "search_", "pr_", "flow_", "var_", "featnet2_", "ssl_", "dnet_", "ckpt_every_s", "log_every", "compile")
POLICY_STAGES = ("policy", "static", "smooth", "fidelity")
PI_STARTS = {"heuristic": "AdaNAT's heuristic", "search": "the AutoNAT table", "param": "the searched family",
             "classonly": "the class-only schedule"}
PI_REWARDS = ("adversarial", "fixed", "fid")
D_NETS = ("backbone", "dnet", "dssl")              # the frozen networks D may sit on
JUDGES = {"featnet": "fid", "featnet2": "fid2", "featssl": "fd_ssl"}   # judge -> its metric key: never D's backbone


class UserError(Exception):
    """Bad input: one line on stderr, exit code 2, nothing overwritten."""


class RunFault(Exception):
    """A running stage's fault (non-finite value, failed write, out of memory): one line, exit code 3."""


FAULT_EXIT = 3


def parse_value(field_type, text: str):
    """A --set value by its field's type: bool, int, float, tuple ("4,8"; "" is ()), str (None: "none")."""
    if field_type is bool:
        if text.lower() in ("1", "true", "yes", "0", "false", "no"):
            return text.lower() in ("1", "true", "yes")
        raise ValueError(f"expected true/false, got {text!r}")
    if field_type in (int, float):
        return field_type(text)
    if field_type is tuple:
        return tuple(int(v) if v.strip().lstrip("-").isdigit() else float(v) for v in text.split(",") if v.strip())
    return None if text.lower() == "none" else text


def validate(c: TrainConfig, stages: list[str]) -> None:
    """One clear line (UserError) for a value that cannot work in the stages that run."""
    for f in dataclasses.fields(c):
        if f.name.endswith(("_steps", "_batch", "_iters", "_every", "_samples")) and getattr(c, f.name) <= 0:
            raise UserError(f"{f.name} = {getattr(c, f.name)}: must be positive")
    if c.vq_perceptual < 0 or c.nat_mask_dist not in ("cosine", "beta"):
        raise UserError(f"vq_perceptual must be >= 0 and nat_mask_dist cosine or beta (got {c.nat_mask_dist!r})")
    if c.flow_path not in samplers.PATHS or c.flow_pi_solver not in samplers.SOLVERS:
        raise UserError(f"flow_path {c.flow_path!r} / flow_pi_solver {c.flow_pi_solver!r}: use one of "
                        f"{', '.join(samplers.PATHS)} / {', '.join(samplers.SOLVERS)}")
    if not set(stages) & {*POLICY_STAGES, "flow-policy", "flow-static", "flow-smooth"}:
        return
    bad_nets = [n for n in c.pi_d_nets.split("+") if n not in D_NETS]
    checks = [
        (c.pi_group >= 1 and c.pi_batch % c.pi_group == 0, f"pi_group {c.pi_group} must be >= 1 and divide pi_batch {c.pi_batch}"),
        (c.pi_start in PI_STARTS, f"pi_start {c.pi_start!r}: use one of {', '.join(PI_STARTS)}"),
        (c.pi_reward in PI_REWARDS, f"pi_reward {c.pi_reward!r}: use one of {', '.join(PI_REWARDS)}"),
        ("fidelity" not in stages or c.pi_reward == "adversarial", "the fidelity policy's reward is the blend of the "
         "adversarial and the fixed reward (Eq. 15): drop --set pi_reward"),
        (not bad_nets, f"pi_d_nets {c.pi_d_nets!r}: {', '.join(bad_nets)}" + (" (a judge: D never sits on one)"
         if set(bad_nets) & set(JUDGES) else "") + f"; use one or more of {', '.join(D_NETS)} joined by +"),
        (c.pi_d_taps and len(set(c.pi_d_taps)) == len(c.pi_d_taps) and set(c.pi_d_taps) <= {0, 1, 2},
         f"pi_d_taps {c.pi_d_taps}: distinct pooling stages among 0, 1, 2, e.g. --set pi_d_taps=1,2"),
        (not c.pi_d_acc_band or len(c.pi_d_acc_band) == 2 and 0 < c.pi_d_acc_band[0] < c.pi_d_acc_band[1] < 1,
         f"pi_d_acc_band {c.pi_d_acc_band}: two accuracies lo,hi with 0 < lo < hi < 1 (or empty: fixed pi_d_steps)"),
        (c.pi_d_real in ("raw", "recon") and c.pi_recipe in ("ours", "official") and c.pi_sigma_schedule in ("linear", "step"),
         "pi_d_real: raw or recon; pi_recipe: ours or official; pi_sigma_schedule: linear or step"),
        (c.pi_fid_chunk >= 2 and c.pi_d_replay >= 1 and c.pi_anchor >= 0 and c.pi_adv_floor >= 0 and c.pi_epochs >= 1
         and c.pi_minibatches >= 1, "pi_fid_chunk >= 2, pi_d_replay, pi_epochs, pi_minibatches >= 1, pi_anchor, pi_adv_floor >= 0"),
        (c.pi_T and min(c.pi_T) >= 2, f"pi_T {c.pi_T}: decoding step counts of at least 2, e.g. --set pi_T=4,8"),
        (c.pi_sigma0 > 0 and c.pi_sigma1 > 0 and 0 <= c.pi_beta_ema < 1, "pi_sigma0, pi_sigma1 > 0 and pi_beta_ema in [0, 1)")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def load_config(run_dir: str, preset: str | None = None) -> TrainConfig:
    """A run folder's TrainConfig: its config.json over the preset's defaults (an empty folder: the preset's)."""
    saved = read_json(os.path.join(run_dir, "config.json"), {})
    if not isinstance(saved, dict):
        raise UserError(f"{run_dir}/config.json is unreadable; delete it (and the folder's checkpoints) to start over")
    preset = preset or saved.get("preset", "small")
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    c = TrainConfig(**{**PRESETS[preset], "preset": preset})
    if saved.get("preset") == preset:
        for f in dataclasses.fields(c):
            if f.name in saved and f.name not in THIS_COMMAND:
                setattr(c, f.name, tuple(saved[f.name]) if f.type is tuple else saved[f.name])
    return c


def build_config(args: argparse.Namespace, stages: list[str], running: list[str]) -> tuple[TrainConfig, str]:
    """The run folder's config (else the preset's) with --set on top, checked. Once one of `stages` has
    written its checkpoint, only keys with FREE_PREFIXES may change: a run folder is one experiment."""
    run_dir = args.run_dir or os.path.join("runs", args.preset or "small")
    c = load_config(run_dir, args.preset)
    fields = {f.name: f.type for f in dataclasses.fields(c)}
    for item in args.set or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise UserError(f"--set {item}: expected KEY=VALUE, e.g. --set nat_lr=5e-4")
        if key not in fields or key == "preset":
            raise UserError(f"--set {item}: unknown config key {key!r}; keys: {', '.join(k for k in fields if k != 'preset')}")
        try:
            setattr(c, key, parse_value(fields[key], value))
        except ValueError as e:
            raise UserError(f"--set {item}: {e}") from None
    c.data = args.data if args.data is not None else c.data
    c.seed = args.seed if args.seed is not None else c.seed
    validate(c, running)
    saved = read_json(os.path.join(run_dir, "config.json"))
    if saved and any(os.path.exists(os.path.join(run_dir, f"{s}.pt")) for s in stages):
        now = to_plain(c)
        diff = sorted(k for k in now if k in saved and not k.startswith(FREE_PREFIXES) and saved[k] != now[k])
        if diff:
            raise UserError(f"{run_dir} was trained with another config (differs in {', '.join(diff)}); "
                            f"use another --run-dir, or the same flags as before")
    return c, run_dir


def vq_config(c: TrainConfig) -> vqgan.VQConfig:
    return vqgan.VQConfig(in_ch=c.channels, img_size=c.img_size, ch=c.vq_ch, ch_mult=tuple(c.vq_ch_mult), n_res=c.vq_n_res,
                          codebook_size=c.vq_codebook_size, code_dim=c.vq_code_dim, gan_weight=c.vq_gan_weight,
                          gan_start=c.vq_gan_start)


# ============================================================================= helpers: torchrun, files, the loop

@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun); rank 0 writes files."""
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


DIST = Dist()


def init_distributed(device: torch.device) -> torch.device:
    """Join the job torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK; NCCL on CUDA, gloo on the CPU), as
    nanoGPT does; returns this rank's device. Without torchrun, the single process of the same code."""
    if "RANK" not in os.environ or dist.is_initialized():
        return device
    DIST.rank, DIST.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def barrier() -> None:
    if DIST.world > 1:
        dist.barrier()


def all_mean(x) -> torch.Tensor:
    """The mean of a number or tensor over the ranks (x itself in a single process)."""
    x = torch.as_tensor(x, dtype=torch.float32 if not torch.is_tensor(x) else None)
    if DIST.world == 1:
        return x
    y = x.detach().clone().to(torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else x.device)
    dist.all_reduce(y)
    return y / DIST.world


def all_sum(x: float) -> float:
    """The sum of a number over the ranks (float64: counts stay exact)."""
    if DIST.world == 1:
        return x
    y = torch.tensor([x], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(y)
    return y.item()


def all_cat(x: torch.Tensor) -> torch.Tensor:
    """Every rank's x (the same shape on each), concatenated in rank order along dim 0."""
    if DIST.world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(DIST.world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def my_rows(x: torch.Tensor) -> torch.Tensor:
    """This rank's share of a tensor gathered with all_cat."""
    n = x.shape[0] // DIST.world
    return x[DIST.rank * n:(DIST.rank + 1) * n]


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP around `model` in a torchrun job (gradients averaged in backward), the model itself otherwise."""
    if DIST.world == 1:
        return model
    wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    wrapped.cfg = getattr(model, "cfg", None)
    return wrapped


def rank_seed(seed: int) -> int:
    """A seed of this rank's own random stream (each rank draws its own batches)."""
    return seed + 1_000_003 * DIST.rank


def rank_batch(global_batch: int, name: str) -> int:
    """This rank's share of a global batch."""
    if global_batch % DIST.world:
        raise UserError(f"{name} = {global_batch} does not split over {DIST.world} processes: use a multiple")
    return global_batch // DIST.world


def sharded(n_chunks: int, run_chunk: Callable, desc: str = "", progress: bool = False) -> list:
    """[run_chunk(0), ..., run_chunk(n_chunks - 1)] on every rank: rank r runs the chunks r, r + world, ...
    and the results (CPU tensors) are gathered in chunk order, so they do not depend on the process count."""
    mine = {i: run_chunk(i) for i in tqdm(range(DIST.rank, n_chunks, DIST.world), desc=desc, leave=False,
                                          disable=not (progress and DIST.main))}
    if DIST.world > 1:
        parts: list = [None] * DIST.world
        dist.all_gather_object(parts, mine)
        mine = {i: out for part in parts for i, out in part.items()}
    return [mine[i] for i in range(n_chunks)]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device auto or cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name}: {e}") from None


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA; a no-op on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and enabled else contextlib.nullcontext()


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """write(tmp), then os.replace(tmp, path), by rank 0: an interrupt never leaves a truncated file; a
    failed write leaves `path` as it was and raises RunFault."""
    if not DIST.main:
        return
    try:
        write(path + ".tmp")
        os.replace(path + ".tmp", path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        was = "the previous file is intact" if os.path.exists(path) else "nothing was written"
        raise RunFault(f"could not write {path}: {e.strerror or e} ({was}); free space or fix the folder's "
                       f"permissions, then re-run the same command to resume") from None


def save_ckpt(path: str, obj: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_ckpt(path: str, expect_config: dict | None = None) -> dict:
    """A checkpoint, loaded with weights_only=True; one clear line for a missing, corrupt or mismatched file."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path} not found: run the stage that makes it (python train.py --run-dir {os.path.dirname(path)})") from None
    except Exception as e:                                            # truncated zip, pickle error, ...
        raise UserError(f"{path} is corrupt or not a checkpoint ({type(e).__name__}); delete it to retrain that stage") from None
    if not isinstance(ck, dict) or "model" not in ck or "config" not in ck:
        raise UserError(f"{path} is not a checkpoint of this project (no 'model'/'config'); delete it to retrain that stage")
    if expect_config is not None and ck["config"] != expect_config:
        diff = sorted(k for k in set(ck["config"]) | set(expect_config) if ck["config"].get(k) != expect_config.get(k))
        raise UserError(f"{path} was trained with another config (differs in {', '.join(diff)}); "
                        f"use the run folder's own flags, another --run-dir, or delete the file to retrain")
    return ck


def is_done(path: str) -> bool:
    return os.path.exists(path) and bool(load_ckpt(path).get("done"))


def to_plain(cfg) -> dict:
    """A dataclass as a dict of plain types (tuples become lists, as in JSON)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def write_json(path: str, obj) -> None:
    atomic_write(path, lambda tmp: json.dump(obj, open(tmp, "w"), indent=1))


def write_text(path: str, text: str) -> None:
    atomic_write(path, lambda tmp: open(tmp, "w").write(text))


def read_json(path: str, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def finite_json(v):
    """v with every non-finite float replaced by None (valid JSON: null, not NaN)."""
    if isinstance(v, (list, tuple, dict)):
        return {k: finite_json(x) for k, x in v.items()} if isinstance(v, dict) else [finite_json(x) for x in v]
    return None if isinstance(v, float) and not math.isfinite(v) else v


class Logger:
    """Appends one JSON object per record to <run_dir>/log.jsonl (rank 0)."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, "log.jsonl")

    def __call__(self, **record) -> None:
        if DIST.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(finite_json({"time": round(time.time(), 1), **record}), allow_nan=False) + "\n")


def all_finite(obj) -> bool:
    """Whether every floating-point tensor in a (nested) checkpoint dict is finite."""
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, (dict, list, tuple)):
        return all(all_finite(v) for v in (obj.values() if isinstance(obj, dict) else obj))
    return True


def check_finite(**values: float) -> None:
    """FloatingPointError naming the first non-finite value (a float already synchronised for the log)."""
    for k, v in values.items():
        if not math.isfinite(v):
            raise FloatingPointError(f"{k} ({v})")


def resume(ck_path: str, model_cfg: dict, modules: dict) -> dict:
    """Load a stage's checkpoint into `modules` (name -> module / optimiser) if there is one."""
    if not os.path.exists(ck_path):
        return {"step": 0}
    ck = load_ckpt(ck_path, expect_config=model_cfg)
    for k, m in modules.items():
        m.load_state_dict(ck[k])
    if "rng" in ck:
        torch.set_rng_state(ck["rng"])
        if DIST.world > 1:                                           # ranks go on from rank 0's state, each its own way
            torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,))) + DIST.rank)
    print(f"resuming {os.path.basename(ck_path)} from step {ck['step']}")
    return ck


def train_loop(name: str, ck_path: str, state: dict, modules: dict, step_fn: Callable, total: int, c: TrainConfig,
               log: Logger) -> dict:
    """The loop every stage shares: step_fn(step) -> dict of floats for steps state["step"] .. total - 1, a
    tqdm bar, log.jsonl, checkpoints (every ckpt_every_s, at the end, on Ctrl-C); a non-finite value or
    out of memory saves the last finite state and stops with one line (RunFault)."""
    def snapshot() -> dict:
        state.update({k: m.state_dict() for k, m in modules.items()}, rng=torch.get_rng_state())
        return state

    def fault(what: str, step: int) -> RunFault:
        bar.close()
        if all_finite(snapshot()):
            save_ckpt(ck_path, state)
            kept = f"its last good state (step {state['step']}) is saved in {ck_path}"
        else:
            kept = f"nothing non-finite was saved: {ck_path} is kept" if os.path.exists(ck_path) else "nothing was saved"
        return RunFault(f"{name}: {what} at step {step + 1}; {kept}. Re-run the same command to resume, or start a "
                        f"new run folder with a lower learning rate (non-finite) or batch (memory)")

    last_save, t0 = time.time(), time.time()
    bar = tqdm(range(state["step"], total), initial=state["step"], total=total, desc=name, dynamic_ncols=True,
               disable=not DIST.main)
    try:
        for step in bar:
            try:
                metrics = step_fn(step)
            except FloatingPointError as e:                         # found before the update: the weights are finite
                raise fault(f"non-finite {e}", step) from None
            except torch.OutOfMemoryError:
                raise fault("out of memory", step) from None
            state["step"] = step + 1
            if step % c.log_every == 0 or step + 1 == total:
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if not isinstance(v, list)})
                log(stage=name, step=step + 1, **{k: v if isinstance(v, list) else round(float(v), 6) for k, v in metrics.items()})
            if time.time() - last_save > c.ckpt_every_s:
                save_ckpt(ck_path, snapshot())
                last_save = time.time()
    except KeyboardInterrupt:
        bar.close()
        state["train_seconds"] = state.get("train_seconds", 0.0) + time.time() - t0
        save_ckpt(ck_path, snapshot())
        print(f"\ninterrupted: {name} saved at step {state['step']} in {ck_path}; re-run the same command to resume")
        sys.exit(130)
    bar.close()
    state["train_seconds"] = state.get("train_seconds", 0.0) + time.time() - t0
    save_ckpt(ck_path, snapshot())                                  # trained weights are safe before any evaluation
    return state


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flip per sample. x (B, C, H, W)."""
    flip = torch.rand(x.shape[0], generator=g, device="cpu").to(x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def generator_step(model: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor,
                   step: int, decay: float) -> dict:
    """Backward, clip the gradient norm to 1, check for finite values, step, update the EMA weights (decay
    warmed up as (1 + step) / (10 + step)); the NAT's and the flow's optimiser step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    out = {"loss": all_mean(loss.detach()).item(), "grad_norm": gn.item()}
    check_finite(**out)
    opt.step()
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.lerp_(p, 1 - d)
    return out


# ============================================================================= models from a run folder

def build_model(run_dir: str, stage: str, device: torch.device, weights: str = "model") -> torch.nn.Module:
    """A finished stage's model rebuilt from its checkpoint alone (config + weights), in eval mode. stage:
    vq, nat, a frozen network (fid.FeatureNet), flow or vp; weights: "model" or "ema" (the generators')."""
    path = os.path.join(run_dir, f"{stage}.pt")
    ck = load_ckpt(path)
    if not ck.get("done"):
        raise UserError(f"{path} is unfinished (step {ck.get('step')}): finish it with python "
                        + (f"experiments/flow.py train --run-dir {run_dir} --stage flow --set flow_path={stage}"
                           if stage in samplers.PATHS else f"train.py --run-dir {run_dir} --stage {stage}"))
    cfg = ck["config"]
    try:
        if stage == "vq":
            model = vqgan.VQModel(vqgan.VQConfig(**{**cfg, "ch_mult": tuple(cfg["ch_mult"])}))
        elif stage == "nat":
            model = nat.NAT(nat.NATConfig(**cfg))
        elif stage in samplers.PATHS:
            model = samplers.FlowTransformer(samplers.FlowConfig(**cfg), nat.Block)
        else:
            model = fid.FeatureNet(fid.FeatureNetConfig(**cfg))
        model.load_state_dict(ck[weights])
    except (TypeError, KeyError, RuntimeError) as e:
        raise UserError(f"{path} does not match this code's {stage} model ({type(e).__name__}: {str(e)[:120]}); "
                        f"delete it to retrain that stage") from None
    return model.to(device).eval()


def build_policy(cfg: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(policy, critic) of a policy checkpoint's config: the adaptive pair, or the static tables."""
    D = len(cfg["spec"])                                              # 4 actions (NAT) or 2 (ODE sampler)
    if cfg["kind"] == "static":
        return policy.StaticPolicy(cfg["T"], out_dim=D), policy.StaticPolicy(cfg["T"], out_dim=1)
    make = lambda out: policy.AdaptivePolicy(cfg["T"], cfg["C"], cfg["N"], cfg["pi_width"], hidden=cfg["pi_hidden"], out_dim=out)
    return make(D), make(1)


def load_policy(path: str, device: torch.device, weights: str = "best") -> tuple[torch.nn.Module, dict]:
    """A finished policy checkpoint's policy and config; weights "best" (on featnet's training FID) or "model" (last)."""
    ck = load_ckpt(path)
    if not ck.get("done"):
        raise UserError(f"{path} is unfinished (iteration {ck.get('step')}): re-run the command that trained it to resume")
    try:
        pi, _ = build_policy(ck["config"])
        pi.load_state_dict(ck[weights])
    except (TypeError, KeyError, RuntimeError) as e:
        raise UserError(f"{path} does not match this code's policy ({type(e).__name__}: {str(e)[:120]}); "
                        f"delete it to retrain that stage") from None
    return pi.to(device).eval(), ck["config"]


def feature_maps(net: fid.FeatureNet, taps: tuple = (0, 1, 2), grad: bool = False):
    """A frozen classifier as a backbone: x -> its maps after the pooling stages `taps` ((B, w, S/2, S/2),
    (B, 2w, S/4, S/4), (B, 4w, S/8, S/8)), and their channels; gradients reach x only with grad=True."""
    layers = list(net.body)
    pools = [i for i, layer in enumerate(layers) if isinstance(layer, (torch.nn.MaxPool2d, torch.nn.AvgPool2d))]
    keep = {pools[k] for k in taps}

    def backbone(x: torch.Tensor) -> list[torch.Tensor]:
        feats, h = [], x
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            for i, layer in enumerate(layers[:max(keep) + 1]):
                h = layer(h)
                if i in keep:
                    feats.append(h)
        return feats
    return backbone, [[net.cfg.width, 2 * net.cfg.width, 4 * net.cfg.width][k] for k in sorted(taps)]


def d_backbone(run_dir: str, nets: str, taps: tuple, device: torch.device):
    """D's frozen backbone: the maps at `taps` of each network in `nets` ("backbone+dssl": heads on both)."""
    for name in nets.split("+"):
        if not os.path.exists(os.path.join(run_dir, f"{name}.pt")):
            raise UserError(f"pi_d_nets={nets}: {run_dir}/{name}.pt is missing; train it with python train.py "
                            f"--run-dir {run_dir} --stage {name}")
    parts = [feature_maps(build_model(run_dir, n, device), taps) for n in nets.split("+")]
    return (lambda x: [f for fn, _ in parts for f in fn(x)]), [ch for _, chs in parts for ch in chs]


# ============================================================================= generation and training-set FIDs

def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    return torch.arange(n) % num_classes


class GeneratorPipeline:
    """What the NAT's and the flow's (experiments/flow.py) generation share: the FID network, chunks of
    `batch` rows whose random numbers are keyed by (seed, chunk) and shared over the ranks, so any number
    of processes makes the same samples; a forward counter; the w_0 sweep's settings."""

    def __init__(self, run_dir: str, device: torch.device, bf16: bool, batch: int | None):
        self.run_dir, self.device, self.bf16 = run_dir, device, bf16
        self.batch = batch or (4096 if device.type == "cuda" else 500)  # rows per generation chunk (x2 with CFG)
        self.featnet = build_model(run_dir, "featnet", device)
        self.forwards = 0

    def counted(self, net, *args: torch.Tensor):
        """One generator forward, counted (rows so far), under autocast."""
        self.forwards += args[0].shape[0]
        with autocast(self.device, self.bf16):
            return net(*args)

    def chunked(self, labels: torch.Tensor, group: int, seed: int, make_chunk: Callable, schedule, desc: str = "",
                progress: bool = False) -> torch.Tensor:
        """make_chunk(labels of chunk j, its generator) for every chunk (whole groups of `group`), concatenated.
        A PolicySchedule's executed actions are gathered too, in chunk order (schedule.actions())."""
        step = max(group, self.batch // group * group)

        def run_chunk(j: int):
            g = torch.Generator(self.device).manual_seed(seed * 1_000_003 + j)
            out = make_chunk(labels[j * step:(j + 1) * step].to(self.device), g)
            return (out, torch.stack(schedule.executed).cpu()) if isinstance(schedule, policy.PolicySchedule) else out
        outs = sharded(-(-len(labels) // step), run_chunk, desc, progress)
        if isinstance(schedule, policy.PolicySchedule):
            actions = [a for _, a in outs]                             # (T, rows, D) per chunk
            schedule.finished, schedule.executed = actions[:-1], list(actions[-1])
            outs = [o for o, _ in outs]
        return torch.cat(outs)


class Pipeline(GeneratorPipeline):
    """The trained tokenizer, NAT (EMA weights) and FID network of a run folder, and generation through them."""

    W_GRID, sweep_file, sweep_what, sweep_info = (0.0, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0), "sweep_w.json", "T=8", \
        {"T": 8, "tau2_0": nat.ADANAT_TAU2_0}

    def __init__(self, run_dir: str, device: torch.device, bf16: bool = True, batch: int | None = None):
        super().__init__(run_dir, device, bf16, batch)
        self.vq = build_model(run_dir, "vq", device)
        self.net = self.forward = build_model(run_dir, "nat", device, weights="ema")
        self.cfg: nat.NATConfig = self.net.cfg
        if (self.cfg.vocab_size, self.cfg.num_tokens) != (self.vq.cfg.codebook_size, self.vq.num_tokens):
            raise UserError(f"{run_dir}: nat.pt expects {self.cfg.vocab_size} codes x {self.cfg.num_tokens} tokens but "
                            f"vq.pt makes {self.vq.cfg.codebook_size} x {self.vq.num_tokens}; retrain the nat stage")

    def compile(self) -> None:
        self.forward = torch.compile(self.net)

    def logits_fn(self, tokens: torch.Tensor, labels: torch.Tensor):
        return self.counted(self.forward, tokens, labels)

    def generate(self, labels: torch.Tensor, T: int, schedule: nat.Schedule, seed: int, guided: bool = True,
                 progress: bool = False, group: int = 1, lookahead: int = 1, score_fn=None,
                 logits_fn: Callable | None = None) -> torch.Tensor:
        """Tokens (n, N) for labels (n,) with any schedule (a table, a policy), chunk by chunk (see chunked);
        guided=False skips the null-class forward; group = G: blocks of G rows share random numbers;
        lookahead, score_fn: nat.generate's look-ahead; logits_fn: another forward (default the NAT's)."""
        null = self.cfg.null_label if guided else None
        make = lambda y, g: nat.generate(logits_fn or self.logits_fn, y, T, schedule, self.cfg.mask_id, self.cfg.num_tokens,
                                         null, g, group, lookahead, score_fn).cpu()
        return self.chunked(labels, group, seed, make, schedule, f"T={T}", progress)

    def sweep_images(self, labels: torch.Tensor, w_0: float) -> torch.Tensor:
        """The w_0 sweep's images: AdaNAT's heuristic (tau2_0 = 1, w = w_0 t/T) at T = 8, seed 0."""
        sched = nat.heuristic_schedule(8, tau2_0=nat.ADANAT_TAU2_0, w_0=w_0)
        return self.decode(self.generate(labels, 8, sched, seed=0, guided=w_0 != 0))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (n, N) -> float images (n, C, H, W) in [-1, 1] on the CPU."""
        return torch.cat([self.vq.detokenize(tokens[i:i + self.batch].to(self.device)).float().cpu()
                          for i in range(0, len(tokens), self.batch)])


def training_draw(c: TrainConfig, n: int = 10000) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed draw of n training images (float, [-1, 1]) and labels that training statistics are computed on."""
    x_train, y_train, _ = data.load_dataset(c.data, "train", c.img_size, c.channels, c.seed)
    pick = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))[:n]
    return data.to_float(x_train[pick]), y_train[pick]


class RealFeatures:
    """Training-set statistics on the FID network ("fid") and on each trained held-out judge ("fid2":
    featnet2, "fd_ssl": featssl): 10 000 training images (a fixed draw), what every choice is made on.
    sample.py's EvalReferences adds the test set's."""

    def __init__(self, pipe: GeneratorPipeline):
        self.run_dir, self.device, self.featnet, self.vq = pipe.run_dir, pipe.device, pipe.featnet, getattr(pipe, "vq", None)
        self.config = load_config(self.run_dir)
        self.judges = {m: build_model(self.run_dir, s, self.device) for s, m in JUDGES.items()
                       if s != "featnet" and is_done(os.path.join(self.run_dir, f"{s}.pt"))}
        c = self.config
        self.train_images, self.train_labels = training_draw(c)
        self.train_feats, logits = fid.extract(self.featnet, self.train_images, device=self.device)   # (n, D)
        self.train_correct = logits.argmax(1) == self.train_labels
        self.train_all = {"fid": self.train_feats} | {                # metric -> (n, D) training features
            m: fid.extract(net, self.train_images, device=self.device)[0] for m, net in self.judges.items()}
        self.train = {m: fid.statistics(f) for m, f in self.train_all.items()}
        self.train_mu, self.train_sigma = self.train["fid"]

    def distances(self, images: torch.Tensor, stats: dict, feats: torch.Tensor | None = None) -> dict:
        """Fréchet distances of images against `stats` (metric -> (mu, sigma)) on featnet and every judge."""
        nets = {"fid": self.featnet, **self.judges}
        return {m: fid.fid_from_features(feats if m == "fid" and feats is not None else
                                         fid.extract(nets[m], images, device=self.device)[0], *stats[m]) for m in stats}


def sweep_w(pipe: GeneratorPipeline, ref: RealFeatures, samples: int) -> dict:
    """The guidance w_0 of the start schedule (the NAT: AdaNAT's heuristic at T = 8; the flow: constant
    guidance, Euler, 8 steps) over pipe.W_GRID by FID against training statistics: pipe.sweep_file."""
    labels = balanced_labels(samples, pipe.cfg.num_classes)
    results = {}
    bar = tqdm(pipe.W_GRID, desc=f"w_0 sweep ({pipe.sweep_what}, {samples} samples)", disable=not DIST.main)
    for w_0 in bar:
        feats, _ = fid.extract(pipe.featnet, pipe.sweep_images(labels, w_0), device=pipe.device)
        results[w_0] = fid.fid_from_features(feats, ref.train_mu, ref.train_sigma)
        bar.set_postfix(fid=f"{results[w_0]:.2f}")
    best = min(results, key=results.get)
    if best == max(pipe.W_GRID):
        print(f"warning: the best w_0 is the largest of the grid {pipe.W_GRID}; extend W_GRID")
    out = {"samples": samples, "grid": list(pipe.W_GRID), **pipe.sweep_info,
           "train_fid": {str(k): v for k, v in results.items()}, "w_0": best}
    write_json(os.path.join(pipe.run_dir, pipe.sweep_file), out)
    barrier()
    print(f"w_0 sweep (FID vs training set, {pipe.sweep_what}): " + ", ".join(f"{k}: {v:.2f}" for k, v in results.items())
          + f" -> w_0 = {best}")
    return out


def get_w0(pipe: GeneratorPipeline, ref: RealFeatures, samples: int) -> float:
    """The swept w_0 (the generator's stage deletes a stale sweep), sweeping first when there is none."""
    saved = read_json(os.path.join(pipe.run_dir, pipe.sweep_file), {})
    if (saved.get("samples"), saved.get("grid")) == (samples, list(pipe.W_GRID)):
        return saved["w_0"]
    return sweep_w(pipe, ref, samples)["w_0"]


# ============================================================================= stages: frozen networks, tokenizer, NAT

def frozen_net(c: TrainConfig, run_dir: str, device: torch.device, log: Logger, name: str, sizes: dict, steps: int,
               seed_offset: int, simclr: bool = False) -> None:
    """Train a fid.FeatureNet into <name>.pt: a classifier (cross-entropy, flip + shift), or with simclr=True
    by SimCLR (fid.nt_xent on two fid.views of each image; its classifier layer is the projection head)."""
    x_train, y_train, num_classes = data.load_dataset(c.data, "train", c.img_size, c.channels, c.seed)
    x_test, y_test, _ = data.load_dataset(c.data, "test", c.img_size, c.channels, c.seed)
    cfg = fid.FeatureNetConfig(in_ch=c.channels, num_classes=c.ssl_proj if simclr else num_classes, img_size=c.img_size, **sizes)
    torch.manual_seed(c.seed + seed_offset)
    model = fid.FeatureNet(cfg).to(device)
    lr, batch = (c.ssl_lr, c.ssl_batch) if simclr else (c.feat_lr, c.feat_batch)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    modules, path = {"model": model, "optim": opt}, os.path.join(run_dir, f"{name}.pt")
    state = {**resume(path, to_plain(cfg), modules), "config": to_plain(cfg), "done": False}
    g = torch.Generator().manual_seed(rank_seed(c.seed + seed_offset + state["step"]))
    it = data.batches(x_train, y_train, rank_batch(batch, "ssl_batch" if simclr else "feat_batch"), g, infinite=True)
    net = data_parallel(model, device)                                # batch-norm statistics per rank, rank 0's kept

    def step_fn(step: int) -> dict:
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, steps, lr, c.feat_warmup)
        xb, yb = next(it)
        net.train()
        if simclr:
            x = data.to_float(xb).to(device)                          # (B, C, H, W)
            z = net(torch.cat([fid.views(x, g), fid.views(x, g)]))    # (2B, ssl_proj): one forward, one sync
            loss, out = fid.nt_xent(*z.chunk(2), tau=c.ssl_tau), {}
        else:
            x = augment(data.to_float(xb).to(device), g)
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()  # random shift by up to 2 pixels
            logits = net(torch.roll(x, (dx, dy), dims=(2, 3)))
            loss = F.cross_entropy(logits, yb.to(device))
            out = {"acc": (logits.argmax(1).cpu() == yb).float().mean()}
        loss_v = all_mean(loss.detach()).item()
        check_finite(loss=loss_v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss_v, **{k: all_mean(v.to(device)).item() for k, v in out.items()}}

    state = train_loop(name, path, state, modules, step_fn, steps, c, log)
    f_test, logits = fid.extract(model, data.to_float(x_test), device=device)
    if simclr:                                                        # how much class its features hold
        metric = {"test_knn_acc": fid.knn_accuracy(fid.extract(model, data.to_float(x_train), device=device)[0], y_train,
                                                   f_test, y_test)}
    else:
        metric = {"test_acc": (logits.argmax(1) == y_test).float().mean().item()}
    state.update(metrics=metric, done=True)
    save_ckpt(path, state)
    log(stage=name, final=True, **metric)
    print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metric.items()))


FROZEN_NETS = {   # stage -> (sizes, steps key, seed offset, SimCLR); the discriminator's candidates dnet, dssl
    "backbone": (lambda c: dict(width=c.backbone_width, feat_dim=c.backbone_dim), "backbone_steps", 7, False),
    "featnet": (lambda c: dict(width=c.featnet_width, feat_dim=c.featnet_dim), "featnet_steps", 2, False),
    "featnet2": (lambda c: dict(width=c.featnet2_width, feat_dim=c.featnet2_dim, convs=c.featnet2_convs, pool="avg"),
                 "featnet2_steps", 13, False),
    "featssl": (lambda c: dict(width=c.ssl_width, feat_dim=c.ssl_dim), "ssl_steps", 23, True),
    "dnet": (lambda c: dict(width=c.dnet_width, feat_dim=c.dnet_dim), "dnet_steps", 17, False),
    "dssl": (lambda c: dict(width=c.ssl_width, feat_dim=c.ssl_dim, convs=1, pool="avg"), "ssl_steps", 29, True)}


def stage_vq(c: TrainConfig, run_dir: str, device: torch.device, log: Logger) -> None:
    """The VQ tokenizer: L = |x - G(z_q)| + (x - G(z_q))^2 + L_vq + vq_perceptual * L_P (+ hinge patch-GAN)."""
    x_train, x_test = (data.load_dataset(c.data, split, c.img_size, c.channels, c.seed)[0] for split in ("train", "test"))
    cfg = vq_config(c)
    model = vqgan.VQModel(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=c.vq_lr, betas=(0.5, 0.9))
    disc = vqgan.PatchDiscriminator(c.channels, cfg.disc_ch).to(device) if c.vq_gan_weight > 0 else None
    opt_d = torch.optim.Adam(disc.parameters(), lr=c.vq_lr, betas=(0.5, 0.9)) if disc else None
    modules = {"model": model, "optim": opt, **({"disc": disc, "optim_d": opt_d} if disc else {})}
    path = os.path.join(run_dir, "vq.pt")
    state = {**resume(path, to_plain(cfg), modules), "config": to_plain(cfg), "done": False}
    g = torch.Generator().manual_seed(rank_seed(c.seed + 1 + state["step"]))
    it = data.batches(x_train, y=torch.zeros(len(x_train), dtype=torch.long), batch_size=rank_batch(c.vq_batch, "vq_batch"),
                      generator=g, infinite=True)
    # torchrun: the quantizer syncs its usage counts itself (vqgan.py), so DDP must not broadcast buffers
    net = DistributedDataParallel(model, broadcast_buffers=False) if DIST.world > 1 else model
    disc_dp = data_parallel(disc, device) if disc is not None else None
    if c.vq_perceptual > 0:                                           # L_P on the frozen backbone (not a judge)
        if not os.path.exists(os.path.join(run_dir, "backbone.pt")):
            raise UserError(f"vq_perceptual > 0 needs the backbone classifier: run python train.py --run-dir {run_dir} "
                            f"--stage backbone first")
        percep, _ = feature_maps(build_model(run_dir, "backbone", device).requires_grad_(False), grad=True)

    def step_fn(step: int) -> dict:
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, c.vq_steps, c.vq_lr, c.vq_warmup)
        x = augment(data.to_float(next(it)[0]).to(device), g)        # (B, C, H, W)
        x_rec, codes, vq_loss, z_e = net(x)
        loss = (x_rec - x).abs().mean() + F.mse_loss(x_rec, x) + vq_loss
        out = {"mse": all_mean(F.mse_loss(x_rec, x).detach()).item()}
        if c.vq_perceptual > 0:
            with torch.no_grad():
                f_x = percep(x)
            l_p = vqgan.perceptual_loss(f_x, percep(x_rec))
            loss = loss + c.vq_perceptual * l_p
            out["percep"] = all_mean(l_p.detach()).item()
        out["loss"] = all_mean(loss.detach()).item()
        check_finite(loss=out["loss"])
        if disc is not None and step >= c.vq_gan_start:
            g_loss = vqgan.hinge_g_loss(disc(x_rec))                  # D's gradients here are zeroed below
            loss = loss + c.vq_gan_weight * g_loss
            out["g_loss"] = g_loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if disc is not None and step >= c.vq_gan_start:
            d_loss = vqgan.hinge_d_loss(*disc_dp(torch.cat([x, x_rec.detach()])).chunk(2))
            out["d_loss"] = d_loss.item()
            check_finite(d_loss=out["d_loss"])
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        if (step + 1) % c.vq_restart_every == 0 and step < 0.8 * c.vq_steps:
            out["restarted"] = model.vq.restart_dead_codes(z_e.detach().permute(0, 2, 3, 1).reshape(-1, cfg.code_dim))
        return out

    state = train_loop("vq", path, state, modules, step_fn, c.vq_steps, c, log)
    model.eval()                                                      # the held-out test set: MSE, code usage
    codes, mse = [], 0.0
    with torch.no_grad():
        for i in range(0, len(x_test), 500):
            x = data.to_float(x_test[i:i + 500]).to(device)
            x_rec, k, _, _ = model(x)
            mse += F.mse_loss(x_rec.clamp(-1, 1), x, reduction="sum").item()
            codes.append(k.cpu())
    stats = vqgan.codebook_stats(torch.cat(codes), cfg.codebook_size)
    state.update(metrics={"test_mse": mse / x_test.numel(), **{f"test_{k}": float(v) for k, v in stats.items()}}, done=True)
    save_ckpt(path, state)
    log(stage="vq", final=True, **state["metrics"])
    print("vq:", json.dumps({k: round(v, 4) for k, v in state["metrics"].items()}))


def stage_nat(c: TrainConfig, run_dir: str, device: torch.device, log: Logger) -> None:
    """The NAT on the tokenised training set (and its mirror images) with the masked-token loss; an EMA of
    its weights is what sampling uses."""
    x_train, y_train, num_classes = data.load_dataset(c.data, "train", c.img_size, c.channels, c.seed)
    vq = build_model(run_dir, "vq", device)
    with torch.no_grad():
        parts = [[vq.tokenize((xb.flip(-1) if flip else xb)).cpu() for flip in (False, True)]
                 for xb in (data.to_float(x_train[i:i + 1000]).to(device) for i in range(0, len(x_train), 1000))]
    tokens, labels = torch.cat([p[0] for p in parts] + [p[1] for p in parts]), y_train.repeat(2)   # (2M, N), (2M,)
    cfg = nat.NATConfig(vocab_size=vq.cfg.codebook_size, num_tokens=tokens.shape[1], num_classes=num_classes,
                        dim=c.nat_dim, depth=c.nat_depth, heads=c.nat_heads, dropout=c.nat_dropout,
                        mask_dist=c.nat_mask_dist, alpha=c.nat_mask_alpha, beta=c.nat_mask_beta)
    model = nat.NAT(cfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c.nat_wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=c.nat_lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    modules, path = {"model": model, "ema": ema, "optim": opt}, os.path.join(run_dir, "nat.pt")
    state = {**resume(path, to_plain(cfg), modules), "config": to_plain(cfg), "done": False}
    g = torch.Generator().manual_seed(rank_seed(c.seed + 3 + state["step"]))
    it = data.batches(tokens, labels, rank_batch(c.nat_batch, "nat_batch"), g, infinite=True)
    net = data_parallel(model, device)
    net = torch.compile(net) if c.compile else net

    def step_fn(step: int) -> dict:
        lr = lr_at(step, c.nat_steps, c.nat_lr, c.nat_warmup)
        for grp in opt.param_groups:
            grp["lr"] = lr
        v, y = next(it)
        net.train()
        with autocast(device, c.bf16):
            loss = nat.masked_token_loss(net, v.to(device), y.to(device))
        return {"lr": lr, **generator_step(model, ema, opt, loss, step, c.nat_ema_decay)}

    state = train_loop("nat", path, state, modules, step_fn, c.nat_steps, c, log)
    state["done"] = True
    save_ckpt(path, state)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(run_dir, "sweep_w.json"))             # a sweep of other weights
    print(f"nat: done, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")


# ============================================================================= policies: AdaNAT's Algorithm 1

@dataclass
class PolicyTask:
    """A paradigm's MDP (AdaNAT §4.2; AdaGen §III for the ODE sampler, experiments/flow.py), as callables."""
    name: str                  # checkpoint / log name, e.g. policy_T8, flow_policy_nfe4
    T: int                     # steps, i.e. decisions per trajectory
    spec: policy.ActionSpec    # the actions' names, squashings and which act at which step
    h: torch.Tensor            # (T, D) the schedule a zero residual reproduces
    start: str                 # what h is, for the log
    C: int                     # the generator's features: (B, N, C)
    N: int
    num_classes: int
    generate: Callable         # (labels (B,), schedule, generator g, group G) -> final (B, ...) on the device
    to_images: Callable        # final -> images (B, C, H, W) in [-1, 1]
    fid_images: Callable       # (labels, schedule) -> images on the CPU (seed 0), for the training-set FID
    reals: Callable            # () -> (x (n, C, H, W) float, y (n,)): what D calls real
    to_step: Optional[Callable] = None   # PolicySchedule's to_step (the ODE sampler's [f, w] -> (t', w))
    extra: dict = dataclasses.field(default_factory=dict)   # recorded in the policy's config, over the pi_ flags


def policy_file(kind: str, start: str, T: int, reward_name: str = "adversarial", seed: int = 0) -> str:
    """policy_T8; policy_search_T8 (started from the searched table); policy_fid_T8 (trained on another reward);
    policy_T8_seed1 (training seed 1)."""
    parts = [kind] + ([start] if start != "heuristic" else []) + ([reward_name] if reward_name != "adversarial" else [])
    return "_".join(parts) + f"_T{T}" + (f"_seed{seed}" if seed else "")


def policy_seeds(run_dir: str, kind: str, start: str, T: int, reward_name: str = "adversarial") -> list[int]:
    """The training seeds of `kind` whose checkpoints are finished (policy_file names), in order."""
    found = [0] + [int(p.rsplit("_seed", 1)[1][:-3]) for p in
                   glob.glob(os.path.join(run_dir, policy_file(kind, start, T, reward_name) + "_seed*.pt"))]
    return sorted(k for k in found if is_done(os.path.join(run_dir, policy_file(kind, start, T, reward_name, k) + ".pt")))


def searched_table(run_dir: str, name: str, T: int) -> tuple | None:
    """(table (T, 4), config) of a finished AutoNAT search `name` ("search" or "param") for T, or None."""
    path = os.path.join(run_dir, f"{name}_T{T}.pt")
    ck = load_ckpt(path) if os.path.exists(path) else {}
    return (ck["table"], ck["config"]) if ck.get("done") else None


def class_only_table(run_dir: str, T: int) -> torch.Tensor | None:
    """(K, T, 4): each class the heuristic at its own (w_0, tau2_0) of experiments/game.py --headroom's sweep, or None."""
    saved = read_json(os.path.join(run_dir, "headroom_sweep.json"), {})
    pairs = saved.get("class_pairs") if saved.get("T") == T else None
    return torch.stack([nat.heuristic_table(T, tau2, w) for w, tau2 in pairs]) if pairs else None


def real_images(c: TrainConfig, n: int = 11000) -> tuple[torch.Tensor, torch.Tensor]:
    """n random training images (float, [-1, 1]) and their labels: the discriminator's reals."""
    x_train, y_train, _ = data.load_dataset(c.data, "train", c.img_size, c.channels, c.seed)
    pick = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(c.seed + 5))[:n]
    return data.to_float(x_train[pick]), y_train[pick]


def nat_task(c: TrainConfig, run_dir: str, device: torch.device, kind: str, T: int):
    """(task, pipeline, RealFeatures) of the NAT's MDP for T decoding steps (AdaNAT), starting from AdaNAT's
    heuristic (tau2_0 = 1, w = w_0 t/T, w_0 swept) or a finished AutoNAT table (pi_start)."""
    pipe = Pipeline(run_dir, device, c.bf16)
    ref = RealFeatures(pipe)
    w_0 = get_w0(pipe, ref, c.pi_sweep_samples)
    h = (nat.heuristic_table(T, nat.ADANAT_TAU2_0, w_0) if c.pi_start == "heuristic" else class_only_table(run_dir, T)
         if c.pi_start == "classonly" else searched_table(run_dir, c.pi_start, T))
    if h is None:
        what, fix = ("no class-only schedule", "experiments/game.py --headroom") if c.pi_start == "classonly" else (
            f"no finished {c.pi_start}_T{T}.pt", f"experiments/search.py --stage {'search' if c.pi_start == 'search' else 'param-search'} --set search_T={T}")
        raise UserError(f"pi_start={c.pi_start}: {run_dir} has {what} at T = {T}; run python {fix} --run-dir {run_dir} first")
    cfg, dedup = pipe.cfg, nat.dedup_logits_fn(pipe.logits_fn)    # the first step: one forward per class

    def reals():                                   # raw training images, or (pi_d_real = recon) their reconstructions
        x, y = real_images(c)
        if c.pi_d_real == "recon":
            x = torch.cat([pipe.decode(pipe.vq.tokenize(x[i:i + 500].to(device))) for i in range(0, len(x), 500)])
        return x, y

    task = PolicyTask(
        name=policy_file(kind, c.pi_start, T, c.pi_reward, c.pi_seed), T=T, spec=policy.NAT_ACTIONS,
        h=h[0].float() if isinstance(h, tuple) else h, start=f"{PI_STARTS[c.pi_start]} (w_0 = {w_0:g})", C=cfg.dim,
        N=cfg.num_tokens, num_classes=cfg.num_classes,
        generate=lambda y, sched, g, G: nat.generate(dedup, y, T, sched, cfg.mask_id, cfg.num_tokens, cfg.null_label, g, group=G),
        to_images=pipe.vq.detokenize, reals=reals,
        fid_images=lambda y, sched: pipe.decode(pipe.generate(y, T, sched, seed=0, logits_fn=dedup)))
    return task, pipe, ref


def sigma_at(c: TrainConfig, it: int) -> float:
    """Exploration std of iteration `it`: linear pi_sigma0 -> pi_sigma1, or a step at the half."""
    step = c.pi_sigma0 if it < c.pi_iters // 2 else c.pi_sigma1
    return step if c.pi_sigma_schedule == "step" else c.pi_sigma0 + (c.pi_sigma1 - c.pi_sigma0) * it / max(1, c.pi_iters - 1)


def advantages(c: TrainConfig, R_all: torch.Tensor, value: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(returns, advantages), each (T*B,) step-major, from the global batch's terminal rewards R_all: R_hat = R
    normalised by max(std, pi_adv_floor), A = R_hat - V_old (AdaNAT Eq. 12; pi_group = 1), or A = R minus its
    group's mean, divided the same way (GRPO-style; pi_group > 1)."""
    G, floor = c.pi_group, c.pi_adv_floor
    ret = my_rows(ppo.normalise(R_all, floor)).repeat(T)
    if G == 1:
        return ret, ret - value
    A = (R_all.view(-1, G) - R_all.view(-1, G).mean(1, keepdim=True)).flatten()
    return ret, my_rows(A / (A.std().clamp_min(floor) + 1e-8)).repeat(T)


def reward_hook(c: TrainConfig, kind: str, pipe, ref: RealFeatures) -> Callable:
    """R (B,) from (r_adv, r_fid, fake images, lam): D's score r_adv (AdaNAT Eq. 13); the fidelity blend
    (AdaGen Eq. 15); or for the reward-hacking study the fixed reward r_fid = log p(y|x) or minus the FID
    (training statistics) of the trajectory's chunk of pi_fid_chunk (AdaGen §III-D)."""
    simple = {"fidelity": lambda r_adv, r_fid, fake, lam: reward.blended_reward(r_adv, r_fid, lam),
              "fixed": lambda r_adv, r_fid, fake, lam: r_fid, "adversarial": lambda r_adv, r_fid, fake, lam: r_adv}
    if (key := "fidelity" if kind == "fidelity" else c.pi_reward) in simple:
        return simple[key]

    def chunk_fid(r_adv, r_fid, fake, lam):
        feats = all_cat(fid.extract(pipe.featnet, fake, device=fake.device)[0].to(fake.device)).cpu()   # (B, D)
        chunk_of = torch.arange(len(feats)) % max(2, len(feats) // c.pi_fid_chunk)   # a group's members: other chunks
        R = torch.empty(len(feats))
        for j in chunk_of.unique():
            R[chunk_of == j] = -fid.fid_from_features(feats[chunk_of == j], ref.train_mu, ref.train_sigma)
        return my_rows(R).to(fake.device)
    return chunk_fid


def fidelity_base(run_dir: str, device: torch.device, task: PolicyTask, pcfg: dict, nets: tuple) -> torch.nn.Module:
    """AdaGen §III-F2: the frozen adaptive policy the fidelity policy is blended with (Eq. 14); a new fidelity
    policy, its critic and D start as copies of the adaptive policy's."""
    base_name = task.name.replace("fidelity", "policy", 1)
    base_path = os.path.join(run_dir, f"{base_name}.pt")
    if not os.path.exists(base_path):
        raise UserError(f"the fidelity stage blends with the adaptive policy {base_path}, which is missing: "
                        f"run python train.py --run-dir {run_dir} --stage policy first")
    base, base_cfg = load_policy(base_path, device)
    if base_cfg["heuristic"] != task.h.tolist() or base_cfg["beta_ema"] != 0:
        raise UserError(f"{base_path} starts from another schedule than this run's (the w_0 sweep changed since) or "
                        f"smooths its actions: the blend needs both policies on the same start; retrain it")
    pcfg["base"] = base_name
    if not os.path.exists(os.path.join(run_dir, f"{task.name}.pt")):
        main_ck = load_ckpt(base_path)
        for net, key in zip(nets, ("best", "critic", "disc")):
            net.load_state_dict(main_ck[key])
    return base.requires_grad_(False)


def train_policy(c: TrainConfig, run_dir: str, device: torch.device, log: Logger, kind: str, task: PolicyTask,
                 pipe, ref: RealFeatures) -> None:
    """Train one policy of `kind` on `task` by AdaNAT's Algorithm 1, keeping the best weights by featnet's FID.

    kind: "policy" (adaptive), "static" (the learnable table), "smooth" (adaptive with EMA action smoothing
    beta_ema = pi_beta_ema) or "fidelity" (AdaGen §III-F2: a second adaptive policy blended with the frozen
    adaptive one by lam ~ U(0, 1) per group, Eq. 14, rewarded (1 - lam) r_adv + lam r_fid, Eq. 15). The policy
    learns a residual eta on task.h, starting at zero. Every pi_fid_every iterations the mean policy's
    Fréchet distances against training statistics are logged on every network; the best on featnet is kept
    (the fidelity policy: the last)."""
    c = dataclasses.replace(c, **OFFICIAL_RECIPE) if c.pi_recipe == "official" else c
    c = dataclasses.replace(c, pi_iters=max(1, c.pi_iters * 4 // task.T))   # the same generator forwards at any T
    T, spec, G, name = task.T, task.spec, c.pi_group, task.name
    pcfg = {"kind": kind, "T": T, "heuristic": task.h.tolist(), "C": task.C, "N": task.N,
            "beta_ema": c.pi_beta_ema if kind == "smooth" else 0.0, "spec": list(spec.names),
            **{k: v for k, v in to_plain(c).items() if k.startswith("pi_") and k not in ("pi_T", "pi_beta_ema")}, **task.extra}
    if c.pi_seed:                                                    # seed 0: the process's generator, as it always was
        torch.manual_seed(c.seed + 7919 * c.pi_seed)
    pi, V = (m.to(device) for m in build_policy(pcfg))               # the policy pi (eta_phi) and its critic V
    classifier = build_model(run_dir, "backbone", device)            # r_fid's frozen classifier
    backbone, channels = d_backbone(run_dir, c.pi_d_nets, c.pi_d_taps, device)   # D's frozen feature maps
    D = reward.ProjectedDiscriminator(channels, task.num_classes).to(device)     # the discriminator r_psi
    base = fidelity_base(run_dir, device, task, pcfg, (pi, V, D)) if kind == "fidelity" else None
    B = rank_batch(c.pi_batch, "pi_batch")                            # this rank's trajectories
    if B % G:
        raise UserError(f"pi_group {G} must divide each process's share of pi_batch ({B} of {c.pi_batch})")
    opt = torch.optim.Adam(list(pi.parameters()) + list(V.parameters()), lr=c.pi_static_lr if kind == "static" else c.pi_lr)
    d_opt = torch.optim.Adam(D.parameters(), lr=c.pi_d_lr, betas=(0.5, 0.999))
    h_pre, active, beta_ema = policy.inverse_activation(task.h, spec).to(device), spec.active(T, device), pcfg["beta_ema"]
    pi_dp, V_dp, D_dp = (data_parallel(m, device) for m in (pi, V, D))
    modules, path = {"model": pi, "critic": V, "disc": D, "optim": opt, "d_optim": d_opt}, os.path.join(run_dir, f"{name}.pt")
    state = {"history": [], "best": None, "best_fid": None, **resume(path, pcfg, modules), "config": pcfg, "done": False}
    x_real, y_real = task.reals()                  # D's reals: 10 000 training images, and 1 000 held out for D's accuracy
    n_hold = min(1000, len(x_real) // 10)
    x_real, y_real, f_hold, y_hold = x_real[n_hold:], y_real[n_hold:], backbone(x_real[:n_hold].to(device)), y_real[:n_hold].to(device)
    fid_labels = balanced_labels(c.pi_fid_samples, task.num_classes)

    def schedule(sigma: float = 0.0, g: torch.Generator | None = None, lam=None) -> policy.PolicySchedule:
        """The policy as a schedule: its mean (sigma = 0) or exploring; with lam, blended with base (Eq. 14)."""
        return policy.PolicySchedule(pi, h_pre, sigma, beta_ema, g, spec=spec, to_step=task.to_step,
                                     base=base if lam is not None else None, lam=lam)

    def explore(sigma: float, g: torch.Generator):
        """B labels (groups of G share one; the blend's lam per group) and a generate(labels, schedule)."""
        y = torch.randint(0, task.num_classes, (B // G,), device=device, generator=g).repeat_interleave(G)
        lam = torch.rand(B // G, device=device, generator=g).repeat_interleave(G) if base is not None else None
        return y, lam, lambda y_, sched: task.generate(y_, sched, g, G)

    def train_fids() -> dict:
        """The mean policy's Fréchet distances against training statistics on every network (seed 0, fixed labels)."""
        t0 = time.time()
        fids = ref.distances(task.fid_images(fid_labels, schedule()), ref.train)
        return {"train_" + k: v for k, v in fids.items()} | {"sec_fid": time.time() - t0}

    if state["best"] is None:                                        # iteration 0: the start schedule itself
        first = train_fids()
        state["best_fid"], state["best"] = first["train_fid"], copy.deepcopy(pi.state_dict())
        state["history"].append({"iter": 0, **first})
        print(f"{name}: start = {task.start}, training-set FID {state['best_fid']:.2f}")
    reward_fn = reward_hook(c, kind, pipe, ref)

    def iteration(it: int) -> dict:
        """One iteration of Algorithm 1; returns the logged values."""
        t0 = time.time()
        sigma = sigma_at(c, it)
        seed = rank_seed((c.seed + 7919 * c.pi_seed) * 100003 + it)  # per iteration (resumable), rank, training seed
        g, g_cpu = torch.Generator(device).manual_seed(seed), torch.Generator().manual_seed(seed)

        # 1 rollout: B trajectories of the exploring policy o_t ~ N(eta(s_t), sigma^2) on the frozen generator
        pi.eval(), V.eval(), D.eval()                                # D scores in eval mode (spectral norms fixed)
        labels, lam, generate = explore(sigma, g)
        ro = policy.rollout(pi, V, generate, labels, h_pre, sigma, beta_ema, g, spec, task.to_step, base, lam)

        # 2 reward: D's score of the finished images (AdaNAT Eq. 13), or reward_hook's variant
        with torch.no_grad():
            fake = task.to_images(ro.final)                          # (B, C, H, W)
            logits_fake = D(backbone(fake), labels)                  # [(B, P)] one logit per position per head
            r_adv = reward.reward(logits_fake)                       # (B,)
            r_fid = reward.fidelity_reward(classifier(fake), labels) # (B,) log p(y|x) under the frozen classifier
            R = reward_fn(r_adv, r_fid, fake, lam)                   # (B,)
            d_acc = reward.accuracy(D(f_hold, y_hold), logits_fake)  # held-out reals vs these fakes
        out = {"reward": all_mean(R.mean()).item(), "r_adv": all_mean(r_adv.mean()).item(),
               "r_fid": all_mean(r_fid.mean()).item(), "d_acc": all_mean(d_acc).item(), "sigma": sigma}
        check_finite(reward=out["reward"])
        out["sec_rollout"], t0 = time.time() - t0, time.time()
        if it == c.pi_d_warmup:                                      # D after its warm-up: kept for the reward check
            state["disc_warmup"], state["d_acc_warmup"] = copy.deepcopy(D.state_dict()), out["d_acc"]
            print(f"{name}: D's held-out accuracy after its warm-up: {out['d_acc']:.3f}")

        # 3 advantages + PPO (AdaNAT Eq. 11-12), once D's warm-up is over; the anchor keeps eta near zero
        if it >= c.pi_d_warmup:
            ret, adv = advantages(c, all_cat(R), ro.value, T)        # (T*B,) each
            out["adv_abs"] = all_mean(adv.abs().mean()).item()
            check_finite(advantage=out["adv_abs"])
            act = active[ro.t]                                       # (T*B, D) the knobs that act
            pi.train(), V.train()

            def evaluate(idx):                                       # through DDP: gradients averaged over ranks
                mu = pi_dp(ro.features[idx], ro.t[idx])              # (n, D)
                anchor = c.pi_anchor * ((mu * act[idx]) ** 2).sum(-1).mean()
                return (policy.gaussian_logp(ro.o[idx], mu, sigma, act[idx]), V_dp(ro.features[idx], ro.t[idx]),
                        policy.gaussian_entropy(sigma, act[idx].sum(-1)), anchor)
            stats = ppo.ppo_update(evaluate, ro.logp, adv, ret, opt, list(pi.parameters()) + list(V.parameters()),
                                   c.pi_epochs, c.pi_minibatches, c.pi_target_kl, c.pi_clip, c.pi_vf_coef, c.pi_ent_coef,
                                   c.pi_grad_clip, generator=g_cpu, mean_over_ranks=lambda x: all_mean(x).item())
            stats["explained_var"] = ppo.explained_variance(all_cat(ro.value), all_cat(ret))
            with torch.no_grad():                                    # how far the mean residual has moved
                mu = pi(ro.features, ro.t)
                stats["residual_rms"] = (((mu * act) ** 2).sum() / act.sum()).sqrt()
            out.update({k: float(v) for k, v in stats.items()})
        out["sec_ppo"], t0 = time.time() - t0, time.time()

        # 4 discriminator (AdaNAT Eq. 14): real training images vs fakes from the last pi_d_replay rollouts (or,
        # with pi_d_fresh, this rollout and fresh ones), translation-augmented; its steps keep its accuracy in band
        state["replay"] = (state.get("replay") or [])[-(c.pi_d_replay - 1):] if c.pi_d_replay > 1 else []
        state["replay"].append((fake.cpu(), labels.cpu()))
        out["d_steps"] = state.setdefault("d_steps", c.pi_d_steps) if it >= c.pi_d_warmup else c.pi_d_warmup_steps
        D.train()
        for k in range(out["d_steps"]):
            i = torch.randint(0, len(x_real), (B,), generator=g_cpu)
            xr, yr = x_real[i].to(device), y_real[i].to(device)
            if c.pi_d_fresh and k > 0:
                yf, lam_f, gen_f = explore(sigma, g)
                with torch.no_grad():
                    xf = task.to_images(gen_f(yf, schedule(sigma, g, lam_f)))
            elif c.pi_d_fresh:
                xf, yf = (v.to(device) for v in state["replay"][-1])
            else:
                xs, ys = (torch.cat(v) for v in zip(*state["replay"]))
                j = torch.randint(0, len(xs), (B,), generator=g_cpu)
                xf, yf = xs[j].to(device), ys[j].to(device)
            xr, xf = reward.diff_augment(xr, g, cutout=0.0), reward.diff_augment(xf, g, cutout=0.0)
            both = D_dp(backbone(torch.cat([xr, xf])), torch.cat([yr, yf]))     # one forward: one DDP sync
            d_loss = reward.d_loss(reward.rows(both, slice(0, B)), reward.rows(both, slice(B, None)))
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()
        out["d_loss"], out["sec_d"] = all_mean(d_loss.detach()).item(), time.time() - t0
        check_finite(d_loss=out["d_loss"])                           # a non-finite D is never saved (train_loop)
        if it >= c.pi_d_warmup and c.pi_d_acc_band:
            lo, hi = c.pi_d_acc_band
            state["d_steps"] = min(c.pi_d_steps_max, out["d_steps"] + 1) if out["d_acc"] < lo else \
                max(1, out["d_steps"] - 1) if out["d_acc"] > hi else out["d_steps"]

        out.update({f"{a}_sd": ro.actions[:, :, j].std(1).mean().item() for j, a in enumerate(spec.names)})   # per-sample spreads
        out["act_mean"] = [[round(v, 5) for v in row] for row in ro.actions.mean(1).tolist()]   # (T, D)
        share = torch.nn.functional.one_hot(labels.cpu(), task.num_classes).float()   # (B, K): each class's mean action
        out["act_class"] = torch.einsum("bk,tbd->ktd", share / share.sum(0), ro.actions.cpu()).round(decimals=4).tolist()   # nan: absent
        record = {"iter": it + 1, **out}
        if (it + 1) % c.pi_fid_every == 0 or it + 1 == c.pi_iters:   # the checkpoint choice: featnet's training FID
            pi.eval()
            fids = train_fids()
            record.update(fids), out.update(fids)
            if record["train_fid"] < state["best_fid"] or kind == "fidelity":
                state["best_fid"], state["best"] = record["train_fid"], copy.deepcopy(pi.state_dict())
        state["history"].append(record)
        return out

    state = train_loop(name, path, state, modules, iteration, c.pi_iters, dataclasses.replace(c, log_every=1), log)
    finish_policy(state, path, name, kind)


def finish_policy(state: dict, path: str, name: str, kind: str) -> None:
    """A trained policy's checkpoint finished (the time split per iteration), its curves drawn, its summary."""
    state["done"] = True
    state.pop("replay", None)                                        # D's replay is only needed to resume
    its = [r for r in state["history"][1:] if "sec_d" in r]
    state["time_split"] = {k: sum(r.get(k, 0.0) for r in its) / max(1, len(its))
                           for k in ("sec_rollout", "sec_ppo", "sec_d", "sec_fid", "d_steps")}
    save_ckpt(path, state)
    panels = [{"title": key, "series": [{"x": [r["iter"] for r in state["history"] if key in r], "color": color,
                                         "y": [r[key] for r in state["history"] if key in r]}]}
              for key, color in (("reward", (200, 60, 30)), ("d_acc", (30, 90, 200)), ("d_steps", (30, 90, 200)),
                                 ("approx_kl", (120, 60, 160)), ("residual_rms", (120, 60, 160)), ("train_fid", (20, 140, 60)),
                                 ("train_fid2", (20, 140, 60)), ("train_fd_ssl", (20, 140, 60)))]
    data.plot_panels(os.path.join(os.path.dirname(path), f"{name}_curve.png"), panels, f"{name}: per PPO iteration (training-set statistics)",
                     save=DIST.main)
    print(f"{name}: per iteration, mean over {len(its)}: " + ", ".join(f"{k} {v:.2f}" for k, v in state["time_split"].items()))
    which = "training-set FID at lam = 1 (last weights kept)" if kind == "fidelity" else "best training-set FID"
    print(f"{name}: done, {which} {state['best_fid']:.2f} (start {state['history'][0]['train_fid']:.2f}); curve in {name}_curve.png")


def stage_policies(kind: str, make_task: Callable = nat_task, counts: Callable = lambda c: c.pi_T,
                   file: Callable = lambda c, kind, n: policy_file(kind, c.pi_start, n, c.pi_reward, c.pi_seed)) -> Callable:
    """The stage of one policy kind: a policy per count (the NAT: T in pi_T; the ODE sampler: NFE budgets),
    its task from make_task(c, run_dir, device, kind, n), trained by train_policy; finished ones skipped."""
    def stage(c: TrainConfig, run_dir: str, device: torch.device, log: Logger) -> None:
        for n in counts(c):
            path = os.path.join(run_dir, f"{file(c, kind, n)}.pt")
            if is_done(path):
                print(f"{path}: done, skipped")
                continue
            train_policy(c, run_dir, device, log, kind, *make_task(c, run_dir, device, kind, n))
    return stage


# ============================================================================= command line

def frozen_stage(name: str) -> Callable:
    sizes, steps, seed_offset, simclr = FROZEN_NETS[name]
    return lambda c, run_dir, device, log: frozen_net(c, run_dir, device, log, name, sizes(c), getattr(c, steps),
                                                      seed_offset, simclr)


STAGES = ["backbone", "vq", "featnet", "featnet2", "featssl", "nat", "policy", "static", "smooth"]   # --stage all
STAGE_FNS = {**{n: frozen_stage(n) for n in FROZEN_NETS}, "vq": stage_vq, "nat": stage_nat,
             **{kind: stage_policies(kind) for kind in POLICY_STAGES}}


def main(argv: list[str] | None = None, stages: dict | None = None, default: list | None = None, doc: str = __doc__) -> None:
    """The command line. An experiment's script passes its own stages (name -> fn(c, run_dir, device, log)) and
    the ones its --stage all runs; the core's stages stay available to it."""
    stage_fns, default = {**STAGE_FNS, **(stages or {})}, default or STAGES
    p = argparse.ArgumentParser(description=doc.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)} (default: the run folder's, else small)")
    p.add_argument("--stage", default="all", help=f"all (= {', '.join(default)}) or one of {', '.join(stage_fns)}")
    p.add_argument("--run-dir", default=None, help="run folder (default runs/<preset>)")
    p.add_argument("--data", default=None, help="Fashion-MNIST idx folder, a folder of class subfolders, or 'synthetic'")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any TrainConfig key, e.g. --set nat_lr=5e-4")
    args = p.parse_args(argv)
    try:
        if args.stage != "all" and args.stage not in stage_fns:
            raise UserError(f"unknown stage {args.stage!r}: choose all or one of {', '.join(stage_fns)}")
        running = default if args.stage == "all" else [args.stage]
        c, run_dir = build_config(args, STAGES, running)
        device = init_distributed(pick_device(args.device))
        if not DIST.main:
            sys.stdout = open(os.devnull, "w")                       # one rank reports; errors still reach stderr
        os.makedirs(run_dir, exist_ok=True)
        write_json(os.path.join(run_dir, "config.json"), to_plain(c))
        torch.manual_seed(c.seed + DIST.rank)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        log = Logger(run_dir)
        if DIST.world > 1 and c.data != "synthetic":                 # one rank fetches the data set, if it must
            if DIST.main:
                for split in ("train", "test"):
                    data.load_dataset(c.data, split, c.img_size, c.channels, c.seed)
            barrier()
        print(f"run folder {run_dir} | preset {c.preset} | device {device}")
        for s in running:
            if s in STAGE_FNS and s not in POLICY_STAGES and is_done(os.path.join(run_dir, f"{s}.pt")):
                print(f"{s}: done ({os.path.join(run_dir, f'{s}.pt')}), skipped")   # the others skip their finished parts
                continue
            if DIST.world > 1:                                       # each rank its own random stream
                torch.manual_seed(rank_seed(c.seed + list(stage_fns).index(s)))
            t0 = time.time()
            try:
                stage_fns[s](c, run_dir, device, log)
            except torch.OutOfMemoryError:                           # outside a training loop
                raise RunFault(f"{s}: out of memory; lower its batch in a new run folder") from None
            barrier()                                                # its files are written before the next stage reads them
            log(stage=s, wall_seconds=round(time.time() - t0, 1))
    except (UserError, data.DataError, RunFault) as e:               # a run fault: every rank stops with the same line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(FAULT_EXIT if isinstance(e, RunFault) else 2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
