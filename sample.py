"""Generate image grids, evaluate schedules side by side, and benchmark decoding.

    python sample.py --run-dir runs/small                     # grids: samples_<row>_T8.png
    python sample.py --run-dir runs/small --sweep-w           # pick w_0 of AdaNAT's heuristic (train-set FID)
    python sample.py --run-dir runs/small --eval              # the table: eval.json + eval.md
    python sample.py --run-dir runs/small --bench             # generate vs bare forwards, images/s
    python sample.py --run-dir runs/small --flow flow         # the continuous generator's grid (train.py --stage flow)
    python sample.py --run-dir runs/small --flow flow --eval  # its table at NFE 4 and 8: flow_eval.json + flow_eval.md
    python sample.py --run-dir runs/small --refine            # AdaGen §III-F1 refinement table: refine_T8.json + .md
    python sample.py --run-dir runs/small --lam 0,0.5,1       # AdaGen §III-F2 fidelity blend: blend_T8.* (train.py --stage fidelity)
    python sample.py --run-dir runs/small --hacking           # AdaGen §III-D reward study: hacking_T8.* (train.py --reward ...)
    python sample.py --run-dir runs/small --reward-check      # does the warm-up D rank schedules as FID does?

Evaluation protocol: every row generates `--samples` images with
balanced labels on the same EMA generator, for 3 sampling seeds, decoded and embedded by the
feature network (stage `featnet`); FID, precision and recall (k = 3) against the 10 000 real
*test* images, and conditional accuracy (the feature network recognising the requested class).
Beside it: FID against the tokenizer's reconstructions of the test images and FID on featnet2.
Two reference rows give the scale: the tokenizer's reconstructions of the test images (the
floor no schedule can beat) and 10 000 real training images (the metric's own noise).
Anything *chosen* (w_0 here) is chosen by FID against training-set statistics. Results are
cached per (row, T, seed, samples) in eval_cache.json: an interrupted evaluation resumes.
The experiments' flags and tables live in experiments/ (studies, game, flow_sample, throughput).
"""
import argparse
import itertools
import os
import sys

import torch

import data
import ddp
import evaluation
import models
import nat
import policy
import pipeline
import plots
import runs
import schedules
from experiments import flow_sample, game, studies, throughput

# The hand-written schedules (nat.heuristic_table): MaskGIT's, and AdaNAT's whose w_0 is swept.


def schedule_rows(pipe: pipeline.Pipeline, w_0: float, steps: list[int], sweep_samples: int = 2000) -> dict:
    """name -> {T: (make_schedule, guided, key, generator)}: the heuristics, every finished search
    and every trained policy for these T, in the order of the comparison (hand-written, searched,
    learned static, adaptive); then the
    Beta-trained generator of the pr-search stage (generator = its Pipeline; else None, this run's)."""
    rows = {"MaskGIT (cos m, tau2_0=4.5, no CFG)":
            {T: (lambda T=T: nat.heuristic_schedule(T, **nat.MASKGIT), False, "", None) for T in steps},
            f"AdaNAT heuristic (tau2_0=1, w_0={w_0:g})":
            {T: (lambda T=T: nat.heuristic_schedule(T, nat.ADANAT_TAU2_0, w_0), True, "", None) for T in steps}}

    def add_searches(p: pipeline.Pipeline, prefix: str, gen):
        for name, label in schedules.SEARCH_ROWS.items():
            for T in steps:
                found = schedules.searched_table(p, name, T)
                if found is None:
                    continue
                table, cfg, fp = found
                if cfg["generator"] != p.fingerprint:
                    print(f"warning: {p.run_dir}/{name}_T{T}.pt was searched on other weights or numerics ({cfg['generator']})")
                key = f"|{fp}" + (f"|{gen.fingerprint}" if gen is not None else "")
                rows.setdefault(prefix + label, {})[T] = (lambda table=table: nat.table_schedule(table), True, key, gen)

    add_searches(pipe, "", None)
    for start, kind, weights in itertools.product(schedules.PI_STARTS, schedules.POLICY_ROWS, ("best", "model")):
        for T in steps:                                                # the best on training FID, and the last iterate
            found = schedules.policy_schedule(pipe, kind, T, start, weights=weights)
            if found is None or weights == "model" and schedules.last_is_best(pipe.run_dir, kind, T, start):
                continue
            make, cfg, fp = found
            if start == "heuristic" and abs(cfg["heuristic"][-1][3] - w_0 * (T - 1) / T) > 1e-4:   # its w_{T-1}
                print(f"warning: {kind}_T{T}.pt started from w_0 other than {w_0:g} (the sweep changed since)")
            label = schedules.POLICY_ROWS[kind].format(beta_ema=cfg["beta_ema"])
            if start != "heuristic":
                label = label[:-1] + f", on {schedules.PI_STARTS[start]})"
            label += ", last iterate" if weights == "model" else ""
            rows.setdefault(label, {})[T] = (make, True, f"|{fp}|{weights}", None)
    beta_dir = os.path.join(pipe.run_dir, "beta")                      # the pr-search stage's full generator
    if runs.is_done(os.path.join(beta_dir, "nat.pt")):
        bp = pipeline.Pipeline(beta_dir, pipe.device, pipe.bf16, pipe.batch, pipe.rows)
        a, b = bp.cfg.alpha, bp.cfg.beta
        w_b = pipeline.get_w0(bp, evaluation.RealFeatures.of(bp), sweep_samples)
        prefix = f"Beta({a:.3g}, {b:.3g})-trained NAT: "
        rows[prefix + f"AdaNAT heuristic (w_0={w_b:g})"] = {
            T: (lambda T=T: nat.heuristic_schedule(T, nat.ADANAT_TAU2_0, w_b), True, f"|beta|{bp.fingerprint}", bp) for T in steps}
        add_searches(bp, prefix, bp)
    return rows


def evaluate(pipe: pipeline.Pipeline, samples: int, steps: list[int], sweep_samples: int) -> None:
    """The evaluation table (eval.json, eval.md), resuming from eval_cache.json."""
    ref = evaluation.RealFeatures.of(pipe)
    w_0 = pipeline.get_w0(pipe, ref, sweep_samples)
    rows = schedule_rows(pipe, w_0, steps, sweep_samples)
    n = min(samples, len(ref.test_feats), len(ref.train_feats))
    labels = pipeline.balanced_labels(samples, pipe.cfg.num_classes)

    def cell(make, guided, gen, T, s):                                 # same tokenizer + featnet for every row
        return lambda: evaluation.measure(ref, labels, make(), lambda sched: (gen or pipe).generate(
            labels, T, sched, seed=s, guided=guided), pipe.decode)
    cells = [("real training images vs test", f"ref|train|{n}", lambda: evaluation.train_reference(ref, n)),
             ("tokenizer reconstructions of test vs test (floor)", f"ref|recon|{n}", lambda: evaluation.recon_reference(ref, n))]
    cells += [((name, T), f"{name}|T{T}|seed{s}|{samples}{suffix}", cell(make, guided, gen, T, s))
              for name in rows for T, (make, guided, suffix, gen) in rows[name].items() for s in schedules.EVAL_SEEDS]
    res = evaluation.seeded_cells(pipe, ref, "eval", cells, "eval")
    refs = {name: res[name][0] for name, _, _ in cells[:2]}
    table = [{"schedule": name, "T": T, "samples": samples, "seeds": list(schedules.EVAL_SEEDS),
              **evaluation.seed_summary(res[(name, T)], policy.ACTIONS)} for name in rows for T in rows[name]]
    table.sort(key=lambda r: r["T"])
    runs.write_json(os.path.join(pipe.run_dir, "eval.json"),
                     {"rows": table, "reference": refs, "w_0": w_0, "fingerprint": pipe.fingerprint,
                      "device": str(pipe.device), "nat_params": sum(p.numel() for p in pipe.net.parameters())})
    head = f"| schedule | T | {evaluation.metric_head(ref)} images/s |"
    md = [f"{samples} samples per row and seed, seeds {list(schedules.EVAL_SEEDS)}; FID, precision and recall against the "
          f"{n} test images in this run's feature space{evaluation.REF_NOTE}; images/s on {pipe.device} (generation only).", "",
          head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in refs.items():
        md.append(f"| {name} | – | {evaluation.metric_cells(r, ref)} – |")
    for r in table:
        md.append(f"| {r['schedule']} | {r['T']} | {evaluation.metric_cells(r, ref)} {r['images_per_s']:.0f} |")
    runs.write_text(os.path.join(pipe.run_dir, "eval.md"), "\n".join(md) + "\n")
    print("\n".join(md))


def grids(pipe: pipeline.Pipeline, T: int, per_class: int = 10) -> None:
    """One PNG per heuristic, a row per class: samples_maskgit_T{T}.png, samples_adanat_T{T}.png
    (AdaNAT's w_0 from the sweep when it has run, sample.py --sweep-w, else 2)."""
    K = pipe.cfg.num_classes
    labels = torch.arange(K).repeat_interleave(per_class)
    saved = runs.read_json(os.path.join(pipe.run_dir, "sweep_w.json"), {})
    w_0 = saved["w_0"] if saved.get("fingerprint") == pipe.fingerprint else 2.0
    for name, h in {"maskgit": nat.MASKGIT, "adanat": dict(tau2_0=nat.ADANAT_TAU2_0, w_0=w_0)}.items():
        path = os.path.join(pipe.run_dir, f"samples_{name}_T{T}.png")
        plots.save_grid(pipe.decode(pipe.generate_tokens(labels, T, h["tau2_0"], h["w_0"], seed=0)), path, nrow=per_class)
        print("wrote", path)


def plot_policy(pipe: pipeline.Pipeline, T: int, samples: int = 1000, per_class: int = 6) -> None:
    """policy_actions_T{T}.png: the adaptive policy's actions per step (mean and +-1 sd over
    samples, one panel per action; AdaNAT's heuristic dashed), and heuristic_vs_adaptive_T{T}.png:
    each class's samples from the heuristic (left) and the adaptive policy (right), same seed."""
    found = schedules.policy_schedule(pipe, "policy", T)
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
    left = pipe.decode(pipe.generate_tokens(labels, T, nat.ADANAT_TAU2_0, w_0, seed=0)).view(K, per_class, -1)
    right = pipe.decode(pipe.generate(labels, T, make(), seed=0)).view(K, per_class, -1)
    C, S = pipe.vq.cfg.in_ch, pipe.vq.cfg.img_size
    gap = torch.ones(K, 1, C * S * S)                                               # a white column between
    both = torch.cat([left, gap, right], dim=1).view(-1, C, S, S)
    path = os.path.join(pipe.run_dir, f"heuristic_vs_adaptive_T{T}.png")
    plots.save_grid(both, path, nrow=2 * per_class + 1)
    print("wrote", path, f"(left: heuristic tau2_0=1, w_0={w_0:g}; right: adaptive policy; one class per row)")


def parser() -> argparse.ArgumentParser:
    """The core's flags; the experiments add theirs (experiments/studies.py, game.py, flow_sample.py, throughput.py)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", default="runs/small")
    p.add_argument("--device", default="auto")
    p.add_argument("--eval", action="store_true", help="the evaluation table")
    p.add_argument("--sweep-w", action="store_true", help="(re)run the w_0 sweep of AdaNAT's heuristic")
    p.add_argument("--floor", action="store_true", help="the reference rows alone (needs vq and featnet, no NAT): floor.json")
    p.add_argument("--plot", action="store_true", help="the adaptive policy's actions per step, and heuristic vs adaptive grids")
    p.add_argument("--samples", type=int, default=None, help="samples per row and seed (default: 10 000 on a GPU, "
                   "2 000 on a CPU, where 10 000 x 3 seeds take hours)")
    p.add_argument("--sweep-samples", type=int, default=2000, help="samples per w_0 candidate")
    p.add_argument("--decode-steps", default="4,8,16", help="comma-separated T values for --eval")
    p.add_argument("--grid-steps", type=int, default=8, help="T of the grids and of --bench")
    p.add_argument("--batch", type=int, default=None, help="generation batch (default 500 CPU, 4096 GPU; bench: 256 CPU, 1024 GPU)")
    p.add_argument("--rows", type=int, default=None, help="rows per generator forward (default: the whole --batch); "
                   "lower it after an out-of-memory error: the random numbers are keyed by --batch, the images do not change")
    p.add_argument("--no-bf16", action="store_true", help="fp32 on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer (with --bench: eager, then compiled)")
    for experiment in (throughput, flow_sample, studies, game):
        experiment.add_flags(p)
    return p


def floor(run_dir: str, device: torch.device) -> dict:
    """The reference rows alone, before any generator is trained: the tokenizer's reconstructions
    of the test images and real training images, each against the test images (floor.json)."""
    ref = evaluation.RealFeatures(run_dir, device, models.build_model(run_dir, "featnet", device),
                                  models.build_model(run_dir, "vq", device))
    n = len(ref.test_feats)
    rows = {"real training images vs test": evaluation.train_reference(ref, n),
            "tokenizer reconstructions of test vs test (floor)": evaluation.recon_reference(ref, n)}
    runs.write_json(os.path.join(run_dir, "floor.json"), {"rows": rows, "fingerprint": ref.key})
    print(f"| reference | {evaluation.metric_head(ref)}\n|" + "---|" * (evaluation.metric_head(ref).count("|") + 1))
    for name, r in rows.items():
        print(f"| {name} | {evaluation.metric_cells(r, ref)}")
    return rows


def check_args(args) -> list[int]:
    """One clear line for a flag value that cannot work; returns the decoding step counts."""
    if min(args.samples or 10, args.sweep_samples, args.check_samples) < 10:
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
    if not os.path.exists(os.path.join(args.run_dir, "config.json")):
        raise runs.UserError(f"{args.run_dir} is not a run folder (no config.json): train first with "
                             f"python train.py --run-dir {args.run_dir}")
    return steps


def run_nat(args, device: torch.device, steps: list[int]) -> None:
    """Everything sample.py does with the NAT of a run folder, as the flags ask."""
    pipe = pipeline.Pipeline(args.run_dir, device, bf16=not args.no_bf16, batch=args.batch, rows=args.rows)
    if args.bench:
        throughput.bench(pipe, args.batch or (1024 if device.type == "cuda" else 256), T=args.grid_steps)
    if args.compile:
        pipe.compile()
        if args.bench:
            throughput.bench(pipe, args.batch or (1024 if device.type == "cuda" else 256), T=args.grid_steps)
    if args.sweep_w:
        pipeline.sweep_w(pipe, evaluation.RealFeatures.of(pipe), args.sweep_samples)
    if args.eval:
        evaluate(pipe, args.samples, steps, args.sweep_samples)
    if args.plot:
        for T in steps:
            if os.path.exists(os.path.join(args.run_dir, f"policy_T{T}.pt")):
                plot_policy(pipe, T)
    if not (studies.run(args, pipe) | game.run(args, pipe) or args.bench or args.eval or args.sweep_w or args.plot):
        grids(pipe, args.grid_steps)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        steps = check_args(args)
        studies.check_args(args)
        device = ddp.init_distributed(runs.pick_device(args.device))   # torchrun: generations shared over ranks
        if args.samples is None:
            args.samples = 10000 if device.type == "cuda" else 2000
            if args.eval:
                    print(f"--samples {args.samples} per row and seed on {device.type} (the papers' protocol is 10 000: pass "
                      f"--samples 10000; on 2 CPU cores the full table then takes about 4 hours)")
        if not ddp.DIST.main:
            sys.stdout = open(os.devnull, "w")
        torch.backends.cuda.matmul.allow_tf32 = True
        if args.floor:
            floor(args.run_dir, device)
        elif args.flow:
            flow_sample.run(args, device)
        else:
            run_nat(args, device, steps)
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
