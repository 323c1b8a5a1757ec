"""AdaGen's continuous paradigm, sampling side (sample.py --flow flow|vp): grids, the table of every
solver x time grid beside the searched grid and the PPO policies at each NFE budget, per-sample
time-grid plots, the policy's share of sampling time, and repeated sampling.

Usage: python sample.py --run-dir runs/small --flow flow [--eval | --plot | --bench | --repeat 2]
"""
import os

import torch

import ddp
import evaluation
import models
import pipeline
import plots
import policy
import runs
import samplers
import schedules
from experiments import studies, throughput


def flow_rows(pipe: pipeline.FlowPipeline, w_0: float, nfes: list[int]) -> dict:
    """name -> {nfe: (make_schedule, solver, T, cache-key suffix)}: every solver on every heuristic
    grid with constant guidance w_0, each solver on the uniform grid with guidance in
    FLOW_INTERVAL, then the searched table and the PPO policies found in the run folder (their
    suffix: the checkpoint's fingerprint, so a retrained one is evaluated again)."""
    rows = {}
    for solver in samplers.SOLVERS:
        for grid in samplers.GRIDS:
            rows[f"{solver}, {grid} grid, w={w_0:g}"] = {
                n: (lambda T=samplers.steps_for_nfe(solver, n), grid=grid: samplers.heuristic_schedule(
                    samplers.GRIDS[grid](T, pipe.path), w_0), solver, samplers.steps_for_nfe(solver, n), "") for n in nfes}
        lo, hi = samplers.FLOW_INTERVAL
        rows[f"{solver}, uniform grid, w={w_0:g} for t in ({lo:g}, {hi:g}]"] = {
            n: (lambda T=samplers.steps_for_nfe(solver, n): samplers.heuristic_schedule(samplers.uniform_grid(T), w_0, samplers.FLOW_INTERVAL),
                solver, samplers.steps_for_nfe(solver, n), "") for n in nfes}
    for n in nfes:                                                     # the searched T x [t_next, w] table
        name = f"{pipe.path.name}_search_nfe{n}"
        path = os.path.join(pipe.run_dir, f"{name}.pt")
        ck = runs.load_ckpt(path) if os.path.exists(path) else {}
        if ck.get("done"):
            solver = ck["config"]["solver"]
            rows.setdefault(f"searched grid + guidance (AutoNAT's search, {solver})", {})[n] = (
                lambda table=ck["table"]: samplers.table_schedule(table), solver, ck["config"]["T"],
                f"|{runs.fingerprint(pipe.run_dir, (name,))}")
    for kind in schedules.POLICY_ROWS:                                           # the PPO-trained schedules
        for n in nfes:
            found = flow_policy_schedule(pipe, kind, n)
            if found is not None:
                rows.setdefault(found[0], {})[n] = found[1:]
    return rows


def flow_policy_schedule(pipe: pipeline.FlowPipeline, kind: str, nfe: int) -> tuple | None:
    """(row name, make_schedule, solver, T, cache-key suffix) of the trained `kind` flow policy for
    the NFE budget, or None if there is none."""
    file = schedules.flow_policy_file(pipe.path.name, kind, nfe)
    path = os.path.join(pipe.run_dir, f"{file}.pt")
    if not os.path.exists(path):
        return None
    pi, cfg = models.load_policy(path, pipe.device)
    h_pre = policy.inverse_activation(torch.tensor(cfg["heuristic"]), policy.FLOW_ACTIONS).to(pipe.device)
    make = lambda: policy.PolicySchedule(pi, h_pre, beta_ema=cfg["beta_ema"], spec=policy.FLOW_ACTIONS,
                                         to_step=samplers.actions_to_step(cfg["T"]))
    name = schedules.POLICY_ROWS[kind].format(beta_ema=cfg["beta_ema"])[:-1] + f", {cfg['solver']})"
    return name, make, cfg["solver"], cfg["T"], f"|{runs.fingerprint(pipe.run_dir, (file,))}"


def adaptive_flow_policy(pipe: pipeline.FlowPipeline, nfe: int) -> tuple:
    """(make_schedule, solver, T) of the adaptive flow policy for the NFE budget; a clear error if there is none."""
    found = flow_policy_schedule(pipe, "policy", nfe)
    if found is None:
        raise runs.UserError(f"{pipe.run_dir}/{schedules.flow_policy_file(pipe.path.name, 'policy', nfe)}.pt not found: "
                              f"train it with python train.py --stage flow-policy --run-dir {pipe.run_dir}")
    return found[1:4]


def evaluate_flow(pipe: pipeline.FlowPipeline, samples: int, nfes: list[int], sweep_samples: int) -> None:
    """The continuous generator's table (<path>_eval.json, <path>_eval.md), resumable through
    <path>_eval_cache.json: FID / precision / recall against the test images, NFE per image."""
    name_ = pipe.path.name
    ref = evaluation.RealFeatures.of(pipe)
    w_0 = pipeline.get_w0(pipe, ref, sweep_samples)
    rows = flow_rows(pipe, w_0, nfes)
    n = min(samples, len(ref.test_feats), len(ref.train_feats))
    labels = pipeline.balanced_labels(samples, pipe.cfg.num_classes)
    refs = {"real training images vs test": evaluation.train_reference(ref, n)}

    def cell(make, solver, T, s):
        def compute() -> dict:
            before = pipe.forwards
            res = evaluation.measure(ref, labels, make(), lambda sched: pipe.generate(labels, T, sched, solver, seed=s))
            return {**res, "nfe": (pipe.forwards - before) / (2 * samples)}  # a guided pair counts once
        return compute
    cells = [((name, nfe), f"{name}|NFE{nfe}|seed{s}|{samples}{suffix}", cell(make, solver, T, s))
             for name in rows for nfe, (make, solver, T, suffix) in rows[name].items() for s in schedules.EVAL_SEEDS]
    res = evaluation.seeded_cells(pipe, ref, f"{name_}_eval", cells, f"{name_} eval")
    table = [{"schedule": name, "solver": solver, "T": T, "nfe_budget": nfe, "nfe": res[(name, nfe)][0]["nfe"],
              "samples": samples, "seeds": list(schedules.EVAL_SEEDS),
              **evaluation.seed_summary(res[(name, nfe)], policy.FLOW_ACTIONS.names)}
             for name in rows for nfe, (_, solver, T, _) in rows[name].items()]
    table.sort(key=lambda r: r["nfe_budget"])
    runs.write_json(os.path.join(pipe.run_dir, f"{name_}_eval.json"),
                     {"rows": table, "reference": refs, "w_0": w_0, "fingerprint": pipe.fingerprint, "device": str(pipe.device)})
    head = f"| schedule | T | NFE | {evaluation.metric_head(ref)} images/s |"
    md = [f"{name_} path: {samples} samples per row and seed, seeds {list(schedules.EVAL_SEEDS)}; FID, precision and recall against "
          f"the {n} test images{evaluation.REF_NOTE}; NFE = network evaluations per image (a guided pair in one batch counts as one); "
          f"images/s on {pipe.device}.", "", head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in refs.items():
        md.append(f"| {name} | – | – | {evaluation.metric_cells(r, ref)} – |")
    for r in table:
        md.append(f"| {r['schedule']} | {r['T']} | {r['nfe']:g} | {evaluation.metric_cells(r, ref)} {r['images_per_s']:.0f} |")
    runs.write_text(os.path.join(pipe.run_dir, f"{name_}_eval.md"), "\n".join(md) + "\n")
    print("\n".join(md))


def flow_grids(pipe: pipeline.FlowPipeline, nfe: int, per_class: int = 10) -> None:
    """<path>_samples_nfe<nfe>.png: a row per class, DPM-Solver++(2S) on the uniform grid with the swept w_0."""
    saved = runs.read_json(os.path.join(pipe.run_dir, f"{pipe.path.name}_sweep_w.json"), {})
    w_0 = saved["w_0"] if saved.get("fingerprint") == pipe.fingerprint else 1.0
    labels = torch.arange(pipe.cfg.num_classes).repeat_interleave(per_class)
    T = samplers.steps_for_nfe("dpmpp2s", nfe)
    images = pipe.generate(labels, T, samplers.heuristic_schedule(samplers.uniform_grid(T), w_0), "dpmpp2s", seed=0)
    path = os.path.join(pipe.run_dir, f"{pipe.path.name}_samples_nfe{nfe}.png")
    plots.save_grid(images, path, nrow=per_class)
    print("wrote", path)


def plot_flow_policy(pipe: pipeline.FlowPipeline, nfe: int, samples: int = 1000, per_class: int = 6, lines: int = 24) -> None:
    """<path>_policy_grids_nfe<nfe>.png: the adaptive policy's per-sample time grids t_k (thin lines:
    `lines` samples; red: mean +- sd; dashed: the uniform grid it started from) and guidance w per
    step; <path>_heuristic_vs_adaptive_nfe<nfe>.png: each class's samples from the start schedule
    (left) and the policy (right), same noise."""
    make, solver, T = adaptive_flow_policy(pipe, nfe)
    sched = make()
    h = policy.activation(sched.h_pre.cpu(), policy.FLOW_ACTIONS)                   # (T, 2) the start, as executed
    pipe.generate(pipeline.balanced_labels(samples, pipe.cfg.num_classes), T, sched, solver, seed=0)
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
    plots.plot_panels(path, panels, size=(360, 240), title=f"adaptive policy, {solver}, T={T} (NFE {nfe}): {samples} samples; "
                                                     f"dashed: the start schedule")
    print("wrote", path)
    K = pipe.cfg.num_classes
    labels = torch.arange(K).repeat_interleave(per_class)
    start = samplers.table_schedule(samplers.grid_table(t_h[:, 0], h[:, 1]))
    left = pipe.generate(labels, T, start, solver, seed=0).view(K, per_class, -1)
    right = pipe.generate(labels, T, make(), solver, seed=0).view(K, per_class, -1)
    C, S = pipe.cfg.channels, pipe.cfg.img_size
    both = torch.cat([left, torch.ones(K, 1, C * S * S), right], dim=1).view(-1, C, S, S)
    path = os.path.join(pipe.run_dir, f"{pipe.path.name}_heuristic_vs_adaptive_nfe{nfe}.png")
    plots.save_grid(both, path, nrow=2 * per_class + 1)
    print("wrote", path, "(left: the start schedule; right: the adaptive policy; one class per row)")


def flow_bench(pipe: pipeline.FlowPipeline, batch: int, nfe: int = 8, repeats: int = 3) -> dict:
    """The adaptive flow policy's cost: its T forwards vs the network's T guided forwards (2B rows),
    both on the same batch; and images/s of sampling with the policy vs the uniform grid."""
    file = schedules.flow_policy_file(pipe.path.name, "policy", nfe)
    make, solver, T = adaptive_flow_policy(pipe, nfe)
    c = pipe.cfg
    labels = pipeline.balanced_labels(batch, c.num_classes).to(pipe.device)
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
    res = {name: batch / secs for name, secs in throughput.time_round_robin(fns, pipe.device, repeats).items()}
    res["policy_cost"] = res["bare forwards"] / res["policy forwards"]
    print(f"flow bench ({pipe.device}, batch {batch}, {solver}, T={T}, CFG): sample {res['sample']:.1f} images/s, "
          f"sample + policy {res['sample + policy']:.1f} images/s; policy cost {100 * res['policy_cost']:.2f}% "
          f"of the network's forward time per step ({file}.pt)")
    return res


def flow_refined_grid(pipe: pipeline.FlowPipeline, nfe: int, repeat: int, per_class: int = 10) -> None:
    """<path>_samples_adaptive_repeat<k>_nfe<n>.png: the adaptive flow policy with repeated sampling
    (its discriminator keeps the best of k), a row per class. The ODE is deterministic given the
    noise, so there is no look-ahead here: candidates differ only in their starting noise."""
    make, solver, T = adaptive_flow_policy(pipe, nfe)
    refiner = studies.Refiner(pipe, schedules.flow_policy_file(pipe.path.name, "policy", nfe))
    labels = torch.arange(pipe.cfg.num_classes).repeat_interleave(per_class)
    before = pipe.forwards
    images = studies.refine(lambda y: pipe.generate(y, T, make(), solver, seed=0), labels, repeat, refiner.score)
    path = os.path.join(pipe.run_dir, f"{pipe.path.name}_samples_adaptive_repeat{repeat}_nfe{nfe}.png")
    plots.save_grid(images, path, nrow=per_class)
    print("wrote", path, f"({ddp.all_sum(pipe.forwards - before) / len(labels):.1f} network rows per image)")


def add_flags(p) -> None:
    """sample.py's flags of the continuous generator."""
    p.add_argument("--flow", default=None, choices=list(samplers.PATHS),
                   help="the continuous generator (flow.pt / vp.pt) instead of the NAT: grids, or --eval at NFE --nfe")
    p.add_argument("--nfe", default="4,8", help="comma-separated NFE budgets for --flow --eval")


def run(args, device: torch.device) -> None:
    """Everything sample.py --flow does, as the flags ask."""
    try:
        nfes = [int(v) for v in args.nfe.split(",")]
    except ValueError:
        raise runs.UserError(f"--nfe {args.nfe!r}: expected integers like 4,8") from None
    if any(v < 1 for v in nfes):
        raise runs.UserError("--nfe budgets must be positive")
    nat_only = [f for f, on in (("--lookahead", args.lookahead > 1), ("--refine", args.refine), ("--lam", args.lams),
                                 ("--hacking", args.hacking), ("--reward-check", args.reward_check)) if on]
    if nat_only:
        raise runs.UserError(f"{', '.join(nat_only)}: NAT only (the ODE's steps are deterministic, and the "
                             f"refinement table, the blend and the reward study are built for the NAT); "
                             f"--flow takes --repeat")
    fpipe = pipeline.FlowPipeline(args.run_dir, device, args.flow, bf16=not args.no_bf16, batch=args.batch, rows=args.rows)
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

