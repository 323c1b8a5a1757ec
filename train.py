"""Train the pipeline, stage by stage: backbone -> vq -> featnet -> featnet2 -> nat -> search -> param-search -> policies.

    python train.py                                  # the `small` preset, all stages, CPU or GPU
    python train.py --preset base                    # the single-GPU scale
    python train.py --stage nat --run-dir runs/small # one stage; resumes what is there
    torchrun --standalone --nproc_per_node 4 train.py --preset base   # data-parallel (docs/torchrun.md)

Stages (each writes its checkpoint(s) into the run folder):
  backbone      a classifier: the frozen backbone of the tokenizer's perceptual loss and of the
                policy's discriminator (never the FID network).
  vq            the VQ tokenizer (vqgan.py): 32x32 image -> 8x8 = 64 tokens.
  featnet       a small classifier whose penultimate features define FID here (fid.py).
  featnet2      an independent FID network (other architecture and seed), a second FID column.
  nat           the class-conditional masked-token transformer (nat.py) on the tokenised
                training set, with an EMA of its weights that sampling uses.
  search, param-search, pr-search, flow, flow-search, flow-policy, flow-static, flow-smooth
                the experiments (experiments/search.py, experiments/flow_train.py), imported
                only when one of their stages runs; pr-search and the flow stages run only when named.
  policy, static, smooth
                AdaNAT's PPO-trained schedules (policy.py, ppo.py, reward.py) through Algorithm 1
                (`algorithm1` below): adaptive, learnable static table, adaptive with EMA smoothing;
                {kind}_T{T}.pt per T in pi_T ({kind}_search_T{T}.pt with pi_start=search);
                --reward fixed|fid trains them on another reward instead ({kind}_{reward}_T{T}.pt).
  fidelity      (optional) AdaGen's fidelity policy, blended with the adaptive one by lam: fidelity_T{T}.pt.

A run folder holds config.json, log.jsonl (one JSON object per logged step), and the
checkpoints. Re-running the same command resumes: finished stages are skipped, an
interrupted stage continues from its last checkpoint (written every `ckpt_every_s`
seconds, after every search update, at the end, and on Ctrl-C). Checkpoints are dicts of
plain types and tensors, `torch.load(path, weights_only=True)` loads them, and each carries
its model's config so that sample.py rebuilds every model from the files alone. Bad input
exits with code 2, a run fault (non-finite loss, failed write, out of memory) with 3 (runs.py).
"""
import argparse
import copy
import dataclasses
import importlib
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
import ddp
import fid
import nat
import pipeline
import plots
import policy
import ppo
import reward
import runs
import samplers
import vqgan


@dataclass
class TrainConfig:
    """Everything a run depends on. Presets (below) override the defaults by name."""

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
    codebook_size: int = 512
    code_dim: int = 32
    vq_warmup: int = 100
    vq_restart_every: int = 100      # dead-code restart period (steps); off in the last 20% of training
    gan_weight: float = 0.0          # hinge patch-GAN generator weight (0: off)
    gan_start: int = 0               # steps of plain reconstruction before the GAN starts
    vq_perceptual: float = 0.5       # weight of the perceptual loss L_P on the backbone classifier's
                                     # feature maps (never the FID network's); > 0 needs the backbone stage first
    # --- featnet: the FID feature network
    feat_steps: int = 1500
    feat_batch: int = 128
    feat_lr: float = 2e-3
    feat_warmup: int = 50
    feat_width: int = 32
    feat_dim: int = 128
    # --- backbone: a second classifier, the frozen backbone of the policy's discriminator
    bb_steps: int = 400
    bb_width: int = 16
    bb_dim: int = 64
    # --- featnet2: an independent FID network (another architecture and seed) for the reward-hacking study
    feat2_steps: int = 1500
    feat2_width: int = 48
    feat2_dim: int = 96
    # --- nat: the generator
    nat_steps: int = 1800
    nat_batch: int = 256
    nat_lr: float = 1e-3
    nat_warmup: int = 100
    nat_wd: float = 0.05
    nat_dim: int = 128
    nat_depth: int = 4
    nat_heads: int = 4
    nat_dropout: float = 0.0
    # --- flow: the continuous generator (AdaGen's rectified-flow / diffusion paradigm), on pixels;
    # keys flow_* are free after the other stages (flow.pt / vp.pt carry their own model config)
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
    mask_dist: str = "cosine"        # training p(r): "cosine" (MaskGIT) or "beta" (AutoNAT)
    mask_alpha: float = 1.0
    mask_beta: float = 1.0
    ema_decay: float = 0.995         # EMA of the NAT weights used for sampling
    # --- policy / static / smooth: generation policies trained by PPO (keys pi_*; each policy
    # checkpoint carries its own copy, so these may change after the generator is trained)
    pi_T: tuple = (4, 8)             # decoding step counts to train a policy for (one checkpoint each)
    pi_iters: int = 18               # PPO iterations per policy (each: rollouts, PPO epochs, D steps)
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
    pi_d_lr: float = 1e-3            # discriminator: Adam(lr, betas (0.5, 0.999)) (AdaNAT: 1e-4 over 1000 iterations)
    pi_d_steps: int = 4              # D steps per iteration ...
    pi_d_replay: int = 4             # ... each on pi_batch fakes drawn from the last pi_d_replay iterations' rollouts
    pi_d_fresh: bool = False         # ... or each on a fresh rollout of the current policy (the AdaNAT release)
    pi_d_warmup: int = 5             # first iterations train D only (the reward must mean something) ...
    pi_d_warmup_steps: int = 20      # ... with this many D steps each; D then is saved as "disc_warmup"
    pi_d_real: str = "raw"           # reals for D: "raw" training images, or "recon" (their tokenizer reconstructions)
    pi_fid_every: int = 6            # iterations between FID checks (training-set statistics; best kept)
    pi_fid_samples: int = 5000       # samples per FID check
    pi_sweep_samples: int = 2000     # samples per w_0 candidate of the heuristic the residual starts from
    pi_reward: str = "adversarial"   # the policy's reward (AdaGen §III-D): "adversarial" (D, trained alongside),
                                     # "fixed" (log p(y|x) under the frozen backbone classifier), or "fid" (minus the
                                     # FID vs training statistics of the trajectory's chunk); --reward; files *_<reward>_T*
    pi_fid_chunk: int = 64           # "fid" reward: trajectories per FID chunk (a group's members go to different chunks)
    pi_start: str = "heuristic"      # the residual's zero point: AdaNAT's heuristic, or the finished AutoNAT
                                     # "search" / "param" table of the same T (files <kind>_<start>_T{T}.pt)
    # --- search / param-search: AutoNAT's finite-difference schedule search (keys search_*; free to
    # change after the generator is trained, each search checkpoint carries its own copy)
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


PRESETS: dict[str, dict] = {
    # seconds on a CPU, synthetic data: for CI and the end-to-end test
    "test": dict(data="synthetic", vq_steps=30, vq_warmup=5, feat_warmup=5, vq_batch=32, vq_ch=8, vq_n_res=1, codebook_size=32, code_dim=8,
                 vq_restart_every=10, feat_steps=30, feat_batch=32, feat_width=8, feat_dim=16, bb_steps=20, bb_width=4, bb_dim=8,
                 nat_steps=30, nat_batch=32, nat_dim=32, nat_depth=1, nat_heads=2, nat_warmup=5,
                 log_every=10, ema_decay=0.9, pi_T=(4,), pi_iters=4, pi_batch=16, pi_width=16, pi_hidden=16,
                 pi_d_warmup=1, pi_d_steps=1, pi_d_warmup_steps=2, pi_fid_every=2, pi_fid_samples=40, pi_sweep_samples=20,
                 search_T=(4,), search_updates=2, search_param_updates=2, search_samples=40,
                 pr_budget=2, pr_steps=5, pr_samples=40,
                 flow_steps=20, flow_batch=16, flow_dim=32, flow_depth=1, flow_heads=2, flow_warmup=5, flow_pi_nfe=(4,),
                 feat2_steps=30, feat2_width=8, feat2_dim=16, pi_fid_chunk=4, vq_perceptual=0.1),
    # the default, for 2 CPU cores (stage times in the README)
    "small": dict(),
    # one GPU, a few minutes to an hour
    "base": dict(vq_steps=8000, vq_ch=64, codebook_size=512, gan_weight=0.1, gan_start=4000,
                 feat_steps=4000, feat_width=48, nat_steps=30000, nat_batch=512, nat_lr=6e-4,
                 nat_warmup=1000, nat_dim=384, nat_depth=8, nat_heads=6, nat_dropout=0.1, ema_decay=0.9995,
                 search_samples=2000, search_updates=30, search_param_updates=30, pr_steps=5000,
                 flow_steps=30000, flow_batch=512, flow_lr=6e-4, flow_warmup=1000, flow_dim=384, flow_depth=8,
                 flow_heads=6, feat2_steps=4000),
}
# the AdaNAT release's PPO (`--set pi_recipe=official`): lr 1e-5, K = 5 full-batch epochs, sigma 0.6 then 0.3
# from the half on, no KL stop, no gradient clip, advantages divided by the batch std, no anchor
OFFICIAL_RECIPE = dict(pi_lr=1e-5, pi_static_lr=1e-5, pi_epochs=5, pi_minibatches=1, pi_sigma0=0.6, pi_sigma1=0.3,
                       pi_sigma_schedule="step", pi_target_kl=0.0, pi_grad_clip=0.0, pi_anchor=0.0, pi_adv_floor=0.0)


def recipe(c: "TrainConfig") -> "TrainConfig":
    """The config a policy stage trains with: c, or c with OFFICIAL_RECIPE's keys when pi_recipe = official."""
    return dataclasses.replace(c, **OFFICIAL_RECIPE) if c.pi_recipe == "official" else c


def sigma_at(c: "TrainConfig", it: int) -> float:
    """Exploration std of iteration `it`: linear pi_sigma0 -> pi_sigma1, or a step at the half."""
    if c.pi_sigma_schedule == "step":
        return c.pi_sigma0 if it < c.pi_iters // 2 else c.pi_sigma1
    return c.pi_sigma0 + (c.pi_sigma1 - c.pi_sigma0) * it / max(1, c.pi_iters - 1)


STAGES = ["backbone", "vq", "featnet", "featnet2", "nat", "search", "param-search", "policy", "static", "smooth"]


# ----------------------------------------------------------------------------- plumbing


# ----------------------------------------------------------------------------- data parallel (torchrun)


def vq_config(c: TrainConfig) -> vqgan.VQConfig:
    return vqgan.VQConfig(in_ch=c.channels, img_size=c.img_size, ch=c.vq_ch, ch_mult=tuple(c.vq_ch_mult),
                          n_res=c.vq_n_res, codebook_size=c.codebook_size, code_dim=c.code_dim,
                          gan_weight=c.gan_weight, gan_start=c.gan_start)


def nat_config(c: TrainConfig, num_classes: int, num_tokens: int, vocab_size: int) -> nat.NATConfig:
    return nat.NATConfig(vocab_size=vocab_size, num_tokens=num_tokens, num_classes=num_classes,
                         dim=c.nat_dim, depth=c.nat_depth, heads=c.nat_heads, dropout=c.nat_dropout,
                         mask_dist=c.mask_dist, alpha=c.mask_alpha, beta=c.mask_beta)


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


# ----------------------------------------------------------------------------- stages

def stage_vq(c: TrainConfig, run_dir: str, device: torch.device, log: runs.Logger) -> None:
    """Train the VQ tokenizer: L = |x - G(z_q)| + (x - G(z_q))^2 + L_vq (+ hinge GAN)."""
    x_train, _, _ = data.load_dataset(c.data, "train", c.img_size, c.channels, c.seed)
    x_test, _, _ = data.load_dataset(c.data, "test", c.img_size, c.channels, c.seed)
    cfg = vq_config(c)
    model = vqgan.VQModel(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=c.vq_lr, betas=(0.5, 0.9))
    disc = vqgan.PatchDiscriminator(c.channels, cfg.disc_ch).to(device) if c.gan_weight > 0 else None
    opt_d = torch.optim.Adam(disc.parameters(), lr=c.vq_lr, betas=(0.5, 0.9)) if disc else None
    modules = {"model": model, "optim": opt, **({"disc": disc, "optim_d": opt_d} if disc else {})}
    path = os.path.join(run_dir, "vq.pt")
    state = {**runs.resume(path, runs.to_plain(cfg), modules), "config": runs.to_plain(cfg), "done": False}
    g = torch.Generator().manual_seed(c.seed + 1 + state["step"] + 1000003 * ddp.DIST.rank)   # each rank its own batches
    it = data.batches(x_train, y=torch.zeros(len(x_train), dtype=torch.long), batch_size=runs.rank_batch(c.vq_batch, "vq_batch"),
                      generator=g, infinite=True)
    # torchrun: the quantizer syncs itself (usage summed, rank 0's codebook broadcast: vqgan.py), so DDP must not
    # overwrite the per-rank usage counts with rank 0's buffers
    net = DistributedDataParallel(model, broadcast_buffers=False) if ddp.DIST.world > 1 else model
    disc_dp = ddp.data_parallel(disc, device) if disc is not None else None
    if c.vq_perceptual > 0:                            # L_P on the frozen backbone classifier (not the FID network)
        if not os.path.exists(os.path.join(run_dir, "backbone.pt")):
            raise runs.UserError(f"vq_perceptual > 0 needs the backbone classifier: run python train.py --run-dir {run_dir} "
                            f"--stage backbone first")
        percep, _ = pipeline.classifier_backbone(pipeline.build_model(run_dir, "backbone", device).requires_grad_(False), grad=True)

    def step_fn(step: int) -> dict:
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, c.vq_steps, c.vq_lr, c.vq_warmup)
        x = augment(data.to_float(next(it)[0]).to(device), g)          # (B, C, H, W)
        x_rec, codes, vq_loss, z_e = net(x)
        rec = (x_rec - x).abs().mean() + F.mse_loss(x_rec, x)
        loss = rec + vq_loss
        out = {"mse": ddp.all_mean(F.mse_loss(x_rec, x).detach()).item()}
        if c.vq_perceptual > 0:
            with torch.no_grad():
                f_x = percep(x)
            l_p = vqgan.perceptual_loss(f_x, percep(x_rec))
            loss = loss + c.vq_perceptual * l_p
            out["percep"] = ddp.all_mean(l_p.detach()).item()
        out["loss"] = ddp.all_mean(loss.detach()).item()
        runs.check_finite(loss=out["loss"])                                   # before the update (a value logged anyway)
        if disc is not None and step >= c.gan_start:
            g_loss = vqgan.hinge_g_loss(disc(x_rec))                     # D's gradients here are zeroed below
            loss = loss + c.gan_weight * g_loss
            out["g_loss"] = g_loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if disc is not None and step >= c.gan_start:
            logits = disc_dp(torch.cat([x, x_rec.detach()]))              # one forward: one DDP gradient sync
            d_loss = vqgan.hinge_d_loss(*logits.chunk(2))
            out["d_loss"] = d_loss.item()
            runs.check_finite(d_loss=out["d_loss"])
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        if (step + 1) % c.vq_restart_every == 0 and step < 0.8 * c.vq_steps:
            out["restarted"] = model.vq.restart_dead_codes(z_e.detach().permute(0, 2, 3, 1).reshape(-1, cfg.code_dim))
        return out

    state = runs.train_loop("vq", path, state, modules, step_fn, c.vq_steps, c, log)
    # report on the held-out test set: reconstruction MSE, codebook usage, perplexity
    model.eval()
    codes, mse = [], 0.0
    with torch.no_grad():
        for i in range(0, len(x_test), 500):
            x = data.to_float(x_test[i:i + 500]).to(device)
            x_rec, k, _, _ = model(x)
            mse += F.mse_loss(x_rec.clamp(-1, 1), x, reduction="sum").item()
            codes.append(k.cpu())
    stats = vqgan.codebook_stats(torch.cat(codes), cfg.codebook_size)
    state["metrics"] = {"test_mse": mse / x_test.numel(), **{f"test_{k}": float(v) for k, v in stats.items()}}
    state["done"] = True
    runs.save_ckpt(path, state)
    log(stage="vq", final=True, **state["metrics"])
    print("vq:", json.dumps({k: round(v, 4) for k, v in state["metrics"].items()}))


def stage_featnet(c: TrainConfig, run_dir: str, device: torch.device, log: runs.Logger) -> None:
    """Train the FID feature network as a classifier (flip + shift augmentation)."""
    train_classifier(c, run_dir, device, log, "featnet", dict(width=c.feat_width, feat_dim=c.feat_dim), c.feat_steps, 2)


def stage_backbone(c: TrainConfig, run_dir: str, device: torch.device, log: runs.Logger) -> None:
    """A second classifier (other width and seed, shorter training): the frozen backbone the
    policy's discriminator reads (reward.py). The FID network itself must not be the reward."""
    train_classifier(c, run_dir, device, log, "backbone", dict(width=c.bb_width, feat_dim=c.bb_dim), c.bb_steps, 7)


def stage_featnet2(c: TrainConfig, run_dir: str, device: torch.device, log: runs.Logger) -> None:
    """An independent FID network for the reward-hacking study (AdaGen §III-D): another
    architecture (one conv per stage, average pooling, other widths) and seed, so that a policy
    trained on the FID network's own FID can be judged on features it never saw."""
    train_classifier(c, run_dir, device, log, "featnet2",
                     dict(width=c.feat2_width, feat_dim=c.feat2_dim, convs=1, pool="avg"), c.feat2_steps, 13)


def train_classifier(c: TrainConfig, run_dir: str, device: torch.device, log: runs.Logger, name: str, sizes: dict,
                     steps: int, seed_offset: int) -> None:
    """Train a fid.FeatureNet classifier of the given sizes into <name>.pt (Adam, flip + shift)."""
    x_train, y_train, num_classes = data.load_dataset(c.data, "train", c.img_size, c.channels, c.seed)
    x_test, y_test, _ = data.load_dataset(c.data, "test", c.img_size, c.channels, c.seed)
    cfg = fid.FeatureNetConfig(in_ch=c.channels, num_classes=num_classes, img_size=c.img_size, **sizes)
    torch.manual_seed(c.seed + seed_offset)
    model = fid.FeatureNet(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=c.feat_lr)
    modules = {"model": model, "optim": opt}
    path = os.path.join(run_dir, f"{name}.pt")
    state = {**runs.resume(path, runs.to_plain(cfg), modules), "config": runs.to_plain(cfg), "done": False}
    g = torch.Generator().manual_seed(c.seed + seed_offset + state["step"] + 1000003 * ddp.DIST.rank)
    it = data.batches(x_train, y_train, runs.rank_batch(c.feat_batch, "feat_batch"), g, infinite=True)
    net = ddp.data_parallel(model, device)                    # (batch-norm statistics per rank, rank 0's buffers kept)

    def step_fn(step: int) -> dict:
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, steps, c.feat_lr, c.feat_warmup)
        xb, yb = next(it)
        x = augment(data.to_float(xb).to(device), g)
        dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()       # random shift by up to 2 pixels
        x = torch.roll(x, (dx, dy), dims=(2, 3))
        net.train()
        logits = net(x)
        loss = F.cross_entropy(logits, yb.to(device))
        loss_v = ddp.all_mean(loss.detach()).item()
        runs.check_finite(loss=loss_v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc = (logits.argmax(1).cpu() == yb).float().mean()
        return {"loss": loss_v, "acc": ddp.all_mean(acc.to(device)).item()}

    state = runs.train_loop(name, path, state, modules, step_fn, steps, c, log)
    _, logits = fid.extract(model, data.to_float(x_test), device=device)
    acc = (logits.argmax(1) == y_test).float().mean().item()
    state["metrics"] = {"test_acc": acc}
    state["done"] = True
    runs.save_ckpt(path, state)
    log(stage=name, final=True, test_acc=acc)
    print(f"{name}: test accuracy {acc:.4f}")


@torch.no_grad()
def tokenize_dataset(vq: vqgan.VQModel, x: torch.Tensor, y: torch.Tensor, device: torch.device):
    """Tokens (2M, N) of the M images and of their mirror images (flip augmentation), labels (2M,)."""
    out = {False: [], True: []}
    for i in tqdm(range(0, len(x), 1000), desc="tokenize", leave=False, disable=not ddp.DIST.main):
        xb = data.to_float(x[i:i + 1000]).to(device)
        for flip in (False, True):
            out[flip].append(vq.tokenize(xb.flip(-1) if flip else xb).cpu())
    return torch.cat(out[False] + out[True]), y.repeat(2)


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


def stage_nat(c: TrainConfig, run_dir: str, device: torch.device, log: runs.Logger) -> None:
    """Train the NAT on tokens with the masked-token loss; keep an EMA of the weights."""
    x_train, y_train, num_classes = data.load_dataset(c.data, "train", c.img_size, c.channels, c.seed)
    vq = pipeline.build_model(run_dir, "vq", device)
    tokens, labels = tokenize_dataset(vq, x_train, y_train, device)         # (2M, N), (2M,)
    cfg = nat_config(c, num_classes, tokens.shape[1], vq.cfg.codebook_size)
    model = nat.NAT(cfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.dim() >= 2 and "emb" not in n else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c.nat_wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=c.nat_lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    modules = {"model": model, "ema": ema, "optim": opt}
    path = os.path.join(run_dir, "nat.pt")
    state = {**runs.resume(path, runs.to_plain(cfg), modules), "config": runs.to_plain(cfg), "done": False}
    g = torch.Generator().manual_seed(c.seed + 3 + state["step"] + 1000003 * ddp.DIST.rank)   # each rank its own batches
    it = data.batches(tokens, labels, runs.rank_batch(c.nat_batch, "nat_batch"), g, infinite=True)
    net = ddp.data_parallel(model, device)
    net = torch.compile(net) if c.compile else net

    def step_fn(step: int) -> dict:
        lr = lr_at(step, c.nat_steps, c.nat_lr, c.nat_warmup)
        for grp in opt.param_groups:
            grp["lr"] = lr
        v, y = next(it)
        net.train()
        with runs.autocast(device, c.bf16):
            loss = nat.masked_token_loss(net, v.to(device), y.to(device))
        out = generator_step(model, ema, opt, loss, step, c.ema_decay)
        return {"loss": out["loss"], "lr": lr, "grad_norm": out["grad_norm"]}

    state = runs.train_loop("nat", path, state, modules, step_fn, c.nat_steps, c, log)
    state["done"] = True
    runs.save_ckpt(path, state)
    print(f"nat: done, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")


# ----------------------------------------------------------------------------- flow (AdaGen, continuous)


# ----------------------------------------------------------------------------- policies (AdaNAT)

def policy_config(c: TrainConfig, kind: str, T: int, h: torch.Tensor, C: int, N: int) -> dict:
    """What a policy checkpoint needs to be rebuilt and resumed: the kind, T, the heuristic
    table its residual starts from, the network sizes and the training hyper-parameters."""
    return {"kind": kind, "T": T, "heuristic": h.tolist(), "C": C, "N": N,
            "beta_ema": c.pi_beta_ema if kind == "smooth" else 0.0,
            **{k: v for k, v in runs.to_plain(c).items() if k.startswith("pi_") and k not in ("pi_T", "pi_beta_ema")}}


def start_table(pipe, start: str, T: int, w_0: float) -> torch.Tensor:
    """The (T, 4) schedule a policy's zero residual reproduces: AdaNAT's heuristic (tau2_0 = 1,
    w = w_0 t/T), or a finished AutoNAT search of this run ("search": the free table, "param":
    the family), AdaNAT's "residual on the best hand-made schedule" taken one step further."""
    if start == "heuristic":
        return nat.heuristic_table(T, pipeline.ADANAT_TAU2_0, w_0)
    found = pipeline.searched_table(pipe, start, T)
    if found is None:
        stage = "search" if start == "search" else "param-search"
        raise runs.UserError(f"pi_start={start}: {pipe.run_dir} has no finished {start}_T{T}.pt; run python train.py "
                        f"--run-dir {pipe.run_dir} --stage {stage} --set search_T={T} first")
    table, cfg, _ = found
    if cfg["generator"] != pipe.fingerprint:
        print(f"warning: {start}_T{T}.pt was searched on other weights or numerics ({cfg['generator']})")
    return table.float()


@dataclass
class PolicyTask:
    """What the PPO loop needs from a paradigm (the NAT, or an ODE sampler on the flow generator)."""
    name: str                  # checkpoint / log name, e.g. policy_T8, flow_policy_nfe4
    T: int                     # steps, i.e. decisions per trajectory
    spec: policy.ActionSpec
    h: torch.Tensor            # (T, D) the schedule a zero residual reproduces
    start: str                 # what h is, for the log
    C: int                     # the generator's feature width and number of positions (B, N, C)
    N: int
    num_classes: int
    generate: Callable         # (labels (B,), schedule, generator g, group G) -> final (B, ...) on the device
    to_images: Callable        # final -> images (B, C, H, W) in [-1, 1] on the device
    fid_images: Callable       # (labels, schedule) -> images on the CPU (seed 0), for the training-set FID
    reals: Callable            # () -> (x (n, C, H, W) float CPU, y (n,)): what D calls real
    to_step: Optional[Callable] = None   # policy.PolicySchedule's to_step (the ODE sampler's [f, w] -> (t', w))
    extra: dict = dataclasses.field(default_factory=dict)   # recorded in the policy's config


def real_images(c: TrainConfig, n: int = 11000) -> tuple[torch.Tensor, torch.Tensor]:
    """n random training images (float, [-1, 1]) and labels: the discriminator's reals."""
    x_train, y_train, _ = data.load_dataset(c.data, "train", c.img_size, c.channels, c.seed)
    pick = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(c.seed + 5))[:n]
    return data.to_float(x_train[pick]), y_train[pick]


def nat_task(c: TrainConfig, run_dir: str, device: torch.device, kind: str, T: int):
    """(task, pipeline, RealFeatures) of the NAT MDP for T decoding steps (AdaNAT)."""
    pipe = pipeline.Pipeline(run_dir, device, c.bf16, rows=c.gen_rows)
    ref = pipeline.RealFeatures(pipe)
    w_0 = pipeline.get_w0(pipe, ref, c.pi_sweep_samples)
    cfg = pipe.cfg

    def reals():                                    # raw training images, or (pi_d_real = recon) their reconstructions
        x, y = real_images(c)
        if c.pi_d_real == "recon":
            x = pipe.decode(torch.cat([pipe.vq.tokenize(x[i:i + 500].to(device)).cpu() for i in range(0, len(x), 500)]))
        return x, y

    task = PolicyTask(
        name=pipeline.policy_file(kind, c.pi_start, T, c.pi_reward), T=T, spec=policy.NAT_ACTIONS, h=start_table(pipe, c.pi_start, T, w_0),
        start=f"{pipeline.PI_STARTS[c.pi_start]} (w_0 = {w_0:g})", C=cfg.dim, N=cfg.num_tokens, num_classes=cfg.num_classes,
        generate=lambda y, sched, g, G: nat.generate(pipe.logits_fn, y, T, sched, cfg.mask_id, cfg.num_tokens,
                                                     cfg.null_label, g, group=G),
        to_images=pipe.vq.detokenize,
        fid_images=lambda y, sched: pipe.decode(pipe.generate(y, T, sched, seed=0)),
        reals=reals)
    return task, pipe, ref


@dataclass
class Learner:
    """What Algorithm 1 trains and reads, for one task: the policy pi (eta_phi) and critic V, the
    discriminator D (r_psi) on the frozen backbone classifier, their optimisers, D's reals."""
    c: TrainConfig
    task: PolicyTask
    device: torch.device
    pi: torch.nn.Module
    V: torch.nn.Module
    D: reward.ProjectedDiscriminator
    opt: torch.optim.Optimizer
    d_opt: torch.optim.Optimizer
    classifier: torch.nn.Module          # the frozen backbone classifier (D's features, r_fid's logits)
    backbone: Callable                   # images -> its feature maps
    h_pre: torch.Tensor                  # (T, D) pre-activations of the start schedule
    active: torch.Tensor                 # (T, D) knobs that act
    beta_ema: float
    B: int                               # this rank's trajectories per iteration
    base: Optional[torch.nn.Module] = None   # the fidelity blend's frozen main policy
    x_real: Optional[torch.Tensor] = None    # (n, C, H, W) D's reals and their labels y_real (n,) ...
    y_real: Optional[torch.Tensor] = None
    f_hold: Optional[list] = None            # ... and 1 000 held-out reals as the backbone's feature maps, labels y_hold
    y_hold: Optional[torch.Tensor] = None

    def __post_init__(self):
        self.pi_dp, self.V_dp, self.D_dp = (ddp.data_parallel(m, self.device) for m in (self.pi, self.V, self.D))

    def schedule(self, sigma: float = 0.0, g: Optional[torch.Generator] = None, lam=None) -> policy.PolicySchedule:
        """The policy as a schedule: the mean (sigma = 0) or exploring; with lam, blended with base (Eq. 14)."""
        return policy.PolicySchedule(self.pi, self.h_pre, sigma, self.beta_ema, g, spec=self.task.spec,
                                     to_step=self.task.to_step, base=self.base if lam is not None else None, lam=lam)

    def explore(self, sigma: float, g: torch.Generator):
        """B trajectories' labels (groups of pi_group share one; the blend's lam per group) and the generator."""
        G = self.c.pi_group
        y = torch.randint(0, self.task.num_classes, (self.B // G,), device=self.device, generator=g).repeat_interleave(G)
        lam = None
        if self.base is not None:
            lam = torch.rand(self.B // G, device=self.device, generator=g).repeat_interleave(G)
        return y, lam, lambda y_, sched: self.task.generate(y_, sched, g, G)


def build_learner(c: TrainConfig, run_dir: str, device: torch.device, kind: str, task: PolicyTask) -> tuple:
    """(Learner, its checkpoint config, modules to checkpoint) for a policy of `kind` on `task`."""
    T, spec = task.T, task.spec
    pcfg = {**policy_config(c, kind, T, task.h, task.C, task.N), "spec": list(spec.names), **task.extra}
    pi, V = (m.to(device) for m in pipeline.build_policy(pcfg))
    classifier = pipeline.build_model(run_dir, "backbone", device)                 # D's frozen backbone and r_fid's classifier
    backbone, channels = pipeline.classifier_backbone(classifier)
    D = reward.ProjectedDiscriminator(channels, task.num_classes).to(device)
    base = fidelity_base(run_dir, device, task, pcfg, (pi, V, D)) if kind == "fidelity" else None
    B = runs.rank_batch(c.pi_batch, "pi_batch")                                   # this rank's trajectories
    if B % c.pi_group:
        raise runs.UserError(f"pi_group {c.pi_group} must divide each process's share of pi_batch ({B} of {c.pi_batch})")
    opt = torch.optim.Adam(list(pi.parameters()) + list(V.parameters()), lr=c.pi_static_lr if kind == "static" else c.pi_lr)
    d_opt = torch.optim.Adam(D.parameters(), lr=c.pi_d_lr, betas=(0.5, 0.999))
    L = Learner(c, task, device, pi, V, D, opt, d_opt, classifier, backbone, policy.inverse_activation(task.h, spec).to(device),
                spec.active(T, device), pcfg["beta_ema"], B, base)
    modules = {"model": pi, "critic": V, "disc": D, "optim": opt, "d_optim": d_opt}
    return L, pcfg, modules


def fidelity_base(run_dir: str, device: torch.device, task: PolicyTask, pcfg: dict, nets: tuple) -> torch.nn.Module:
    """AdaGen §III-F2: the frozen adaptive policy the fidelity policy is blended with (Eq. 14); a new
    fidelity policy, its critic and D start as copies of the adaptive policy's."""
    base_name = task.name.replace("fidelity", "policy", 1)
    base_path = os.path.join(run_dir, f"{base_name}.pt")
    if not os.path.exists(base_path):
        raise runs.UserError(f"the fidelity stage blends with the adaptive policy {base_path}, which is missing: "
                             f"run python train.py --run-dir {run_dir} --stage policy first")
    base, base_cfg = pipeline.load_policy(base_path, device)
    if base_cfg["heuristic"] != task.h.tolist() or base_cfg["beta_ema"] != 0:
        raise runs.UserError(f"{base_path} starts from another schedule than this run's (the w_0 sweep changed since) or "
                             f"smooths its actions: the blend needs both policies on the same start; retrain it")
    pcfg["base"] = base_name
    if not os.path.exists(os.path.join(run_dir, f"{task.name}.pt")):   # start: the main policy, critic and D
        main = runs.load_ckpt(base_path)
        for net, key in zip(nets, ("best", "critic", "disc")):
            net.load_state_dict(main[key])
    return base.requires_grad_(False)


def reward_hook(c: TrainConfig, kind: str, pipe, ref) -> Callable:
    """The policy's reward R (B,) from (r_adv, r_fid, fake images, lam): D's score (AdaNAT Eq. 13) by
    default; the fidelity blend (AdaGen Eq. 15); or, for the reward-hacking study, the fixed reward
    r_fid = log p(y|x) or minus the FID of the trajectory's chunk (AdaGen §III-D)."""
    if kind == "fidelity":
        return lambda r_adv, r_fid, fake, lam: reward.blended_reward(r_adv, r_fid, lam)
    if c.pi_reward == "fid":                                                  # chunks of the global batch
        def chunk_fid(r_adv, r_fid, fake, lam):
            feats = ddp.all_cat(fid.extract(pipe.featnet, fake, device=fake.device)[0].to(fake.device)).cpu()
            return ddp.my_rows(chunk_fid_reward(feats, ref, c.pi_fid_chunk)).to(fake.device)
        return chunk_fid
    if c.pi_reward == "fixed":
        return lambda r_adv, r_fid, fake, lam: r_fid
    return lambda r_adv, r_fid, fake, lam: r_adv


def advantages(c: TrainConfig, R_all: torch.Tensor, value: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(returns, advantages), each (T*B,) step-major, from the global batch's terminal rewards R_all:
    R_hat = R normalised by max(std, pi_adv_floor), A = R_hat - V_old (AdaNAT Eq. 12; pi_group = 1) or
    A = R minus its group's mean, divided the same way (GRPO-style; pi_group > 1)."""
    G, floor = c.pi_group, c.pi_adv_floor
    ret = ddp.my_rows(ppo.normalise(R_all, floor)).repeat(T)
    if G == 1:
        return ret, ret - value
    A = (R_all.view(-1, G) - R_all.view(-1, G).mean(1, keepdim=True)).flatten()
    return ret, ddp.my_rows(A / (A.std().clamp_min(floor) + 1e-8)).repeat(T)


def rollout_and_reward(L: Learner, sigma: float, g: torch.Generator, reward_fn: Callable) -> tuple:
    """Algorithm 1, steps 1-2: B trajectories of the exploring policy, decoded and scored by D in
    eval mode. Returns (rollout, fake images, labels, R (B,), logged values)."""
    L.pi.eval(), L.V.eval(), L.D.eval()                                  # D scores in eval mode (spectral norms fixed)
    labels, lam, gen = L.explore(sigma, g)
    ro = policy.rollout(L.pi, L.V, gen, labels, L.h_pre, sigma, L.beta_ema, g, L.task.spec, L.task.to_step, L.base, lam)
    with torch.no_grad():
        fake = L.task.to_images(ro.final)                                # (B, C, H, W)
        maps = L.backbone(fake)                                          # the frozen classifier's feature maps
        logits_fake = L.D(maps, labels)                                  # [(B, P_h)] per head
        r_adv = reward.reward(logits_fake)                               # (B,)
        r_fid = reward.fidelity_reward(L.classifier.head(maps[-1])[0], labels)   # its head on the same pass: (B,)
        R = reward_fn(r_adv, r_fid, fake, lam)
        d_acc = reward.accuracy(L.D(L.f_hold, L.y_hold), logits_fake)
    out = {"reward": mean_over_ranks(R.mean()), "r_adv": mean_over_ranks(r_adv.mean()),
           "r_fid": mean_over_ranks(r_fid.mean()), "d_acc": mean_over_ranks(d_acc), "sigma": sigma}
    runs.check_finite(reward=out["reward"])
    return ro, fake, labels, R, out


def mean_over_ranks(x) -> float:
    """A number (or 0-d tensor) averaged over the ranks of a torchrun job."""
    return ddp.all_mean(torch.as_tensor(x, dtype=torch.float32, device=ddp.current_device())).item()


def ppo_step(L: Learner, ro: policy.Rollout, R_all: torch.Tensor, sigma: float, g_cpu: torch.Generator) -> dict:
    """Algorithm 1, step 3: advantages (AdaNAT Eq. 12) and the PPO update (Eq. 11) on one rollout, with
    the anchor pi_anchor * mean ||eta(s)||^2 pulling the residual toward its start schedule."""
    c = L.c
    ret, adv = advantages(c, R_all, ro.value, L.task.T)
    adv_abs = mean_over_ranks(adv.abs().mean())                            # the step size PPO is given
    runs.check_finite(advantage=adv_abs)
    act = L.active[ro.t]                                                   # (T*B, D)
    L.pi.train(), L.V.train()

    def evaluate(idx):                                                     # through DDP: gradients averaged over ranks
        mu = L.pi_dp(ro.features[idx], ro.t[idx])                          # (n, D)
        anchor = c.pi_anchor * ((mu * act[idx]) ** 2).sum(-1).mean()
        return (policy.gaussian_logp(ro.o[idx], mu, sigma, act[idx]), L.V_dp(ro.features[idx], ro.t[idx]),
                policy.gaussian_entropy(sigma, act[idx].sum(-1)), anchor)
    params = list(L.pi.parameters()) + list(L.V.parameters())
    stats = ppo.ppo_update(evaluate, ro.logp, adv, ret, L.opt, params, c.pi_epochs, c.pi_minibatches, c.pi_target_kl,
                           c.pi_clip, c.pi_vf_coef, c.pi_ent_coef, c.pi_grad_clip, generator=g_cpu,
                           mean_over_ranks=mean_over_ranks)
    stats["explained_var"] = ppo.explained_variance(ddp.all_cat(ro.value), ddp.all_cat(ret))
    with torch.no_grad():                                                  # how far the mean residual has moved
        mu = L.pi(ro.features, ro.t)
        stats["residual_rms"] = (((mu * act) ** 2).sum() / act.sum()).sqrt()
    return {"adv_abs": adv_abs, **{k: float(v) for k, v in stats.items()}}


def d_update(L: Learner, state: dict, steps: int, sigma: float, g: torch.Generator, g_cpu: torch.Generator) -> float:
    """Algorithm 1, step 4 (AdaNAT Eq. 14): `steps` Adam steps of D, real training images against
    fakes from the replay of the last pi_d_replay rollouts (or, with pi_d_fresh, the iteration's
    rollout and then fresh ones, as the AdaNAT release does). Translation-only augmentation (a
    cutout made D learn slower here). Returns the last D loss, averaged over the ranks."""
    x_real, y_real = L.x_real, L.y_real
    L.D.train()
    for k in range(steps):
        i = torch.randint(0, len(x_real), (L.B,), generator=g_cpu)
        xr, yr = x_real[i].to(L.device), y_real[i].to(L.device)
        if L.c.pi_d_fresh and k > 0:
            yf, lam, gen = L.explore(sigma, g)
            with torch.no_grad():
                xf = L.task.to_images(gen(yf, L.schedule(sigma, g, lam)))
        elif L.c.pi_d_fresh:
            xf, yf = (v.to(L.device) for v in state["replay"][-1])
        else:
            xs, ys = (torch.cat(v) for v in zip(*state["replay"]))
            j = torch.randint(0, len(xs), (L.B,), generator=g_cpu)
            xf, yf = xs[j].to(L.device), ys[j].to(L.device)
        xr, xf = reward.diff_augment(xr, g, cutout=0.0), reward.diff_augment(xf, g, cutout=0.0)
        both = L.D_dp(L.backbone(torch.cat([xr, xf])), torch.cat([yr, yf]))
        loss = reward.d_loss(reward.rows(both, slice(0, L.B)), reward.rows(both, slice(L.B, None)))   # one DDP sync
        L.d_opt.zero_grad(set_to_none=True)
        loss.backward()
        L.d_opt.step()
    return mean_over_ranks(loss.detach())


def algorithm1(L: Learner, state: dict, it: int, reward_fn: Callable) -> dict:
    """One iteration of AdaNAT's Algorithm 1 (AdaGen's, with the ODE sampler's MDP): 1. roll out B
    trajectories with the exploring policy, 2. reward the finished images, 3. advantages and the PPO
    update (after D's warm-up), 4. update the discriminator. Returns the iteration's logged values."""
    c, t0 = L.c, time.time()
    sigma = sigma_at(c, it)
    seed = c.seed * 100003 + it + 1_000_003 * ddp.DIST.rank                  # per iteration (resumable) and rank
    g, g_cpu = torch.Generator(L.device).manual_seed(seed), torch.Generator().manual_seed(seed)
    ro, fake, labels, R, out = rollout_and_reward(L, sigma, g, reward_fn)  # 1-2
    out["sec_rollout"] = time.time() - t0
    if it == c.pi_d_warmup:                                                # D after its warm-up: kept for the reward check
        state["disc_warmup"], state["d_acc_warmup"] = copy.deepcopy(L.D.state_dict()), out["d_acc"]
        print(f"{L.task.name}: D's held-out accuracy after its warm-up: {out['d_acc']:.3f}")
    t0 = time.time()
    if it >= c.pi_d_warmup:
        out.update(ppo_step(L, ro, ddp.all_cat(R), sigma, g_cpu))          # 3
    out["sec_ppo"], t0 = time.time() - t0, time.time()
    state["replay"] = (state.get("replay") or [])[-(c.pi_d_replay - 1):] if c.pi_d_replay > 1 else []
    state["replay"].append((fake.cpu(), labels.cpu()))                     # this rollout joins D's replay
    out["d_loss"] = d_update(L, state, c.pi_d_steps if it >= c.pi_d_warmup else c.pi_d_warmup_steps, sigma, g, g_cpu)  # 4
    out["sec_d"] = time.time() - t0
    runs.check_finite(d_loss=out["d_loss"])                                # a non-finite D is never saved (train_loop)
    for j, a in enumerate(L.task.spec.names):                              # per-sample spread of each action
        out[f"{a}_sd"] = ro.actions[:, :, j].std(1).mean().item()
    out["act_mean"] = [[round(v, 5) for v in row] for row in ro.actions.mean(1).tolist()]   # (T, D) per step
    return out


def train_policy(c: TrainConfig, run_dir: str, device: torch.device, log: runs.Logger, kind: str, task: PolicyTask,
                 pipe, ref) -> None:
    """Train one policy of `kind` on `task` with Algorithm 1 (`algorithm1`), keeping the best weights.

    kind: "policy" (adaptive), "static" (the learnable table), "smooth" (adaptive with EMA
    action smoothing beta_ema = pi_beta_ema) or "fidelity" (AdaGen §III-F2: a second adaptive
    policy blended with the frozen adaptive one by lam ~ U(0, 1) per trajectory group, Eq. 14,
    rewarded (1 - lam) r_adv + lam r_fid, Eq. 15). The policy starts as a zero residual on
    task.h. Every pi_fid_every iterations the mean policy's FID against *training* statistics is
    measured; the best weights are kept (the fidelity policy: the last). The reward: reward_hook."""
    c = recipe(c)                                                         # pi_recipe = official: the release's PPO
    L, pcfg, modules = build_learner(c, run_dir, device, kind, task)
    name, path = task.name, os.path.join(run_dir, f"{task.name}.pt")
    state = {"history": [], "best": None, "best_fid": None, **runs.resume(path, pcfg, modules), "config": pcfg, "done": False}
    x_real, y_real = task.reals()                  # D's reals: 10 000 training images (pi_d_real = recon: reconstructions)
    n_hold = min(1000, len(x_real) // 10)          # ... and 1 000 held out for D's accuracy
    L.x_real, L.y_real = x_real[n_hold:], y_real[n_hold:]
    L.f_hold, L.y_hold = L.backbone(x_real[:n_hold].to(device)), y_real[:n_hold].to(device)   # the backbone is frozen
    fid_labels = pipeline.balanced_labels(c.pi_fid_samples, task.num_classes)

    def train_fid() -> float:
        """FID of the mean policy (seed 0, fixed labels) against training-set statistics."""
        feats, _ = fid.extract(pipe.featnet, task.fid_images(fid_labels, L.schedule()), device=device)
        return fid.fid_from_features(feats, ref.train_mu, ref.train_sigma)

    if state["best"] is None:                                   # iteration 0: the start schedule itself
        state["best_fid"], state["best"] = train_fid(), copy.deepcopy(L.pi.state_dict())
        state["history"].append({"iter": 0, "train_fid": state["best_fid"]})
        print(f"{name}: start = {task.start}, training-set FID {state['best_fid']:.2f}")
    reward_fn = reward_hook(c, kind, pipe, ref)

    def step_fn(it: int) -> dict:
        out = algorithm1(L, state, it, reward_fn)
        record = {"iter": it + 1, **out}
        if (it + 1) % c.pi_fid_every == 0 or it + 1 == c.pi_iters:
            L.pi.eval()
            record["train_fid"] = out["train_fid"] = train_fid()
            if record["train_fid"] < state["best_fid"] or kind == "fidelity":
                state["best_fid"], state["best"] = record["train_fid"], copy.deepcopy(L.pi.state_dict())
        state["history"].append(record)
        return out

    state = runs.train_loop(name, path, state, modules, step_fn, c.pi_iters, dataclasses.replace(c, log_every=1), log)
    state["done"] = True
    state.pop("replay", None)                                               # D's replay is only needed to resume
    runs.save_ckpt(path, state)
    plots.plot_training(state["history"], os.path.join(run_dir, f"{name}_curve.png"), name)
    which = "training-set FID at lam = 1 (last weights kept)" if kind == "fidelity" else "best training-set FID"
    print(f"{name}: done, {which} {state['best_fid']:.2f} (start {state['history'][0]['train_fid']:.2f}); "
          f"curve in {name}_curve.png")


def chunk_fid_reward(feats: torch.Tensor, ref, chunk: int) -> torch.Tensor:
    """The batch-FID reward of the reward-hacking study (AdaGen §III-D option 1): trajectory i's
    reward is minus the FID (training statistics) of its chunk, i mod (B // chunk); consecutive
    trajectories (a group) land in different chunks, so group baselines still see a difference.
    feats (B, D) of the FID network -> (B,) on the CPU."""
    B = feats.shape[0]
    chunk_of = torch.arange(B) % max(2, B // chunk)
    R = torch.empty(B)
    for j in chunk_of.unique():
        R[chunk_of == j] = -fid.fid_from_features(feats[chunk_of == j], ref.train_mu, ref.train_sigma)
    return R


def stage_policies(kind: str, make_task: Callable = None, counts: Callable = lambda c: c.pi_T,
                   file: Callable = lambda c, kind, n: pipeline.policy_file(kind, c.pi_start, n, c.pi_reward)):
    """The stage function for one policy kind: a policy per count (the NAT: T in pi_T; the ODE
    sampler: NFE budgets, experiments/flow_train.py) built by make_task(c, run_dir, device, kind,
    n) (default nat_task) and trained by train_policy; finished ones skipped."""
    def stage(c: TrainConfig, run_dir: str, device: torch.device, log: runs.Logger) -> None:
        for n in counts(c):
            path = os.path.join(run_dir, f"{file(c, kind, n)}.pt")
            if os.path.exists(path) and runs.load_ckpt(path).get("done"):
                print(f"{path}: done, skipped")
                continue
            train_policy(c, run_dir, device, log, kind, *(make_task or nat_task)(c, run_dir, device, kind, n))
    return stage


POLICY_STAGES = ("policy", "static", "smooth", "fidelity")
STAGE_FNS = {"backbone": stage_backbone, "vq": stage_vq, "featnet": stage_featnet, "featnet2": stage_featnet2, "nat": stage_nat,
             **{kind: stage_policies(kind) for kind in POLICY_STAGES}}
# the experiments' stages (experiments/): their module is imported only when one of them runs
EXPERIMENT_STAGES = {**dict.fromkeys(("search", "param-search", "flow-search", "pr-search"), "experiments.search"),
                     **dict.fromkeys(("flow", "flow-policy", "flow-static", "flow-smooth"), "experiments.flow_train")}
FLOW_POLICY_STAGES = ("flow-policy", "flow-static", "flow-smooth")
OPTIONAL_STAGES = ["pr-search", "fidelity", "flow", "flow-search", *FLOW_POLICY_STAGES]   # run only when named
STAGES_ALL = STAGES + OPTIONAL_STAGES
SKIPS_INSIDE = POLICY_STAGES + FLOW_POLICY_STAGES + ("search", "param-search", "flow-search", "pr-search", "flow")   # stages that skip their finished parts themselves


def stage_fn(name: str) -> Callable:
    """The function of a stage: the core's, or an experiment's (its module imported now)."""
    if name in STAGE_FNS:
        return STAGE_FNS[name]
    return importlib.import_module(EXPERIMENT_STAGES[name]).STAGES[name]


# ----------------------------------------------------------------------------- command line

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
    if field_type is tuple:
        return tuple(int(v) for v in text.split(","))
    return None if text.lower() == "none" else text


def validate(c: TrainConfig, stage: str) -> None:
    """One clear line (UserError) for a config value that cannot work."""
    for name in ("vq_steps", "feat_steps", "nat_steps", "bb_steps", "vq_batch", "feat_batch", "nat_batch", "pi_iters", "pi_batch",
                 "pi_fid_every", "pi_fid_samples", "pi_epochs", "pi_minibatches", "search_updates", "search_param_updates",
                 "search_samples", "search_eps_m", "search_eps", "flow_steps", "flow_batch"):
        if getattr(c, name) <= 0:
            raise runs.UserError(f"{name} = {getattr(c, name)}: must be positive")
    if c.mask_dist not in ("cosine", "beta"):
        raise runs.UserError(f"mask_dist {c.mask_dist!r}: use cosine or beta")
    if c.pi_group < 1 or c.pi_batch % c.pi_group:
        raise runs.UserError(f"pi_group {c.pi_group} must be >= 1 and divide pi_batch {c.pi_batch}")
    if c.pi_start not in pipeline.PI_STARTS:
        raise runs.UserError(f"pi_start {c.pi_start!r}: use one of {', '.join(pipeline.PI_STARTS)}")
    if c.flow_pi_solver not in samplers.SOLVERS:
        raise runs.UserError(f"flow_pi_solver {c.flow_pi_solver!r}: use one of {', '.join(samplers.SOLVERS)}")
    if not c.flow_pi_nfe or any(n < 2 or samplers.steps_for_nfe(c.flow_pi_solver, n) < 2 for n in c.flow_pi_nfe):
        raise runs.UserError(f"flow_pi_nfe {c.flow_pi_nfe}: budgets of at least 2 solver steps ({c.flow_pi_solver})")
    if c.flow_path not in samplers.PATHS:
        raise runs.UserError(f"flow_path {c.flow_path!r}: use one of {', '.join(samplers.PATHS)}")
    if c.img_size % c.flow_patch:
        raise runs.UserError(f"flow_patch {c.flow_patch} must divide img_size {c.img_size}")
    if c.pi_reward not in pipeline.PI_REWARDS:
        raise runs.UserError(f"pi_reward {c.pi_reward!r}: use one of {', '.join(pipeline.PI_REWARDS)}")
    if stage == "fidelity" and c.pi_reward != "adversarial":
        raise runs.UserError(f"--stage {stage} --reward {c.pi_reward}: the fidelity policy's reward is the blend of "
                        f"the adversarial and the fixed reward (Eq. 15); drop --reward")
    if c.pi_fid_chunk < 2:
        raise runs.UserError(f"pi_fid_chunk {c.pi_fid_chunk}: an FID needs at least 2 samples per chunk")
    if c.pi_d_real not in ("recon", "raw"):
        raise runs.UserError(f"pi_d_real {c.pi_d_real!r}: use raw or recon")
    if c.pi_recipe not in ("ours", "official") or c.pi_sigma_schedule not in ("linear", "step"):
        raise runs.UserError(f"pi_recipe {c.pi_recipe!r} / pi_sigma_schedule {c.pi_sigma_schedule!r}: use ours or official / "
                        f"linear or step")
    if c.pi_d_replay < 1 or c.pi_anchor < 0 or c.pi_adv_floor < 0 or c.vq_perceptual < 0:
        raise runs.UserError("pi_d_replay must be >= 1 and pi_anchor, pi_adv_floor, vq_perceptual >= 0")
    if not c.pi_T or any(T < 2 for T in c.pi_T):
        raise runs.UserError(f"pi_T {c.pi_T}: decoding step counts of at least 2, e.g. --set pi_T=4,8")
    if not c.search_T or any(T < 2 for T in c.search_T):
        raise runs.UserError(f"search_T {c.search_T}: decoding step counts of at least 2, e.g. --set search_T=4,8")
    if c.pr_budget < 1 or c.pr_steps < 1 or c.pr_T < 2 or c.pr_samples < 1:
        raise runs.UserError("pr_budget, pr_steps and pr_samples must be positive and pr_T >= 2")
    if not (0 <= c.search_momentum < 1 and c.search_lr >= 0 and c.search_lr_m >= 0 and c.search_clip >= 0):
        raise runs.UserError("search_momentum must be in [0, 1), search_lr, search_lr_m and search_clip >= 0")
    if not (c.pi_sigma0 > 0 and c.pi_sigma1 > 0 and 0 <= c.pi_beta_ema < 1):
        raise runs.UserError("pi_sigma0 and pi_sigma1 must be positive and pi_beta_ema in [0, 1)")


def build_config(args: argparse.Namespace) -> tuple[TrainConfig, str]:
    """The run folder's config.json (else the preset), with the flags applied on top.

    Once a stage has written a checkpoint, the config may no longer change: a run folder is
    one experiment. Before that (e.g. after a wrong --data) anything may be fixed."""
    run_dir = args.run_dir or os.path.join("runs", args.preset or "small")
    config_path = os.path.join(run_dir, "config.json")
    saved = runs.read_json(config_path) if os.path.exists(config_path) else None
    if os.path.exists(config_path) and not isinstance(saved, dict):
        raise runs.UserError(f"{config_path} is unreadable; delete it (and the run folder's checkpoints) to start over")
    fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    preset = args.preset or (saved or {}).get("preset", "small")
    if preset not in PRESETS:
        raise runs.UserError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if saved is not None and saved.get("preset") == preset:       # keys missing from an older config: the preset's
        c = TrainConfig(**{**PRESETS[preset], **{k: v for k, v in saved.items() if k in fields}})
        c.vq_ch_mult, c.pi_T, c.search_T = tuple(c.vq_ch_mult), tuple(c.pi_T), tuple(c.search_T)
        c.flow_pi_nfe = tuple(c.flow_pi_nfe)
    else:
        c = TrainConfig(**{**PRESETS[preset], "preset": preset})
    for item in args.set or []:
        key, _, value = item.partition("=")
        if key not in fields or key == "preset":
            raise runs.UserError(f"--set {item}: unknown config key {key!r}; keys: {', '.join(k for k in fields if k != 'preset')}")
        try:
            setattr(c, key, parse_value(fields[key], value))
        except ValueError as e:
            raise runs.UserError(f"--set {item}: {e}") from None
    if args.data is not None:
        c.data = args.data
    c.flow_path, c.pi_reward, c.compile = args.path, args.reward, args.compile
    if args.seed is not None:
        c.seed = args.seed
    if args.steps is not None:
        if args.steps <= 0:
            raise runs.UserError(f"--steps {args.steps}: must be a positive number of training steps")
        for s in (STAGES if args.stage == "all" else [args.stage]):
            key = {"featnet": "feat_steps", "featnet2": "feat2_steps", "backbone": "bb_steps", "search": "search_updates", "flow-search": "search_updates",
                   "param-search": "search_param_updates", "pr-search": "pr_steps"}.get(s, "pi_iters" if s in POLICY_STAGES + FLOW_POLICY_STAGES else f"{s}_steps")
            setattr(c, key, args.steps)
    validate(c, args.stage)
    trained = [s for s in STAGES if os.path.exists(os.path.join(run_dir, f"{s}.pt"))]
    if saved is not None and trained:
        now = runs.to_plain(c)
        # pi_*, search_*, flow_*, feat2_* keys are free: each of their checkpoints carries (and on resume checks) its own copy
        diff = sorted(k for k in now if k in saved and not k.startswith(("pi_", "search_", "pr_", "flow_", "feat2_"))
                      and k not in ("ckpt_every_s", "log_every", "compile", "gen_rows") and saved[k] != now[k])
        if diff:
            raise runs.UserError(f"{run_dir} was trained with another config (differs in {', '.join(diff)}); "
                            f"use another --run-dir, or the same flags as before")
    return c, run_dir


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)} (default: the run folder's, else small)")
    p.add_argument("--stage", default="all", help=f"all (= {', '.join(STAGES)}) or one of them, or {', '.join(OPTIONAL_STAGES)}")
    p.add_argument("--run-dir", default=None, help="run folder (default runs/<preset>)")
    p.add_argument("--data", default=None, help="Fashion-MNIST idx folder, a folder of class subfolders, or 'synthetic'")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="training steps of the selected stage(s)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any TrainConfig field, e.g. --set nat_lr=5e-4")
    p.add_argument("--compile", action="store_true", help="torch.compile the nat / flow training forward")
    p.add_argument("--path", default="flow", choices=list(samplers.PATHS), help="the flow stage's probability path")
    p.add_argument("--reward", default="adversarial", choices=pipeline.PI_REWARDS,
                   help="the policy stages' reward (the reward-hacking study); other than adversarial: files *_<reward>_T*")
    args = p.parse_args(argv)
    try:
        if args.stage != "all" and args.stage not in STAGES + OPTIONAL_STAGES:
            raise runs.UserError(f"unknown stage {args.stage!r}: choose all or one of {', '.join(STAGES + OPTIONAL_STAGES)}")
        c, run_dir = build_config(args)
        device = ddp.init_distributed(runs.pick_device(args.device))
        if not ddp.DIST.main:
            sys.stdout = open(os.devnull, "w")                         # one rank reports; errors still reach stderr
        os.makedirs(run_dir, exist_ok=True)
        runs.write_json(os.path.join(run_dir, "config.json"), runs.to_plain(c))
        torch.manual_seed(c.seed + ddp.DIST.rank)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        log = runs.Logger(run_dir)
        if ddp.DIST.world > 1 and c.data != "synthetic":                   # one rank fetches the data set, if it must
            if ddp.DIST.main:
                for split in ("train", "test"):
                    data.load_dataset(c.data, split, c.img_size, c.channels, c.seed)
            ddp.barrier()
        print(f"run folder {run_dir} | preset {c.preset} | device {device}")
        for s in (STAGES if args.stage == "all" else [args.stage]):
            path = os.path.join(run_dir, f"{s}.pt")
            if s not in SKIPS_INSIDE and os.path.exists(path) and runs.load_ckpt(path).get("done"):
                print(f"{s}: done ({path}), skipped")
                continue
            if ddp.DIST.world > 1:                                         # each rank its own random stream
                torch.manual_seed(c.seed + 1_000_003 * ddp.DIST.rank + STAGES_ALL.index(s))
            t0 = time.time()
            try:
                stage_fn(s)(c, run_dir, device, log)
            except torch.OutOfMemoryError:                             # outside a training loop (data, final evaluation)
                raise runs.RunFault(f"{s}: out of memory ({runs.oom_advice(c, runs.fault_keys(s)[1])})") from None
            ddp.barrier()                                                  # its files are written before the next stage reads them
            log(stage=s, wall_seconds=round(time.time() - t0, 1))
    except (runs.UserError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except runs.RunFault as e:                                              # every rank stops with the same line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(runs.FAULT_EXIT)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    import train                    # run as the module `train`, the one sample.py imports: one UserError class
    train.main()
