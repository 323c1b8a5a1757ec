"""AdaGen's continuous paradigm (AdaGen §III-A, §III-C, App. B): the rectified-flow / VP-diffusion
generator on pixels (samplers.py: paths, solvers, the flow network), the PPO policies that choose
each sample's next time and guidance scale, trained by train.py's Algorithm 1 (`train_policy`) on
the ODE sampler's MDP (`flow_task`), and its sampling side: grids, the table of every solver x time
grid beside the searched grid and the policies at each NFE budget, per-sample time-grid plots, the
policy's share of sampling time, and repeated sampling.

    python experiments/flow.py train --run-dir runs/small [--stage flow | flow-policy | flow-static | flow-smooth] [--set flow_path=vp]
    python experiments/flow.py sample --run-dir runs/small [--path vp] [--eval | --plot | --bench | --repeat 2] [--nfe 4,8]

(AutoNAT's search of the ODE sampler's grid: python experiments/search.py --stage flow-search.)
"""
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the project's root

import torch  # noqa: E402

import data  # noqa: E402
import nat  # noqa: E402
import policy  # noqa: E402
import sample  # noqa: E402
import samplers  # noqa: E402
import train  # noqa: E402
from experiments import bench, studies  # noqa: E402


FLOW_W_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


class FlowPipeline(train.GeneratorPipeline):
    """The continuous generator of a run folder (flow.pt or vp.pt, EMA weights) and the feature network."""

    def __init__(self, run_dir: str, device: torch.device, path: str = "flow", bf16: bool = True, batch: int | None = None):
        if not os.path.exists(os.path.join(run_dir, f"{path}.pt")):
            raise train.UserError(f"{run_dir}/{path}.pt not found: train it with python experiments/flow.py train --run-dir "
                                  f"{run_dir} --stage flow --set flow_path={path}")
        super().__init__(run_dir, device, bf16, batch)
        self.net = train.build_model(run_dir, path, device, weights="ema")
        self.cfg: samplers.FlowConfig = self.net.cfg
        self.path = samplers.PATHS[path]
        self.sweep_file = f"{path}_sweep_w.json"

    W_GRID, sweep_what, sweep_info = FLOW_W_GRID, "Euler, NFE 8", {}

    def sweep_images(self, labels: torch.Tensor, w_0: float) -> torch.Tensor:
        """The w_0 sweep's images: constant guidance w_0, Euler on the uniform 8-step grid, seed 0."""
        return self.generate(labels, 8, samplers.heuristic_schedule(samplers.uniform_grid(8), w_0), "euler", seed=0)

    def velocity_fn(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor):
        return self.counted(self.net, x, t, labels)

    def generate(self, labels: torch.Tensor, T: int, schedule: samplers.Schedule, solver: str, seed: int,
                 guided: bool = True, group: int = 1) -> torch.Tensor:
        """Images (n, C, H, W) in [-1, 1] on the CPU: T solver steps from seeded noise, in chunks of
        `batch` rows keyed by (seed, chunk) and shared over the ranks of a torchrun job;
        group = G: consecutive blocks of G rows start from the same noise (common random numbers)."""
        c = self.cfg

        def make(y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
            x = torch.randn((len(y) // group, c.channels, c.img_size, c.img_size), device=self.device,
                            generator=g).repeat_interleave(group, 0)
            x = samplers.sample(self.velocity_fn, x, y, T, schedule, solver, c.null_label if guided else None, self.path)
            return x.clamp(-1, 1).float().cpu()
        return self.chunked(labels, group, seed, make, schedule)


def flow_policy_file(path: str, kind: str, nfe: int, reward_name: str = "adversarial") -> str:
    return f"{path}_{kind}_nfe{nfe}" + (f"_{reward_name}" if reward_name != "adversarial" else "")


def flow_config(c: train.TrainConfig, num_classes: int) -> samplers.FlowConfig:
    return samplers.FlowConfig(img_size=c.img_size, channels=c.channels, patch=c.flow_patch, num_classes=num_classes,
                          dim=c.flow_dim, depth=c.flow_depth, heads=c.flow_heads, path=c.flow_path)


def stage_flow(c: train.TrainConfig, run_dir: str, device: torch.device, log: train.Logger) -> None:
    """Train the continuous generator on pixels (flow_path: rectified flow or VP diffusion, see samplers.py), with horizontal
    flips, class dropout for guidance and an EMA of the weights. Writes flow.pt (or vp.pt)."""
    name = c.flow_path
    path = os.path.join(run_dir, f"{name}.pt")
    if train.is_done(path):
        print(f"{name}: done ({path}), skipped")
        return
    x_train, y_train, num_classes = data.load_dataset(c.data, "train", c.img_size, c.channels, c.seed)
    cfg = flow_config(c, num_classes)
    model = samplers.FlowTransformer(cfg, nat.Block).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=c.flow_lr, betas=(0.9, 0.99), weight_decay=c.flow_wd,
                            fused=device.type == "cuda")
    modules = {"model": model, "ema": ema, "optim": opt}
    state = {**train.resume(path, train.to_plain(cfg), modules), "config": train.to_plain(cfg), "done": False}
    g = torch.Generator().manual_seed(train.rank_seed(c.seed + 11 + state["step"]))   # each rank its own batches
    gd = torch.Generator(device).manual_seed(train.rank_seed(c.seed + 12 + state["step"]))
    it = data.batches(x_train, y_train, train.rank_batch(c.flow_batch, "flow_batch"), g, infinite=True)
    net = train.data_parallel(model, device)
    loss_fn = samplers.flow_net_fn(torch.compile(net) if c.compile else net, cfg.class_drop)

    def step_fn(step: int) -> dict:
        lr = train.lr_at(step, c.flow_steps, c.flow_lr, c.flow_warmup)
        for grp in opt.param_groups:
            grp["lr"] = lr
        x, y = next(it)
        x = data.to_float(x)
        flip = torch.rand(len(x), generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x).to(device)
        model.train()
        with train.autocast(device, c.bf16):
            loss = samplers.training_loss(loss_fn, samplers.PATHS[c.flow_path], x, y.to(device), gd)
        out = train.generator_step(model, ema, opt, loss, step, c.flow_ema_decay)
        return {"loss": out["loss"], "lr": lr, "grad_norm": out["grad_norm"]}

    state = train.train_loop(name, path, state, modules, step_fn, c.flow_steps, c, log)
    state["done"] = True
    train.save_ckpt(path, state)
    if os.path.exists(os.path.join(run_dir, f"{name}_sweep_w.json")):
        os.remove(os.path.join(run_dir, f"{name}_sweep_w.json"))           # a sweep of other weights
    print(f"{name}: done, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
          f"python experiments/flow.py sample --run-dir {run_dir} --path {name} draws its grids")


def flow_task(c: train.TrainConfig, run_dir: str, device: torch.device, kind: str, nfe: int):
    """(task, pipeline, RealFeatures) of the ODE-sampler MDP (AdaGen): flow_pi_solver with the most
    steps whose network evaluations fit in `nfe`, starting from the uniform grid with constant
    guidance w_0 (the AdaGen release's DiT/SiT start); D's reals are raw training images."""
    pipe = FlowPipeline(run_dir, device, c.flow_path, c.bf16)
    ref = train.RealFeatures(pipe)
    w_0 = train.get_w0(pipe, ref, c.pi_sweep_samples)
    solver, cfg = c.flow_pi_solver, pipe.cfg
    T = samplers.steps_for_nfe(solver, nfe)
    grid = samplers.uniform_grid(T)
    h = torch.stack([samplers.fractions(grid), samplers.guidance_table(grid, w_0)], 1)      # (T, 2) [f, w]

    def generate(y, sched, g, G):
        noise = torch.randn((len(y) // G, cfg.channels, cfg.img_size, cfg.img_size), device=device, generator=g)
        return samplers.sample(pipe.velocity_fn, noise.repeat_interleave(G, 0), y, T, sched, solver, cfg.null_label,
                               pipe.path).clamp(-1, 1)

    task = train.PolicyTask(
        name=flow_policy_file(c.flow_path, kind, nfe, c.pi_reward), T=T, spec=policy.FLOW_ACTIONS, h=h,
        start=f"{solver}, uniform grid, w = {w_0:g}", C=cfg.dim, N=cfg.num_patches, num_classes=cfg.num_classes,
        generate=generate, to_images=lambda x: x,
        fid_images=lambda y, sched: pipe.generate(y, T, sched, solver, seed=0),
        reals=lambda: train.real_images(c), to_step=samplers.actions_to_step(T),
        extra={"solver": solver, "nfe": nfe, "path": c.flow_path})
    return task, pipe, ref

def flow_rows(pipe: FlowPipeline, w_0: float, nfes: list[int]) -> dict:
    """name -> {nfe: (make_schedule, solver, T)}: every solver on every heuristic grid with constant guidance
    w_0, each solver on the uniform grid with guidance in FLOW_INTERVAL, then the searched table and the PPO
    policies found in the run folder."""
    rows = {}
    for solver in samplers.SOLVERS:
        for grid in samplers.GRIDS:
            rows[f"{solver}, {grid} grid, w={w_0:g}"] = {
                n: (lambda T=samplers.steps_for_nfe(solver, n), grid=grid: samplers.heuristic_schedule(
                    samplers.GRIDS[grid](T, pipe.path), w_0), solver, samplers.steps_for_nfe(solver, n)) for n in nfes}
        lo, hi = samplers.FLOW_INTERVAL
        rows[f"{solver}, uniform grid, w={w_0:g} for t in ({lo:g}, {hi:g}]"] = {
            n: (lambda T=samplers.steps_for_nfe(solver, n): samplers.heuristic_schedule(samplers.uniform_grid(T), w_0, samplers.FLOW_INTERVAL),
                solver, samplers.steps_for_nfe(solver, n)) for n in nfes}
    for n in nfes:                                                     # the searched T x [t_next, w] table
        path = os.path.join(pipe.run_dir, f"{pipe.path.name}_search_nfe{n}.pt")
        ck = train.load_ckpt(path) if os.path.exists(path) else {}
        if ck.get("done"):
            solver = ck["config"]["solver"]
            rows.setdefault(f"searched grid + guidance (AutoNAT's search, {solver})", {})[n] = (
                lambda table=ck["table"]: samplers.table_schedule(table), solver, ck["config"]["T"])
    for kind in sample.POLICY_ROWS:                                           # the PPO-trained schedules
        for n in nfes:
            found = flow_policy_schedule(pipe, kind, n)
            if found is not None:
                rows.setdefault(found[0], {})[n] = found[1:]
    return rows


def flow_policy_schedule(pipe: FlowPipeline, kind: str, nfe: int) -> tuple | None:
    """(row name, make_schedule, solver, T) of the trained `kind` flow policy for the NFE budget, or None."""
    path = os.path.join(pipe.run_dir, f"{flow_policy_file(pipe.path.name, kind, nfe)}.pt")
    if not os.path.exists(path):
        return None
    pi, cfg = train.load_policy(path, pipe.device)
    h_pre = policy.inverse_activation(torch.tensor(cfg["heuristic"]), policy.FLOW_ACTIONS).to(pipe.device)
    make = lambda: policy.PolicySchedule(pi, h_pre, beta_ema=cfg["beta_ema"], spec=policy.FLOW_ACTIONS,
                                         to_step=samplers.actions_to_step(cfg["T"]))
    name = sample.POLICY_ROWS[kind].format(beta_ema=cfg["beta_ema"])[:-1] + f", {cfg['solver']})"
    return name, make, cfg["solver"], cfg["T"]


def adaptive_flow_policy(pipe: FlowPipeline, nfe: int) -> tuple:
    """(make_schedule, solver, T) of the adaptive flow policy for the NFE budget; a clear error if there is none."""
    found = flow_policy_schedule(pipe, "policy", nfe)
    if found is None:
        raise train.UserError(f"{pipe.run_dir}/{flow_policy_file(pipe.path.name, 'policy', nfe)}.pt not found: "
                              f"train it with python experiments/flow.py train --stage flow-policy --run-dir {pipe.run_dir} "
                              f"--set flow_path={pipe.path.name} --set flow_pi_nfe={nfe}")
    return found[1:4]


def evaluate_flow(pipe: FlowPipeline, samples: int, nfes: list[int], sweep_samples: int) -> None:
    """The continuous generator's table (<path>_eval.json, <path>_eval.md): the metrics against the test
    images, NFE per image."""
    name_ = pipe.path.name
    ref = sample.EvalReferences(pipe)
    w_0 = train.get_w0(pipe, ref, sweep_samples)
    rows = flow_rows(pipe, w_0, nfes)
    n = min(samples, len(ref.test_feats), len(ref.train_feats))
    labels = train.balanced_labels(samples, pipe.cfg.num_classes)
    refs = {"real training images vs test": sample.train_reference(ref, n)}

    def cell(make, solver, T, s):
        def compute() -> dict:
            before = pipe.forwards
            res = sample.measure(ref, labels, make(), lambda sched: pipe.generate(labels, T, sched, solver, seed=s))
            return {**res, "nfe": train.all_sum(pipe.forwards - before) / (2 * samples)}  # a guided pair counts once
        return compute
    res = sample.run_cells([((name, nfe), cell(make, solver, T, s)) for name in rows
                            for nfe, (make, solver, T) in rows[name].items() for s in sample.EVAL_SEEDS], f"{name_} eval")
    table = [{"schedule": name, "solver": solver, "T": T, "nfe_budget": nfe, "nfe": res[(name, nfe)][0]["nfe"],
              "samples": samples, "seeds": list(sample.EVAL_SEEDS),
              **sample.seed_summary(res[(name, nfe)], policy.FLOW_ACTIONS.names)}
             for name in rows for nfe, (_, solver, T) in rows[name].items()]
    table.sort(key=lambda r: r["nfe_budget"])
    train.write_json(os.path.join(pipe.run_dir, f"{name_}_eval.json"),
                     {"rows": table, "reference": refs, "w_0": w_0, "device": str(pipe.device)})
    head = f"| schedule | T | NFE | {sample.metric_head(ref)} images/s |"
    md = [f"{name_} path: {samples} samples per row and seed, seeds {list(sample.EVAL_SEEDS)}; FID, precision and recall against "
          f"the {n} test images{sample.REF_NOTE}; NFE = network evaluations per image (a guided pair in one batch counts as one); "
          f"images/s on {pipe.device}.", "", head, "|" + "---|" * (head.count("|") - 1)]
    md += [f"| {name} | – | – | {sample.metric_cells(r, ref)} – |" for name, r in refs.items()]
    md += [f"| {r['schedule']} | {r['T']} | {r['nfe']:g} | {sample.metric_cells(r, ref)} {r['images_per_s']:.0f} |"
           for r in table]
    train.write_text(os.path.join(pipe.run_dir, f"{name_}_eval.md"), "\n".join(md) + "\n")
    print("\n".join(md))


def flow_grids(pipe: FlowPipeline, nfe: int, per_class: int = 10) -> None:
    """<path>_samples_nfe<nfe>.png: a row per class, DPM-Solver++(2S) on the uniform grid with the swept w_0."""
    w_0 = train.read_json(os.path.join(pipe.run_dir, pipe.sweep_file), {}).get("w_0", 1.0)
    labels = torch.arange(pipe.cfg.num_classes).repeat_interleave(per_class)
    T = samplers.steps_for_nfe("dpmpp2s", nfe)
    images = pipe.generate(labels, T, samplers.heuristic_schedule(samplers.uniform_grid(T), w_0), "dpmpp2s", seed=0)
    path = os.path.join(pipe.run_dir, f"{pipe.path.name}_samples_nfe{nfe}.png")
    data.save_grid(images, path, nrow=per_class, save=train.DIST.main)
    print("wrote", path)


def plot_flow_policy(pipe: FlowPipeline, nfe: int, samples: int = 1000, per_class: int = 6, lines: int = 24) -> None:
    """<path>_policy_grids_nfe<nfe>.png: the adaptive policy's per-sample time grids t_k (thin lines: `lines` samples; red:
    mean +- sd; dashed: the uniform grid it started from) and guidance w per step; <path>_heuristic_vs_adaptive_nfe<nfe>.png:
    each class's samples from the start schedule (left) and the policy (right), same noise."""
    make, solver, T = adaptive_flow_policy(pipe, nfe)
    sched = make()
    h = policy.activation(sched.h_pre.cpu(), policy.FLOW_ACTIONS)                   # (T, 2) the start, as executed
    pipe.generate(train.balanced_labels(samples, pipe.cfg.num_classes), T, sched, solver, seed=0)
    a = sched.actions()                                                            # (T, n, 2) executed [f, w]
    t = samplers.grid_of_fractions(a[:, :, 0])                                    # (T + 1, n) per-sample grids
    t_h = samplers.grid_of_fractions(h[:, :1])                                     # (T + 1, 1) the start's grid
    steps = list(range(T + 1))
    series = [{"x": steps, "y": t[:, i].tolist(), "color": (150, 170, 220)} for i in range(min(lines, t.shape[1]))]
    series += [{"x": steps, "y": t.mean(1).tolist(), "color": (200, 60, 30),
                "band": ((t.mean(1) - t.std(1)).tolist(), (t.mean(1) + t.std(1)).tolist())},
               {"x": steps, "y": t_h[:, 0].tolist(), "color": (60, 60, 60), "dashed": True}]
    w = a[:, :, 1]
    panels = [{"title": "time t_k per sample", "series": series},
              {"title": "guidance w", "series": [
                  {"x": steps[:-1], "y": w.mean(1).tolist(), "color": (200, 60, 30),
                   "band": ((w.mean(1) - w.std(1)).tolist(), (w.mean(1) + w.std(1)).tolist())},
                  {"x": steps[:-1], "y": h[:, 1].tolist(), "color": (60, 60, 60), "dashed": True}]}]
    path = os.path.join(pipe.run_dir, f"{pipe.path.name}_policy_grids_nfe{nfe}.png")
    data.plot_panels(path, panels, size=(360, 240), title=f"adaptive policy, {solver}, T={T} (NFE {nfe}): {samples} samples; "
                                                     f"dashed: the start schedule", save=train.DIST.main)
    print("wrote", path)
    K = pipe.cfg.num_classes
    labels = torch.arange(K).repeat_interleave(per_class)
    start = samplers.table_schedule(samplers.grid_table(t_h[:, 0], h[:, 1]))
    left = pipe.generate(labels, T, start, solver, seed=0).view(K, per_class, -1)
    right = pipe.generate(labels, T, make(), solver, seed=0).view(K, per_class, -1)
    C, S = pipe.cfg.channels, pipe.cfg.img_size
    both = torch.cat([left, torch.ones(K, 1, C * S * S), right], dim=1).view(-1, C, S, S)
    path = os.path.join(pipe.run_dir, f"{pipe.path.name}_heuristic_vs_adaptive_nfe{nfe}.png")
    data.save_grid(both, path, nrow=2 * per_class + 1, save=train.DIST.main)
    print("wrote", path, "(left: the start schedule; right: the adaptive policy; one class per row)")


def flow_bench(pipe: FlowPipeline, batch: int, nfe: int = 8, repeats: int = 3) -> dict:
    """The adaptive flow policy's cost: its T forwards vs the network's T guided forwards (2B rows),
    both on the same batch; and images/s of sampling with the policy vs the uniform grid."""
    file = flow_policy_file(pipe.path.name, "policy", nfe)
    make, solver, T = adaptive_flow_policy(pipe, nfe)
    c = pipe.cfg
    labels = train.balanced_labels(batch, c.num_classes).to(pipe.device)
    x = torch.randn((2 * batch, c.channels, c.img_size, c.img_size), device=pipe.device)
    y2 = torch.cat([labels, torch.full_like(labels, c.null_label)])
    t2 = torch.full((2 * batch,), 0.5, device=pipe.device)
    feats = torch.randn(batch, c.num_patches, c.dim, device=pipe.device)                    # (B, P, C)
    state = samplers.FlowState(0, x[:batch], t2[:batch], feats, labels)

    @torch.no_grad()
    def run_forwards():
        for _ in range(T):
            pipe.velocity_fn(x, t2, y2)

    def run_policy():
        sched = make()
        for k in range(T):
            sched(k, state)
    heuristic = samplers.heuristic_schedule(samplers.uniform_grid(T), 1.0)
    fns = [("bare forwards", run_forwards), ("policy forwards", run_policy),
           ("sample", lambda: pipe.generate(labels.cpu(), T, heuristic, solver, seed=0)),
           ("sample + policy", lambda: pipe.generate(labels.cpu(), T, make(), solver, seed=0))]
    res = {name: batch / secs for name, secs in bench.time_round_robin(fns, pipe.device, repeats).items()}
    res["policy_cost"] = res["bare forwards"] / res["policy forwards"]
    print(f"flow bench ({pipe.device}, batch {batch}, {solver}, T={T}, CFG): sample {res['sample']:.1f} images/s, "
          f"sample + policy {res['sample + policy']:.1f} images/s; policy cost {100 * res['policy_cost']:.2f}% "
          f"of the network's forward time per step ({file}.pt)")
    return res


def flow_refined_grid(pipe: FlowPipeline, nfe: int, repeat: int, per_class: int = 10) -> None:
    """<path>_samples_adaptive_repeat<k>_nfe<n>.png: the adaptive flow policy with repeated sampling
    (its discriminator keeps the best of k), a row per class. The ODE is deterministic given the
    noise, so there is no look-ahead here: candidates differ only in their starting noise."""
    make, solver, T = adaptive_flow_policy(pipe, nfe)
    refiner = studies.Refiner(pipe, flow_policy_file(pipe.path.name, "policy", nfe))
    labels = torch.arange(pipe.cfg.num_classes).repeat_interleave(per_class)
    before = pipe.forwards
    images = studies.refine(lambda y: pipe.generate(y, T, make(), solver, seed=0), labels, repeat, refiner.score)
    path = os.path.join(pipe.run_dir, f"{pipe.path.name}_samples_adaptive_repeat{repeat}_nfe{nfe}.png")
    data.save_grid(images, path, nrow=per_class, save=train.DIST.main)
    print("wrote", path, f"({train.all_sum(pipe.forwards - before) / len(labels):.1f} network rows per image)")

def add_flags(p) -> None:
    """The sampling side's flags."""
    p.add_argument("--path", default="flow", choices=list(samplers.PATHS), help="the continuous generator: flow.pt or vp.pt")
    p.add_argument("--nfe", default="4,8", help="comma-separated NFE budgets")
    p.add_argument("--bench", action="store_true", help="images/s of sampling vs bare forwards, and the policy's cost")
    p.add_argument("--repeat", type=int, default=1, help="grids of the adaptive policy with repeated sampling: k candidates "
                   "per image, the policy's discriminator keeps one")


def run(args, device: torch.device) -> None:
    """The sampling side, as the flags ask: the table, the plots, the bench, repeated sampling, else the grids."""
    try:
        nfes = [int(v) for v in args.nfe.split(",")]
    except ValueError:
        raise train.UserError(f"--nfe {args.nfe!r}: expected integers like 4,8") from None
    if any(v < 1 for v in nfes):
        raise train.UserError("--nfe budgets must be positive")
    if args.repeat < 1:
        raise train.UserError("--repeat counts candidates: at least 1")
    fpipe = FlowPipeline(args.run_dir, device, args.path, bf16=not args.no_bf16, batch=args.batch)
    if args.eval:
        evaluate_flow(fpipe, args.samples, nfes, args.sweep_samples)
    if args.plot:
        for nfe in nfes:
            plot_flow_policy(fpipe, nfe)
    if args.bench:
        flow_bench(fpipe, args.batch or (1024 if device.type == "cuda" else 256), max(nfes))
    if args.repeat > 1:
        flow_refined_grid(fpipe, max(nfes), args.repeat)
    elif not (args.eval or args.plot or args.bench):
        flow_grids(fpipe, max(nfes))


STAGES = {"flow": stage_flow, **{f"flow-{kind}": train.stage_policies(
    kind, make_task=flow_task, counts=lambda c: c.flow_pi_nfe,
    file=lambda c, kind, n: flow_policy_file(c.flow_path, kind, n, c.pi_reward)) for kind in ("policy", "static", "smooth")}}


if __name__ == "__main__":
    if sys.argv[1:2] == ["train"]:
        train.main(sys.argv[2:], stages=STAGES, default=["flow"], doc=__doc__)
    elif sys.argv[1:2] == ["sample"]:
        sample.main(sys.argv[2:], add_flags=add_flags, run=run, doc=__doc__)
    else:
        sys.exit(f"usage: python {sys.argv[0]} train|sample --run-dir R ... (see --help of each)")
