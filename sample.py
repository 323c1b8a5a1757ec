"""Sample from a trained run folder: grids, the evaluation table, the policy's actions.

    python sample.py --run-dir runs/small                           # grids: samples_<heuristic>_T8.png
    python sample.py --run-dir runs/small --eval --samples 2000     # the table: eval.json + eval.md (and the grids)
    python sample.py --run-dir runs/small --plot --decode-steps 4   # the adaptive policy's actions, and its samples
    python sample.py --run-dir runs/small --sweep-w                 # (re)pick w_0 of AdaNAT's heuristic
    python sample.py --run-dir runs/small --floor                   # the reference rows alone (no NAT needed)

Evaluation protocol (`evaluate`): every row generates --samples images with balanced labels on
the same EMA generator, for the sampling seeds 1, 2, 3 (mean ± sd), decoded and embedded by each
network: FID, precision and recall (k = 3) against the 10 000 real *test* images on the FID
network (featnet), conditional accuracy (featnet recognising the requested class), FID against
the tokenizer's reconstructions of the test images, and the Fréchet distance on the held-out
judges (featnet2, featssl). Two reference rows give the scale: the tokenizer's reconstructions
of the test images (the floor no schedule can beat) and real training images (the metric's own
noise). Anything *chosen* (w_0, checkpoints) is chosen on training-set statistics (train.py).
Models are rebuilt from their checkpoints alone (train.build_model); generation is seeded per
chunk and sharded over the ranks of a torchrun job (train.GeneratorPipeline).
"""
import argparse
import itertools
import math
import os
import sys
import time
import types

import numpy as np
import torch
from tqdm import tqdm

import data
import fid
import nat
import policy
import train


# ============================================================================= references and metrics

KID_OF = {"fid": "kid", "fid2": "kid2", "fd_ssl": "kid_ssl"}     # a network's Fréchet key -> its KID key
NET_NAME = {"fid": "FID", "fid2": "featnet2 FD", "fd_ssl": "SSL FD"}


def claim_judges(run_dir: str) -> list[str] | None:
    """The Fréchet keys of the claim judges experiments/judges.py chose (judges.json), or None before it ran."""
    found = train.read_json(os.path.join(run_dir, "judges.json"))
    return None if found is None else [train.JUDGES[j] for j in found["claim_judges"]]


class EvalReferences(train.RealFeatures):
    """train.RealFeatures (training statistics on every network) plus the 10 000 test images' features and
    statistics on every network ("fid", "fid2", "fd_ssl"), their KID self-sums, featnet's statistics of the
    tokenizer's reconstructions of the test images (`recon`; None without a tokenizer), and the claim judges."""

    def __init__(self, pipe):
        super().__init__(pipe)
        c = self.config
        self.test_images, self.test_labels, _ = data.load_dataset(c.data, "test", c.img_size, c.channels, c.seed)  # uint8
        x = data.to_float(self.test_images)
        self.test_feats = fid.extract(self.featnet, x, device=self.device)[0]                    # (n, D)
        self.test_all = {"fid": self.test_feats} | {m: fid.extract(net, x, device=self.device)[0] for m, net in self.judges.items()}
        self.test = {m: fid.statistics(f) for m, f in self.test_all.items()}
        self.test_sums = {m: fid.kid_self_sums(f) for m, f in self.test_all.items()}
        self.test_mu, self.test_sigma = self.test["fid"]
        self.claims = claim_judges(self.run_dir)                      # None: not validated yet
        self.recon = None if self.vq is None else fid.statistics(
            fid.extract(self.featnet, reconstruct(self.vq, x, self.device), device=self.device)[0])


@torch.no_grad()
def reconstruct(vq: torch.nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The tokenizer's reconstructions of images x (n, C, H, W) in [-1, 1], 500 at a time, on the CPU."""
    return torch.cat([vq.detokenize(vq.tokenize(x[i:i + 500].to(device))).float().cpu() for i in range(0, len(x), 500)])


def distances(ref: EvalReferences, feats: dict) -> dict:
    """Fréchet distance and KID against the test images of each network's features {key: (n, D)}."""
    kids = {m: fid.kid(ref.test_all[m], f, real_sums=ref.test_sums[m]) for m, f in feats.items()}   # (KID, its s.e.)
    return {m: fid.fid_from_features(f, *ref.test[m]) for m, f in feats.items()} | {
        KID_OF[m]: v for m, (v, _) in kids.items()} | {KID_OF[m] + "_se": se for m, (_, se) in kids.items()}


def metrics(ref: EvalReferences, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """FID, KID, precision, recall against the test images and conditional accuracy on featnet; FID against the
    reconstructions ("fid_recon"); the Fréchet distance and KID on each held-out judge ("fid2", "fd_ssl")."""
    feats, logits = fid.extract(ref.featnet, images, device=ref.device)
    P, R = fid.precision_recall(ref.test_feats, feats, k=3, device=ref.device)
    out = {"precision": P, "recall": R, "cond_acc": (logits.argmax(1) == labels).float().mean().item()}
    if ref.recon is not None:
        out["fid_recon"] = fid.fid_from_features(feats, *ref.recon)
    return out | distances(ref, {"fid": feats} | {m: fid.extract(net, images, device=ref.device)[0]
                                                 for m, net in ref.judges.items()})


def train_reference(ref: EvalReferences, n: int) -> dict:
    """The metric's own noise: n real training images against the test set, on every network."""
    P, R = fid.precision_recall(ref.test_feats, ref.train_feats[:n], k=3, device=ref.device)
    out = {"precision": P, "recall": R, "cond_acc": ref.train_correct[:n].float().mean().item()}
    if ref.recon is not None:
        out["fid_recon"] = fid.fid_from_features(ref.train_feats[:n], *ref.recon)
    return out | distances(ref, {m: f[:n] for m, f in ref.train_all.items()})


def recon_reference(ref: EvalReferences, n: int) -> dict:
    """The floor row: the tokenizer's reconstructions of the first n test images, measured as a generated row."""
    return metrics(ref, reconstruct(ref.vq, data.to_float(ref.test_images[:n]), ref.device), ref.test_labels[:n])


METRIC_KEYS = ("fid", "kid", "fid_recon", "fid2", "kid2", "fd_ssl", "kid_ssl", "precision", "recall", "cond_acc")
REF_NOTE = ("; FID vs recon: against the tokenizer's reconstructions of the test images (the schedule's effect "
            "without the tokenizer's); featnet2 FD, SSL FD: the Fréchet distance on the held-out networks (the "
            "independent classifier featnet2, the self-supervised network featssl), which no choice reads; KID x 1000 "
            "beside every Fréchet distance (unbiased: comparable across sample sizes); claim judges (experiments/"
            "judges.py, judges.json) marked *claim*")


def metric_columns(ref: EvalReferences) -> list[tuple[str, str]]:
    """(key, header) of every metric column: each network's Fréchet distance and KID (FID vs recon after the FID
    network's), then precision, recall, cond. acc."""
    cols = []
    for m in ["fid", *ref.judges]:
        mark = " *claim*" if ref.claims is not None and m in ref.claims else ""
        cols += [(m, NET_NAME[m] + mark), (KID_OF[m], "KID " + NET_NAME[m] + mark)]
        if m == "fid" and ref.recon is not None:
            cols.append(("fid_recon", "FID vs recon"))
    return cols + [("precision", "precision"), ("recall", "recall"), ("cond_acc", "cond. acc.")]


def metric_head(ref: EvalReferences) -> str:
    """The metric columns of every table."""
    return " | ".join(h for _, h in metric_columns(ref)) + " |"


def metric_cells(r: dict, ref: EvalReferences) -> str:
    """One row's cells for metric_head (mean ± sd when the row has an sd; KID x 1000)."""
    def v(k: str) -> str:
        if k not in r:
            return "–"
        scale, digits = (1000, 2) if k.startswith("kid") else (1, 3 if k in ("precision", "recall", "cond_acc") else 2)
        spread = (f" ± {scale * r[k + '_sd']:.{digits}f}" if k + "_sd" in r else      # over seeds, else KID's own
                  f" (s.e. {scale * r[k + '_se']:.{digits}f})" if k + "_se" in r else "")
        return f"{scale * r[k]:.{digits}f}" + spread
    return " | ".join(v(k) for k, _ in metric_columns(ref)) + " |"


T_975 = [12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20, 2.18, 2.16, 2.14, 2.13, 2.12, 2.11,
         2.10, 2.09, 2.09, 2.08, 2.07, 2.07, 2.06, 2.06, 2.06, 2.05, 2.05, 2.05, 2.04]   # t quantile, df = 1 .. 30


def claims(cells: list[dict], base: list[dict], keys: list[str]) -> dict:
    """key -> (mean of row - base, half-width of its 95% interval). base: one cell per sampling seed; cells: the
    row's training seeds x the same sampling seeds, seed-minor (run_cells' order). Per sampling seed s the row's
    mean over training seeds minus base[s] (paired: the same labels and random numbers); the variance adds the
    spread over sampling seeds (var_s / n_s) and, with several training seeds, over them (var_t / n_t), the
    degrees of freedom by Welch-Satterthwaite (rounded down); a single sampling seed: half-width nan (no claim)."""
    n_s = len(base)
    n_t = len(cells) // n_s
    out = {}
    for k in keys:
        r = np.array([c[k] for c in cells]).reshape(n_t, n_s)                 # (training seeds, sampling seeds)
        d = r.mean(0) - np.array([c[k] for c in base])                        # (n_s,) paired differences
        a = d.var(ddof=1) / n_s if n_s > 1 else math.nan                     # one sampling seed: nan, no claim
        b = r.mean(1).var(ddof=1) / n_t if n_t > 1 else 0.0
        df = (a + b) ** 2 / (a ** 2 / (n_s - 1) + (b ** 2 / (n_t - 1) if n_t > 1 else 0.0)) if a + b > 0 else 1
        out[k] = (float(d.mean()), T_975[min(max(int(df), 1), 30) - 1] * math.sqrt(a + b))
    return out


def claim_text(mean: float, half: float, verdict: bool = True, lower_is_better: bool = True) -> str:
    """"-0.52 [-0.80, -0.24] better": better or worse only where the interval excludes zero (and verdict)."""
    claimed = verdict and math.isfinite(half) and abs(mean) > half
    word = ("better" if (mean < 0) == lower_is_better else "worse") if claimed else "–"
    return f"{mean:+.3g} [{mean - half:+.3g}, {mean + half:+.3g}]" + (f" {word}" if verdict else "")


def claim_keys(ref) -> list[str]:
    """The keys every claim table shows: each claim judge's Fréchet distance and KID (every held-out network's
    before the validation ran), then the FID network and recall, shown without a verdict."""
    nets = [m for m in ref.claims if m in ref.judges] if ref.claims is not None else list(ref.judges)
    return [k for m in nets for k in (m, KID_OF[m])] + ["fid", "recall"]


def claims_markdown(rows: list[tuple[str, dict]], against: str, ref) -> str:
    """Each (name, claims) row minus `against`: mean [95% interval] (KID x 1000); verdicts on the claim judges only."""
    keys = claim_keys(ref)
    names = {**NET_NAME, **{KID_OF[m]: "KID " + NET_NAME[m] for m in KID_OF}, "recall": "recall"}
    verdict = lambda k: ref.claims is not None and k not in ("fid", "recall")
    note = (" The judges are NOT validated (no judges.json): run python experiments/judges.py; no verdicts."
            if ref.claims is None else " No network passed the validation (judges.md): no claims." if not ref.claims
            else " Verdicts on the claim judges only; the FID network (every choice reads it) and recall without one.")
    md = [f"Row minus {against}, paired on the sampling seed: mean [95% interval] (KID x 1000; the interval spans "
          f"sampling and training seeds); better / worse only where it excludes zero.{note}", "",
          "| schedule | " + " | ".join(names[k] for k in keys) + " |", "|---|" + "---|" * len(keys)]
    scale = lambda k: 1000 if k.startswith("kid") else 1
    for name, c in rows:
        md.append(f"| {name} | " + " | ".join(claim_text(scale(k) * c[k][0], scale(k) * c[k][1], verdict(k), k != "recall")
                                              for k in keys) + " |")
    return "\n".join(md)


def seed_summary(per_seed: list[dict], actions: tuple) -> dict:
    """Mean and sd over the seeds of each metric; a policy's per-step action spread (first seed)."""
    row = {"cells": len(per_seed)}
    for k in (*METRIC_KEYS, *(KID_OF[m] + "_se" for m in KID_OF), "images_per_s"):
        if all(k in r for r in per_seed):
            v = np.array([r[k] for r in per_seed])
            row[k], row[k + "_sd"] = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
    if "actions_sd" in per_seed[0]:
        row["actions"] = list(actions)
        row["actions_mean_per_step"], row["actions_sd_per_step"] = per_seed[0]["actions_mean"], per_seed[0]["actions_sd"]
    return row


def measure(ref: EvalReferences, labels: torch.Tensor, sched, generate, to_images=lambda x: x) -> dict:
    """One table cell: generate(sched) timed (generation only), then the metrics of to_images(output); a
    policy's per-step action spread too."""
    t0 = time.time()
    out = generate(sched)
    res = {"images_per_s": len(labels) / (time.time() - t0), **metrics(ref, to_images(out), labels)}
    if isinstance(sched, policy.PolicySchedule):
        a = sched.actions()                                           # (T, n, D)
        res.update(actions_mean=a.mean(1).tolist(), actions_sd=a.std(1).tolist())
    return res


def run_cells(cells: list, desc: str) -> dict:
    """cells [(row, compute)] -> {row: [compute() of each of its cells, in order]}, with a bar."""
    out: dict = {}
    bar = tqdm(cells, desc=desc, disable=not train.DIST.main)
    for row, compute in bar:
        out.setdefault(row, []).append(compute())
        bar.set_postfix(fid=f"{out[row][-1]['fid']:.2f}")
    return out


# ============================================================================= the run's schedules and the table

EVAL_SEEDS = (1, 2, 3)       # sampling seeds of the final table; the w_0 sweep and the checks use seed 0
POLICY_ROWS = {"static": "learned static (PPO, no state)", "policy": "adaptive policy (PPO)",
               "smooth": "adaptive + smoothing (PPO, beta_ema={beta_ema:g})"}
SEARCH_ROWS = {"param": "parametric family (searched, 6 shape parameters)", "search": "AutoNAT search (free T x 4 table)"}


def policy_schedule(pipe, kind: str, T: int, start: str = "heuristic", reward_name: str = "adversarial",
                    weights: str = "best", seed: int = 0) -> tuple | None:
    """(make_schedule, config) of the trained `kind` policy for T (started from `start`, trained on
    `reward_name`, training seed `seed`), or None; weights "best" (on featnet's training FID) or "model" (the last iterate)."""
    path = os.path.join(pipe.run_dir, f"{train.policy_file(kind, start, T, reward_name, seed)}.pt")
    if not os.path.exists(path):
        return None
    pi, cfg = train.load_policy(path, pipe.device, weights)
    h_pre = policy.inverse_activation(torch.tensor(cfg["heuristic"])).to(pipe.device)
    return (lambda: policy.PolicySchedule(pi, h_pre, beta_ema=cfg["beta_ema"])), cfg


def last_is_best(run_dir: str, kind: str, T: int, start: str = "heuristic", seed: int = 0) -> bool:
    """Whether a policy checkpoint's last iterate is its best weights (one row suffices)."""
    ck = train.load_ckpt(os.path.join(run_dir, f"{train.policy_file(kind, start, T, seed=seed)}.pt"))
    return all(torch.equal(ck["best"][k], ck["model"][k]) for k in ck["best"])


def schedule_rows(pipe: train.Pipeline, w_0: float, steps: list[int], sweep_samples: int) -> dict:
    """name -> {T: [(make_schedule, guided, generator pipeline), one per training seed]}: the heuristics, every
    finished search and every trained policy (its best weights, and its last iterate when they differ), in the
    comparison's order; then the Beta-trained generator of experiments/search.py --stage pr-search (in <run>/beta).
    The first row after MaskGIT is the heuristic every claim is measured against."""
    rows = {"MaskGIT (cos m, tau2_0=4.5, no CFG)": {T: [(lambda T=T: nat.heuristic_schedule(T, **nat.MASKGIT), False, pipe)]
                                                   for T in steps},
            f"AdaNAT heuristic (tau2_0=1, w_0={w_0:g})":
            {T: [(lambda T=T: nat.heuristic_schedule(T, nat.ADANAT_TAU2_0, w_0), True, pipe)] for T in steps}}

    def add_searches(p: train.Pipeline, prefix: str) -> None:
        for (name, label), T in itertools.product(SEARCH_ROWS.items(), steps):
            found = train.searched_table(p.run_dir, name, T)
            if found is not None:
                rows.setdefault(prefix + label, {})[T] = [(lambda table=found[0]: nat.table_schedule(table), True, p)]

    add_searches(pipe, "")
    for start, kind, weights, T in itertools.product(train.PI_STARTS, POLICY_ROWS, ("best", "model"), steps):
        seeds = train.policy_seeds(pipe.run_dir, kind, start, T)
        if not seeds or weights == "model" and all(last_is_best(pipe.run_dir, kind, T, start, k) for k in seeds):
            continue                                                  # the last iterate: a row only if it differs
        found = [policy_schedule(pipe, kind, T, start, weights=weights, seed=k) for k in seeds]
        label = POLICY_ROWS[kind].format(beta_ema=found[0][1]["beta_ema"])
        label = label[:-1] + f", on {train.PI_STARTS[start]})" if start != "heuristic" else label
        rows.setdefault(label + (", last iterate" if weights == "model" else ""), {})[T] = [(make, True, pipe) for make, _ in found]
    beta_dir = os.path.join(pipe.run_dir, "beta")
    if train.is_done(os.path.join(beta_dir, "nat.pt")):
        bp = train.Pipeline(beta_dir, pipe.device, pipe.bf16, pipe.batch)
        w_b = train.get_w0(bp, train.RealFeatures(bp), sweep_samples)
        prefix = f"Beta({bp.cfg.alpha:.3g}, {bp.cfg.beta:.3g})-trained NAT: "
        rows[prefix + f"AdaNAT heuristic (w_0={w_b:g})"] = {
            T: [(lambda T=T: nat.heuristic_schedule(T, nat.ADANAT_TAU2_0, w_b), True, bp)] for T in steps}
        add_searches(bp, prefix)
    return rows


def evaluate(pipe: train.Pipeline, samples: int, steps: list[int], sweep_samples: int) -> None:
    """The evaluation table: eval.json and eval.md."""
    ref = EvalReferences(pipe)
    w_0 = train.get_w0(pipe, ref, sweep_samples)
    rows = schedule_rows(pipe, w_0, steps, sweep_samples)
    n = min(samples, len(ref.test_feats), len(ref.train_feats))
    labels = train.balanced_labels(samples, pipe.cfg.num_classes)

    def cell(make, guided, gen, T, s):                                # same tokenizer and networks for every row
        return lambda: measure(ref, labels, make(), lambda sched: gen.generate(labels, T, sched, seed=s, guided=guided),
                               pipe.decode)
    refs = {"real training images vs test": train_reference(ref, n),
            "tokenizer reconstructions of test vs test (floor)": recon_reference(ref, n)}
    res = run_cells([((name, T), cell(*variant, T, s)) for name in rows for T in rows[name] for variant in rows[name][T]
                     for s in EVAL_SEEDS], "eval")
    base = list(rows)[1]                                              # AdaNAT's heuristic: what every claim is against
    keys = claim_keys(ref)
    table = sorted(({"schedule": name, "T": T, "samples": samples, "seeds": list(EVAL_SEEDS), "training_seeds": len(rows[name][T]),
                     **seed_summary(res[(name, T)], policy.ACTIONS),
                     "vs_heuristic": claims(res[(name, T)], res[(base, T)], keys)} for name in rows for T in rows[name]),
                   key=lambda r: r["T"])
    train.write_json(os.path.join(pipe.run_dir, "eval.json"), {"rows": table, "reference": refs, "w_0": w_0, "device": str(pipe.device),
                                                               "claim_judges": ref.claims,
                                                               "nat_params": sum(p.numel() for p in pipe.net.parameters())})
    head = f"| schedule | T | {metric_head(ref)} images/s |"
    md = [f"{samples} samples per row and seed, seeds {list(EVAL_SEEDS)} (mean ± sd over the cells: sampling seeds x "
          f"training seeds); every distance against the {len(ref.test_feats)} test images in this run's feature spaces (the "
          f"reference rows: {n} images each){REF_NOTE}; images/s "
          f"on {pipe.device} (generation only).", "", head, "|" + "---|" * (head.count("|") - 1)]
    md += [f"| {name} | – | {metric_cells(r, ref)} – |" for name, r in refs.items()]
    md += [f"| {r['schedule']} | {r['T']} | {metric_cells(r, ref)} {r['images_per_s']:.0f} |" for r in table]
    for T in steps:
        md += ["", f"T = {T}. " + claims_markdown([(r["schedule"], r["vs_heuristic"]) for r in table
                                                   if r["T"] == T and r["schedule"] != base], base, ref)]
    train.write_text(os.path.join(pipe.run_dir, "eval.md"), "\n".join(md) + "\n")
    print("\n".join(md))


def floor(run_dir: str, device: torch.device) -> dict:
    """The reference rows alone, before any generator is trained (floor.json)."""
    ref = EvalReferences(types.SimpleNamespace(run_dir=run_dir, device=device, vq=train.build_model(run_dir, "vq", device),
                                               featnet=train.build_model(run_dir, "featnet", device)))
    n = len(ref.test_feats)
    rows = {"real training images vs test": train_reference(ref, n),
            "tokenizer reconstructions of test vs test (floor)": recon_reference(ref, n)}
    train.write_json(os.path.join(run_dir, "floor.json"), {"rows": rows})
    print(f"| reference | {metric_head(ref)}\n|" + "---|" * (metric_head(ref).count("|") + 1))
    for name, r in rows.items():
        print(f"| {name} | {metric_cells(r, ref)}")
    return rows


# ============================================================================= pictures

def grids(pipe: train.Pipeline, T: int, per_class: int = 10) -> None:
    """samples_maskgit_T{T}.png, samples_adanat_T{T}.png: one row per class (AdaNAT's w_0 swept, else 2)."""
    labels = torch.arange(pipe.cfg.num_classes).repeat_interleave(per_class)
    w_0 = train.read_json(os.path.join(pipe.run_dir, "sweep_w.json"), {}).get("w_0", 2.0)
    for name, (tau2_0, w) in {"maskgit": (nat.MASKGIT["tau2_0"], 0.0), "adanat": (nat.ADANAT_TAU2_0, w_0)}.items():
        path = os.path.join(pipe.run_dir, f"samples_{name}_T{T}.png")
        tokens = pipe.generate(labels, T, nat.heuristic_schedule(T, tau2_0=tau2_0, w_0=w), seed=0, guided=w != 0)
        data.save_grid(pipe.decode(tokens), path, nrow=per_class, save=train.DIST.main)
        print("wrote", path)


def plot_policy(pipe: train.Pipeline, T: int, samples: int = 1000, per_class: int = 6) -> None:
    """policy_actions_T{T}.png: the adaptive policy's actions per step (mean ± sd over samples; the heuristic
    dashed); heuristic_vs_adaptive_T{T}.png: each class's samples, heuristic left, policy right, same seed."""
    found = policy_schedule(pipe, "policy", T)
    if found is None:
        raise train.UserError(f"{pipe.run_dir}/policy_T{T}.pt not found: train it with python train.py --stage policy "
                              f"--run-dir {pipe.run_dir} --set pi_T={T}")
    make, cfg = found
    h = policy.activation(policy.inverse_activation(torch.tensor(cfg["heuristic"])))   # (T, 4), as executed
    sched = make()
    pipe.generate(train.balanced_labels(samples, pipe.cfg.num_classes), T, sched, seed=0)
    a = sched.actions()                                               # (T, n, 4)
    mean, sd, steps = a.mean(1), a.std(1), list(range(T))
    panels = [{"title": name, "series": [
        {"x": steps, "y": mean[:, j].tolist(), "color": (200, 60, 30),
         "band": ((mean[:, j] - sd[:, j]).tolist(), (mean[:, j] + sd[:, j]).tolist())},
        {"x": steps, "y": h[:, j].tolist(), "color": (60, 60, 60), "dashed": True}]} for j, name in enumerate(policy.ACTIONS)]
    path = os.path.join(pipe.run_dir, f"policy_actions_T{T}.png")
    data.plot_panels(path, panels, title=f"adaptive policy, T={T}: mean +- sd over {samples} samples per step "
                                          f"(x: step t); dashed: the heuristic it started from", save=train.DIST.main)
    print("wrote", path)
    K, C, S = pipe.cfg.num_classes, pipe.vq.cfg.in_ch, pipe.vq.cfg.img_size
    labels = torch.arange(K).repeat_interleave(per_class)
    w_0 = cfg["heuristic"][-1][3] * T / (T - 1)
    left = pipe.decode(pipe.generate(labels, T, nat.heuristic_schedule(T, nat.ADANAT_TAU2_0, w_0), seed=0,
                                     guided=w_0 != 0)).view(K, per_class, -1)
    right = pipe.decode(pipe.generate(labels, T, make(), seed=0)).view(K, per_class, -1)
    both = torch.cat([left, torch.ones(K, 1, C * S * S), right], dim=1).view(-1, C, S, S)   # a white column between
    path = os.path.join(pipe.run_dir, f"heuristic_vs_adaptive_T{T}.png")
    data.save_grid(both, path, nrow=2 * per_class + 1, save=train.DIST.main)
    print("wrote", path, f"(left: heuristic tau2_0=1, w_0={w_0:g}; right: adaptive policy; one class per row)")


# ============================================================================= command line

def parser(doc: str = __doc__) -> argparse.ArgumentParser:
    """The core's flags; an experiment's script adds its own (experiments/*.py)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/small")
    p.add_argument("--device", default="auto")
    p.add_argument("--eval", action="store_true", help="the evaluation table")
    p.add_argument("--sweep-w", action="store_true", help="(re)run the w_0 sweep of AdaNAT's heuristic")
    p.add_argument("--floor", action="store_true", help="the reference rows alone (needs vq and featnet): floor.json")
    p.add_argument("--plot", action="store_true", help="the adaptive policy's actions per step, and heuristic vs adaptive grids")
    p.add_argument("--samples", type=int, default=None, help="samples per row and seed (default 10 000 on a GPU, 2 000 on a CPU)")
    p.add_argument("--sweep-samples", type=int, default=2000, help="samples per w_0 candidate")
    p.add_argument("--decode-steps", default="4,8,16", help="comma-separated T values for --eval and --plot")
    p.add_argument("--grid-steps", type=int, default=8, help="T of the grids")
    p.add_argument("--batch", type=int, default=None, help="rows per generation chunk (default 500 CPU, 4096 GPU); the "
                   "random numbers are keyed by chunk")
    p.add_argument("--no-bf16", action="store_true", help="fp32 on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    return p


def check_args(args) -> list[int]:
    """One clear line for a flag value that cannot work; returns the decoding step counts."""
    if min(args.samples or 10, args.sweep_samples, getattr(args, "check_samples", 10)) < 10:
        raise train.UserError("--samples, --sweep-samples and --check-samples must be at least 10 (k-NN precision/recall needs k < n)")
    if args.batch is not None and args.batch <= 0:
        raise train.UserError(f"--batch {args.batch}: must be positive")
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
    pipe = train.Pipeline(args.run_dir, device, bf16=not args.no_bf16, batch=args.batch)
    if args.compile:
        pipe.compile()
    return pipe


def main(argv: list[str] | None = None, add_flags=None, run=None, check=None, doc: str = __doc__) -> None:
    """The command line. An experiment's script passes add_flags(parser), check(args) and run(args, device),
    which replaces the NAT's grids and table."""
    p = parser(doc)
    if add_flags is not None:
        add_flags(p)
    args = p.parse_args(argv)
    try:
        steps = check_args(args)
        if check is not None:
            check(args)
        device = train.init_distributed(train.pick_device(args.device))   # torchrun: generation shared over ranks
        if args.samples is None:
            args.samples = 10000 if device.type == "cuda" else 2000
            if args.eval:
                print(f"--samples {args.samples} per row and seed on {device.type} (the papers' protocol is 10 000)")
        if not train.DIST.main:
            sys.stdout = open(os.devnull, "w")
        torch.backends.cuda.matmul.allow_tf32 = True
        if args.floor:
            floor(args.run_dir, device)
        elif run is not None:
            run(args, device)
        else:
            pipe = nat_pipeline(args, device)
            if args.sweep_w:
                train.sweep_w(pipe, train.RealFeatures(pipe), args.sweep_samples)
            if args.eval:
                evaluate(pipe, args.samples, steps, args.sweep_samples)
            for T in steps if args.plot else []:
                if os.path.exists(os.path.join(args.run_dir, f"policy_T{T}.pt")):
                    plot_policy(pipe, T)
            if args.eval or not (args.sweep_w or args.plot):
                grids(pipe, args.grid_steps)
    except (train.UserError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except torch.OutOfMemoryError:
        print(f"error: out of memory generating {args.batch or 'the default'} rows per chunk: lower --batch, e.g. --batch 128 "
              f"(other random numbers, so other images)", file=sys.stderr)
        sys.exit(train.FAULT_EXIT)
    except train.RunFault as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(train.FAULT_EXIT)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
