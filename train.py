"""Train the pipeline, stage by stage: backbone -> vq -> featnet -> featnet2 -> featssl -> nat -> search -> param-search -> policies.

    python train.py                                  # the `small` preset, all stages, CPU or GPU
    python train.py --preset base                    # the single-GPU scale
    python train.py --stage nat --run-dir runs/small # one stage; resumes what is there
    torchrun --standalone --nproc_per_node 4 train.py --preset base   # data-parallel (docs/torchrun.md)

Stages (each writes its checkpoint(s) into the run folder):
  backbone      a classifier: the frozen backbone of the tokenizer's perceptual loss and of the
                policy's discriminator (never the FID network).
  vq            the VQ tokenizer (vqgan.py): 32x32 image -> 8x8 = 64 tokens.
  featnet       a small classifier whose penultimate features define FID here (fid.py).
  featnet2      a held-out judge: an independent FID network (other architecture and seed), a second FID column.
  featssl       a held-out judge: a self-supervised SimCLR network (simclr.py), the SSL FD column.
  dnet, dssl    (when named) candidate backbones of the discriminator: a wider, longer classifier; a
                second SimCLR network (the reward check compares them: sample.py --reward-check).
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

Beside this file: config.py (TrainConfig: every key, the presets, --set / --steps checked),
learner.py (what Algorithm 1 works on: a paradigm's MDP, the policy, critic and discriminator,
the reward hooks), pipeline.py (models rebuilt from a run folder, generation, FID statistics),
runs.py (run folders, checkpoints, the training loop) and ddp.py (torchrun).

A run folder holds config.json, log.jsonl (one JSON object per logged step), and the
checkpoints. Re-running the same command resumes: finished stages are skipped, an
interrupted stage continues from its last checkpoint (written every `ckpt_every_s`
seconds, after every search update, at the end, and on Ctrl-C). Checkpoints are dicts of
plain types and tensors, `torch.load(path, weights_only=True)` loads them, and each carries
its model's config so that sample.py rebuilds every model from the files alone. Bad input
exits with code 2, a run fault (non-finite loss, failed write, out of memory) with 3 (runs.py).
"""

import argparse
import contextlib
import copy
import dataclasses
import functools
import importlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from PIL import Image, ImageDraw

import autonat
import data
import fid
import nat
import policy
import ppo
import reward
import samplers
import vqgan


@dataclass
class Dist:
    """This process's place in a torchrun job; rank 0 of 1 without torchrun."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


DIST = Dist()


def init_distributed(device: torch.device) -> torch.device:
    """Join the job torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK (NCCL on CUDA, gloo on
    the CPU), as nanoGPT's and DiT's train.py do, and return this rank's device (cuda:LOCAL_RANK).
    Without torchrun: the single process of the same code. Rank 0 alone writes files."""
    if "RANK" not in os.environ or dist.is_initialized():
        return device
    DIST.rank, DIST.world, DIST.local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        device = torch.device("cuda", DIST.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def current_device() -> torch.device:
    """Where collectives run: this rank's GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if DIST.world > 1:
        dist.barrier()


def all_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of x over the ranks (x itself in a single process)."""
    if DIST.world == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / DIST.world


def all_sum(x: float) -> float:
    """The sum of a number over the ranks (in float64: counts stay exact)."""
    if DIST.world == 1:
        return x
    v = torch.tensor([x], dtype=torch.float64, device=current_device())   # NCCL: GPU tensors
    dist.all_reduce(v)
    return v.item()


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
    """DDP around `model` in a torchrun job (gradients averaged over ranks in backward; rank 0's
    weights broadcast at the start), the model itself in a single process."""
    if DIST.world == 1:
        return model
    wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    wrapped.cfg = getattr(model, "cfg", None)                           # what the losses read off the model
    return wrapped


def rank_seed(seed: int) -> int:
    """A seed of this rank's own random stream (each rank draws its own batches): seed + 1 000 003 * rank."""
    return seed + 1_000_003 * DIST.rank


def chunk_seed(seed: int, chunk: int) -> int:
    """The seed of generation chunk `chunk` of a run seeded `seed`: sampling randomness is keyed by
    (seed, chunk index), never by the process, so any number of ranks makes the same images."""
    return seed * 1_000_003 + chunk


def sharded(n_chunks: int, run_chunk: Callable, desc: str = "", progress: bool = False) -> list:
    """[run_chunk(0), ..., run_chunk(n_chunks - 1)] on every rank: rank r runs the chunks
    i = r mod world (whole chunks, so results do not depend on the process count) and the
    results (CPU tensors) are gathered in chunk order."""
    mine = {i: run_chunk(i) for i in tqdm(range(DIST.rank, n_chunks, DIST.world), desc=desc, leave=False,
                                          disable=not (progress and DIST.main))}
    if DIST.world > 1:
        parts: list = [None] * DIST.world
        dist.all_gather_object(parts, mine)
        mine = {i: out for part in parts for i, out in part.items()}
    return [mine[i] for i in range(n_chunks)]


FAULT_EXIT = 3          # exit code of a run fault (non-finite values, a failed write, out of memory); bad input: 2


class RunFault(Exception):
    """A fault of a running stage (non-finite loss, failed checkpoint write, out of memory): one
    line on stderr, exit code FAULT_EXIT; the last good checkpoint stays loadable."""


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device auto or cpu")
    if name.startswith("cuda:") and name[5:].isdigit() and int(name[5:]) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name}: {e}") from None


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA (TF32 is set in main); a no-op on CPU."""
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def rank_batch(global_batch: int, name: str) -> int:
    """This rank's share of a preset's global batch."""
    if global_batch % DIST.world:
        raise UserError(f"{name} = {global_batch} does not split over {DIST.world} processes: use a multiple")
    return global_batch // DIST.world


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """write(tmp) then os.replace(tmp, path) (rank 0 only): an interrupt never leaves a truncated
    file. A failed write (disk full, permission) removes the temp file, leaves `path` as it was
    and raises RunFault naming the path and the reason."""
    if not DIST.main:
        return
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        was = "the previous file is intact" if os.path.exists(path) else "nothing was written"
        raise RunFault(f"could not write {path}: {e.strerror or e} ({was}); free space or fix the folder's permissions, "
                       f"then re-run the same command to resume") from None


def save_ckpt(path: str, obj: dict) -> None:
    """Atomic checkpoint write (temp file + os.replace, rank 0 only); see atomic_write."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_ckpt(path: str, expect_config: dict | None = None) -> dict:
    """Load a checkpoint with weights_only=True; clear errors for corrupt or mismatched files."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path} not found: run the stage that makes it (python train.py --run-dir {os.path.dirname(path)})") from None
    except Exception as e:  # truncated zip, pickle error, ...
        raise UserError(f"{path} is corrupt or not a checkpoint ({type(e).__name__}); delete it to retrain that stage") from None
    if not isinstance(ck, dict) or "model" not in ck or "config" not in ck:
        raise UserError(f"{path} is not a checkpoint of this project (no 'model'/'config'); delete it to retrain that stage")
    if expect_config is not None and ck["config"] != expect_config:
        diff = sorted(k for k in set(ck["config"]) | set(expect_config) if ck["config"].get(k) != expect_config.get(k))
        raise UserError(f"{path} was trained with another config (differs in {', '.join(diff)}); "
                        f"use the run folder's own flags, another --run-dir, or delete the file to retrain")
    return ck


def to_plain(cfg) -> dict:
    """A dataclass as a dict of plain types (tuples become lists, as in JSON)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def fingerprint(run_dir: str, stages: tuple = ("vq", "featnet", "nat")) -> str:
    """Identifies the trained models of a run folder (step and training time of each checkpoint),
    so that cached evaluation results are never reused for other weights."""
    parts = []
    for s in stages:
        ck = load_ckpt(os.path.join(run_dir, f"{s}.pt"))
        parts.append(f"{s}:{ck.get('step')}:{round(ck.get('train_seconds', 0.0), 1)}")
    return "|".join(parts)


def write_json(path: str, obj) -> None:
    """Atomic JSON write (temp file + os.replace, rank 0 only); see atomic_write."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    atomic_write(path, write)


def finite_json(v):
    """v with every non-finite float replaced by None: json.dumps then writes null, valid JSON (not NaN)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [finite_json(x) for x in v]
    if isinstance(v, dict):
        return {k: finite_json(x) for k, x in v.items()}
    return v


def read_json(path: str, default=None):
    """JSON from path, or `default` when the file is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


class Logger:
    """Appends one JSON object per record to <run_dir>/log.jsonl."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, "log.jsonl")

    def __call__(self, **record) -> None:
        if not DIST.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(finite_json({"time": round(time.time(), 1), **record}), allow_nan=False) + "\n")


def train_loop(name: str, ck_path: str, state: dict, modules: dict, step_fn, total: int, c,
               log: Logger) -> dict:
    """The loop every stage shares: tqdm bar, log.jsonl, checkpoints (periodic, final, on Ctrl-C).

    state: the checkpoint dict, state["step"] = steps done (the loop resumes there);
    modules: name -> module or optimizer, saved as state[name] = its state_dict();
    step_fn(step) -> dict of floats trains one step in place; c: the run's TrainConfig (log_every,
    ckpt_every_s, and fault_keys(name): the keys a run fault's advice names).
    """
    def snapshot() -> dict:
        state.update({k: m.state_dict() for k, m in modules.items()}, rng=torch.get_rng_state())
        return state

    def fault(what: str, step: int, advice: str, note: str = "") -> RunFault:
        """Save the state before this step if it is finite (else keep the last checkpoint); the one-line error."""
        bar.close()
        if all_finite(snapshot()):
            save_ckpt(ck_path, state)
            kept = f"its last good state (step {state['step']}) is saved in {ck_path}"
        else:
            kept = f"nothing non-finite was saved: the last checkpoint in {ck_path} is kept" if os.path.exists(ck_path) \
                else "nothing was saved"
        return RunFault(f"{name}: {what} at step {step + 1}{note}; {kept}. {advice}")

    last_save, t0, last_loss = time.time(), time.time(), None
    lr_key, batch_key = c.fault_keys(name)
    bar = tqdm(range(state["step"], total), initial=state["step"], total=total, desc=name, dynamic_ncols=True,
               disable=not DIST.main)
    try:
        for step in bar:
            try:
                metrics = step_fn(step)
            except FloatingPointError as e:                          # a step_fn found a non-finite value before its update
                value = getattr(c, lr_key)
                raise fault(f"non-finite {e}", step,
                            f"Try a lower learning rate in a new run folder (a run folder's config is fixed), e.g. "
                            f"--set {lr_key}={value / 10:g} --run-dir <new>; or, if the fault was transient, re-run "
                            f"the same command to resume",
                            f" (last finite loss {last_loss:.6g})" if last_loss is not None else "") from None
            except torch.OutOfMemoryError:
                raise fault("out of memory", step, f"Lower the batch: {oom_advice(c, batch_key)}; or, if memory was "
                            f"short only for a while, re-run the same command to resume") from None
            last_loss = metrics.get("loss", last_loss)
            state["step"] = step + 1
            if step % c.log_every == 0 or step + 1 == total:
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if not isinstance(v, list)})
                log(stage=name, step=step + 1, **{k: v if isinstance(v, list) else round(float(v), 6)
                                                  for k, v in metrics.items()})
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
    save_ckpt(ck_path, snapshot())                     # trained weights are safe before the final evaluation
    return state


def all_finite(obj) -> bool:
    """True when every floating-point tensor in a (nested) checkpoint dict is finite."""
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    return True


def check_finite(**values: float) -> None:
    """Raise FloatingPointError naming the first non-finite value (a float the loop has already
    synchronised for its log, so the check costs no extra host synchronisation)."""
    for k, v in values.items():
        if not math.isfinite(v):
            raise FloatingPointError(f"{k} ({v})")


def oom_advice(c, key: str) -> str:
    """What to lower after an out-of-memory error, for the batch key of the stage."""
    if key == "gen_rows":
        now = f"gen_rows = {c.gen_rows}" if c.gen_rows else "gen_rows = 0 (whole chunks: 500 rows on CPU, 4096 on CUDA)"
        return (f"generating at {now}: set fewer rows per generator forward, e.g. --set gen_rows=128; it splits the "
                f"forwards only, so the samples do not change")
    value = getattr(c, key)
    extra = "" if key != "pi_batch" else ", or lower gen_rows (rows per generator forward; the samples do not change)"
    return f"at {key} = {value}: lower it in a new run folder, e.g. --set {key}={max(1, value // 2)} --run-dir <new>{extra}"


def resume(ck_path: str, model_cfg: dict, modules: dict) -> dict:
    """Load a stage checkpoint into `modules` (name -> module/optimizer) if one exists."""
    if not os.path.exists(ck_path):
        return {"step": 0}
    ck = load_ckpt(ck_path, expect_config=model_cfg)
    for k, m in modules.items():
        m.load_state_dict(ck[k])
    if "rng" in ck:
        torch.set_rng_state(ck["rng"])
        if DIST.world > 1:                              # ranks go on from rank 0's saved state, each its own way
            torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,))) + DIST.rank)
    print(f"resuming {os.path.basename(ck_path)} from step {ck['step']}")
    return ck


def is_done(path: str) -> bool:
    """Whether a stage checkpoint exists and is finished."""
    return os.path.exists(path) and bool(load_ckpt(path).get("done"))


def write_text(path: str, text: str) -> None:
    """A text file, written by rank 0 alone in a torchrun job."""
    if DIST.main:
        with open(path, "w") as f:
            f.write(text)


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
    out = {"loss": all_mean(loss.detach()).item(), "grad_norm": gn.item()}
    check_finite(**out)                                                   # before the update, no extra synchronisation
    opt.step()
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.lerp_(p, 1 - d)
    return out


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
        """(learning-rate key, batch key) of a training loop's stage (train_loop's advice on a fault)."""
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


# keys renamed since older run folders were written: their config.json still loads
RENAMED = {"bb_steps": "backbone_steps", "bb_width": "backbone_width", "bb_dim": "backbone_dim",
           "feat_steps": "featnet_steps", "feat_width": "featnet_width", "feat_dim": "featnet_dim",
           "feat2_steps": "featnet2_steps", "feat2_width": "featnet2_width", "feat2_dim": "featnet2_dim",
           "feat2_convs": "featnet2_convs", "codebook_size": "vq_codebook_size", "code_dim": "vq_code_dim",
           "gan_weight": "vq_gan_weight", "gan_start": "vq_gan_start", "mask_dist": "nat_mask_dist",
           "mask_alpha": "nat_mask_alpha", "mask_beta": "nat_mask_beta", "ema_decay": ("nat_ema_decay", "flow_ema_decay")}


def stage_of(loop: str) -> str:
    """The stage of a training loop's name (train_loop): "policy_T4", "static_search_T8" and
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
                raise UserError(f"{key} = {getattr(c, key)}: must be positive")
    if c.vq_perceptual < 0:
        raise UserError("vq_perceptual must be >= 0")
    if run & {"nat", "pr-search"} and c.nat_mask_dist not in ("cosine", "beta"):
        raise UserError(f"nat_mask_dist {c.nat_mask_dist!r}: use cosine or beta")
    if run & {*POLICY_STAGES, *FLOW_POLICY_STAGES}:
        validate_policy(c, stages)
    if run & {"search", "param-search", "flow-search", "pr-search"}:
        if c.search_samples <= 0 or c.search_eps_m <= 0 or c.search_eps <= 0:
            raise UserError("search_samples, search_eps_m and search_eps must be positive")
        if not c.search_T or any(T < 2 for T in c.search_T):
            raise UserError(f"search_T {c.search_T}: decoding step counts of at least 2, e.g. --set search_T=4,8")
        if not (0 <= c.search_momentum < 1 and c.search_lr >= 0 and c.search_lr_m >= 0 and c.search_clip >= 0):
            raise UserError("search_momentum must be in [0, 1), search_lr, search_lr_m and search_clip >= 0")
    if "pr-search" in run and (c.pr_budget < 1 or c.pr_steps < 1 or c.pr_T < 2 or c.pr_samples < 1):
        raise UserError("pr_budget, pr_steps and pr_samples must be positive and pr_T >= 2")
    if run & {"flow", "flow-search", *FLOW_POLICY_STAGES}:
        if c.flow_path not in samplers.PATHS:
            raise UserError(f"flow_path {c.flow_path!r}: use one of {', '.join(samplers.PATHS)}")
        if c.img_size % c.flow_patch:
            raise UserError(f"flow_patch {c.flow_patch} must divide img_size {c.img_size}")
        if c.flow_pi_solver not in samplers.SOLVERS:
            raise UserError(f"flow_pi_solver {c.flow_pi_solver!r}: use one of {', '.join(samplers.SOLVERS)}")
        if not c.flow_pi_nfe or any(n < 2 or samplers.steps_for_nfe(c.flow_pi_solver, n) < 2 for n in c.flow_pi_nfe):
            raise UserError(f"flow_pi_nfe {c.flow_pi_nfe}: budgets of at least 2 solver steps ({c.flow_pi_solver})")


def validate_policy(c: TrainConfig, stages: list[str]) -> None:
    """The policy stages' keys (pi_*)."""
    if c.pi_fid_every <= 0 or c.pi_fid_samples <= 0 or c.pi_epochs <= 0 or c.pi_minibatches <= 0:
        raise UserError("pi_fid_every, pi_fid_samples, pi_epochs and pi_minibatches must be positive")
    if c.pi_group < 1 or c.pi_batch % c.pi_group:
        raise UserError(f"pi_group {c.pi_group} must be >= 1 and divide pi_batch {c.pi_batch}")
    if c.pi_start not in PI_STARTS:
        raise UserError(f"pi_start {c.pi_start!r}: use one of {', '.join(PI_STARTS)}")
    if c.pi_reward not in PI_REWARDS:
        raise UserError(f"pi_reward {c.pi_reward!r}: use one of {', '.join(PI_REWARDS)}")
    if "fidelity" in stages and c.pi_reward != "adversarial":
        raise UserError(f"--stage fidelity --reward {c.pi_reward}: the fidelity policy's reward is the blend of "
                             f"the adversarial and the fixed reward (Eq. 15); drop --reward")
    if c.pi_fid_chunk < 2:
        raise UserError(f"pi_fid_chunk {c.pi_fid_chunk}: an FID needs at least 2 samples per chunk")
    bad = [n for n in c.pi_d_nets.split("+") if n not in D_NETS]
    if bad:
        judge = " (a judge: D never sits on one)" if set(bad) & set(JUDGES) else ""
        raise UserError(f"pi_d_nets {c.pi_d_nets!r}: {', '.join(bad)}{judge}; use one or more of "
                             f"{', '.join(D_NETS)} joined by +")
    if not c.pi_d_taps or len(set(c.pi_d_taps)) != len(c.pi_d_taps) or not set(c.pi_d_taps) <= {0, 1, 2}:
        raise UserError(f"pi_d_taps {c.pi_d_taps}: distinct pooling stages among 0, 1, 2, e.g. --set pi_d_taps=1,2")
    if c.pi_d_acc_band and not (len(c.pi_d_acc_band) == 2 and 0 < c.pi_d_acc_band[0] < c.pi_d_acc_band[1] < 1) \
            or min(c.pi_d_steps_max, c.pi_d_steps, c.pi_d_warmup_steps) < 1:
        raise UserError(f"pi_d_acc_band {c.pi_d_acc_band}: two accuracies lo,hi with 0 < lo < hi < 1 (or empty: fixed "
                             f"pi_d_steps), and pi_d_steps, pi_d_warmup_steps, pi_d_steps_max >= 1")
    if c.pi_d_real not in ("recon", "raw"):
        raise UserError(f"pi_d_real {c.pi_d_real!r}: use raw or recon")
    if c.pi_recipe not in ("ours", "official") or c.pi_sigma_schedule not in ("linear", "step"):
        raise UserError(f"pi_recipe {c.pi_recipe!r} / pi_sigma_schedule {c.pi_sigma_schedule!r}: use ours or official / "
                             f"linear or step")
    if c.pi_d_replay < 1 or c.pi_anchor < 0 or c.pi_adv_floor < 0:
        raise UserError("pi_d_replay must be >= 1 and pi_anchor, pi_adv_floor >= 0")
    if not c.pi_T or any(T < 2 for T in c.pi_T):
        raise UserError(f"pi_T {c.pi_T}: decoding step counts of at least 2, e.g. --set pi_T=4,8")
    if not (c.pi_sigma0 > 0 and c.pi_sigma1 > 0 and 0 <= c.pi_beta_ema < 1):
        raise UserError("pi_sigma0 and pi_sigma1 must be positive and pi_beta_ema in [0, 1)")


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
    saved = read_json(os.path.join(run_dir, "config.json"))
    if not isinstance(saved, dict):
        raise UserError(f"{run_dir}/config.json is missing or unreadable: train first with python train.py --run-dir {run_dir}")
    return from_saved(saved, saved.get("preset"))


def build_config(args: argparse.Namespace, stages: list[str], default: list[str] | None = None) -> tuple[TrainConfig, str]:
    """The run folder's config.json (else the preset), with the flags applied on top.

    Once a stage has written a checkpoint, the config may no longer change: a run folder is
    one experiment. Before that (e.g. after a wrong --data) anything may be fixed. `stages`: the
    stages `--stage all` runs, in order; their checkpoints lock the config."""
    run_dir = args.run_dir or os.path.join("runs", args.preset or "small")
    config_path = os.path.join(run_dir, "config.json")
    saved = read_json(config_path) if os.path.exists(config_path) else None
    if os.path.exists(config_path) and not isinstance(saved, dict):
        raise UserError(f"{config_path} is unreadable; delete it (and the run folder's checkpoints) to start over")
    saved = upgrade(saved) if saved is not None else None
    fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    preset = args.preset or (saved or {}).get("preset", "small")
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    same = saved is not None and saved.get("preset") == preset          # keys missing from an older config: the preset's
    c = from_saved(saved, preset) if same else TrainConfig(**{**PRESETS[preset], "preset": preset})
    for item in args.set or []:
        key, _, value = item.partition("=")
        if key in RENAMED:
            raise UserError(f"--set {item}: {key} is now called {RENAMED[key] if isinstance(RENAMED[key], str) else ' and '.join(RENAMED[key])}")
        if key not in fields or key == "preset":
            raise UserError(f"--set {item}: unknown config key {key!r}; keys: {', '.join(k for k in fields if k != 'preset')}")
        try:
            setattr(c, key, parse_value(fields[key], value))
        except ValueError as e:
            raise UserError(f"--set {item}: {e}") from None
    if args.data is not None:
        c.data = args.data
    set_keys = {item.partition("=")[0] for item in args.set or []}
    for key, flag, given, default in (("flow_path", "--path", args.path, "flow"), ("pi_reward", "--reward", args.reward,
                                      "adversarial"), ("compile", "--compile", args.compile, False)):
        if given is not None and key in set_keys and getattr(c, key) != given:   # a flag and its key never contradict
            raise UserError(f"--set {key}={getattr(c, key)} contradicts {flag} {given}: give one of them")
        if given is not None or key not in set_keys:                   # the flag, else --set, else the flag's default
            setattr(c, key, given if given is not None else default)
    if args.seed is not None:
        c.seed = args.seed
    running = (default or stages) if args.stage == "all" else [args.stage]
    if args.steps is not None:
        if args.steps <= 0:
            raise UserError(f"--steps {args.steps}: must be a positive number of training steps")
        for s in running:
            setattr(c, STAGE_KEYS[s][0], args.steps)
    validate(c, running)
    trained = [s for s in stages if os.path.exists(os.path.join(run_dir, f"{s}.pt"))]
    if saved is not None and trained:
        now = to_plain(c)
        diff = sorted(k for k in now if k in saved and not k.startswith(FREE_PREFIXES)
                      and k not in ("ckpt_every_s", "log_every", "compile", "gen_rows") and saved[k] != now[k])
        if diff:
            raise UserError(f"{run_dir} was trained with another config (differs in {', '.join(diff)}); "
                                 f"use another --run-dir, or the same flags as before")
    return c, run_dir


FROZEN_NETS = ("featnet", "featnet2", "featssl", "backbone", "dnet", "dssl")   # fid.FeatureNet checkpoints (frozen_nets.py)


JUDGES = ("featnet", "featnet2", "featssl")     # the FID network (choices) and the held-out judges: never D's backbone


def build_model(run_dir: str, stage: str, device: torch.device, weights: str = "model") -> torch.nn.Module:
    """Rebuild a finished stage's model from its checkpoint alone (config + weights), in eval mode.

    stage: "vq", one of FROZEN_NETS, "nat", "flow" or "vp"; weights: "model" or "ema" (the
    generators' EMA weights)."""
    path = os.path.join(run_dir, f"{stage}.pt")
    ck = load_ckpt(path)
    if not ck.get("done"):
        raise UserError(f"{path} is unfinished (step {ck.get('step')}): finish it with python train.py --run-dir {run_dir}")
    cfg = ck["config"]
    try:
        if stage == "vq":
            model = vqgan.VQModel(vqgan.VQConfig(**{**cfg, "ch_mult": tuple(cfg["ch_mult"])}))
        elif stage in FROZEN_NETS:
            model = fid.FeatureNet(fid.FeatureNetConfig(**cfg))
        elif stage in samplers.PATHS:                                   # flow.pt, vp.pt
            model = samplers.FlowTransformer(samplers.FlowConfig(**cfg), nat.Block)
        else:
            model = nat.NAT(nat.NATConfig(**cfg))
        model.load_state_dict(ck[weights])
    except (TypeError, KeyError, RuntimeError) as e:
        raise UserError(f"{path} does not match this code's {stage} model ({type(e).__name__}: {str(e)[:120]}); "
                        f"delete it to retrain that stage") from None
    return model.to(device).eval()


def build_policy(cfg: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(policy, critic) for a policy_config: adaptive network pair, or the static table pair."""
    D = len(cfg["spec"])                                         # the actions' names: 4 (NAT) or 2 (ODE sampler)
    if cfg["kind"] == "static":
        return policy.StaticPolicy(cfg["T"], out_dim=D), policy.StaticPolicy(cfg["T"], out_dim=1)
    make = lambda out: policy.AdaptivePolicy(cfg["T"], cfg["C"], cfg["N"], cfg["pi_width"], hidden=cfg["pi_hidden"], out_dim=out)
    return make(D), make(1)


def load_policy(path: str, device: torch.device, weights: str = "best") -> tuple[torch.nn.Module, dict]:
    """The policy of a finished policy checkpoint and its config: weights "best" (by the FID network's
    training-set FID) or "model" (the last iterate)."""
    ck = load_ckpt(path)
    if not ck.get("done"):
        raise UserError(f"{path} is unfinished (iteration {ck.get('step')}): finish it with python train.py")
    try:
        pi, _ = build_policy(ck["config"])
        pi.load_state_dict(ck[weights])
    except (TypeError, KeyError, RuntimeError) as e:
        raise UserError(f"{path} does not match this code's policy ({type(e).__name__}: {str(e)[:120]}); "
                        f"delete it to retrain that stage") from None
    return pi.to(device).eval(), ck["config"]


def classifier_backbone(net: fid.FeatureNet, grad: bool = False, taps: tuple = (0, 1, 2)):
    """A frozen classifier as the discriminator's backbone (and the tokenizer's perceptual
    network): x -> its feature maps after the chosen pooling stages (0, 1, 2: (B, w, S/2, S/2),
    (B, 2w, S/4, S/4), (B, 4w, S/8, S/8)), and their channel counts; gradients flow to x only
    with grad=True. (A discriminator on the frozen VQ encoder reaches only ~55% held-out accuracy.)"""
    layers = list(net.body)
    pools = [i for i, layer in enumerate(layers) if isinstance(layer, (torch.nn.MaxPool2d, torch.nn.AvgPool2d))]
    keep = {pools[k] for k in taps}
    w = net.cfg.width

    def backbone(x: torch.Tensor) -> list[torch.Tensor]:
        feats, h = [], x
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            for i, layer in enumerate(layers[:max(keep) + 1]):
                h = layer(h)
                if i in keep:
                    feats.append(h)
        return feats
    return backbone, [[w, 2 * w, 4 * w][k] for k in sorted(taps)]


D_NETS = ("backbone", "dnet", "dssl")      # the frozen networks the discriminator may sit on (never a judge)


def d_backbone(run_dir: str, nets: str, taps: tuple, device: torch.device):
    """The discriminator's frozen backbone: the feature maps at `taps` of each network named in
    `nets` ("+"-separated, e.g. "backbone+dssl": heads on several backbones), concatenated as one
    list, and their channel counts."""
    names = nets.split("+")
    parts = [classifier_backbone(build_model(run_dir, n, device), taps=taps) for n in names]
    return (lambda x: [f for fn, _ in parts for f in fn(x)]), [ch for _, chs in parts for ch in chs]


W0_GRID = (0.0, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0)


def in_rows(fn, rows: int | None, *args: torch.Tensor) -> torch.Tensor:
    """fn(*args) on at most `rows` rows at a time, concatenated: the same result in less memory (the
    random numbers of a generation are drawn for the whole chunk, outside fn)."""
    n = args[0].shape[0]
    if not rows or n <= rows:
        return fn(*args)
    parts = [fn(*(a[i:i + rows] for a in args)) for i in range(0, n, rows)]
    if isinstance(parts[0], tuple):                                         # e.g. the NAT's (logits, features)
        return tuple(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)


class GeneratorPipeline:
    """What the NAT's and the flow's pipelines share: the run folder's config, the feature network (and
    the tokenizer `vq`, None for the flow),
    the rows per generator batch (`batch`, whose chunks key the random numbers) and per forward
    (`rows`, memory only), a forward counter, the fingerprint that keys cached results, and
    chunked generation shared over the ranks of a torchrun job."""

    vq = None

    def __init__(self, run_dir: str, device: torch.device, bf16: bool, batch: int | None, rows: int | None,
                 stages: tuple):
        self.run_dir, self.device, self.bf16 = run_dir, device, bf16
        self.batch = batch or (4096 if device.type == "cuda" else 500)   # rows per generator batch (x2 with CFG)
        self.rows = rows or None                                           # rows per forward (memory); None: whole batches
        self.config = read_json(os.path.join(run_dir, "config.json"))
        if not isinstance(self.config, dict):
            raise UserError(f"{run_dir}/config.json is unreadable: re-run python train.py --run-dir {run_dir}")
        self.featnet = build_model(run_dir, "featnet", device)
        self.forwards = 0
        # identifies weights + numerics: cached results are reused only for the same fingerprint
        self.fingerprint = f"{fingerprint(run_dir, stages)}|{device.type}|bf16={bf16 and device.type == 'cuda'}"
        self.eval_key = f"{self.fingerprint}|chunk={self.batch}"             # + how randomness is keyed: table caches

    def forward_rows(self, net, *args: torch.Tensor):
        """One generator forward on a batch, counted (image-forwards so far), autocast, in `rows` slices."""
        self.forwards += args[0].shape[0]
        with autocast(self.device, self.bf16):
            return in_rows(net, self.rows, *args)

    def chunked(self, labels: torch.Tensor, group: int, seed: int, make_chunk, schedule, desc: str = "",
                progress: bool = False) -> torch.Tensor:
        """make_chunk(labels of chunk j, its generator) for every chunk of `batch` rows (whole groups of
        `group`), each chunk's random numbers keyed by (seed, j), shared over the ranks, concatenated."""
        step = max(group, self.batch // group * group)                     # whole groups per chunk

        def run_chunk(j: int) -> torch.Tensor:                             # chunk j: rows [j step, (j + 1) step)
            g = torch.Generator(self.device).manual_seed(chunk_seed(seed, j))
            return make_chunk(labels[j * step:(j + 1) * step].to(self.device), g)
        return torch.cat(sharded_with_actions(-(-len(labels) // step), run_chunk, schedule, desc, progress))


class Pipeline(GeneratorPipeline):
    """The trained models of a run folder (tokenizer, NAT with EMA weights, feature network), and
    generation through them."""

    def __init__(self, run_dir: str, device: torch.device, bf16: bool = True, batch: int | None = None,
                 rows: int | None = None):
        super().__init__(run_dir, device, bf16, batch, rows, ("vq", "featnet", "nat"))
        self.vq = build_model(run_dir, "vq", device)
        self.net = build_model(run_dir, "nat", device, weights="ema")
        self.forward = self.net                                            # or its torch.compile (compile())
        self.cfg: nat.NATConfig = self.net.cfg
        if (self.cfg.vocab_size, self.cfg.num_tokens) != (self.vq.cfg.codebook_size, self.vq.num_tokens):
            raise UserError(f"{run_dir}: nat.pt expects {self.cfg.vocab_size} codes x {self.cfg.num_tokens} tokens but "
                                 f"vq.pt makes {self.vq.cfg.codebook_size} x {self.vq.num_tokens}; retrain the nat stage")

    def compile(self) -> None:
        """Generate through torch.compile of the transformer from now on (sample.py --compile)."""
        self.forward = torch.compile(self.net)

    def logits_fn(self, tokens: torch.Tensor, labels: torch.Tensor):
        return self.forward_rows(self.forward, tokens, labels)

    def generate(self, labels: torch.Tensor, T: int, schedule: nat.Schedule, seed: int, guided: bool = True,
                 progress: bool = False, group: int = 1, dedup: bool = False, lookahead: int = 1,
                 score_fn=None) -> torch.Tensor:
        """Generate tokens (n, N) for labels (n,) in chunks of `batch` rows, with any schedule (a
        heuristic table, a policy); each chunk's random numbers are keyed by (seed, chunk index) and
        the chunks are shared over the ranks of a torchrun job, so any number of processes makes
        the same tokens. guided=False skips the null-class forward (the schedule's w is ignored).
        group = G: consecutive blocks of G rows share their random numbers (nat.decode_step).
        dedup: one forward per distinct (tokens, label) row of a step (see `dedup_logits_fn`).
        lookahead, score_fn: nat.generate's look-ahead sampling (k candidates per transition)."""
        null = self.cfg.null_label if guided else None
        fn = dedup_logits_fn(self.logits_fn) if dedup else self.logits_fn
        make = lambda y, g: nat.generate(fn, y, T, schedule, self.cfg.mask_id, self.cfg.num_tokens, null, g, group,
                                         lookahead, score_fn).cpu()
        return self.chunked(labels, group, seed, make, schedule, f"T={T}", progress)

    def generate_tokens(self, labels: torch.Tensor, T: int, tau2_0: float, w_0: float, seed: int) -> torch.Tensor:
        """Generate tokens (n, N) for labels (n,) with the heuristic schedule (tau2_0, w_0)."""
        return self.generate(labels, T, nat.heuristic_schedule(T, tau2_0=tau2_0, w_0=w_0), seed, guided=w_0 != 0)

    W_GRID, sweep_file, sweep_what, sweep_info = W0_GRID, "sweep_w.json", "T=8", {"T": 8, "tau2_0": nat.ADANAT_TAU2_0}

    def sweep_images(self, labels: torch.Tensor, w_0: float) -> torch.Tensor:
        """The w_0 sweep's images: AdaNAT's heuristic (tau2_0 = 1, w = w_0 t/T) at T = 8, seed 0."""
        return self.decode(self.generate_tokens(labels, 8, nat.ADANAT_TAU2_0, w_0, seed=0))

    def candidate_images(self, labels: torch.Tensor, tables: torch.Tensor, seed: int, C: int, progress: bool) -> torch.Tensor:
        """Images of C interleaved (T, 4) schedules (candidate_fids), one forward per distinct row (dedup)."""
        tok = self.generate(labels, tables.shape[1], nat.table_schedule(tables), seed, group=C, progress=progress, dedup=True)
        return self.decode(tok)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Decode tokens (n, N) to float images (n, C, H, W) in [-1, 1] on the CPU."""
        return torch.cat([self.vq.detokenize(tokens[i:i + self.batch].to(self.device)).float().cpu()
                          for i in range(0, len(tokens), self.batch)])


def sharded_with_actions(n_chunks: int, run_chunk, schedule, desc: str = "", progress: bool = False) -> list:
    """sharded over the chunks of a generation; a PolicySchedule's executed actions are
    gathered with them, in chunk order, so its actions() cover every sample on every rank."""
    if not isinstance(schedule, policy.PolicySchedule):
        return sharded(n_chunks, run_chunk, desc, progress)
    outs = sharded(n_chunks, lambda j: (run_chunk(j), torch.stack(schedule.executed).cpu()), desc, progress)
    actions = [a for _, a in outs]                                     # (T, rows, D) per chunk
    schedule.finished, schedule.executed = actions[:-1], list(actions[-1])
    return [out for out, _ in outs]


def dedup_logits_fn(logits_fn):
    """logits_fn run once per distinct (tokens, label) row, its outputs copied to the duplicates.

    In a search update the candidates that perturb step t decode steps 0..t-1 exactly like the
    unperturbed schedule (same random numbers), so at step t only 1 + (candidates perturbed
    earlier) rows are distinct: about half the generator forwards of the update are skipped."""
    def fn(tokens: torch.Tensor, labels: torch.Tensor):
        key = torch.cat([tokens, labels[:, None]], 1)                     # (B, N+1)
        uniq, inv = torch.unique(key, dim=0, return_inverse=True)         # (U, N+1), (B,)
        logits, feats = logits_fn(uniq[:, :-1], uniq[:, -1])
        return logits[inv], feats[inv]
    return fn


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    return torch.arange(n) % num_classes


def sweep_w(pipe: GeneratorPipeline, ref, samples: int) -> dict:
    """Pick the guidance w_0 of the generator's start schedule (the NAT: AdaNAT's heuristic at T = 8; the
    flow: constant guidance, Euler, 8 steps) over pipe.W_GRID by FID against *training* statistics;
    written to pipe.sweep_file."""
    labels = balanced_labels(samples, pipe.cfg.num_classes)
    results = {}
    bar = tqdm(pipe.W_GRID, desc=f"w_0 sweep ({pipe.sweep_what}, {samples} samples)", disable=not DIST.main)
    for w_0 in bar:
        feats, _ = fid.extract(pipe.featnet, pipe.sweep_images(labels, w_0), device=pipe.device)
        results[w_0] = fid.fid_from_features(feats, ref.train_mu, ref.train_sigma)
        bar.set_postfix(fid=f"{results[w_0]:.2f}")
    best = min(results, key=results.get)
    if best == max(pipe.W_GRID):
        print(f"warning: the best w_0 is the largest of the grid {pipe.W_GRID}; extend it in pipeline.py")
    out = {"fingerprint": pipe.fingerprint, "samples": samples, "grid": list(pipe.W_GRID), **pipe.sweep_info,
           "train_fid": {str(k): v for k, v in results.items()}, "w_0": best}
    write_json(os.path.join(pipe.run_dir, pipe.sweep_file), out)
    barrier()                                                    # written before any rank reads it again
    print(f"w_0 sweep (FID vs training set, {pipe.sweep_what}): " + ", ".join(f"{k}: {v:.2f}" for k, v in results.items())
          + f" -> w_0 = {best}")
    return out


def get_w0(pipe: GeneratorPipeline, ref, samples: int) -> float:
    """The swept w_0 of this run's weights, sweeping first when there is none (or it is stale)."""
    saved = read_json(os.path.join(pipe.run_dir, pipe.sweep_file), {})
    if (saved.get("fingerprint"), saved.get("samples"), saved.get("grid")) == (pipe.fingerprint, samples, list(pipe.W_GRID)):
        return saved["w_0"]
    return sweep_w(pipe, ref, samples)["w_0"]


HELD_OUT = {"featnet2": "fid2", "featssl": "fd_ssl"}   # held-out judge -> its metric key: read by no choice


def judge_feats_key(split: str, metric: str) -> str:
    """fid_ref.pt's key of a held-out judge's features ("test2_feats" for featnet2, as older caches name them)."""
    return f"{split}2_feats" if metric == "fid2" else f"{split}_{metric}_feats"


class RealFeatures:
    """Feature-network features of real images: the 10 000 test images and 10 000 training images;
    and the references every table adds beside FID against the test images: FID against the
    tokenizer's reconstructions of the test images (`recon_*`; a generator that matched the token
    distribution exactly would score 0 there) and the Fréchet distance on each held-out judge
    (HELD_OUT: featnet2, the independent classifier, and featssl, the self-supervised network;
    `judges`, `held_out[key][split]` = (mu, sigma), when trained). `net2`, `test2_*`, `train2_*`
    name featnet2's.

    Cached in <run_dir>/fid_ref.pt, keyed by the fingerprints of the networks involved."""

    def __init__(self, run_dir: str, device: torch.device, featnet: torch.nn.Module, vq: torch.nn.Module | None = None):
        self.run_dir, self.device, self.featnet, self.vq = run_dir, device, featnet, vq   # device: where P/R run too
        path = os.path.join(run_dir, "fid_ref.pt")
        nets = tuple(s for s in ("featnet", "vq", *HELD_OUT) if s == "featnet" or is_done(os.path.join(run_dir, f"{s}.pt")))
        key = fingerprint(run_dir, nets)
        try:
            cached = torch.load(path, weights_only=True) if os.path.exists(path) else None
        except Exception:
            cached = None                                                  # unreadable cache: recompute
        self.judges = {HELD_OUT[s]: build_model(run_dir, s, device) for s in HELD_OUT if s in nets}
        if "vq" in nets and self.vq is None:
            self.vq = build_model(run_dir, "vq", device)
        if cached is None or cached.get("key") != key or "train_labels" not in cached:
            cached = self._compute(key)
            save_ckpt(path, cached)
        self.test_images, self.test_labels = cached["test_images"], cached["test_labels"]   # uint8, long
        self.test_feats, self.train_feats = cached["test_feats"], cached["train_feats"]     # (N, D)
        self.train_correct, self.train_labels = cached["train_correct"], cached["train_labels"]   # (N,) bool, long
        self.key = key
        self.test_mu, self.test_sigma = fid.statistics(self.test_feats)
        self.train_mu, self.train_sigma = fid.statistics(self.train_feats)
        stats = lambda k: fid.statistics(cached[k]) if k in cached else (None, None)
        self.recon_mu, self.recon_sigma = stats("recon_feats")
        self.held_out = {m: {split: stats(judge_feats_key(split, m)) for split in ("test", "train")} for m in self.judges}
        self.net2 = self.judges.get("fid2")
        (self.test2_mu, self.test2_sigma), (self.train2_mu, self.train2_sigma) = (
            self.held_out.get("fid2", {}).get(s, (None, None)) for s in ("test", "train"))

    @classmethod
    def of(cls, pipe) -> "RealFeatures":
        """The references of a generator pipeline's run folder, on its device and feature network."""
        return cls(pipe.run_dir, pipe.device, pipe.featnet, pipe.vq)

    def _compute(self, key: str) -> dict:
        c = read_json(os.path.join(self.run_dir, "config.json"))
        x_test, y_test, _ = data.load_dataset(c["data"], "test", c["img_size"], c["channels"], c["seed"])
        x_train, y_train, _ = data.load_dataset(c["data"], "train", c["img_size"], c["channels"], c["seed"])
        pick = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))[:10000]
        test, train_x = data.to_float(x_test), data.to_float(x_train[pick])
        test_feats, _ = fid.extract(self.featnet, test, device=self.device)
        train_feats, train_logits = fid.extract(self.featnet, train_x, device=self.device)
        out = {"key": key, "test_images": x_test, "test_labels": y_test, "test_feats": test_feats,
               "train_feats": train_feats, "train_correct": train_logits.argmax(1) == y_train[pick], "train_labels": y_train[pick]}
        if self.vq is not None:                                            # the tokenizer's reconstructions of test
            out["recon_feats"] = fid.extract(self.featnet, reconstruct(self.vq, test, self.device), device=self.device)[0]
        for m, net in self.judges.items():                                 # featnet2's keep their old names
            for split, x in (("test", test), ("train", train_x)):
                out[judge_feats_key(split, m)] = fid.extract(net, x, device=self.device)[0]
        return out


@torch.no_grad()
def reconstruct(vq: torch.nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The tokenizer's reconstructions of images x (n, C, H, W) in [-1, 1], 500 at a time: float, on the CPU."""
    return torch.cat([vq.detokenize(vq.tokenize(x[i:i + 500].to(device))).float().cpu() for i in range(0, len(x), 500)])


def judge_fids(ref: RealFeatures, images: torch.Tensor, split: str, feats: torch.Tensor | None = None,
               fid_net: bool = False) -> dict:
    """The Fréchet distance of images against the `split` ("test" or "train") statistics on each held-out
    judge {"fid2", "fd_ssl"}, and with fid_net on the FID network too ("fid"; its features `feats` if given)."""
    out = {}
    if fid_net:
        feats = feats if feats is not None else fid.extract(ref.featnet, images, device=ref.device)[0]
        mu, sigma = (ref.test_mu, ref.test_sigma) if split == "test" else (ref.train_mu, ref.train_sigma)
        out["fid"] = fid.fid_from_features(feats, mu, sigma)
    for m, net in ref.judges.items():
        out[m] = fid.fid_from_features(fid.extract(net, images, device=ref.device)[0], *ref.held_out[m][split])
    return out


PI_STARTS = {"heuristic": "AdaNAT's heuristic", "search": "the AutoNAT table", "param": "the searched family"}


PI_REWARDS = ("adversarial", "fixed", "fid")


def policy_file(kind: str, start: str, T: int, reward_name: str = "adversarial") -> str:
    """policy_T8; policy_search_T8 for a policy whose residual starts from the searched table;
    policy_fixed_T8 / policy_fid_T8 for one trained on another reward (the reward-hacking study)."""
    parts = [kind] + ([start] if start != "heuristic" else []) + ([reward_name] if reward_name != "adversarial" else [])
    return "_".join(parts) + f"_T{T}"


def searched_table(pipe, name: str, T: int) -> tuple | None:
    """(table (T, 4), config, fingerprint) of a finished search `name` ("search" or "param") for T, or None."""
    path = os.path.join(pipe.run_dir, f"{name}_T{T}.pt")
    if not os.path.exists(path):
        return None
    ck = load_ckpt(path)
    if not ck.get("done"):
        return None
    return ck["table"], ck["config"], fingerprint(pipe.run_dir, (f"{name}_T{T}",))


def plot_panels(path: str, panels: list[dict], title: str = "", size: tuple = (300, 200)) -> None:
    """Line plots drawn with Pillow, one panel each, side by side.

    panel = {"title": str, "series": [{"x": [...], "y": [...], "color": (r, g, b),
             "dashed": bool, "band": (lo list, hi list) or None, "label": str}]}"""
    W, H = size
    ml, mr, mt, mb = 46, 10, 22, 22                                       # margins: left, right, top, bottom
    img = Image.new("RGB", (W * len(panels), H + (18 if title else 0)), "white")
    d = ImageDraw.Draw(img)
    if title:
        d.text((6, 2), title, fill="black")
    for p_i, panel in enumerate(panels):
        ox, oy = p_i * W, 18 if title else 0
        xs = [x for s in panel["series"] for x in s["x"]]
        ys = [y for s in panel["series"] for y in s["y"] if y == y]
        ys += [v for s in panel["series"] if s.get("band") for part in s["band"] for v in part]
        if not xs or not ys:
            continue
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        y0, y1 = min(ys), max(ys)
        pad = (y1 - y0) * 0.05 or abs(y0) * 0.05 or 1.0
        y0, y1 = y0 - pad, y1 + pad
        px = lambda x: ox + ml + (x - x0) / (x1 - x0) * (W - ml - mr)
        py = lambda y: oy + mt + (y1 - y) / (y1 - y0) * (H - mt - mb)
        d.rectangle([ox + ml, oy + mt, ox + W - mr, oy + H - mb], outline=(160, 160, 160))
        d.text((ox + ml, oy + 6), panel["title"], fill="black")
        d.text((ox + 2, oy + mt - 4), f"{y1:.3g}", fill=(90, 90, 90))
        d.text((ox + 2, oy + H - mb - 8), f"{y0:.3g}", fill=(90, 90, 90))
        d.text((ox + ml, oy + H - mb + 4), f"{x0:g}", fill=(90, 90, 90))
        d.text((ox + W - mr - 24, oy + H - mb + 4), f"{x1:g}", fill=(90, 90, 90))
        for s in panel["series"]:
            if s.get("band"):
                lo, hi = s["band"]
                poly = [(px(x), py(v)) for x, v in zip(s["x"], hi)] + [(px(x), py(v)) for x, v in reversed(list(zip(s["x"], lo)))]
                d.polygon(poly, fill=tuple(int(255 - (255 - c) * 0.25) for c in s["color"]))
            pts = [(px(x), py(y)) for x, y in zip(s["x"], s["y"]) if y == y]
            for k, (a, b) in enumerate(zip(pts, pts[1:])):
                if not s.get("dashed") or k % 2 == 0:
                    d.line([a, b], fill=s["color"], width=2)
            if len(pts) == 1 or s.get("dashed"):
                for x, y in pts:
                    d.ellipse([x - 2, y - 2, x + 2, y + 2], outline=s["color"])
    if DIST.main:
        img.save(path)


def plot_training(history: list[dict], path: str, name: str) -> None:
    """The policy stage's curves per iteration: reward, D's accuracy and steps, approx_kl, the residual's size,
    and the training-set Fréchet distance on every network (the FID network, featnet2, the SSL judge)."""
    panels = []
    for key, color in (("reward", (200, 60, 30)), ("d_acc", (30, 90, 200)), ("d_steps", (30, 90, 200)),
                       ("approx_kl", (120, 60, 160)), ("residual_rms", (120, 60, 160)), ("train_fid", (20, 140, 60)),
                       ("train_fid2", (20, 140, 60)), ("train_fd_ssl", (20, 140, 60))):
        pts = [(r["iter"], r[key]) for r in history if key in r]
        panels.append({"title": key, "series": [{"x": [p[0] for p in pts], "y": [p[1] for p in pts], "color": color}]})
    plot_panels(path, panels, title=f"{name}: per PPO iteration (train_fid vs training-set statistics)")


def setup(c: TrainConfig, run_dir: str, device: torch.device, name: str, outputs: int | None, sizes: dict, lr: float,
          batch: int, batch_key: str, seed_offset: int) -> tuple:
    """What a frozen network's training starts from: the training and test sets, a fid.FeatureNet of the
    given sizes (outputs: its classifier width, None: the number of classes), its Adam, the checkpoint
    state (resumed if there is one) and this rank's batch stream."""
    x_train, y_train, num_classes = data.load_dataset(c.data, "train", c.img_size, c.channels, c.seed)
    x_test, y_test, _ = data.load_dataset(c.data, "test", c.img_size, c.channels, c.seed)
    cfg = fid.FeatureNetConfig(in_ch=c.channels, num_classes=outputs or num_classes, img_size=c.img_size, **sizes)
    torch.manual_seed(c.seed + seed_offset)
    model = fid.FeatureNet(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    modules = {"model": model, "optim": opt}
    path = os.path.join(run_dir, f"{name}.pt")
    state = {**resume(path, to_plain(cfg), modules), "config": to_plain(cfg), "done": False}
    g = torch.Generator().manual_seed(rank_seed(c.seed + seed_offset + state["step"]))
    it = data.batches(x_train, y_train, rank_batch(batch, batch_key), g, infinite=True)
    return x_train, y_train, x_test, y_test, model, opt, modules, path, state, g, it


def train_classifier(c: TrainConfig, run_dir: str, device: torch.device, log: Logger, name: str, sizes: dict,
                     steps: int, seed_offset: int) -> None:
    """Train a fid.FeatureNet classifier of the given sizes into <name>.pt (Adam, flip + shift)."""
    x_train, y_train, x_test, y_test, model, opt, modules, path, state, g, it = setup(
        c, run_dir, device, name, None, sizes, c.feat_lr, c.feat_batch, "feat_batch", seed_offset)
    net = data_parallel(model, device)                    # (batch-norm statistics per rank, rank 0's buffers kept)

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
        loss_v = all_mean(loss.detach()).item()
        check_finite(loss=loss_v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc = (logits.argmax(1).cpu() == yb).float().mean()
        return {"loss": loss_v, "acc": all_mean(acc.to(device)).item()}

    state = train_loop(name, path, state, modules, step_fn, steps, c, log)
    _, logits = fid.extract(model, data.to_float(x_test), device=device)
    acc = (logits.argmax(1) == y_test).float().mean().item()
    state["metrics"] = {"test_acc": acc}
    state["done"] = True
    save_ckpt(path, state)
    log(stage=name, final=True, test_acc=acc)
    print(f"{name}: test accuracy {acc:.4f}")


def train_simclr(c: TrainConfig, run_dir: str, device: torch.device, log: Logger, name: str, sizes: dict,
                 seed_offset: int) -> None:
    """Train a fid.FeatureNet by SimCLR (fid.nt_xent on two fid.views of each image, no labels)
    into <name>.pt; report the k-NN (k = 20) test accuracy of its features (how much class they hold)."""
    x_train, y_train, x_test, y_test, model, opt, modules, path, state, g, it = setup(
        c, run_dir, device, name, c.ssl_proj, sizes, c.ssl_lr, c.ssl_batch, "ssl_batch", seed_offset)
    net = data_parallel(model, device)

    def step_fn(step: int) -> dict:
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, c.ssl_steps, c.ssl_lr, c.feat_warmup)
        x = data.to_float(next(it)[0]).to(device)                          # (B, C, H, W)
        net.train()
        z = net(torch.cat([fid.views(x, g), fid.views(x, g)]))       # (2B, ssl_proj): one forward, one sync
        loss = fid.nt_xent(*z.chunk(2), tau=c.ssl_tau)
        loss_v = all_mean(loss.detach()).item()
        check_finite(loss=loss_v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss_v}

    state = train_loop(name, path, state, modules, step_fn, c.ssl_steps, c, log)
    f_train, _ = fid.extract(model, data.to_float(x_train), device=device)
    f_test, _ = fid.extract(model, data.to_float(x_test), device=device)
    acc = fid.knn_accuracy(f_train, y_train, f_test, y_test)
    state["metrics"] = {"test_knn_acc": acc}
    state["done"] = True
    save_ckpt(path, state)
    log(stage=name, final=True, test_knn_acc=acc)
    print(f"{name}: k-NN (k = 20) test accuracy of its features {acc:.4f}")


def policy_config(c: TrainConfig, kind: str, T: int, h: torch.Tensor, C: int, N: int) -> dict:
    """What a policy checkpoint needs to be rebuilt and resumed: the kind, T, the heuristic
    table its residual starts from, the network sizes and the training hyper-parameters."""
    return {"kind": kind, "T": T, "heuristic": h.tolist(), "C": C, "N": N,
            "beta_ema": c.pi_beta_ema if kind == "smooth" else 0.0,
            **{k: v for k, v in to_plain(c).items() if k.startswith("pi_") and k not in ("pi_T", "pi_beta_ema")}}


def start_table(pipe, start: str, T: int, w_0: float) -> torch.Tensor:
    """The (T, 4) schedule a policy's zero residual reproduces: AdaNAT's heuristic (tau2_0 = 1,
    w = w_0 t/T), or a finished AutoNAT search of this run ("search": the free table, "param":
    the family), AdaNAT's "residual on the best hand-made schedule" taken one step further."""
    if start == "heuristic":
        return nat.heuristic_table(T, nat.ADANAT_TAU2_0, w_0)
    found = searched_table(pipe, start, T)
    if found is None:
        stage = "search" if start == "search" else "param-search"
        raise UserError(f"pi_start={start}: {pipe.run_dir} has no finished {start}_T{T}.pt; run python train.py "
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
    pipe = Pipeline(run_dir, device, c.bf16, rows=c.gen_rows)
    ref = RealFeatures.of(pipe)
    w_0 = get_w0(pipe, ref, c.pi_sweep_samples)
    cfg = pipe.cfg

    def reals():                                    # raw training images, or (pi_d_real = recon) their reconstructions
        x, y = real_images(c)
        if c.pi_d_real == "recon":
            x = reconstruct(pipe.vq, x, device)
        return x, y

    task = PolicyTask(
        name=policy_file(kind, c.pi_start, T, c.pi_reward), T=T, spec=policy.NAT_ACTIONS, h=start_table(pipe, c.pi_start, T, w_0),
        start=f"{PI_STARTS[c.pi_start]} (w_0 = {w_0:g})", C=cfg.dim, N=cfg.num_tokens, num_classes=cfg.num_classes,
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
    classifier: torch.nn.Module          # the frozen backbone classifier (r_fid's logits)
    backbone: Callable                   # images -> D's frozen feature maps (pi_d_nets at pi_d_taps)
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
        self.pi_dp, self.V_dp, self.D_dp = (data_parallel(m, self.device) for m in (self.pi, self.V, self.D))

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
    pi, V = (m.to(device) for m in build_policy(pcfg))
    classifier = build_model(run_dir, "backbone", device)                 # r_fid's classifier
    for name in c.pi_d_nets.split("+"):
        if not os.path.exists(os.path.join(run_dir, f"{name}.pt")):
            raise UserError(f"pi_d_nets={c.pi_d_nets}: {run_dir}/{name}.pt is missing; train it with python train.py "
                                 f"--run-dir {run_dir} --stage {name}")
    backbone, channels = d_backbone(run_dir, c.pi_d_nets, c.pi_d_taps, device)   # D's frozen backbone
    D = reward.ProjectedDiscriminator(channels, task.num_classes).to(device)
    base = fidelity_base(run_dir, device, task, pcfg, (pi, V, D)) if kind == "fidelity" else None
    B = rank_batch(c.pi_batch, "pi_batch")                                   # this rank's trajectories
    if B % c.pi_group:
        raise UserError(f"pi_group {c.pi_group} must divide each process's share of pi_batch ({B} of {c.pi_batch})")
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
        raise UserError(f"the fidelity stage blends with the adaptive policy {base_path}, which is missing: "
                             f"run python train.py --run-dir {run_dir} --stage policy first")
    base, base_cfg = load_policy(base_path, device)
    if base_cfg["heuristic"] != task.h.tolist() or base_cfg["beta_ema"] != 0:
        raise UserError(f"{base_path} starts from another schedule than this run's (the w_0 sweep changed since) or "
                             f"smooths its actions: the blend needs both policies on the same start; retrain it")
    pcfg["base"] = base_name
    if not os.path.exists(os.path.join(run_dir, f"{task.name}.pt")):   # start: the main policy, critic and D
        main = load_ckpt(base_path)
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
            feats = all_cat(fid.extract(pipe.featnet, fake, device=fake.device)[0].to(fake.device)).cpu()
            return my_rows(chunk_fid_reward(feats, ref, c.pi_fid_chunk)).to(fake.device)
        return chunk_fid
    if c.pi_reward == "fixed":
        return lambda r_adv, r_fid, fake, lam: r_fid
    return lambda r_adv, r_fid, fake, lam: r_adv


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


STAGES = ["backbone", "vq", "featnet", "featnet2", "featssl", "nat", "policy", "static", "smooth"]   # --stage all


# ----------------------------------------------------------------------------- stages

def stage_backbone(c: TrainConfig, run_dir: str, device: torch.device, log: Logger) -> None:
    """A second classifier (other width and seed, shorter training): the frozen backbone the
    policy's discriminator reads (reward.py). The FID network itself must not be the reward."""
    train_classifier(c, run_dir, device, log, "backbone", dict(width=c.backbone_width, feat_dim=c.backbone_dim), c.backbone_steps, 7)


def stage_vq(c: TrainConfig, run_dir: str, device: torch.device, log: Logger) -> None:
    """Train the VQ tokenizer: L = |x - G(z_q)| + (x - G(z_q))^2 + L_vq (+ hinge GAN)."""
    x_train, _, _ = data.load_dataset(c.data, "train", c.img_size, c.channels, c.seed)
    x_test, _, _ = data.load_dataset(c.data, "test", c.img_size, c.channels, c.seed)
    cfg = vq_config(c)
    model = vqgan.VQModel(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=c.vq_lr, betas=(0.5, 0.9))
    disc = vqgan.PatchDiscriminator(c.channels, cfg.disc_ch).to(device) if c.vq_gan_weight > 0 else None
    opt_d = torch.optim.Adam(disc.parameters(), lr=c.vq_lr, betas=(0.5, 0.9)) if disc else None
    modules = {"model": model, "optim": opt, **({"disc": disc, "optim_d": opt_d} if disc else {})}
    path = os.path.join(run_dir, "vq.pt")
    state = {**resume(path, to_plain(cfg), modules), "config": to_plain(cfg), "done": False}
    g = torch.Generator().manual_seed(rank_seed(c.seed + 1 + state["step"]))   # each rank its own batches
    it = data.batches(x_train, y=torch.zeros(len(x_train), dtype=torch.long), batch_size=rank_batch(c.vq_batch, "vq_batch"),
                      generator=g, infinite=True)
    # torchrun: the quantizer syncs itself (usage summed, rank 0's codebook broadcast: vqgan.py), so DDP must not
    # overwrite the per-rank usage counts with rank 0's buffers
    net = DistributedDataParallel(model, broadcast_buffers=False) if DIST.world > 1 else model
    disc_dp = data_parallel(disc, device) if disc is not None else None
    if c.vq_perceptual > 0:                            # L_P on the frozen backbone classifier (not the FID network)
        if not os.path.exists(os.path.join(run_dir, "backbone.pt")):
            raise UserError(f"vq_perceptual > 0 needs the backbone classifier: run python train.py --run-dir {run_dir} "
                            f"--stage backbone first")
        percep, _ = classifier_backbone(build_model(run_dir, "backbone", device).requires_grad_(False), grad=True)

    def step_fn(step: int) -> dict:
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, c.vq_steps, c.vq_lr, c.vq_warmup)
        x = augment(data.to_float(next(it)[0]).to(device), g)          # (B, C, H, W)
        x_rec, codes, vq_loss, z_e = net(x)
        rec = (x_rec - x).abs().mean() + F.mse_loss(x_rec, x)
        loss = rec + vq_loss
        out = {"mse": all_mean(F.mse_loss(x_rec, x).detach()).item()}
        if c.vq_perceptual > 0:
            with torch.no_grad():
                f_x = percep(x)
            l_p = vqgan.perceptual_loss(f_x, percep(x_rec))
            loss = loss + c.vq_perceptual * l_p
            out["percep"] = all_mean(l_p.detach()).item()
        out["loss"] = all_mean(loss.detach()).item()
        check_finite(loss=out["loss"])                                   # before the update (a value logged anyway)
        if disc is not None and step >= c.vq_gan_start:
            g_loss = vqgan.hinge_g_loss(disc(x_rec))                     # D's gradients here are zeroed below
            loss = loss + c.vq_gan_weight * g_loss
            out["g_loss"] = g_loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if disc is not None and step >= c.vq_gan_start:
            logits = disc_dp(torch.cat([x, x_rec.detach()]))              # one forward: one DDP gradient sync
            d_loss = vqgan.hinge_d_loss(*logits.chunk(2))
            out["d_loss"] = d_loss.item()
            check_finite(d_loss=out["d_loss"])
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        if (step + 1) % c.vq_restart_every == 0 and step < 0.8 * c.vq_steps:
            out["restarted"] = model.vq.restart_dead_codes(z_e.detach().permute(0, 2, 3, 1).reshape(-1, cfg.code_dim))
        return out

    state = train_loop("vq", path, state, modules, step_fn, c.vq_steps, c, log)
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
    save_ckpt(path, state)
    log(stage="vq", final=True, **state["metrics"])
    print("vq:", json.dumps({k: round(v, 4) for k, v in state["metrics"].items()}))


def stage_featnet(c: TrainConfig, run_dir: str, device: torch.device, log: Logger) -> None:
    """Train the FID feature network as a classifier (flip + shift augmentation)."""
    train_classifier(c, run_dir, device, log, "featnet", dict(width=c.featnet_width, feat_dim=c.featnet_dim), c.featnet_steps, 2)


def stage_featnet2(c: TrainConfig, run_dir: str, device: torch.device, log: Logger) -> None:
    """A held-out judge: an independent FID network (average pooling, its own feature width and seed,
    as wide and trained as long as featnet), so that schedules chosen on the FID network, or a
    policy trained on its FID (AdaGen §III-D), are judged on features no choice has seen."""
    train_classifier(c, run_dir, device, log, "featnet2",
                     dict(width=c.featnet2_width, feat_dim=c.featnet2_dim, convs=c.featnet2_convs, pool="avg"), c.featnet2_steps, 13)


def stage_featssl(c: TrainConfig, run_dir: str, device: torch.device, log: Logger) -> None:
    """The self-supervised held-out judge (SimCLR on the training images, no labels): a third FID column."""
    train_simclr(c, run_dir, device, log, "featssl", dict(width=c.ssl_width, feat_dim=c.ssl_dim), 23)


def stage_dnet(c: TrainConfig, run_dir: str, device: torch.device, log: Logger) -> None:
    """A candidate backbone of the discriminator: the backbone classifier, wider and trained longer."""
    train_classifier(c, run_dir, device, log, "dnet", dict(width=c.dnet_width, feat_dim=c.dnet_dim), c.dnet_steps, 17)


def stage_dssl(c: TrainConfig, run_dir: str, device: torch.device, log: Logger) -> None:
    """A candidate backbone of the discriminator: a second SimCLR network (one conv per stage, average pooling,
    another seed)."""
    train_simclr(c, run_dir, device, log, "dssl", dict(width=c.ssl_width, feat_dim=c.ssl_dim, convs=1, pool="avg"), 29)


@torch.no_grad()
def tokenize_dataset(vq: vqgan.VQModel, x: torch.Tensor, y: torch.Tensor, device: torch.device):
    """Tokens (2M, N) of the M images and of their mirror images (flip augmentation), labels (2M,)."""
    out = {False: [], True: []}
    for i in tqdm(range(0, len(x), 1000), desc="tokenize", leave=False, disable=not DIST.main):
        xb = data.to_float(x[i:i + 1000]).to(device)
        for flip in (False, True):
            out[flip].append(vq.tokenize(xb.flip(-1) if flip else xb).cpu())
    return torch.cat(out[False] + out[True]), y.repeat(2)


def stage_nat(c: TrainConfig, run_dir: str, device: torch.device, log: Logger) -> None:
    """Train the NAT on tokens with the masked-token loss; keep an EMA of the weights."""
    x_train, y_train, num_classes = data.load_dataset(c.data, "train", c.img_size, c.channels, c.seed)
    vq = build_model(run_dir, "vq", device)
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
    state = {**resume(path, to_plain(cfg), modules), "config": to_plain(cfg), "done": False}
    g = torch.Generator().manual_seed(rank_seed(c.seed + 3 + state["step"]))   # each rank its own batches
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
        out = generator_step(model, ema, opt, loss, step, c.nat_ema_decay)
        return {"loss": out["loss"], "lr": lr, "grad_norm": out["grad_norm"]}

    state = train_loop("nat", path, state, modules, step_fn, c.nat_steps, c, log)
    state["done"] = True
    save_ckpt(path, state)
    print(f"nat: done, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")


# ----------------------------------------------------------------------------- policies: AdaNAT Algorithm 1

def sigma_at(c: TrainConfig, it: int) -> float:
    """Exploration std of iteration `it`: linear pi_sigma0 -> pi_sigma1, or a step at the half."""
    if c.pi_sigma_schedule == "step":
        return c.pi_sigma0 if it < c.pi_iters // 2 else c.pi_sigma1
    return c.pi_sigma0 + (c.pi_sigma1 - c.pi_sigma0) * it / max(1, c.pi_iters - 1)


def advantages(c: TrainConfig, R_all: torch.Tensor, value: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(returns, advantages), each (T*B,) step-major, from the global batch's terminal rewards R_all:
    R_hat = R normalised by max(std, pi_adv_floor), A = R_hat - V_old (AdaNAT Eq. 12; pi_group = 1) or
    A = R minus its group's mean, divided the same way (GRPO-style; pi_group > 1)."""
    G, floor = c.pi_group, c.pi_adv_floor
    ret = my_rows(ppo.normalise(R_all, floor)).repeat(T)
    if G == 1:
        return ret, ret - value
    A = (R_all.view(-1, G) - R_all.view(-1, G).mean(1, keepdim=True)).flatten()
    return ret, my_rows(A / (A.std().clamp_min(floor) + 1e-8)).repeat(T)


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
        r_fid = reward.fidelity_reward(L.classifier(fake), labels)       # the frozen classifier's log p(y|x): (B,)
        R = reward_fn(r_adv, r_fid, fake, lam)
        d_acc = reward.accuracy(L.D(L.f_hold, L.y_hold), logits_fake)
    out = {"reward": mean_over_ranks(R.mean()), "r_adv": mean_over_ranks(r_adv.mean()),
           "r_fid": mean_over_ranks(r_fid.mean()), "d_acc": mean_over_ranks(d_acc), "sigma": sigma}
    check_finite(reward=out["reward"])
    return ro, fake, labels, R, out


def mean_over_ranks(x) -> float:
    """A number (or 0-d tensor) averaged over the ranks of a torchrun job."""
    return all_mean(torch.as_tensor(x, dtype=torch.float32, device=current_device())).item()


def ppo_step(L: Learner, ro: policy.Rollout, R_all: torch.Tensor, sigma: float, g_cpu: torch.Generator) -> dict:
    """Algorithm 1, step 3: advantages (AdaNAT Eq. 12) and the PPO update (Eq. 11) on one rollout, with
    the anchor pi_anchor * mean ||eta(s)||^2 pulling the residual toward its start schedule."""
    c = L.c
    ret, adv = advantages(c, R_all, ro.value, L.task.T)
    adv_abs = mean_over_ranks(adv.abs().mean())                            # the step size PPO is given
    check_finite(advantage=adv_abs)
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
    stats["explained_var"] = ppo.explained_variance(all_cat(ro.value), all_cat(ret))
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
    seed = rank_seed(c.seed * 100003 + it)                 # per iteration (resumable) and rank
    g, g_cpu = torch.Generator(L.device).manual_seed(seed), torch.Generator().manual_seed(seed)
    ro, fake, labels, R, out = rollout_and_reward(L, sigma, g, reward_fn)  # 1-2
    out["sec_rollout"] = time.time() - t0
    if it == c.pi_d_warmup:                                                # D after its warm-up: kept for the reward check
        state["disc_warmup"], state["d_acc_warmup"] = copy.deepcopy(L.D.state_dict()), out["d_acc"]
        print(f"{L.task.name}: D's held-out accuracy after its warm-up: {out['d_acc']:.3f}")
    t0 = time.time()
    if it >= c.pi_d_warmup:
        out.update(ppo_step(L, ro, all_cat(R), sigma, g_cpu))          # 3
    out["sec_ppo"], t0 = time.time() - t0, time.time()
    state["replay"] = (state.get("replay") or [])[-(c.pi_d_replay - 1):] if c.pi_d_replay > 1 else []
    state["replay"].append((fake.cpu(), labels.cpu()))                     # this rollout joins D's replay
    out["d_steps"] = state.setdefault("d_steps", c.pi_d_steps) if it >= c.pi_d_warmup else c.pi_d_warmup_steps
    out["d_loss"] = d_update(L, state, out["d_steps"], sigma, g, g_cpu)   # 4
    out["sec_d"] = time.time() - t0
    check_finite(d_loss=out["d_loss"])                                # a non-finite D is never saved (train_loop)
    if it >= c.pi_d_warmup and c.pi_d_acc_band:                            # keep D's accuracy on current fakes in the band
        lo, hi = c.pi_d_acc_band
        state["d_steps"] = min(c.pi_d_steps_max, out["d_steps"] + 1) if out["d_acc"] < lo else \
            max(1, out["d_steps"] - 1) if out["d_acc"] > hi else out["d_steps"]
    for j, a in enumerate(L.task.spec.names):                              # per-sample spread of each action
        out[f"{a}_sd"] = ro.actions[:, :, j].std(1).mean().item()
    out["act_mean"] = [[round(v, 5) for v in row] for row in ro.actions.mean(1).tolist()]   # (T, D) per step
    return out


def train_policy(c: TrainConfig, run_dir: str, device: torch.device, log: Logger, kind: str, task: PolicyTask,
                 pipe, ref) -> None:
    """Train one policy of `kind` on `task` with Algorithm 1 (`algorithm1`), keeping the best weights.

    kind: "policy" (adaptive), "static" (the learnable table), "smooth" (adaptive with EMA
    action smoothing beta_ema = pi_beta_ema) or "fidelity" (AdaGen §III-F2: a second adaptive
    policy blended with the frozen adaptive one by lam ~ U(0, 1) per trajectory group, Eq. 14,
    rewarded (1 - lam) r_adv + lam r_fid, Eq. 15). The policy starts as a zero residual on
    task.h. Every pi_fid_every iterations the mean policy's FID against *training* statistics is
    measured; the best weights are kept (the fidelity policy: the last). The reward: reward_hook."""
    c = recipe(c)                                                         # pi_recipe = official: the release's PPO
    c = dataclasses.replace(c, pi_iters=max(1, c.pi_iters * 4 // task.T))  # pi_iters at T = 4: the same forwards at any T
    L, pcfg, modules = build_learner(c, run_dir, device, kind, task)
    name, path = task.name, os.path.join(run_dir, f"{task.name}.pt")
    state = {"history": [], "best": None, "best_fid": None, **resume(path, pcfg, modules), "config": pcfg, "done": False}
    x_real, y_real = task.reals()                  # D's reals: 10 000 training images (pi_d_real = recon: reconstructions)
    n_hold = min(1000, len(x_real) // 10)          # ... and 1 000 held out for D's accuracy
    L.x_real, L.y_real = x_real[n_hold:], y_real[n_hold:]
    L.f_hold, L.y_hold = L.backbone(x_real[:n_hold].to(device)), y_real[:n_hold].to(device)   # the backbone is frozen
    fid_labels = balanced_labels(c.pi_fid_samples, task.num_classes)

    def train_fids() -> dict:
        """The mean policy's (seed 0, fixed labels) Fréchet distances against training-set statistics on every
        network: "train_fid" (the FID network: the checkpoint choice), "train_fid2", "train_fd_ssl" (judges: logged only)."""
        t0 = time.time()
        fids = judge_fids(ref, task.fid_images(fid_labels, L.schedule()), "train", fid_net=True)
        return {"train_" + k if k != "fid" else "train_fid": v for k, v in fids.items()} | {"sec_fid": time.time() - t0}

    if state["best"] is None:                                   # iteration 0: the start schedule itself
        first = train_fids()
        state["best_fid"], state["best"] = first["train_fid"], copy.deepcopy(L.pi.state_dict())
        state["history"].append({"iter": 0, **first})
        print(f"{name}: start = {task.start}, training-set FID {state['best_fid']:.2f}")
    reward_fn = reward_hook(c, kind, pipe, ref)

    def step_fn(it: int) -> dict:
        out = algorithm1(L, state, it, reward_fn)
        record = {"iter": it + 1, **out}
        if (it + 1) % c.pi_fid_every == 0 or it + 1 == c.pi_iters:
            L.pi.eval()
            fids = train_fids()
            record.update(fids), out.update(fids)
            if record["train_fid"] < state["best_fid"] or kind == "fidelity":
                state["best_fid"], state["best"] = record["train_fid"], copy.deepcopy(L.pi.state_dict())
        state["history"].append(record)
        return out

    state = train_loop(name, path, state, modules, step_fn, c.pi_iters, dataclasses.replace(c, log_every=1), log)
    state["done"] = True
    state.pop("replay", None)                                               # D's replay is only needed to resume
    its = [r for r in state["history"][1:] if "sec_d" in r]
    state["time_split"] = {k: sum(r.get(k, 0.0) for r in its) / max(1, len(its))
                           for k in ("sec_rollout", "sec_ppo", "sec_d", "sec_fid", "d_steps")}
    save_ckpt(path, state)
    plot_training(state["history"], os.path.join(run_dir, f"{name}_curve.png"), name)
    print(f"{name}: per iteration, mean over {len(its)}: " + ", ".join(f"{k} {v:.2f}" for k, v in state["time_split"].items()))
    which = "training-set FID at lam = 1 (last weights kept)" if kind == "fidelity" else "best training-set FID"
    print(f"{name}: done, {which} {state['best_fid']:.2f} (start {state['history'][0]['train_fid']:.2f}); "
          f"curve in {name}_curve.png")


def stage_policies(kind: str, make_task: Callable = None, counts: Callable = lambda c: c.pi_T,
                   file: Callable = lambda c, kind, n: policy_file(kind, c.pi_start, n, c.pi_reward)):
    """The stage function for one policy kind: a policy per count (the NAT: T in pi_T; the ODE
    sampler: NFE budgets, experiments/flow_train.py) built by make_task(c, run_dir, device, kind,
    n) (default nat_task) and trained by train_policy; finished ones skipped."""
    def stage(c: TrainConfig, run_dir: str, device: torch.device, log: Logger) -> None:
        for n in counts(c):
            path = os.path.join(run_dir, f"{file(c, kind, n)}.pt")
            if is_done(path):
                print(f"{path}: done, skipped")
                continue
            train_policy(c, run_dir, device, log, kind, *(make_task or nat_task)(c, run_dir, device, kind, n))
    return stage


STAGE_FNS = {"backbone": stage_backbone, "vq": stage_vq, "featnet": stage_featnet, "featnet2": stage_featnet2,
             "featssl": stage_featssl, "dnet": stage_dnet, "dssl": stage_dssl, "nat": stage_nat,
             **{kind: stage_policies(kind) for kind in POLICY_STAGES}}
OPTIONAL_STAGES = ["dnet", "dssl", "fidelity"]                     # run only when named


# ----------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None, stages: dict | None = None, default: list | None = None,
         doc: str = __doc__) -> None:
    """The command line. An experiment's script (experiments/*.py) passes its own stages (name -> function(c,
    run_dir, device, log)) and the ones `--stage all` runs; the core's stages stay available to it."""
    stage_fns = {**STAGE_FNS, **(stages or {})}
    default = default or STAGES
    named = [s for s in stage_fns if s not in default]
    p = argparse.ArgumentParser(description=doc.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)} (default: the run folder's, else small)")
    p.add_argument("--stage", default="all", help=f"all (= {', '.join(default)}) or one of them, or {', '.join(named)}")
    p.add_argument("--run-dir", default=None, help="run folder (default runs/<preset>)")
    p.add_argument("--data", default=None, help="Fashion-MNIST idx folder, a folder of class subfolders, or 'synthetic'")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="training steps of the selected stage(s)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any TrainConfig field, e.g. --set nat_lr=5e-4")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the nat / flow training forward")
    p.add_argument("--path", default=None, choices=list(samplers.PATHS), help="the flow stage's probability path (default flow)")
    p.add_argument("--reward", default=None, choices=PI_REWARDS, help="the policy stages' reward (the "
                   "reward-hacking study; default adversarial); other than adversarial: files *_<reward>_T*")
    args = p.parse_args(argv)
    try:
        if args.stage != "all" and args.stage not in stage_fns:
            raise UserError(f"unknown stage {args.stage!r}: choose all or one of {', '.join(stage_fns)}")
        c, run_dir = build_config(args, STAGES, default)
        device = init_distributed(pick_device(args.device))
        if not DIST.main:
            sys.stdout = open(os.devnull, "w")                         # one rank reports; errors still reach stderr
        os.makedirs(run_dir, exist_ok=True)
        write_json(os.path.join(run_dir, "config.json"), to_plain(c))
        torch.manual_seed(c.seed + DIST.rank)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        log = Logger(run_dir)
        if DIST.world > 1 and c.data != "synthetic":                   # one rank fetches the data set, if it must
            if DIST.main:
                for split in ("train", "test"):
                    data.load_dataset(c.data, split, c.img_size, c.channels, c.seed)
            barrier()
        print(f"run folder {run_dir} | preset {c.preset} | device {device}")
        for s in (default if args.stage == "all" else [args.stage]):
            path = os.path.join(run_dir, f"{s}.pt")
            if s in STAGE_FNS and s not in POLICY_STAGES and is_done(path):   # the others skip their finished parts
                print(f"{s}: done ({path}), skipped")
                continue
            if DIST.world > 1:                                         # each rank its own random stream
                torch.manual_seed(rank_seed(c.seed + list(stage_fns).index(s)))
            t0 = time.time()
            try:
                stage_fns[s](c, run_dir, device, log)
            except torch.OutOfMemoryError:                             # outside a training loop (data, final evaluation)
                raise RunFault(f"{s}: out of memory ({oom_advice(c, c.fault_keys(s)[1])})") from None
            barrier()                                                  # its files are written before the next stage reads them
            log(stage=s, wall_seconds=round(time.time() - t0, 1))
    except (UserError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunFault as e:                                              # every rank stops with the same line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(FAULT_EXIT)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
