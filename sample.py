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
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import data
import fid
import nat
import policy
import train

def candidate_fids(pipe: train.GeneratorPipeline, ref, tables: torch.Tensor, labels: torch.Tensor, seed: int,
                   progress: bool = False, **kw) -> torch.Tensor:
    """FID against *training* statistics of C schedules, tables (C, T, D), on the same labels (n,) and the
    same random numbers (common random numbers: candidate c of sample i draws sample i's numbers). All
    C x n generations run as few large batches (rows interleaved: pipe.candidate_images; kw: the flow's solver)."""
    C, n = tables.shape[0], len(labels)
    images = pipe.candidate_images(labels.repeat_interleave(C), tables, seed, C, progress, **kw)
    feats = fid.extract(pipe.featnet, images, device=pipe.device)[0].view(n, C, -1)            # (n, C, D)
    return torch.tensor([fid.fid_from_features(feats[:, k], ref.train_mu, ref.train_sigma) for k in range(C)])


def metrics(ref: train.RealFeatures, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """FID / precision / recall against the test images and conditional accuracy; FID against the
    tokenizer's reconstructions of the test images ("fid_recon") and the Fréchet distance on each
    held-out judge ("fid2": featnet2, "fd_ssl": featssl) when there are."""
    feats, logits = fid.extract(ref.featnet, images, device=ref.device)
    P, R = fid.precision_recall(ref.test_feats, feats, k=3, device=ref.device)
    out = {"fid": fid.fid_from_features(feats, ref.test_mu, ref.test_sigma),
           "precision": P, "recall": R, "cond_acc": (logits.argmax(1) == labels).float().mean().item()}
    if ref.recon_mu is not None:
        out["fid_recon"] = fid.fid_from_features(feats, ref.recon_mu, ref.recon_sigma)
    return {**out, **train.judge_fids(ref, images, "test", feats)}


def recon_reference(ref: train.RealFeatures, n: int) -> dict:
    """The floor row: the tokenizer's reconstructions of the first n test images, measured as a generated row."""
    return metrics(ref, train.reconstruct(ref.vq, data.to_float(ref.test_images[:n]), ref.device), ref.test_labels[:n])


def train_reference(ref: train.RealFeatures, n: int) -> dict:
    """The metric's own noise: n real training images against the test set (and its reconstructions, featnet2)."""
    P, R = fid.precision_recall(ref.test_feats, ref.train_feats[:n], k=3, device=ref.device)
    out = {"fid": fid.fid_from_features(ref.train_feats[:n], ref.test_mu, ref.test_sigma),
           "precision": P, "recall": R, "cond_acc": ref.train_correct[:n].float().mean().item()}
    if ref.recon_mu is not None:
        out["fid_recon"] = fid.fid_from_features(ref.train_feats[:n], ref.recon_mu, ref.recon_sigma)
    for m in ref.judges:
        out[m] = fid.frechet_distance(*ref.held_out[m]["train"], *ref.held_out[m]["test"])
    return out


METRIC_KEYS = ("fid", "fid_recon", "fid2", "fd_ssl", "precision", "recall", "cond_acc")


REF_NOTE = ("; FID vs recon: against the tokenizer's reconstructions of the test images (the schedule's effect "
            "without the tokenizer's); featnet2 FID, SSL FD: the Fréchet distance on the held-out judges (the "
            "independent classifier featnet2, the self-supervised network featssl), which no choice reads")


def metric_head(ref: train.RealFeatures) -> str:
    """The metric columns of every table: FID vs test, vs the tokenizer's reconstructions, on featnet2, P, R, acc."""
    return ("FID | " + ("FID vs recon | " if ref.recon_mu is not None else "") +
            ("featnet2 FID | " if ref.net2 is not None else "") + ("SSL FD | " if "fd_ssl" in ref.judges else "") +
            "precision | recall | cond. acc. |")


def metric_cells(r: dict, ref: train.RealFeatures) -> str:
    """One row's metric cells for metric_head (mean ± sd when the row has an sd)."""
    v = lambda k: f"{r[k]:.2f} ± {r[k + '_sd']:.2f}" if k + "_sd" in r else (f"{r[k]:.2f}" if k in r else "–")
    return (f"{v('fid')} | " + (f"{v('fid_recon')} | " if ref.recon_mu is not None else "") +
            (f"{v('fid2')} | " if ref.net2 is not None else "") + (f"{v('fd_ssl')} | " if "fd_ssl" in ref.judges else "") +
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


def measure(ref: train.RealFeatures, labels: torch.Tensor, sched, generate, to_images=lambda x: x) -> dict:
    """One table cell: generate(sched) timed (generation only), then FID / precision / recall /
    conditional accuracy of to_images(output); a policy's per-step action spread too."""
    t0 = time.time()
    out = generate(sched)
    res = {"images_per_s": len(labels) / (time.time() - t0)}
    res.update(metrics(ref, to_images(out), labels))
    if isinstance(sched, policy.PolicySchedule):
        a = sched.actions()                                               # (T, n, D)
        res.update(actions_mean=a.mean(1).tolist(), actions_sd=a.std(1).tolist())
    return res


def seeded_cells(pipe, ref: train.RealFeatures, stem: str, cells: list, desc: str) -> dict:
    """The measured cells of a multi-seed table, cached in <run_dir>/<stem>_cache.json as they are
    made (an interrupted table resumes) and reused only under the same weights, numerics, chunking
    and reference networks. cells: [(row, key, compute)], compute() -> a dict with "fid"; returns
    {row: [the row's results, in cell order]}."""
    path, fp = os.path.join(pipe.run_dir, f"{stem}_cache.json"), f"{pipe.eval_key}|{ref.key}"
    cache = train.read_json(path, {})
    if cache.get("fingerprint") != fp:
        cache = {"fingerprint": fp}                                    # other weights, device or chunking: start over
    out: dict = {}
    bar = tqdm(cells, desc=desc, disable=not train.DIST.main)
    for row, key, compute in bar:
        if key not in cache:
            cache[key] = compute()
            train.write_json(path, cache)
        out.setdefault(row, []).append(cache[key])
        bar.set_postfix(fid=f"{cache[key]['fid']:.2f}")
    return out


EVAL_SEEDS = (1, 2, 3)       # sampling seeds of the final table; the w_0 sweep uses seed 0


POLICY_ROWS = {"static": "learned static (PPO, no state)", "policy": "adaptive policy (PPO)",
               "smooth": "adaptive + smoothing (PPO, beta_ema={beta_ema:g})"}


def policy_schedule(pipe, kind: str, T: int, start: str = "heuristic",
                    reward_name: str = "adversarial", weights: str = "best") -> tuple | None:
    """(make_schedule, config, fingerprint) of the trained `kind` policy for T whose residual
    starts from `start` (PI_STARTS), trained on `reward_name`, or None if there is none;
    weights "best" (by training-set FID) or "model" (the last iterate)."""
    name = train.policy_file(kind, start, T, reward_name)
    path = os.path.join(pipe.run_dir, f"{name}.pt")
    if not os.path.exists(path):
        return None
    pi, cfg = train.load_policy(path, pipe.device, weights)
    h_pre = policy.inverse_activation(torch.tensor(cfg["heuristic"])).to(pipe.device)
    make = lambda: policy.PolicySchedule(pi, h_pre, beta_ema=cfg["beta_ema"])
    return make, cfg, train.fingerprint(pipe.run_dir, (name,))


def last_is_best(run_dir: str, kind: str, T: int, start: str = "heuristic") -> bool:
    """Whether a policy checkpoint's last iterate is its best-by-training-FID weights (one row suffices)."""
    ck = train.load_ckpt(os.path.join(run_dir, f"{train.policy_file(kind, start, T)}.pt"))
    return all(torch.equal(ck["best"][k], ck["model"][k]) for k in ck["best"])


SEARCH_ROWS = {"param": "parametric family (searched, 6 shape parameters)", "search": "AutoNAT search (free T x 4 table)"}


def save_grid(images: torch.Tensor, path: str, nrow: int, scale: int = 3) -> None:
    """images (n, C, H, W) in [-1, 1] -> a PNG with `nrow` images per row."""
    x = data.to_uint8(images)                                           # (n, C, H, W)
    n, C, H, W = x.shape
    rows = (n + nrow - 1) // nrow
    canvas = torch.full((C, rows * (H + 2) + 2, nrow * (W + 2) + 2), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        canvas[:, 2 + r * (H + 2):2 + r * (H + 2) + H, 2 + col * (W + 2):2 + col * (W + 2) + W] = x[i]
    arr = canvas.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if C == 1 else arr)
    if train.DIST.main:                                                 # rank 0 writes in a torchrun job
        img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


# The hand-written schedules (nat.heuristic_table): MaskGIT's, and AdaNAT's whose w_0 is swept.


def schedule_rows(pipe: train.Pipeline, w_0: float, steps: list[int], sweep_samples: int = 2000) -> dict:
    """name -> {T: (make_schedule, guided, key, generator)}: the heuristics, every finished search
    and every trained policy for these T, in the order of the comparison (hand-written, searched,
    learned static, adaptive); then the
    Beta-trained generator of the pr-search stage (generator = its Pipeline; else None, this run's)."""
    rows = {"MaskGIT (cos m, tau2_0=4.5, no CFG)":
            {T: (lambda T=T: nat.heuristic_schedule(T, **nat.MASKGIT), False, "", None) for T in steps},
            f"AdaNAT heuristic (tau2_0=1, w_0={w_0:g})":
            {T: (lambda T=T: nat.heuristic_schedule(T, nat.ADANAT_TAU2_0, w_0), True, "", None) for T in steps}}

    def add_searches(p: train.Pipeline, prefix: str, gen):
        for name, label in SEARCH_ROWS.items():
            for T in steps:
                found = train.searched_table(p, name, T)
                if found is None:
                    continue
                table, cfg, fp = found
                if cfg["generator"] != p.fingerprint:
                    print(f"warning: {p.run_dir}/{name}_T{T}.pt was searched on other weights or numerics ({cfg['generator']})")
                key = f"|{fp}" + (f"|{gen.fingerprint}" if gen is not None else "")
                rows.setdefault(prefix + label, {})[T] = (lambda table=table: nat.table_schedule(table), True, key, gen)

    add_searches(pipe, "", None)
    for start, kind, weights in itertools.product(train.PI_STARTS, POLICY_ROWS, ("best", "model")):
        for T in steps:                                                # the best on training FID, and the last iterate
            found = policy_schedule(pipe, kind, T, start, weights=weights)
            if found is None or weights == "model" and last_is_best(pipe.run_dir, kind, T, start):
                continue
            make, cfg, fp = found
            if start == "heuristic" and abs(cfg["heuristic"][-1][3] - w_0 * (T - 1) / T) > 1e-4:   # its w_{T-1}
                print(f"warning: {kind}_T{T}.pt started from w_0 other than {w_0:g} (the sweep changed since)")
            label = POLICY_ROWS[kind].format(beta_ema=cfg["beta_ema"])
            if start != "heuristic":
                label = label[:-1] + f", on {train.PI_STARTS[start]})"
            label += ", last iterate" if weights == "model" else ""
            rows.setdefault(label, {})[T] = (make, True, f"|{fp}|{weights}", None)
    beta_dir = os.path.join(pipe.run_dir, "beta")                      # the pr-search stage's full generator
    if train.is_done(os.path.join(beta_dir, "nat.pt")):
        bp = train.Pipeline(beta_dir, pipe.device, pipe.bf16, pipe.batch, pipe.rows)
        a, b = bp.cfg.alpha, bp.cfg.beta
        w_b = train.get_w0(bp, train.RealFeatures.of(bp), sweep_samples)
        prefix = f"Beta({a:.3g}, {b:.3g})-trained NAT: "
        rows[prefix + f"AdaNAT heuristic (w_0={w_b:g})"] = {
            T: (lambda T=T: nat.heuristic_schedule(T, nat.ADANAT_TAU2_0, w_b), True, f"|beta|{bp.fingerprint}", bp) for T in steps}
        add_searches(bp, prefix, bp)
    return rows


def evaluate(pipe: train.Pipeline, samples: int, steps: list[int], sweep_samples: int) -> None:
    """The evaluation table (eval.json, eval.md), resuming from eval_cache.json."""
    ref = train.RealFeatures.of(pipe)
    w_0 = train.get_w0(pipe, ref, sweep_samples)
    rows = schedule_rows(pipe, w_0, steps, sweep_samples)
    n = min(samples, len(ref.test_feats), len(ref.train_feats))
    labels = train.balanced_labels(samples, pipe.cfg.num_classes)

    def cell(make, guided, gen, T, s):                                 # same tokenizer + featnet for every row
        return lambda: measure(ref, labels, make(), lambda sched: (gen or pipe).generate(
            labels, T, sched, seed=s, guided=guided), pipe.decode)
    cells = [("real training images vs test", f"ref|train|{n}", lambda: train_reference(ref, n)),
             ("tokenizer reconstructions of test vs test (floor)", f"ref|recon|{n}", lambda: recon_reference(ref, n))]
    cells += [((name, T), f"{name}|T{T}|seed{s}|{samples}{suffix}", cell(make, guided, gen, T, s))
              for name in rows for T, (make, guided, suffix, gen) in rows[name].items() for s in EVAL_SEEDS]
    res = seeded_cells(pipe, ref, "eval", cells, "eval")
    refs = {name: res[name][0] for name, _, _ in cells[:2]}
    table = [{"schedule": name, "T": T, "samples": samples, "seeds": list(EVAL_SEEDS),
              **seed_summary(res[(name, T)], policy.ACTIONS)} for name in rows for T in rows[name]]
    table.sort(key=lambda r: r["T"])
    train.write_json(os.path.join(pipe.run_dir, "eval.json"),
                     {"rows": table, "reference": refs, "w_0": w_0, "fingerprint": pipe.fingerprint,
                      "device": str(pipe.device), "nat_params": sum(p.numel() for p in pipe.net.parameters())})
    head = f"| schedule | T | {metric_head(ref)} images/s |"
    md = [f"{samples} samples per row and seed, seeds {list(EVAL_SEEDS)}; FID, precision and recall against the "
          f"{n} test images in this run's feature space{REF_NOTE}; images/s on {pipe.device} (generation only).", "",
          head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in refs.items():
        md.append(f"| {name} | – | {metric_cells(r, ref)} – |")
    for r in table:
        md.append(f"| {r['schedule']} | {r['T']} | {metric_cells(r, ref)} {r['images_per_s']:.0f} |")
    train.write_text(os.path.join(pipe.run_dir, "eval.md"), "\n".join(md) + "\n")
    print("\n".join(md))


def grids(pipe: train.Pipeline, T: int, per_class: int = 10) -> None:
    """One PNG per heuristic, a row per class: samples_maskgit_T{T}.png, samples_adanat_T{T}.png
    (AdaNAT's w_0 from the sweep when it has run, sample.py --sweep-w, else 2)."""
    K = pipe.cfg.num_classes
    labels = torch.arange(K).repeat_interleave(per_class)
    saved = train.read_json(os.path.join(pipe.run_dir, "sweep_w.json"), {})
    w_0 = saved["w_0"] if saved.get("fingerprint") == pipe.fingerprint else 2.0
    for name, h in {"maskgit": nat.MASKGIT, "adanat": dict(tau2_0=nat.ADANAT_TAU2_0, w_0=w_0)}.items():
        path = os.path.join(pipe.run_dir, f"samples_{name}_T{T}.png")
        save_grid(pipe.decode(pipe.generate_tokens(labels, T, h["tau2_0"], h["w_0"], seed=0)), path, nrow=per_class)
        print("wrote", path)


def plot_policy(pipe: train.Pipeline, T: int, samples: int = 1000, per_class: int = 6) -> None:
    """policy_actions_T{T}.png: the adaptive policy's actions per step (mean and +-1 sd over
    samples, one panel per action; AdaNAT's heuristic dashed), and heuristic_vs_adaptive_T{T}.png:
    each class's samples from the heuristic (left) and the adaptive policy (right), same seed."""
    found = policy_schedule(pipe, "policy", T)
    if found is None:
        raise train.UserError(f"{pipe.run_dir}/policy_T{T}.pt not found: train it with python train.py --stage policy "
                              f"--run-dir {pipe.run_dir} --set pi_T={T}")
    make, cfg, _ = found
    h = policy.activation(policy.inverse_activation(torch.tensor(cfg["heuristic"])))   # (T, 4), as executed
    sched = make()
    pipe.generate(train.balanced_labels(samples, pipe.cfg.num_classes), T, sched, seed=0)
    a = sched.actions()                                                            # (T, n, 4)
    mean, sd, steps = a.mean(1), a.std(1), list(range(T))
    panels = [{"title": name, "series": [
        {"x": steps, "y": mean[:, j].tolist(), "color": (200, 60, 30),
         "band": ((mean[:, j] - sd[:, j]).tolist(), (mean[:, j] + sd[:, j]).tolist())},
        {"x": steps, "y": h[:, j].tolist(), "color": (60, 60, 60), "dashed": True}]}
        for j, name in enumerate(policy.ACTIONS)]
    path = os.path.join(pipe.run_dir, f"policy_actions_T{T}.png")
    train.plot_panels(path, panels, title=f"adaptive policy, T={T}: mean +- sd over {samples} samples per step "
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
    save_grid(both, path, nrow=2 * per_class + 1)
    print("wrote", path, f"(left: heuristic tau2_0=1, w_0={w_0:g}; right: adaptive policy; one class per row)")


def parser(doc: str = __doc__) -> argparse.ArgumentParser:
    """The core's flags; an experiment's script adds its own (experiments/*.py)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
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
    return p


def floor(run_dir: str, device: torch.device) -> dict:
    """The reference rows alone, before any generator is trained: the tokenizer's reconstructions
    of the test images and real training images, each against the test images (floor.json)."""
    ref = train.RealFeatures(run_dir, device, train.build_model(run_dir, "featnet", device),
                                  train.build_model(run_dir, "vq", device))
    n = len(ref.test_feats)
    rows = {"real training images vs test": train_reference(ref, n),
            "tokenizer reconstructions of test vs test (floor)": recon_reference(ref, n)}
    train.write_json(os.path.join(run_dir, "floor.json"), {"rows": rows, "fingerprint": ref.key})
    print(f"| reference | {metric_head(ref)}\n|" + "---|" * (metric_head(ref).count("|") + 1))
    for name, r in rows.items():
        print(f"| {name} | {metric_cells(r, ref)}")
    return rows


def check_args(args) -> list[int]:
    """One clear line for a flag value that cannot work; returns the decoding step counts."""
    if min(args.samples or 10, args.sweep_samples, getattr(args, "check_samples", 10)) < 10:
        raise train.UserError("--samples, --sweep-samples and --check-samples must be at least 10 "
                             "(k-NN precision/recall needs k < n)")
    if args.batch is not None and args.batch <= 0 or args.rows is not None and args.rows <= 0:
        raise train.UserError(f"--batch {args.batch} / --rows {args.rows}: must be positive")
    try:
        steps = [int(s) for s in args.decode_steps.split(",")]
    except ValueError:
        raise train.UserError(f"--decode-steps {args.decode_steps!r}: expected integers like 4,8,16") from None
    if any(T <= 0 for T in steps) or args.grid_steps <= 0:
        raise train.UserError("decoding step counts must be positive")
    if not os.path.exists(os.path.join(args.run_dir, "config.json")):
        raise train.UserError(f"{args.run_dir} is not a run folder (no config.json): train first with "
                             f"python train.py --run-dir {args.run_dir}")
    return steps


def nat_pipeline(args, device: torch.device) -> train.Pipeline:
    """The NAT pipeline of the run folder the flags name."""
    return train.Pipeline(args.run_dir, device, bf16=not args.no_bf16, batch=args.batch, rows=args.rows)


def run_nat(args, device: torch.device, steps: list[int]) -> None:
    """Everything sample.py does with the NAT of a run folder, as the flags ask."""
    pipe = nat_pipeline(args, device)
    if args.compile:
        pipe.compile()
    if args.sweep_w:
        train.sweep_w(pipe, train.RealFeatures.of(pipe), args.sweep_samples)
    if args.eval:
        evaluate(pipe, args.samples, steps, args.sweep_samples)
    if args.plot:
        for T in steps:
            if os.path.exists(os.path.join(args.run_dir, f"policy_T{T}.pt")):
                plot_policy(pipe, T)
    if not (args.eval or args.sweep_w or args.plot):
        grids(pipe, args.grid_steps)


def main(argv: list[str] | None = None, add_flags=None, run=None, check=None, doc: str = __doc__) -> None:
    """The command line. An experiment's script (experiments/*.py) passes add_flags(parser), its
    check(args) and run(args, device), which replaces the NAT's grids and table."""
    p = parser(doc)
    if add_flags is not None:
        add_flags(p)
    args = p.parse_args(argv)
    try:
        steps = check_args(args)
        if check is not None:
            check(args)
        device = train.init_distributed(train.pick_device(args.device))   # torchrun: generations shared over ranks
        if args.samples is None:
            args.samples = 10000 if device.type == "cuda" else 2000
            if args.eval:
                    print(f"--samples {args.samples} per row and seed on {device.type} (the papers' protocol is 10 000: pass "
                      f"--samples 10000; on 2 CPU cores the full table then takes about 4 hours)")
        if not train.DIST.main:
            sys.stdout = open(os.devnull, "w")
        torch.backends.cuda.matmul.allow_tf32 = True
        if args.floor:
            floor(args.run_dir, device)
        elif run is not None:
            run(args, device)
        else:
            run_nat(args, device, steps)
    except (train.UserError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except torch.OutOfMemoryError:
        rows = args.rows or args.batch or (4096 if torch.cuda.is_available() else 500)
        print(f"error: out of memory generating {rows} rows per forward: lower --rows, e.g. --rows {max(1, rows // 2)} "
              f"(the images do not change; finished rows are kept in the caches)", file=sys.stderr)
        sys.exit(train.FAULT_EXIT)
    except train.RunFault as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(train.FAULT_EXIT)
    except KeyboardInterrupt:
        print("\ninterrupted; finished evaluation rows are kept in eval_cache.json", file=sys.stderr)
        sys.exit(130)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
