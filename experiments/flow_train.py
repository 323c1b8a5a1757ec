"""AdaGen's continuous paradigm, training side (AdaGen §III-A, §III-C, App. B): the rectified-flow /
VP-diffusion generator on pixels, and the PPO policies that choose each sample's next time and
guidance scale, trained by train.py's Algorithm 1 (`train_policy`) on the ODE sampler's MDP (`flow_task`, POLICY_TASK).

Usage: python train.py --stage flow | flow-policy | flow-static | flow-smooth --run-dir runs/small [--path vp]
"""
import copy
import os

import torch

import config
import data
import ddp
import evaluation
import flow_net
import learner
import nat
import pipeline
import policy
import runs
import samplers
import schedules
from train_helpers import generator_step, lr_at


def flow_config(c: config.TrainConfig, num_classes: int) -> flow_net.FlowConfig:
    return flow_net.FlowConfig(img_size=c.img_size, channels=c.channels, patch=c.flow_patch, num_classes=num_classes,
                          dim=c.flow_dim, depth=c.flow_depth, heads=c.flow_heads, path=c.flow_path)


def stage_flow(c: config.TrainConfig, run_dir: str, device: torch.device, log: runs.Logger) -> None:
    """Train the continuous generator on pixels (flow_path: rectified flow or VP diffusion, see
    samplers.py), with horizontal flips, class dropout for guidance and an EMA of the weights.
    Writes flow.pt (or vp.pt)."""
    name = c.flow_path
    path = os.path.join(run_dir, f"{name}.pt")
    if runs.is_done(path):
        print(f"{name}: done ({path}), skipped")
        return
    x_train, y_train, num_classes = data.load_dataset(c.data, "train", c.img_size, c.channels, c.seed)
    cfg = flow_config(c, num_classes)
    path_obj = samplers.PATHS[c.flow_path]
    model = flow_net.FlowTransformer(cfg, nat.Block).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=c.flow_lr, betas=(0.9, 0.99), weight_decay=c.flow_wd,
                            fused=device.type == "cuda")
    modules = {"model": model, "ema": ema, "optim": opt}
    state = {**runs.resume(path, runs.to_plain(cfg), modules), "config": runs.to_plain(cfg), "done": False}
    g = torch.Generator().manual_seed(ddp.rank_seed(c.seed + 11 + state["step"]))   # each rank its own batches
    gd = torch.Generator(device).manual_seed(ddp.rank_seed(c.seed + 12 + state["step"]))
    it = data.batches(x_train, y_train, runs.rank_batch(c.flow_batch, "flow_batch"), g, infinite=True)
    net = ddp.data_parallel(model, device)
    loss_fn = flow_net.flow_net_fn(torch.compile(net) if c.compile else net, cfg.class_drop)

    def step_fn(step: int) -> dict:
        lr = lr_at(step, c.flow_steps, c.flow_lr, c.flow_warmup)
        for grp in opt.param_groups:
            grp["lr"] = lr
        x, y = next(it)
        x = data.to_float(x)
        flip = torch.rand(len(x), generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x).to(device)
        model.train()
        with runs.autocast(device, c.bf16):
            loss = samplers.training_loss(loss_fn, path_obj, x, y.to(device), gd)
        out = generator_step(model, ema, opt, loss, step, c.flow_ema_decay)
        return {"loss": out["loss"], "lr": lr, "grad_norm": out["grad_norm"]}

    state = runs.train_loop(name, path, state, modules, step_fn, c.flow_steps, c, log)
    state["done"] = True
    runs.save_ckpt(path, state)
    print(f"{name}: done, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
          f"python sample.py --run-dir {run_dir} --flow {name} draws its grids")


def flow_task(c: config.TrainConfig, run_dir: str, device: torch.device, kind: str, nfe: int):
    """(task, pipeline, RealFeatures) of the ODE-sampler MDP (AdaGen): flow_pi_solver with the most
    steps whose network evaluations fit in `nfe`, starting from the uniform grid with constant
    guidance w_0 (the AdaGen release's DiT/SiT start); D's reals are raw training images."""
    pipe = pipeline.FlowPipeline(run_dir, device, c.flow_path, c.bf16, rows=c.gen_rows)
    ref = evaluation.RealFeatures.of(pipe)
    w_0 = pipeline.get_w0(pipe, ref, c.pi_sweep_samples)
    solver, cfg = c.flow_pi_solver, pipe.cfg
    T = samplers.steps_for_nfe(solver, nfe)
    grid = samplers.uniform_grid(T)
    h = torch.stack([samplers.fractions(grid), samplers.guidance_table(grid, w_0)], 1)      # (T, 2) [f, w]

    def generate(y, sched, g, G):
        noise = torch.randn((len(y) // G, cfg.channels, cfg.img_size, cfg.img_size), device=device, generator=g)
        return samplers.sample(pipe.velocity_fn, noise.repeat_interleave(G, 0), y, T, sched, solver, cfg.null_label,
                               pipe.path).clamp(-1, 1)

    task = learner.PolicyTask(
        name=schedules.flow_policy_file(c.flow_path, kind, nfe, c.pi_reward), T=T, spec=policy.FLOW_ACTIONS, h=h,
        start=f"{solver}, uniform grid, w = {w_0:g}", C=cfg.dim, N=cfg.num_patches, num_classes=cfg.num_classes,
        generate=generate, to_images=lambda x: x,
        fid_images=lambda y, sched: pipe.generate(y, T, sched, solver, seed=0),
        reals=lambda: learner.real_images(c), to_step=samplers.actions_to_step(T),
        extra={"solver": solver, "nfe": nfe, "path": c.flow_path})
    return task, pipe, ref

STAGES = {"flow": stage_flow}
# the policy stages flow-policy, flow-static, flow-smooth: train.py runs Algorithm 1 on this MDP
POLICY_TASK = dict(make_task=flow_task, counts=lambda c: c.flow_pi_nfe,
                   file=lambda c, kind, n: schedules.flow_policy_file(c.flow_path, kind, n, c.pi_reward))
