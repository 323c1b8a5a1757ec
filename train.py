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
import copy
import dataclasses
import functools
import importlib
import json
import os
import sys
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import config
import data
import ddp
import evaluation
import models
import nat
import pipeline
import plots
import policy
import ppo
import reward
import runs
import samplers
import schedules
import vqgan
from config import FLOW_POLICY_STAGES, POLICY_STAGES, PRESETS, TrainConfig, build_config, recipe
from frozen_nets import train_classifier, train_simclr
from learner import Learner, PolicyTask, build_learner, nat_task, reward_hook
from train_helpers import augment, generator_step, lr_at


STAGES = ["backbone", "vq", "featnet", "featnet2", "featssl", "nat", "search", "param-search", "policy", "static", "smooth"]   # --stage all


# ----------------------------------------------------------------------------- stages

def stage_backbone(c: TrainConfig, run_dir: str, device: torch.device, log: runs.Logger) -> None:
    """A second classifier (other width and seed, shorter training): the frozen backbone the
    policy's discriminator reads (reward.py). The FID network itself must not be the reward."""
    train_classifier(c, run_dir, device, log, "backbone", dict(width=c.backbone_width, feat_dim=c.backbone_dim), c.backbone_steps, 7)


def stage_vq(c: TrainConfig, run_dir: str, device: torch.device, log: runs.Logger) -> None:
    """Train the VQ tokenizer: L = |x - G(z_q)| + (x - G(z_q))^2 + L_vq (+ hinge GAN)."""
    x_train, _, _ = data.load_dataset(c.data, "train", c.img_size, c.channels, c.seed)
    x_test, _, _ = data.load_dataset(c.data, "test", c.img_size, c.channels, c.seed)
    cfg = config.vq_config(c)
    model = vqgan.VQModel(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=c.vq_lr, betas=(0.5, 0.9))
    disc = vqgan.PatchDiscriminator(c.channels, cfg.disc_ch).to(device) if c.vq_gan_weight > 0 else None
    opt_d = torch.optim.Adam(disc.parameters(), lr=c.vq_lr, betas=(0.5, 0.9)) if disc else None
    modules = {"model": model, "optim": opt, **({"disc": disc, "optim_d": opt_d} if disc else {})}
    path = os.path.join(run_dir, "vq.pt")
    state = {**runs.resume(path, runs.to_plain(cfg), modules), "config": runs.to_plain(cfg), "done": False}
    g = torch.Generator().manual_seed(ddp.rank_seed(c.seed + 1 + state["step"]))   # each rank its own batches
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
        percep, _ = models.classifier_backbone(models.build_model(run_dir, "backbone", device).requires_grad_(False), grad=True)

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
    train_classifier(c, run_dir, device, log, "featnet", dict(width=c.featnet_width, feat_dim=c.featnet_dim), c.featnet_steps, 2)


def stage_featnet2(c: TrainConfig, run_dir: str, device: torch.device, log: runs.Logger) -> None:
    """A held-out judge: an independent FID network (average pooling, its own feature width and seed,
    as wide and trained as long as featnet), so that schedules chosen on the FID network, or a
    policy trained on its FID (AdaGen §III-D), are judged on features no choice has seen."""
    train_classifier(c, run_dir, device, log, "featnet2",
                     dict(width=c.featnet2_width, feat_dim=c.featnet2_dim, convs=c.featnet2_convs, pool="avg"), c.featnet2_steps, 13)


def stage_featssl(c: TrainConfig, run_dir: str, device: torch.device, log: runs.Logger) -> None:
    """The self-supervised held-out judge (SimCLR on the training images, no labels): a third FID column."""
    train_simclr(c, run_dir, device, log, "featssl", dict(width=c.ssl_width, feat_dim=c.ssl_dim), 23)


def stage_dnet(c: TrainConfig, run_dir: str, device: torch.device, log: runs.Logger) -> None:
    """A candidate backbone of the discriminator: the backbone classifier, wider and trained longer."""
    train_classifier(c, run_dir, device, log, "dnet", dict(width=c.dnet_width, feat_dim=c.dnet_dim), c.dnet_steps, 17)


def stage_dssl(c: TrainConfig, run_dir: str, device: torch.device, log: runs.Logger) -> None:
    """A candidate backbone of the discriminator: a second SimCLR network (one conv per stage, average pooling,
    another seed)."""
    train_simclr(c, run_dir, device, log, "dssl", dict(width=c.ssl_width, feat_dim=c.ssl_dim, convs=1, pool="avg"), 29)


@torch.no_grad()
def tokenize_dataset(vq: vqgan.VQModel, x: torch.Tensor, y: torch.Tensor, device: torch.device):
    """Tokens (2M, N) of the M images and of their mirror images (flip augmentation), labels (2M,)."""
    out = {False: [], True: []}
    for i in tqdm(range(0, len(x), 1000), desc="tokenize", leave=False, disable=not ddp.DIST.main):
        xb = data.to_float(x[i:i + 1000]).to(device)
        for flip in (False, True):
            out[flip].append(vq.tokenize(xb.flip(-1) if flip else xb).cpu())
    return torch.cat(out[False] + out[True]), y.repeat(2)


def stage_nat(c: TrainConfig, run_dir: str, device: torch.device, log: runs.Logger) -> None:
    """Train the NAT on tokens with the masked-token loss; keep an EMA of the weights."""
    x_train, y_train, num_classes = data.load_dataset(c.data, "train", c.img_size, c.channels, c.seed)
    vq = models.build_model(run_dir, "vq", device)
    tokens, labels = tokenize_dataset(vq, x_train, y_train, device)         # (2M, N), (2M,)
    cfg = config.nat_config(c, num_classes, tokens.shape[1], vq.cfg.codebook_size)
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
    g = torch.Generator().manual_seed(ddp.rank_seed(c.seed + 3 + state["step"]))   # each rank its own batches
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
        out = generator_step(model, ema, opt, loss, step, c.nat_ema_decay)
        return {"loss": out["loss"], "lr": lr, "grad_norm": out["grad_norm"]}

    state = runs.train_loop("nat", path, state, modules, step_fn, c.nat_steps, c, log)
    state["done"] = True
    runs.save_ckpt(path, state)
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
        r_fid = reward.fidelity_reward(L.classifier(fake), labels)       # the frozen classifier's log p(y|x): (B,)
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
    seed = ddp.rank_seed(c.seed * 100003 + it)                 # per iteration (resumable) and rank
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
    out["d_steps"] = state.setdefault("d_steps", c.pi_d_steps) if it >= c.pi_d_warmup else c.pi_d_warmup_steps
    out["d_loss"] = d_update(L, state, out["d_steps"], sigma, g, g_cpu)   # 4
    out["sec_d"] = time.time() - t0
    runs.check_finite(d_loss=out["d_loss"])                                # a non-finite D is never saved (train_loop)
    if it >= c.pi_d_warmup and c.pi_d_acc_band:                            # keep D's accuracy on current fakes in the band
        lo, hi = c.pi_d_acc_band
        state["d_steps"] = min(c.pi_d_steps_max, out["d_steps"] + 1) if out["d_acc"] < lo else \
            max(1, out["d_steps"] - 1) if out["d_acc"] > hi else out["d_steps"]
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
    c = dataclasses.replace(c, pi_iters=max(1, c.pi_iters * 4 // task.T))  # pi_iters at T = 4: the same forwards at any T
    L, pcfg, modules = build_learner(c, run_dir, device, kind, task)
    name, path = task.name, os.path.join(run_dir, f"{task.name}.pt")
    state = {"history": [], "best": None, "best_fid": None, **runs.resume(path, pcfg, modules), "config": pcfg, "done": False}
    x_real, y_real = task.reals()                  # D's reals: 10 000 training images (pi_d_real = recon: reconstructions)
    n_hold = min(1000, len(x_real) // 10)          # ... and 1 000 held out for D's accuracy
    L.x_real, L.y_real = x_real[n_hold:], y_real[n_hold:]
    L.f_hold, L.y_hold = L.backbone(x_real[:n_hold].to(device)), y_real[:n_hold].to(device)   # the backbone is frozen
    fid_labels = pipeline.balanced_labels(c.pi_fid_samples, task.num_classes)

    def train_fids() -> dict:
        """The mean policy's (seed 0, fixed labels) Fréchet distances against training-set statistics on every
        network: "train_fid" (the FID network: the checkpoint choice), "train_fid2", "train_fd_ssl" (judges: logged only)."""
        t0 = time.time()
        fids = evaluation.judge_fids(ref, task.fid_images(fid_labels, L.schedule()), "train", fid_net=True)
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

    state = runs.train_loop(name, path, state, modules, step_fn, c.pi_iters, dataclasses.replace(c, log_every=1), log)
    state["done"] = True
    state.pop("replay", None)                                               # D's replay is only needed to resume
    its = [r for r in state["history"][1:] if "sec_d" in r]
    state["time_split"] = {k: sum(r.get(k, 0.0) for r in its) / max(1, len(its))
                           for k in ("sec_rollout", "sec_ppo", "sec_d", "sec_fid", "d_steps")}
    runs.save_ckpt(path, state)
    plots.plot_training(state["history"], os.path.join(run_dir, f"{name}_curve.png"), name)
    print(f"{name}: per iteration, mean over {len(its)}: " + ", ".join(f"{k} {v:.2f}" for k, v in state["time_split"].items()))
    which = "training-set FID at lam = 1 (last weights kept)" if kind == "fidelity" else "best training-set FID"
    print(f"{name}: done, {which} {state['best_fid']:.2f} (start {state['history'][0]['train_fid']:.2f}); "
          f"curve in {name}_curve.png")


def stage_policies(kind: str, make_task: Callable = None, counts: Callable = lambda c: c.pi_T,
                   file: Callable = lambda c, kind, n: schedules.policy_file(kind, c.pi_start, n, c.pi_reward)):
    """The stage function for one policy kind: a policy per count (the NAT: T in pi_T; the ODE
    sampler: NFE budgets, experiments/flow_train.py) built by make_task(c, run_dir, device, kind,
    n) (default nat_task) and trained by train_policy; finished ones skipped."""
    def stage(c: TrainConfig, run_dir: str, device: torch.device, log: runs.Logger) -> None:
        for n in counts(c):
            path = os.path.join(run_dir, f"{file(c, kind, n)}.pt")
            if runs.is_done(path):
                print(f"{path}: done, skipped")
                continue
            train_policy(c, run_dir, device, log, kind, *(make_task or nat_task)(c, run_dir, device, kind, n))
    return stage


STAGE_FNS = {"backbone": stage_backbone, "vq": stage_vq, "featnet": stage_featnet, "featnet2": stage_featnet2,
             "featssl": stage_featssl, "dnet": stage_dnet, "dssl": stage_dssl, "nat": stage_nat,
             **{kind: stage_policies(kind) for kind in POLICY_STAGES}}
# the experiments' stages (experiments/): their module is imported only when one of them runs
EXPERIMENT_STAGES = {**dict.fromkeys(("search", "param-search", "flow-search", "pr-search"), "experiments.search"),
                     **dict.fromkeys(("flow", "flow-policy", "flow-static", "flow-smooth"), "experiments.flow_train")}
OPTIONAL_STAGES = ["dnet", "dssl", "pr-search", "fidelity", "flow", "flow-search", *FLOW_POLICY_STAGES]   # run only when named
STAGES_ALL = STAGES + OPTIONAL_STAGES
SKIPS_INSIDE = POLICY_STAGES + FLOW_POLICY_STAGES + ("search", "param-search", "flow-search", "pr-search", "flow")   # stages that skip their finished parts themselves


def stage_fn(name: str) -> Callable:
    """The function of a stage: the core's, or an experiment's (its module imported now): Algorithm 1 on
    an experiment's MDP (the flow policies), or an experiment that trains NATs (pr-search: stage_nat given)."""
    if name in STAGE_FNS:
        return STAGE_FNS[name]
    module = importlib.import_module(EXPERIMENT_STAGES[name])
    if name in FLOW_POLICY_STAGES:
        return stage_policies(name.removeprefix("flow-"), **module.POLICY_TASK)
    if name == "pr-search":
        return functools.partial(module.STAGES[name], train_nat=stage_nat)
    return module.STAGES[name]


# ----------------------------------------------------------------------------- command line

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
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the nat / flow training forward")
    p.add_argument("--path", default=None, choices=list(samplers.PATHS), help="the flow stage's probability path (default flow)")
    p.add_argument("--reward", default=None, choices=schedules.PI_REWARDS, help="the policy stages' reward (the "
                   "reward-hacking study; default adversarial); other than adversarial: files *_<reward>_T*")
    args = p.parse_args(argv)
    try:
        if args.stage != "all" and args.stage not in STAGES + OPTIONAL_STAGES:
            raise runs.UserError(f"unknown stage {args.stage!r}: choose all or one of {', '.join(STAGES + OPTIONAL_STAGES)}")
        c, run_dir = build_config(args, STAGES)
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
            if s not in SKIPS_INSIDE and runs.is_done(path):
                print(f"{s}: done ({path}), skipped")
                continue
            if ddp.DIST.world > 1:                                         # each rank its own random stream
                torch.manual_seed(ddp.rank_seed(c.seed + STAGES_ALL.index(s)))
            t0 = time.time()
            try:
                stage_fn(s)(c, run_dir, device, log)
            except torch.OutOfMemoryError:                             # outside a training loop (data, final evaluation)
                raise runs.RunFault(f"{s}: out of memory ({runs.oom_advice(c, c.fault_keys(s)[1])})") from None
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
    main()
