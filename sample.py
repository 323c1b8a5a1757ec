"""Generate image grids, evaluate schedules side by side, and benchmark decoding.

    python sample.py --run-dir runs/small                     # grids: samples_<row>_T8.png
    python sample.py --run-dir runs/small --sweep-w           # pick w_0 of AdaNAT's heuristic (train-set FID)
    python sample.py --run-dir runs/small --eval              # the table: eval.json + eval.md
    python sample.py --run-dir runs/small --eval --samples 2000
    python sample.py --run-dir runs/small --bench             # generate vs bare forwards, images/s
    python sample.py --run-dir runs/small --flow flow         # the continuous generator's grid (train.py --stage flow)
    python sample.py --run-dir runs/small --flow flow --eval  # its table at NFE 4 and 8: flow_eval.json + flow_eval.md
    python sample.py --run-dir runs/small --refine            # AdaGen §III-F1 refinement table: refine_T8.json + .md
    python sample.py --run-dir runs/small --lam 0,0.5,1       # AdaGen §III-F2 fidelity blend: blend_T8.* (train.py --stage fidelity)
    python sample.py --run-dir runs/small --hacking           # AdaGen §III-D reward study: hacking_T8.* (train.py --reward ...)

Evaluation protocol (DESIGN.md "Evaluation"): every schedule row generates `--samples`
images with balanced labels on the same EMA generator, for 3 sampling seeds; each image is
decoded by the tokenizer and embedded by the feature network trained in stage `featnet`;
FID, precision and recall (k = 3) are computed against the 10 000 real *test* images, and
conditional accuracy is the feature network's accuracy at recognising the requested class.
Two reference rows give the scale: the tokenizer's reconstructions of the test images (the
floor no schedule can beat) and 10 000 real training images (the metric's own noise).
Anything *chosen* (w_0 here) is chosen by FID against training-set statistics, so the test
set stays held out. Results are cached per (row, T, seed, samples) in eval_cache.json, so
an interrupted evaluation resumes.
"""
import argparse
import itertools
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import data
import ddp
import fid
import nat
import policy
import reward
import pipeline
import plots
import runs
import samplers

# The hand-written schedules (nat.heuristic_table): MaskGIT's, and AdaNAT's whose w_0 is swept.


POLICY_ROWS = {"static": "learned static (PPO, no state)", "policy": "adaptive policy (PPO)",
               "smooth": "adaptive + smoothing (PPO, beta_ema={beta_ema:g})"}


def policy_schedule(pipe: pipeline.Pipeline, kind: str, T: int, start: str = "heuristic",
                    reward_name: str = "adversarial") -> tuple | None:
    """(make_schedule, config, runs.fingerprint) of the trained `kind` policy for T whose residual
    starts from `start` (pipeline.PI_STARTS), trained on `reward_name`, or None if there is none."""
    name = pipeline.policy_file(kind, start, T, reward_name)
    path = os.path.join(pipe.run_dir, f"{name}.pt")
    if not os.path.exists(path):
        return None
    pi, cfg = pipeline.load_policy(path, pipe.device)
    h_pre = policy.inverse_activation(torch.tensor(cfg["heuristic"])).to(pipe.device)
    make = lambda: policy.PolicySchedule(pi, h_pre, beta_ema=cfg["beta_ema"])
    return make, cfg, runs.fingerprint(pipe.run_dir, (name,))


SEARCH_ROWS = {"param": "parametric family (searched, 6 shape parameters)", "search": "AutoNAT search (free T x 4 table)"}


def schedule_rows(pipe: pipeline.Pipeline, w_0: float, steps: list[int], sweep_samples: int = 2000) -> dict:
    """name -> {T: (make_schedule, guided, key, generator)}: the heuristics, every finished search
    and every trained policy for these T, in the order of the comparison (DESIGN.md); then the
    Beta-trained generator of the pr-search stage (generator = its pipeline.Pipeline; else None, this run's)."""
    rows = {"MaskGIT (cos m, tau2_0=4.5, no CFG)":
            {T: (lambda T=T: nat.heuristic_schedule(T, **pipeline.MASKGIT), False, "", None) for T in steps},
            f"AdaNAT heuristic (tau2_0=1, w_0={w_0:g})":
            {T: (lambda T=T: nat.heuristic_schedule(T, pipeline.ADANAT_TAU2_0, w_0), True, "", None) for T in steps}}

    def add_searches(p: pipeline.Pipeline, prefix: str, gen):
        for name, label in SEARCH_ROWS.items():
            for T in steps:
                found = pipeline.searched_table(p, name, T)
                if found is None:
                    continue
                table, cfg, fp = found
                if cfg["generator"] != p.fingerprint:
                    print(f"warning: {p.run_dir}/{name}_T{T}.pt was searched on other weights or numerics ({cfg['generator']})")
                key = f"|{fp}" + (f"|{gen.fingerprint}" if gen is not None else "")
                rows.setdefault(prefix + label, {})[T] = (lambda table=table: nat.table_schedule(table), True, key, gen)

    add_searches(pipe, "", None)
    for start, kind in itertools.product(pipeline.PI_STARTS, POLICY_ROWS):
        for T in steps:
            found = policy_schedule(pipe, kind, T, start)
            if found is None:
                continue
            make, cfg, fp = found
            if start == "heuristic" and abs(cfg["heuristic"][-1][3] - w_0 * (T - 1) / T) > 1e-4:   # its w_{T-1}
                print(f"warning: {kind}_T{T}.pt started from w_0 other than {w_0:g} (the sweep changed since)")
            label = POLICY_ROWS[kind].format(beta_ema=cfg["beta_ema"])
            if start != "heuristic":
                label = label[:-1] + f", on {pipeline.PI_STARTS[start]})"
            rows.setdefault(label, {})[T] = (make, True, f"|{fp}", None)
    beta_dir = os.path.join(pipe.run_dir, "beta")                      # the pr-search stage's full generator
    if os.path.exists(os.path.join(beta_dir, "nat.pt")) and runs.load_ckpt(os.path.join(beta_dir, "nat.pt")).get("done"):
        bp = pipeline.Pipeline(beta_dir, pipe.device, pipe.bf16, pipe.batch, pipe.rows)
        a, b = bp.cfg.alpha, bp.cfg.beta
        w_b = pipeline.get_w0(bp, pipeline.RealFeatures(bp), sweep_samples)
        prefix = f"Beta({a:.3g}, {b:.3g})-trained NAT: "
        rows[prefix + f"AdaNAT heuristic (w_0={w_b:g})"] = {
            T: (lambda T=T: nat.heuristic_schedule(T, pipeline.ADANAT_TAU2_0, w_b), True, f"|beta|{bp.fingerprint}", bp) for T in steps}
        add_searches(bp, prefix, bp)
    return rows


METRIC_KEYS = ("fid", "fid_recon", "fid2", "precision", "recall", "cond_acc")


REF_NOTE = ("; FID vs recon: against the tokenizer's reconstructions of the test images (the schedule's effect "
            "without the tokenizer's); featnet2: FID on the independent feature network")


def metric_head(ref: "pipeline.RealFeatures") -> str:
    """The metric columns of every table: FID vs test, vs the tokenizer's reconstructions, on featnet2, P, R, acc."""
    return ("FID | " + ("FID vs recon | " if ref.recon_mu is not None else "") +
            ("featnet2 FID | " if ref.net2 is not None else "") + "precision | recall | cond. acc. |")


def metric_cells(r: dict, ref: "pipeline.RealFeatures") -> str:
    """One row's metric cells for metric_head (mean ± sd when the row has an sd)."""
    v = lambda k: f"{r[k]:.2f} ± {r[k + '_sd']:.2f}" if k + "_sd" in r else (f"{r[k]:.2f}" if k in r else "–")
    return (f"{v('fid')} | " + (f"{v('fid_recon')} | " if ref.recon_mu is not None else "") +
            (f"{v('fid2')} | " if ref.net2 is not None else "") +
            f"{r['precision']:.3f} | {r['recall']:.3f} | {r['cond_acc']:.3f} |")


def seed_summary(per_seed: list[dict], actions: tuple) -> dict:
    """Mean and sd over the seeds' results of each metric; a policy's per-step action spread
    (from the first seed)."""
    row = {}
    for k in (*METRIC_KEYS, "images_per_s"):
        if not all(k in r for r in per_seed):
            continue
        v = np.array([r[k] for r in per_seed])
        row[k], row[k + "_sd"] = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
    if "actions_sd" in per_seed[0]:
        row["actions"] = list(actions)
        row["actions_mean_per_step"], row["actions_sd_per_step"] = per_seed[0]["actions_mean"], per_seed[0]["actions_sd"]
    return row


def measure(pipe, ref: "pipeline.RealFeatures", labels: torch.Tensor, sched, generate, to_images=lambda x: x) -> dict:
    """One table cell: generate(sched) timed (generation only), then FID / precision / recall /
    conditional accuracy of to_images(output); a policy's per-step action spread too."""
    t0 = time.time()
    out = generate(sched)
    res = {"images_per_s": len(labels) / (time.time() - t0)}
    res.update(pipeline.metrics(pipe, ref, to_images(out), labels))
    if isinstance(sched, policy.PolicySchedule):
        a = sched.actions()                                               # (T, n, D)
        res.update(actions_mean=a.mean(1).tolist(), actions_sd=a.std(1).tolist())
    return res


def time_round_robin(fns: list, device: torch.device, repeats: int) -> dict:
    """name -> best seconds of each (name, fn) over `repeats` rounds, run round-robin so that
    drift hits all alike; the first round warms up."""
    times: dict = {name: [] for name, _ in fns}
    for r in range(repeats + 1):
        for name, fn in fns:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.time()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r > 0:
                times[name].append(time.time() - t0)
    return {name: min(ts) for name, ts in times.items()}


def evaluate(pipe: pipeline.Pipeline, samples: int, steps: list[int], sweep_samples: int) -> None:
    """The evaluation table (eval.json, eval.md), resuming from eval_cache.json."""
    ref = pipeline.RealFeatures(pipe)
    w_0 = pipeline.get_w0(pipe, ref, sweep_samples)
    rows = schedule_rows(pipe, w_0, steps, sweep_samples)
    cache_path = os.path.join(pipe.run_dir, "eval_cache.json")
    cache = runs.read_json(cache_path, {})
    if cache.get("fingerprint") != f"{pipe.eval_key}|{ref.key}":
        cache = {"fingerprint": f"{pipe.eval_key}|{ref.key}"}          # other weights, device or chunking: start over
    n = min(samples, len(ref.test_feats), len(ref.train_feats))
    labels = pipeline.balanced_labels(samples, pipe.cfg.num_classes)

    # reference rows: real training images, and tokenizer reconstructions of the test images
    refs = {}
    key = f"ref|train|{n}"
    if key not in cache:
        cache[key] = pipeline.train_reference(ref, n)
    refs["real training images vs test"] = cache[key]
    key = f"ref|recon|{n}"
    if key not in cache:
        x = data.to_float(ref.test_images[:n])
        recon = pipe.decode(torch.cat([pipe.vq.tokenize(x[i:i + 500].to(pipe.device)).cpu() for i in range(0, n, 500)]))
        cache[key] = pipeline.metrics(pipe, ref, recon, ref.test_labels[:n])
    refs["tokenizer reconstructions of test vs test (floor)"] = cache[key]
    runs.write_json(cache_path, cache)

    jobs = [(name, T, s) for name in rows for T in rows[name] for s in pipeline.EVAL_SEEDS]
    bar = tqdm(jobs, desc="eval", disable=not ddp.DIST.main)
    for name, T, s in bar:
        make, guided, suffix, gen = rows[name][T]
        key = f"{name}|T{T}|seed{s}|{samples}{suffix}"
        if key not in cache:                                            # same tokenizer + featnet for every row
            cache[key] = measure(pipe, ref, labels, make(),
                                 lambda sched: (gen or pipe).generate(labels, T, sched, seed=s, guided=guided), pipe.decode)
            runs.write_json(cache_path, cache)
        bar.set_postfix(T=T, fid=f"{cache[key]['fid']:.2f}")

    table = []
    for name in rows:
        for T, (_, _, suffix, _) in rows[name].items():
            per_seed = [cache[f"{name}|T{T}|seed{s}|{samples}{suffix}"] for s in pipeline.EVAL_SEEDS]
            table.append({"schedule": name, "T": T, "samples": samples, "seeds": list(pipeline.EVAL_SEEDS),
                          **seed_summary(per_seed, policy.ACTIONS)})
    table.sort(key=lambda r: r["T"])
    runs.write_json(os.path.join(pipe.run_dir, "eval.json"),
                     {"rows": table, "reference": refs, "w_0": w_0, "fingerprint": pipe.fingerprint,
                      "device": str(pipe.device), "nat_params": sum(p.numel() for p in pipe.net.parameters())})
    head = f"| schedule | T | {metric_head(ref)} images/s |"
    md = [f"{samples} samples per row and seed, seeds {list(pipeline.EVAL_SEEDS)}; FID, precision and recall against the "
          f"{n} test images in this run's feature space{REF_NOTE}; images/s on {pipe.device} (generation only).", "",
          head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in refs.items():
        md.append(f"| {name} | – | {metric_cells(r, ref)} – |")
    for r in table:
        md.append(f"| {r['schedule']} | {r['T']} | {metric_cells(r, ref)} {r['images_per_s']:.0f} |")
    runs.write_text(os.path.join(pipe.run_dir, "eval.md"), "\n".join(md) + "\n")
    print("\n".join(md))


def grids(pipe: pipeline.Pipeline, T: int, per_class: int = 10) -> None:
    """One PNG per heuristic, a row per class: samples_maskgit_T{T}.png, samples_adanat_T{T}.png.

    AdaNAT's w_0 comes from the sweep when it has run (sample.py --sweep-w), else 2."""
    K = pipe.cfg.num_classes
    labels = torch.arange(K).repeat_interleave(per_class)
    saved = runs.read_json(os.path.join(pipe.run_dir, "sweep_w.json"), {})
    w_0 = saved["w_0"] if saved.get("fingerprint") == pipe.fingerprint else 2.0
    for name, h in {"maskgit": pipeline.MASKGIT, "adanat": dict(tau2_0=pipeline.ADANAT_TAU2_0, w_0=w_0)}.items():
        path = os.path.join(pipe.run_dir, f"samples_{name}_T{T}.png")
        plots.save_grid(pipe.decode(pipe.generate_tokens(labels, T, h["tau2_0"], h["w_0"], seed=0)), path, nrow=per_class)
        print("wrote", path)


def plot_policy(pipe: pipeline.Pipeline, T: int, samples: int = 1000, per_class: int = 6) -> None:
    """policy_actions_T{T}.png: the adaptive policy's actions per step (mean and +-1 sd over
    samples, one panel per action; AdaNAT's heuristic dashed), and heuristic_vs_adaptive_T{T}.png:
    each class's samples from the heuristic (left) and the adaptive policy (right), same seed."""
    found = policy_schedule(pipe, "policy", T)
    if found is None:
        raise runs.UserError(f"{pipe.run_dir}/policy_T{T}.pt not found: train it with python train.py --stage policy "
                              f"--run-dir {pipe.run_dir} --set pi_T={T}")
    make, cfg, _ = found
    h = policy.activation(policy.inverse_activation(torch.tensor(cfg["heuristic"])))   # (T, 4), as executed
    sched = make()
    pipe.generate(pipeline.balanced_labels(samples, pipe.cfg.num_classes), T, sched, seed=0)
    a = sched.actions()                                                            # (T, n, 4)
    mean, sd, steps = a.mean(1), a.std(1), list(range(T))
    panels = [{"title": name, "series": [
        {"x": steps, "y": mean[:, j].tolist(), "color": (200, 60, 30),
         "band": ((mean[:, j] - sd[:, j]).tolist(), (mean[:, j] + sd[:, j]).tolist())},
        {"x": steps, "y": h[:, j].tolist(), "color": (60, 60, 60), "dashed": True}]}
        for j, name in enumerate(policy.ACTIONS)]
    path = os.path.join(pipe.run_dir, f"policy_actions_T{T}.png")
    plots.plot_panels(path, panels, title=f"adaptive policy, T={T}: mean +- sd over {samples} samples per step "
                                    f"(x: step t); dashed: the heuristic it started from")
    print("wrote", path)
    K = pipe.cfg.num_classes
    labels = torch.arange(K).repeat_interleave(per_class)
    w_0 = cfg["heuristic"][-1][3] * T / (T - 1)
    left = pipe.decode(pipe.generate_tokens(labels, T, pipeline.ADANAT_TAU2_0, w_0, seed=0)).view(K, per_class, -1)
    right = pipe.decode(pipe.generate(labels, T, make(), seed=0)).view(K, per_class, -1)
    C, S = pipe.vq.cfg.in_ch, pipe.vq.cfg.img_size
    gap = torch.ones(K, 1, C * S * S)                                               # a white column between
    both = torch.cat([left, gap, right], dim=1).view(-1, C, S, S)
    path = os.path.join(pipe.run_dir, f"heuristic_vs_adaptive_T{T}.png")
    plots.save_grid(both, path, nrow=2 * per_class + 1)
    print("wrote", path, f"(left: heuristic tau2_0=1, w_0={w_0:g}; right: adaptive policy; one class per row)")


def bench(pipe: pipeline.Pipeline, batch: int, T: int = 8, repeats: int = 3) -> dict:
    """images/s of `generate` (AdaNAT's heuristic, w_0 = 2, with CFG) vs the same T bare forwards of 2B rows."""
    labels = pipeline.balanced_labels(batch, pipe.cfg.num_classes).to(pipe.device)
    sched = nat.heuristic_schedule(T, tau2_0=pipeline.ADANAT_TAU2_0, w_0=2.0)
    g = torch.Generator(pipe.device).manual_seed(0)
    tokens = torch.randint(0, pipe.cfg.vocab_size, (2 * batch, pipe.cfg.num_tokens), device=pipe.device)
    y2 = torch.cat([labels, torch.full_like(labels, pipe.cfg.null_label)])

    def run_generate():
        nat.generate(pipe.logits_fn, labels, T, sched, pipe.cfg.mask_id, pipe.cfg.num_tokens, pipe.cfg.null_label, g)

    @torch.no_grad()
    def run_forwards():
        for _ in range(T):
            pipe.logits_fn(tokens, y2)

    fns = [("generate", run_generate), ("bare forwards", run_forwards)]
    found = policy_schedule(pipe, "policy", T)
    if found is not None:                                               # the adaptive policy as the schedule
        make_policy = found[0]
        fns.append(("generate + policy", lambda: nat.generate(pipe.logits_fn, labels, T, make_policy(), pipe.cfg.mask_id,
                                                              pipe.cfg.num_tokens, pipe.cfg.null_label, g)))
        feats = torch.randn(batch, pipe.cfg.num_tokens, pipe.cfg.dim, device=pipe.device)     # (B, N, C)
        state = nat.NATState(0, tokens[:batch], feats, labels)

        def run_policy():                                               # the policy's own T forwards
            sched = make_policy()
            for t in range(T):
                sched(t, state)
        fns.append(("policy forwards", run_policy))
    res = {name: batch / secs for name, secs in time_round_robin(fns, pipe.device, repeats).items()}
    res["overhead"] = res["bare forwards"] / res["generate"] - 1
    mode = "compiled" if pipe.forward is not pipe.net else "eager"
    print(f"bench ({pipe.device}, {mode}, batch {batch}, T={T}, CFG): generate {res['generate']:.1f} images/s "
          f"= {T * res['generate']:.0f} image-steps/s, bare forwards {T * res['bare forwards']:.0f} image-steps/s; "
          f"decoding at {100 / (1 + res['overhead']):.1f}% of bare-forward throughput "
          f"(decoding overhead {100 * res['overhead']:.1f}%)")
    if "generate + policy" in res:
        res["policy_cost"] = res["bare forwards"] / res["policy forwards"]
        print(f"  adaptive policy (policy_T{T}.pt): generate + policy {res['generate + policy']:.1f} images/s; "
              f"policy cost {100 * res['policy_cost']:.2f}% of the generator's forward time per step")
    return res


# ----------------------------------------------------------------------------- the continuous generator


def flow_rows(pipe: pipeline.FlowPipeline, w_0: float, nfes: list[int]) -> dict:
    """name -> {nfe: (make_schedule, solver, T, cache-key suffix)}: every solver on every heuristic
    grid with constant guidance w_0, each solver on the uniform grid with guidance in
    pipeline.FLOW_INTERVAL, then the searched table and the PPO policies found in the run folder (their
    suffix: the checkpoint's runs.fingerprint, so a retrained one is evaluated again)."""
    rows = {}
    for solver in samplers.SOLVERS:
        for grid in samplers.GRIDS:
            rows[f"{solver}, {grid} grid, w={w_0:g}"] = {
                n: (lambda T=samplers.steps_for_nfe(solver, n), grid=grid: samplers.heuristic_schedule(
                    samplers.GRIDS[grid](T, pipe.path), w_0), solver, samplers.steps_for_nfe(solver, n), "") for n in nfes}
        lo, hi = pipeline.FLOW_INTERVAL
        rows[f"{solver}, uniform grid, w={w_0:g} for t in ({lo:g}, {hi:g}]"] = {
            n: (lambda T=samplers.steps_for_nfe(solver, n): samplers.heuristic_schedule(samplers.uniform_grid(T), w_0, pipeline.FLOW_INTERVAL),
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
    for kind in POLICY_ROWS:                                           # the PPO-trained schedules
        for n in nfes:
            found = flow_policy_schedule(pipe, kind, n)
            if found is not None:
                rows.setdefault(found[0], {})[n] = found[1:]
    return rows


def flow_policy_schedule(pipe: pipeline.FlowPipeline, kind: str, nfe: int) -> tuple | None:
    """(row name, make_schedule, solver, T, cache-key suffix) of the trained `kind` flow policy for
    the NFE budget, or None if there is none."""
    file = pipeline.flow_policy_file(pipe.path.name, kind, nfe)
    path = os.path.join(pipe.run_dir, f"{file}.pt")
    if not os.path.exists(path):
        return None
    pi, cfg = pipeline.load_policy(path, pipe.device)
    h_pre = policy.inverse_activation(torch.tensor(cfg["heuristic"]), policy.FLOW_ACTIONS).to(pipe.device)
    make = lambda: policy.PolicySchedule(pi, h_pre, beta_ema=cfg["beta_ema"], spec=policy.FLOW_ACTIONS,
                                         to_step=samplers.actions_to_step(cfg["T"]))
    name = POLICY_ROWS[kind].format(beta_ema=cfg["beta_ema"])[:-1] + f", {cfg['solver']})"
    return name, make, cfg["solver"], cfg["T"], f"|{runs.fingerprint(pipe.run_dir, (file,))}"


def adaptive_flow_policy(pipe: pipeline.FlowPipeline, nfe: int) -> tuple:
    """(make_schedule, solver, T) of the adaptive flow policy for the NFE budget; a clear error if there is none."""
    found = flow_policy_schedule(pipe, "policy", nfe)
    if found is None:
        raise runs.UserError(f"{pipe.run_dir}/{pipeline.flow_policy_file(pipe.path.name, 'policy', nfe)}.pt not found: "
                              f"train it with python train.py --stage flow-policy --run-dir {pipe.run_dir}")
    return found[1:4]


def evaluate_flow(pipe: pipeline.FlowPipeline, samples: int, nfes: list[int], sweep_samples: int) -> None:
    """The continuous generator's table (<path>_eval.json, <path>_eval.md), resumable through
    <path>_eval_cache.json: FID / precision / recall against the test images, NFE per image."""
    name_ = pipe.path.name
    ref = pipeline.RealFeatures(pipe)
    w_0 = pipeline.flow_sweep_w(pipe, ref, sweep_samples)
    rows = flow_rows(pipe, w_0, nfes)
    cache_path = os.path.join(pipe.run_dir, f"{name_}_eval_cache.json")
    cache = runs.read_json(cache_path, {})
    if cache.get("fingerprint") != f"{pipe.eval_key}|{ref.key}":
        cache = {"fingerprint": f"{pipe.eval_key}|{ref.key}"}
    n = min(samples, len(ref.test_feats), len(ref.train_feats))
    labels = pipeline.balanced_labels(samples, pipe.cfg.num_classes)
    refs = {"real training images vs test": pipeline.train_reference(ref, n)}
    jobs = [(name, nfe, s) for name in rows for nfe in rows[name] for s in pipeline.EVAL_SEEDS]
    bar = tqdm(jobs, desc=f"{name_} eval", disable=not ddp.DIST.main)
    for name, nfe, s in bar:
        make, solver, T, suffix = rows[name][nfe]
        key = f"{name}|NFE{nfe}|seed{s}|{samples}{suffix}"
        if key not in cache:
            before = pipe.forwards
            cache[key] = measure(pipe, ref, labels, make(), lambda sched: pipe.generate(labels, T, sched, solver, seed=s))
            cache[key]["nfe"] = (pipe.forwards - before) / (2 * samples)        # a guided pair counts once
            runs.write_json(cache_path, cache)
        bar.set_postfix(nfe=nfe, fid=f"{cache[key]['fid']:.2f}")
    table = []
    for name in rows:
        for nfe, (_, solver, T, suffix) in rows[name].items():
            per_seed = [cache[f"{name}|NFE{nfe}|seed{s}|{samples}{suffix}"] for s in pipeline.EVAL_SEEDS]
            table.append({"schedule": name, "solver": solver, "T": T, "nfe_budget": nfe, "nfe": per_seed[0]["nfe"],
                          "samples": samples, "seeds": list(pipeline.EVAL_SEEDS), **seed_summary(per_seed, policy.FLOW_ACTIONS.names)})
    table.sort(key=lambda r: r["nfe_budget"])
    runs.write_json(os.path.join(pipe.run_dir, f"{name_}_eval.json"),
                     {"rows": table, "reference": refs, "w_0": w_0, "fingerprint": pipe.fingerprint, "device": str(pipe.device)})
    head = f"| schedule | T | NFE | {metric_head(ref)} images/s |"
    md = [f"{name_} path: {samples} samples per row and seed, seeds {list(pipeline.EVAL_SEEDS)}; FID, precision and recall against "
          f"the {n} test images{REF_NOTE}; NFE = network evaluations per image (a guided pair in one batch counts as one); "
          f"images/s on {pipe.device}.", "", head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in refs.items():
        md.append(f"| {name} | – | – | {metric_cells(r, ref)} – |")
    for r in table:
        md.append(f"| {r['schedule']} | {r['T']} | {r['nfe']:g} | {metric_cells(r, ref)} {r['images_per_s']:.0f} |")
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
    file = pipeline.flow_policy_file(pipe.path.name, "policy", nfe)
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
    res = {name: batch / secs for name, secs in time_round_robin(fns, pipe.device, repeats).items()}
    res["policy_cost"] = res["bare forwards"] / res["policy forwards"]
    print(f"flow bench ({pipe.device}, batch {batch}, {solver}, T={T}, CFG): sample {res['sample']:.1f} images/s, "
          f"sample + policy {res['sample + policy']:.1f} images/s; policy cost {100 * res['policy_cost']:.2f}% "
          f"of the network's forward time per step ({file}.pt)")
    return res


# ----------------------------------------------------------------------------- AdaGen §III-D and §III-F

class Refiner:
    """A trained policy checkpoint's auxiliary networks reused at sampling (AdaGen §III-F1): its
    discriminator D ranks finished images (repeated sampling), its critic V ranks the candidate
    next states of a NAT step (look-ahead, nat.generate). Both are the checkpoint's last weights
    (the policy's are its best by training FID)."""

    def __init__(self, pipe, file: str, disc: str = "disc"):
        path = os.path.join(pipe.run_dir, f"{file}.pt")
        if not os.path.exists(path):
            raise runs.UserError(f"{path} not found: refinement uses a trained policy's discriminator and critic; "
                                  f"train it with python train.py --run-dir {pipe.run_dir} --stage policy")
        ck = runs.load_ckpt(path)
        _, self.V = pipeline.build_policy(ck["config"])
        self.V.load_state_dict(ck["critic"])
        self.V.to(pipe.device).eval()
        self.backbone, channels = pipeline.classifier_backbone(pipeline.build_model(pipe.run_dir, "backbone", pipe.device))
        self.D = reward.ProjectedDiscriminator(channels, pipe.cfg.num_classes)
        if disc not in ck:
            raise runs.UserError(f"{path} has no {disc!r}: the discriminator after its warm-up is kept from this "
                                  f"version on; retrain that policy (delete the file)")
        self.D.load_state_dict(ck[disc])
        self.D.to(pipe.device).eval()
        self.device = pipe.device

    @torch.no_grad()
    def score(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """D's reward of images (n, C, H, W) for labels (n,) -> (n,) on the CPU."""
        return torch.cat([reward.reward(self.D(self.backbone(images[i:i + 500].to(self.device)),
                                               labels[i:i + 500].to(self.device))).cpu()
                          for i in range(0, len(images), 500)])

    @torch.no_grad()
    def value(self, features: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """V(s_t) of states seen through the generator's features (B, N, C), t (B,) -> (B,)."""
        return self.V(features, t).float()


def spearman(x, y) -> float:
    """Spearman's rank correlation of two equal-length sequences (ties: their order of appearance)."""
    rank = lambda v: np.argsort(np.argsort(np.asarray(v, dtype=float), kind="stable"), kind="stable").astype(float)
    return float(np.corrcoef(rank(x), rank(y))[0, 1])


def perturbed(table: torch.Tensor, seed: int, scale: float = 0.5) -> torch.Tensor:
    """A (T, 4) schedule moved by fixed Gaussian noise of sd `scale` in pre-activation space on
    the knobs that act (policy.NAT_ACTIONS.active): a nearby schedule that exploration could reach."""
    T = table.shape[0]
    noise = torch.randn(T, 4, generator=torch.Generator().manual_seed(seed)) * policy.NAT_ACTIONS.active(T)
    return policy.activation(policy.inverse_activation(table) + scale * noise)


def reward_check(pipe: pipeline.Pipeline, samples: int, sweep_samples: int, T: int = 4) -> dict:
    """reward_check.md / .json: before PPO is spent on the reward, does it rank schedules as FID does?
    Eight fixed T-step schedules (MaskGIT, AdaNAT's heuristic, the searched table and the searched
    family, and one perturbation of each), `samples` images each (seed 1, balanced labels), scored by
    the discriminator of policy_T{T}.pt as it was after its warm-up, and measured by FID against
    training-set statistics on the FID network and on featnet2, precision and recall (against the
    training features). Reports Spearman rho(mean reward, -FID) per network and rho(FID, FID2)."""
    ref = pipeline.RealFeatures(pipe)
    if ref.net2 is None:
        raise runs.UserError(f"the reward check measures FID on two networks: train featnet2 with python train.py "
                              f"--run-dir {pipe.run_dir} --stage featnet2")
    w_0 = pipeline.get_w0(pipe, ref, sweep_samples)
    tables = {"MaskGIT": nat.heuristic_table(T, **pipeline.MASKGIT), f"AdaNAT heuristic (w_0={w_0:g})":
              nat.heuristic_table(T, pipeline.ADANAT_TAU2_0, w_0)}
    for name, stage in (("search", "search"), ("param", "param-search")):
        found = pipeline.searched_table(pipe, name, T)
        if found is None:
            raise runs.UserError(f"the reward check compares the searched schedules too: run python train.py --run-dir "
                                  f"{pipe.run_dir} --stage {stage} --set search_T={T}")
        tables[SEARCH_ROWS[name]] = found[0].float()
    for i, (name, table) in enumerate(list(tables.items())):
        tables[f"{name}, perturbed"] = perturbed(table, seed=i)
    scorer = Refiner(pipe, pipeline.policy_file("policy", "heuristic", T), disc="disc_warmup")
    labels = pipeline.balanced_labels(samples, pipe.cfg.num_classes)
    rows = []
    for name, table in tqdm(tables.items(), desc="reward check", disable=not ddp.DIST.main):
        images = pipe.decode(pipe.generate(labels, T, nat.table_schedule(table), seed=1))
        feats, _ = fid.extract(pipe.featnet, images, device=pipe.device)
        P, R = fid.precision_recall(ref.train_feats, feats, k=3, device=ref.device)
        rows.append({"schedule": name, "table": table.tolist(), "reward": scorer.score(images, labels).mean().item(),
                     "fid": fid.fid_from_features(feats, ref.train_mu, ref.train_sigma),
                     "fid2": fid.fid_from_features(fid.extract(ref.net2, images, device=pipe.device)[0],
                                                   ref.train2_mu, ref.train2_sigma), "precision": P, "recall": R})
    rho = {"featnet": spearman([r["reward"] for r in rows], [-r["fid"] for r in rows]),
           "featnet2": spearman([r["reward"] for r in rows], [-r["fid2"] for r in rows])}
    out = {"T": T, "samples": samples, "rows": rows, "spearman": rho,
           "spearman_fid_fid2": spearman([r["fid"] for r in rows], [r["fid2"] for r in rows]),
           "d_acc_warmup": runs.load_ckpt(os.path.join(pipe.run_dir, f"{pipeline.policy_file('policy', 'heuristic', T)}.pt"))
           .get("d_acc_warmup"), "fingerprint": pipe.fingerprint}
    runs.write_json(os.path.join(pipe.run_dir, "reward_check.json"), out)
    md = [f"Reward check at T = {T}: {samples} samples per schedule (seed 1); the discriminator of policy_T{T}.pt after its "
          f"warm-up (held-out accuracy {out['d_acc_warmup']}); FID against training-set statistics on the FID network "
          f"and on featnet2; precision and recall against training features.", "",
          "| schedule | mean reward | FID | featnet2 FID | precision | recall |", "|---|---|---|---|---|---|"]
    md += [f"| {r['schedule']} | {r['reward']:.4f} | {r['fid']:.2f} | {r['fid2']:.2f} | {r['precision']:.3f} | "
           f"{r['recall']:.3f} |" for r in rows]
    md += ["", f"Spearman rho(mean reward, -FID): FID network {rho['featnet']:.3f}, featnet2 {rho['featnet2']:.3f}; "
               f"rho(FID, featnet2 FID) = {out['spearman_fid_fid2']:.3f}."]
    runs.write_text(os.path.join(pipe.run_dir, "reward_check.md"), "\n".join(md) + "\n")
    print("\n".join(md))
    return out


def refine(make_images, labels: torch.Tensor, repeat: int, score_fn) -> torch.Tensor:
    """Repeated sampling (AdaGen Algorithm 2): make_images(labels repeated `repeat` times, each
    request's candidates consecutive) -> images (n*k, ...); keep each request's candidate with the
    highest score_fn(images, labels) (n*k,). repeat = 1 is plain sampling."""
    y = labels.repeat_interleave(repeat)
    images = make_images(y)
    if repeat == 1:
        return images
    return images[reward.best_of(score_fn(images, y), repeat)]


def random_scores(seed: int):
    """The control of repeated sampling: a scorer that ranks finished candidates at random
    (seeded; it runs on the gathered images, so every rank draws the same numbers)."""
    g = torch.Generator().manual_seed(seed + 10007)
    return lambda x, *_: torch.rand(x.shape[0], generator=g).to(x.device)


def refined_nat(pipe: pipeline.Pipeline, labels: torch.Tensor, T: int, make, seed: int, repeat: int = 1, lookahead: int = 1,
                refiner: Refiner | None = None, random_pick: bool = False) -> tuple[torch.Tensor, float]:
    """NAT images (n, C, H, W) with repeated sampling (D) and look-ahead (V), or their random-pick
    control, and the generator forwards per image that it took (counted; a guided step is 2 rows)."""
    score_img = random_scores(seed) if random_pick else refiner.score if refiner else None
    score_state = "random" if random_pick else refiner.value if refiner else None   # nat.generate's control
    before = pipe.forwards
    images = refine(lambda y: pipe.decode(pipe.generate(y, T, make(), seed, lookahead=lookahead, score_fn=score_state)),
                    labels, repeat, score_img)
    return images, ddp.all_sum(pipe.forwards - before) / len(labels)


def study_table(pipe: pipeline.Pipeline, ref: pipeline.RealFeatures, rows: dict, samples: int, stem: str, note: str) -> list[dict]:
    """Evaluate rows {name: (fn(labels, seed) -> (images, forwards per image), cache suffix)} over
    pipeline.EVAL_SEEDS on balanced labels, resuming from <stem>_cache.json; write <stem>.json / .md."""
    labels = pipeline.balanced_labels(samples, pipe.cfg.num_classes)
    cache_path = os.path.join(pipe.run_dir, f"{stem}_cache.json")
    cache = runs.read_json(cache_path, {})
    if cache.get("fingerprint") != f"{pipe.eval_key}|{ref.key}":
        cache = {"fingerprint": f"{pipe.eval_key}|{ref.key}"}
    bar = tqdm([(name, s) for name in rows for s in pipeline.EVAL_SEEDS], desc=stem, disable=not ddp.DIST.main)
    for name, s in bar:
        fn, suffix = rows[name]
        key = f"{name}|seed{s}|{samples}{suffix}"
        if key not in cache:
            t0 = time.time()
            images, forwards = fn(labels, s)
            cache[key] = {"images_per_s": len(labels) / (time.time() - t0), "forwards": forwards,
                          **pipeline.metrics(pipe, ref, images, labels)}
            runs.write_json(cache_path, cache)
        bar.set_postfix(fid=f"{cache[key]['fid']:.2f}")
    table = []
    for name, (_, suffix) in rows.items():
        per_seed = [cache[f"{name}|seed{s}|{samples}{suffix}"] for s in pipeline.EVAL_SEEDS]
        table.append({"schedule": name, "samples": samples, "seeds": list(pipeline.EVAL_SEEDS), **seed_summary(per_seed, ()),
                      "forwards": per_seed[0]["forwards"]})
    runs.write_json(os.path.join(pipe.run_dir, f"{stem}.json"), {"rows": table, "fingerprint": pipe.fingerprint,
                                                                   "device": str(pipe.device)})
    head = f"| schedule | {metric_head(ref)} forwards/image | images/s |"
    md = [f"{note} {samples} samples per row and seed, seeds {list(pipeline.EVAL_SEEDS)}; FID, precision and recall against the "
          f"test images{REF_NOTE}; forwards = generator rows run per image, counted (a guided step is 2); images/s on "
          f"{pipe.device}.", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in table:
        md.append(f"| {r['schedule']} | {metric_cells(r, ref)} {r['forwards']:.1f} | {r['images_per_s']:.1f} |")
    runs.write_text(os.path.join(pipe.run_dir, f"{stem}.md"), "\n".join(md) + "\n")
    print("\n".join(md))
    return table


def adaptive_nat_policy(pipe: pipeline.Pipeline, T: int, kind: str = "policy", reward_name: str = "adversarial"):
    """(make_schedule, cache-key suffix) of a trained NAT policy; a clear error if there is none."""
    found = policy_schedule(pipe, kind, T, "heuristic", reward_name)
    if found is None:
        raise runs.UserError(f"{pipe.run_dir}/{pipeline.policy_file(kind, 'heuristic', T, reward_name)}.pt not found: "
                              f"train it with python train.py --run-dir {pipe.run_dir} --stage {kind}"
                              + (f" --reward {reward_name}" if reward_name != "adversarial" else "") + f" --set pi_T={T}")
    make, _, fp = found
    return make, f"|{fp}"


def refine_study(pipe: pipeline.Pipeline, samples: int, T: int, sweep_samples: int, k_repeat: tuple = (2, 3),
                 k_look: int = 2) -> None:
    """refine_T{T}.json / .md (AdaGen §III-F1, Tables IX-X): the adaptive policy alone, with
    repeated sampling (D), look-ahead (V) and both; the same candidates picked at random; and
    the same forwards spent on more steps instead (policy_T{T'}.pt if trained, else AdaNAT's
    heuristic at T', said in the row's name)."""
    make, fp = adaptive_nat_policy(pipe, T)
    refiner = Refiner(pipe, pipeline.policy_file("policy", "heuristic", T))
    gen = lambda **kw: lambda y, s: refined_nat(pipe, y, T, make, s, refiner=refiner, **kw)
    rows = {"adaptive": (gen(), fp)}
    for k in k_repeat:
        rows[f"adaptive + repeat {k} (D picks)"] = (gen(repeat=k), fp)
    rows[f"adaptive + lookahead {k_look} (V picks)"] = (gen(lookahead=k_look), fp)
    rows[f"adaptive + repeat {k_repeat[0]} + lookahead {k_look}"] = (gen(repeat=k_repeat[0], lookahead=k_look), fp)
    rows[f"control: repeat {k_repeat[0]}, random pick"] = (gen(repeat=k_repeat[0], random_pick=True), fp)
    rows[f"control: lookahead {k_look}, random pick"] = (gen(lookahead=k_look, random_pick=True), fp + "|pick=stream")
    ref = pipeline.RealFeatures(pipe)
    w_0 = pipeline.get_w0(pipe, ref, sweep_samples)
    for k in k_repeat:                                                  # repeat k costs k x the forwards of T steps
        Tk = k * T
        try:
            make_k, fp_k = adaptive_nat_policy(pipe, Tk)
            name = f"control: adaptive policy at T={Tk} (same forwards as repeat {k})"
        except runs.UserError:
            make_k, fp_k = (lambda Tk=Tk: nat.heuristic_schedule(Tk, pipeline.ADANAT_TAU2_0, w_0)), ""
            name = f"control: AdaNAT heuristic at T={Tk} (same forwards as repeat {k}; no policy_T{Tk}.pt)"
        rows[name] = ((lambda y, s, Tk=Tk, m=make_k: refined_nat(pipe, y, Tk, m, s)), fp_k)
    study_table(pipe, ref, rows, samples, f"refine_T{T}", f"Inference-time refinement at T = {T}.")


def blend_schedule(pipe: pipeline.Pipeline, T: int, lam: float):
    """(make_schedule, suffix) of AdaGen's fidelity blend (Eq. 14) at lam: fidelity_T{T}.pt on policy_T{T}.pt."""
    file = pipeline.policy_file("fidelity", "heuristic", T)
    path = os.path.join(pipe.run_dir, f"{file}.pt")
    if not os.path.exists(path):
        raise runs.UserError(f"{path} not found: train it with python train.py --run-dir {pipe.run_dir} --stage fidelity "
                              f"--set pi_T={T} (after --stage policy)")
    pi_fid, cfg = pipeline.load_policy(path, pipe.device)
    base, base_cfg = pipeline.load_policy(os.path.join(pipe.run_dir, f"{cfg['base']}.pt"), pipe.device)
    if base_cfg["heuristic"] != cfg["heuristic"]:
        raise runs.UserError(f"{path} and {cfg['base']}.pt start from different schedules (the w_0 sweep changed "
                              f"between them): retrain the fidelity stage")
    h_pre = policy.inverse_activation(torch.tensor(cfg["heuristic"])).to(pipe.device)
    make = lambda: policy.PolicySchedule(pi_fid, h_pre, base=base, lam=lam)
    return make, f"|{runs.fingerprint(pipe.run_dir, (file, cfg['base']))}"


def blend_study(pipe: pipeline.Pipeline, samples: int, T: int, lams: list[float], classes: tuple = (0, 7), per_class: int = 16) -> None:
    """blend_T{T}.json / .md / _curve.png and blend_grids_T{T}.png (AdaGen §III-F2, Figure 13):
    FID / precision / recall per lam, and for two classes a 4x4 grid per lam side by side."""
    makes = {lam: blend_schedule(pipe, T, lam) for lam in lams}
    rows = {f"lam = {lam:g}": ((lambda y, s, m=m: refined_nat(pipe, y, T, m, s)), fp) for lam, (m, fp) in makes.items()}
    table = study_table(pipe, pipeline.RealFeatures(pipe), rows, samples, f"blend_T{T}", f"Fidelity-diversity blend at T = {T}.")
    panels = [{"title": key, "series": [{"x": lams, "y": [r[key] for r in table], "color": color,
                                          "band": ([r[key] - r[key + "_sd"] for r in table], [r[key] + r[key + "_sd"] for r in table])}]}
              for key, color in (("fid", (200, 60, 30)), ("precision", (30, 90, 200)), ("recall", (20, 140, 60)))]
    path = os.path.join(pipe.run_dir, f"blend_T{T}_curve.png")
    plots.plot_panels(path, panels, title=f"fidelity blend, T={T}: x = lam (0: the adaptive policy, 1: the fidelity policy)")
    print("wrote", path)
    side = int(per_class ** 0.5)
    C, S = pipe.vq.cfg.in_ch, pipe.vq.cfg.img_size
    blocks = []                                                          # per class: the lam grids left to right
    for cls in classes:
        labels = torch.full((per_class,), cls)
        grids = [pipe.decode(pipe.generate(labels, T, m(), seed=0)).view(side, side, C, S, S) for m, _ in makes.values()]
        row = [torch.cat([g, torch.ones(side, 1, C, S, S)], dim=1) for g in grids]   # a white column after each
        blocks.append(torch.cat(row, dim=1))
        blocks.append(torch.ones(1, blocks[-1].shape[1], C, S, S))                   # a white row between classes
    grid = torch.cat(blocks[:-1]).reshape(-1, C, S, S)
    path = os.path.join(pipe.run_dir, f"blend_grids_T{T}.png")
    plots.save_grid(grid, path, nrow=len(lams) * (side + 1))
    print("wrote", path, f"(classes {list(classes)} top to bottom; lam = {', '.join(f'{l:g}' for l in lams)} left to right)")


def hacking_study(pipe: pipeline.Pipeline, samples: int, T: int, sweep_samples: int, per_class: int = 8) -> None:
    """hacking_T{T}.json / .md and hacking_grids_T{T}.png (AdaGen §III-D, Figure 3): the adaptive and
    static policies trained on each reward (train.py --reward), beside AdaNAT's heuristic, with the
    FID of the FID network (what the "fid" reward optimised) and of the independent featnet2."""
    ref = pipeline.RealFeatures(pipe)
    w_0 = pipeline.get_w0(pipe, ref, sweep_samples)
    rows = {f"AdaNAT heuristic (w_0={w_0:g})": ((lambda y, s: refined_nat(
        pipe, y, T, lambda: nat.heuristic_schedule(T, pipeline.ADANAT_TAU2_0, w_0), s)), "")}
    for reward_name, kind in itertools.product(pipeline.PI_REWARDS, ("policy", "static")):
        if os.path.exists(os.path.join(pipe.run_dir, f"{pipeline.policy_file(kind, 'heuristic', T, reward_name)}.pt")):
            make, fp = adaptive_nat_policy(pipe, T, kind, reward_name)
            rows[f"{'adaptive' if kind == 'policy' else 'static'}, {reward_name} reward"] = (
                (lambda y, s, m=make: refined_nat(pipe, y, T, m, s)), fp)
    if len(rows) == 1:
        raise runs.UserError(f"no policies for T={T} in {pipe.run_dir}: train them with python train.py --stage policy "
                              f"--reward fid (and fixed, adversarial; --stage static too)")
    if ref.net2 is None:
        raise runs.UserError(f"{pipe.run_dir}/featnet2.pt not found: train it with python train.py --run-dir "
                              f"{pipe.run_dir} --stage featnet2")
    study_table(pipe, ref, rows, samples, f"hacking_T{T}", f"Reward-hacking study at T = {T}.")
    K = pipe.cfg.num_classes
    labels = torch.arange(K).repeat_interleave(per_class)
    C, S = pipe.vq.cfg.in_ch, pipe.vq.cfg.img_size
    panels = [fn(labels, 0)[0].view(K, per_class, C, S, S) for fn, _ in rows.values()]     # seed 0, one class a row
    spaced = [torch.cat([p, torch.ones(K, 1, C, S, S)], dim=1) for p in panels]
    path = os.path.join(pipe.run_dir, f"hacking_grids_T{T}.png")
    plots.save_grid(torch.cat(spaced, dim=1).reshape(-1, C, S, S), path, nrow=len(panels) * (per_class + 1))
    print("wrote", path, "(left to right: " + "; ".join(rows) + "; one class per row)")


def refined_grid(pipe: pipeline.Pipeline, T: int, repeat: int, lookahead: int, per_class: int = 10) -> None:
    """samples_adaptive_repeat<k>_lookahead<k>_T<T>.png: the adaptive policy with refinement, a row per class."""
    make, _ = adaptive_nat_policy(pipe, T)
    refiner = Refiner(pipe, pipeline.policy_file("policy", "heuristic", T))
    labels = torch.arange(pipe.cfg.num_classes).repeat_interleave(per_class)
    images, forwards = refined_nat(pipe, labels, T, make, 0, repeat, lookahead, refiner)
    path = os.path.join(pipe.run_dir, f"samples_adaptive_repeat{repeat}_lookahead{lookahead}_T{T}.png")
    plots.save_grid(images, path, nrow=per_class)
    print("wrote", path, f"({forwards:.1f} generator forwards per image)")


def flow_refined_grid(pipe: pipeline.FlowPipeline, nfe: int, repeat: int, per_class: int = 10) -> None:
    """<path>_samples_adaptive_repeat<k>_nfe<n>.png: the adaptive flow policy with repeated sampling
    (its discriminator keeps the best of k), a row per class. The ODE is deterministic given the
    noise, so there is no look-ahead here: candidates differ only in their starting noise."""
    make, solver, T = adaptive_flow_policy(pipe, nfe)
    refiner = Refiner(pipe, pipeline.flow_policy_file(pipe.path.name, "policy", nfe))
    labels = torch.arange(pipe.cfg.num_classes).repeat_interleave(per_class)
    before = pipe.forwards
    images = refine(lambda y: pipe.generate(y, T, make(), solver, seed=0), labels, repeat, refiner.score)
    path = os.path.join(pipe.run_dir, f"{pipe.path.name}_samples_adaptive_repeat{repeat}_nfe{nfe}.png")
    plots.save_grid(images, path, nrow=per_class)
    print("wrote", path, f"({ddp.all_sum(pipe.forwards - before) / len(labels):.1f} network rows per image)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", default="runs/small")
    p.add_argument("--device", default="auto")
    p.add_argument("--eval", action="store_true", help="the evaluation table")
    p.add_argument("--sweep-w", action="store_true", help="(re)run the w_0 sweep of AdaNAT's heuristic")
    p.add_argument("--bench", action="store_true", help="images/s of generate vs bare forwards")
    p.add_argument("--plot", action="store_true", help="the adaptive policy's actions per step, and heuristic vs adaptive grids")
    p.add_argument("--samples", type=int, default=10000, help="samples per row and seed")
    p.add_argument("--sweep-samples", type=int, default=2000, help="samples per w_0 candidate")
    p.add_argument("--decode-steps", default="4,8,16", help="comma-separated T values for --eval")
    p.add_argument("--grid-steps", type=int, default=8, help="T of the grids and of --bench")
    p.add_argument("--batch", type=int, default=None, help="generation batch (default 500 CPU, 4096 GPU; bench: 256 CPU, 1024 GPU)")
    p.add_argument("--rows", type=int, default=None, help="rows per generator forward (default: the whole --batch); "
                   "lower it after an out-of-memory error: the random numbers are keyed by --batch, the images do not change")
    p.add_argument("--no-bf16", action="store_true", help="fp32 on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer (with --bench: eager, then compiled)")
    p.add_argument("--flow", default=None, choices=list(samplers.PATHS),
                   help="the continuous generator (flow.pt / vp.pt) instead of the NAT: grids, or --eval at NFE --nfe")
    p.add_argument("--nfe", default="4,8", help="comma-separated NFE budgets for --flow --eval")
    p.add_argument("--repeat", type=int, default=1, help="grids of the adaptive policy with repeated sampling: "
                   "k candidates per image, the policy's discriminator keeps one (NAT and --flow)")
    p.add_argument("--lookahead", type=int, default=1, help="... with look-ahead: k candidates per NAT step, the critic keeps one")
    p.add_argument("--refine", action="store_true", help="the refinement table at --grid-steps: refine_T<T>.json/.md")
    p.add_argument("--lam", default=None, help="comma-separated lam values of the fidelity blend, e.g. 0,0.25,0.5,0.75,1: "
                   "table, curve and grids at --grid-steps (blend_T<T>.*)")
    p.add_argument("--hacking", action="store_true", help="the reward-hacking table at --grid-steps: hacking_T<T>.json/.md")
    p.add_argument("--reward-check", action="store_true", help="does the warm-up discriminator rank 8 fixed T = 4 "
                   "schedules as FID does? reward_check.md/.json")
    p.add_argument("--check-samples", type=int, default=2000, help="samples per schedule of --reward-check")
    args = p.parse_args(argv)
    try:
        if min(args.samples, args.sweep_samples, args.check_samples) < 10:
            raise runs.UserError("--samples, --sweep-samples and --check-samples must be at least 10 "
                                  "(k-NN precision/recall needs k < n)")
        if args.batch is not None and args.batch <= 0 or args.rows is not None and args.rows <= 0:
            raise runs.UserError(f"--batch {args.batch} / --rows {args.rows}: must be positive")
        try:
            steps = [int(s) for s in args.decode_steps.split(",")]
        except ValueError:
            raise runs.UserError(f"--decode-steps {args.decode_steps!r}: expected integers like 4,8,16") from None
        if any(T <= 0 for T in steps) or args.grid_steps <= 0:
            raise runs.UserError("decoding step counts must be positive")
        if args.repeat < 1 or args.lookahead < 1:
            raise runs.UserError("--repeat and --lookahead count candidates: at least 1")
        try:
            lams = [float(v) for v in args.lam.split(",")] if args.lam else []
        except ValueError:
            raise runs.UserError(f"--lam {args.lam!r}: expected numbers like 0,0.5,1") from None
        if any(not 0 <= v <= 1 for v in lams):
            raise runs.UserError(f"--lam {args.lam}: lam blends two policies, each value in [0, 1]")
        if not os.path.exists(os.path.join(args.run_dir, "config.json")):
            raise runs.UserError(f"{args.run_dir} is not a run folder (no config.json): train first with "
                                  f"python train.py --run-dir {args.run_dir}")
        device = ddp.init_distributed(runs.pick_device(args.device))   # torchrun: generations shared over ranks
        if not ddp.DIST.main:
            sys.stdout = open(os.devnull, "w")
        torch.backends.cuda.matmul.allow_tf32 = True
        if args.flow:
            try:
                nfes = [int(v) for v in args.nfe.split(",")]
            except ValueError:
                raise runs.UserError(f"--nfe {args.nfe!r}: expected integers like 4,8") from None
            if any(v < 1 for v in nfes):
                raise runs.UserError("--nfe budgets must be positive")
            nat_only = [f for f, on in (("--lookahead", args.lookahead > 1), ("--refine", args.refine), ("--lam", lams),
                                         ("--hacking", args.hacking)) if on]
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
            return
        pipe = pipeline.Pipeline(args.run_dir, device, bf16=not args.no_bf16, batch=args.batch, rows=args.rows)
        if args.bench:
            bench(pipe, args.batch or (1024 if device.type == "cuda" else 256), T=args.grid_steps)
            if args.compile:
                pipe.compile()
                bench(pipe, args.batch or (1024 if device.type == "cuda" else 256), T=args.grid_steps)
        elif args.compile:
            pipe.compile()
        if args.sweep_w:
            pipeline.sweep_w(pipe, pipeline.RealFeatures(pipe), args.sweep_samples)
        if args.eval:
            evaluate(pipe, args.samples, steps, args.sweep_samples)
        if args.plot:
            for T in steps:
                if os.path.exists(os.path.join(args.run_dir, f"policy_T{T}.pt")):
                    plot_policy(pipe, T)
        if args.refine:
            refine_study(pipe, args.samples, args.grid_steps, args.sweep_samples)
        if lams:
            blend_study(pipe, args.samples, args.grid_steps, lams)
        if args.hacking:
            hacking_study(pipe, args.samples, args.grid_steps, args.sweep_samples)
        if args.reward_check:
            reward_check(pipe, args.check_samples, args.sweep_samples)
        if args.repeat > 1 or args.lookahead > 1:
            refined_grid(pipe, args.grid_steps, args.repeat, args.lookahead)
        elif not (args.bench or args.eval or args.sweep_w or args.plot or args.refine or lams or args.hacking
                  or args.reward_check):
            grids(pipe, args.grid_steps)
    except (runs.UserError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except torch.OutOfMemoryError:
        rows = args.rows or args.batch or (4096 if torch.cuda.is_available() else 500)
        print(f"error: out of memory generating {rows} rows per forward: lower --rows, e.g. --rows {max(1, rows // 2)} "
              f"(the images do not change; finished rows are kept in the caches)", file=sys.stderr)
        sys.exit(runs.FAULT_EXIT)
    except runs.RunFault as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(runs.FAULT_EXIT)
    except KeyboardInterrupt:
        print("\ninterrupted; finished evaluation rows are kept in eval_cache.json", file=sys.stderr)
        sys.exit(130)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
