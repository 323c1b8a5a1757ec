"""The reward's fixed point (AdaNAT §4.3, Eq. 13-14 and Algorithm 1, step 4) and the headroom of adaptivity.

AdaNAT keeps training the discriminator D on the current policy's samples, so the policy's fixed point is the schedule whose
samples a freshly trained D can least tell from real images: a classifier two-sample test. `reward_check` measures it
directly. For each of at least 16 fixed T-step schedules, none a perturbation of another (`check_schedules`: MaskGIT;
AdaNAT's heuristic on a w_0 grid and a tau2_0 grid; the searched table and family; the class-only schedule of --headroom's
sweep; every trained policy; experiments/var.py passes the VAR's), `samples` images are made once (seed 1), and:
  - the judges score them against *training* statistics: FID, featnet2 FD, SSL FD, precision and recall;
  - per discriminator spec (frozen network(s) and taps: "backbone", "backbone@12", "dnet", "dssl", "backbone+dssl", ...)
    a fresh D of the policy's kind (`fresh_d`) trains on one split of the fakes and of the reals (`three_splits`), is
    early-stopped on a second and read on the third, which chose nothing (lower accuracy, higher loss: harder to tell);
  - the warm-up reading: the mean reward of policy_T{T}.pt's D after its warm-up, if trained.
Spearman rho(D's badness, judge) per spec and judge with a 95% bootstrap interval over the schedules: badness = the
read accuracy, or minus the read loss; judge = FID, featnet2 FD, SSL FD or minus recall (positive rho: D and the judge
agree). The pair that matters: the class-only schedule's read accuracy minus the heuristic's, with a binomial interval.

`headroom`: how much a schedule that knows only the class gains (AdaNAT's adaptive policy sees the class and more). Every
(w_0, tau2_0) of a grid, widened until no class picks its edge, is scored per class on per-class training statistics of the
FID network; each class takes its best pair; the class-only schedule, the best single pair and the heuristic are then
measured on the test set over EVAL_SEEDS on every network, against the best single pair with 95% intervals.

`training_table` (--training): what each finished policy did while it trained, from its checkpoint's history, and
whether it learned the class-only schedule's per-class choices (`class_actions`).
Usage: python experiments/game.py --run-dir runs/small --reward-check [--d-specs backbone,dnet,dssl] | --headroom | --training
"""
import glob
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the project's root

import torch
from tqdm import tqdm

import data
import fid
import nat
import reward
from experiments.studies import Refiner, spearman, spearman_interval  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402

JUDGE_KEYS = {"fid": "FID", "fid2": "featnet2 FID", "fd_ssl": "SSL FD", "recall": "-recall"}
NOT_READ = ("flow", "msvq", "var", "dnet", "dssl")   # checkpoints the NAT's images and judges never read
CHECK_W = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)        # the heuristic's w_0 grid (tau2_0 = 1) ...
CHECK_TAU2 = (0.25, 0.5, 2.0, 3.0, 4.5, 8.0)              # ... and its tau2_0 grid at the swept w_0
SPLITS = (0.5, 0.25, 0.25)                                # D trains on, is early-stopped on, is read on
HEADROOM_W = (0.0, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0)
HEADROOM_TAU2 = (0.25, 0.5, 1.0, 2.0, 4.5, 8.0)
HEURISTIC = "AdaNAT heuristic (tau2_0=1, w_0={:g})"       # check_schedules' row of the heuristic at a w_0


def parse_spec(spec: str) -> tuple[str, tuple]:
    """"backbone+dssl@12" -> ("backbone+dssl", (1, 2)); no "@": every tap (0, 1, 2)."""
    nets, _, taps = spec.partition("@")
    if set(nets.split("+")) - set(train.D_NETS) or (taps and not (set(taps) <= set("012") and len(set(taps)) == len(taps))):
        raise train.UserError(f"--d-specs {spec!r}: networks among {', '.join(train.D_NETS)} joined by +, then "
                             f"optionally @ and taps among 0 1 2 (e.g. backbone@12); never a judge")
    return nets, tuple(int(k) for k in taps) if taps else (0, 1, 2)


def fresh(pipe: train.Pipeline, path: str, reads: tuple = ()) -> dict:
    """A cache file's contents, or a new cache when it is missing, made with other generation settings (chunk size,
    bf16, device: other numbers) or older than a checkpoint its images or judges read: those named `reads`, else all
    but NOT_READ (a D candidate trained later adds readings; retrain one and delete the cache)."""
    setup, cache = [pipe.batch, pipe.bf16, str(pipe.device)], train.read_json(path, {})   # {}: no cache file yet
    keep = (lambda n: n.startswith(reads)) if reads else (lambda n: not n.startswith(NOT_READ))
    read = [p for p in glob.glob(os.path.join(pipe.run_dir, "*.pt")) if keep(os.path.basename(p))]
    stale = cache.get("setup") != setup or any(os.path.getmtime(p) > os.path.getmtime(path) for p in read)
    return {"setup": setup} if stale else cache


def three_splits(n: int) -> tuple[slice, slice, slice]:
    """Disjoint train / stop / read slices of n items in SPLITS' proportions (each at least one item)."""
    a = max(1, round(n * SPLITS[0]))
    b = max(a + 1, round(n * (SPLITS[0] + SPLITS[1])))
    if b >= n:
        raise train.UserError(f"{n} items cannot make three splits: raise --check-samples")
    return slice(0, a), slice(a, b), slice(b, n)


def check_schedules(pipe: train.Pipeline, ref: train.RealFeatures, sweep_samples: int, T: int) -> dict:
    """{name: make_schedule} of the check, none a perturbation of another: MaskGIT, AdaNAT's heuristic on the
    CHECK_W and CHECK_TAU2 grids (and at the swept w_0), the searched table and family, the class-only schedule
    (when --headroom's sweep is there) and every trained policy's best weights at T (training seed 0)."""
    w_0 = train.get_w0(pipe, ref, sweep_samples)
    h = lambda tau2_0, w: (lambda: nat.heuristic_schedule(T, tau2_0, w))
    out = {"MaskGIT": lambda: nat.heuristic_schedule(T, **nat.MASKGIT)}
    out |= {HEURISTIC.format(w): h(nat.ADANAT_TAU2_0, w) for w in sorted({*CHECK_W, w_0})}
    out |= {f"heuristic, tau2_0={tau:g} (w_0={w_0:g})": h(tau, w_0) for tau in CHECK_TAU2}
    for name in ("search", "param"):                                     # the searched family only if it was searched
        found = train.searched_table(pipe.run_dir, name, T)
        if found is None and name == "search":
            raise train.UserError(f"the reward check compares the searched schedule too: run python experiments/search.py "
                                  f"--run-dir {pipe.run_dir} --stage search --set search_T={T}")
        if found is not None:
            out[sample.SEARCH_ROWS[name]] = lambda table=found[0].float(): nat.table_schedule(table)
    pairs = train.read_json(os.path.join(pipe.run_dir, "headroom_sweep.json"), {}).get("class_pairs")
    if (tables := train.class_only_table(pipe.run_dir, T)) is not None:    # named by its pairs: a new sweep, a new row
        out["class-only schedule (" + ", ".join(f"{w:g}/{tau2:g}" for w, tau2 in pairs) + ")"] = lambda: nat.class_table_schedule(tables)
    trained = {label: sample.policy_schedule(pipe, kind, T) for kind, label in sample.POLICY_ROWS.items()}   # or None
    return out | {label.format(beta_ema=p[1]["beta_ema"]): p[0] for label, p in trained.items() if p is not None}


def fresh_d(c: train.TrainConfig, backbone, channels: list, num_classes: int, reals: tuple, fakes: tuple,
            device: torch.device, max_steps: int, eval_every: int = 25, patience: int = 2) -> dict:
    """One classifier two-sample test: a fresh projected D of the policy's kind (heads, class projection, translation
    DiffAugment, pi_batch reals + pi_batch fakes a step) trained on the train split of fakes (x (n, C, H, W), y (n,))
    against the train split of reals, scored every eval_every steps on the stop splits' loss and stopped after
    `patience` scorings without a better one, read on the read splits (three_splits: no reading is made on what chose
    the stopping point); returns the read {loss, acc}, the stopping loss and the steps run. reals = (x, y,
    [(features, labels) of their stop and read splits])."""
    (xr, yr, (stop_real, read_real)), (xf, yf) = reals, fakes
    (tr_r, _, _), (tr_f, stop_f, read_f) = three_splits(len(xr)), three_splits(len(xf))
    feats = lambda x, y, part: (backbone(x[part].to(device)), y[part].to(device))   # frozen: computed once
    stop, read = (stop_real, feats(xf, yf, stop_f)), (read_real, feats(xf, yf, read_f))
    xr, yr, xf, yf = xr[tr_r], yr[tr_r], xf[tr_f], yf[tr_f]
    torch.manual_seed(c.seed)
    D = reward.ProjectedDiscriminator(channels, num_classes).to(device)
    opt = torch.optim.Adam(D.parameters(), lr=c.pi_d_lr, betas=(0.5, 0.999))
    g, g_cpu = torch.Generator(device).manual_seed(c.seed + 77), torch.Generator().manual_seed(c.seed + 77)

    @torch.no_grad()
    def score(split) -> dict:
        D.eval()
        lr_, lf_ = D(*split[0]), D(*split[1])
        return {"loss": reward.d_loss(lr_, lf_).item(), "acc": reward.accuracy(lr_, lf_)}
    best, since, step = {"stop_loss": math.inf, "steps": 0, **score(read)}, 0, 0
    while step < max_steps and since < patience:
        D.train()
        for _ in range(eval_every):
            i, j = (torch.randint(0, len(x), (c.pi_batch,), generator=g_cpu) for x in (xr, xf))
            x = torch.cat([reward.diff_augment(xr[i].to(device), g, cutout=0.0), reward.diff_augment(xf[j].to(device), g, cutout=0.0)])
            both = D(backbone(x), torch.cat([yr[i], yf[j]]).to(device))
            loss = reward.d_loss(reward.rows(both, slice(0, c.pi_batch)), reward.rows(both, slice(c.pi_batch, None)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        step, stop_loss = step + eval_every, score(stop)["loss"]
        train.check_finite(d_loss=stop_loss)
        improved = stop_loss < best["stop_loss"]
        best, since = ({"stop_loss": stop_loss, "steps": step, **score(read)}, 0) if improved else (best, since + 1)
    return best


def reward_check(pipe: train.Pipeline, ref: train.RealFeatures, samples: int, specs: list[str], max_steps: int, tables: dict,
                 make_images, T: int = 4, stem: str = "reward_check", reads: tuple = (), warm=None, heuristic: str = "") -> dict:
    """{stem}.md / .json: the two-sample readings of every D spec on the schedules `tables` ({name: make_schedule};
    make_images(labels, schedule) -> images, seed 1) and the warm-up reading (`warm`, a Refiner), with the judges and
    Spearman rho per spec and judge (module docstring). Resumable: {stem}_cache.json (started over when a checkpoint it
    reads is newer or the generation settings differ: `fresh`)."""
    if "fid2" not in ref.judges or "fd_ssl" not in ref.judges:
        raise train.UserError(f"the reward check reads both held-out judges: train them with python train.py --run-dir "
                             f"{pipe.run_dir} --stage featnet2, then --stage featssl")
    c, cache = train.load_config(pipe.run_dir), fresh(pipe, path := os.path.join(pipe.run_dir, f"{stem}_cache.json"), reads)
    labels, images = train.balanced_labels(samples, pipe.cfg.num_classes), {}   # images: made once, kept in memory
    for name, make in tqdm(tables.items(), desc="schedules: images and judges", disable=not train.DIST.main):
        images[name] = make_images(labels, make())
        if (key := f"judges|{name}|{samples}") not in cache:               # the judges' readings: cached
            feats, _ = fid.extract(pipe.featnet, images[name], device=pipe.device)
            P, R = fid.precision_recall(ref.train_feats, feats, k=3, device=ref.device)
            cache[key] = {"precision": P, "recall": R, **ref.distances(images[name], ref.train, feats)}
            train.write_json(path, cache)
    x_real, y_real = train.real_images(c)
    for spec in specs:                         # the reals' stop and read splits through D's backbone: once per spec
        backbone, channels = train.d_backbone(pipe.run_dir, *parse_spec(spec), pipe.device)
        held_out = [(backbone(x_real[p].to(pipe.device)), y_real[p].to(pipe.device)) for p in three_splits(len(x_real))[1:]]
        for name in tqdm(tables, desc=f"two-sample D on {spec}", disable=not train.DIST.main):
            if (key := f"d3|{spec}|{name}|{samples}|{max_steps}") not in cache:   # d3: the three-split reading
                cache[key] = fresh_d(c, backbone, channels, pipe.cfg.num_classes, (x_real, y_real, held_out),
                                     (images[name], labels), pipe.device, max_steps)
                train.write_json(path, cache)
    read_sizes = [(p.stop - p.start) for p in (three_splits(len(x_real))[2], three_splits(samples)[2])]
    return write_check(pipe, tables, specs, cache, samples, max_steps, T, warm, images, labels, heuristic, read_sizes, stem)


def publish(run_dir: str, stem: str, obj, md: list) -> None:
    """{stem}.json (obj) and {stem}.md (the markdown lines, printed too) in the run folder."""
    train.write_json(os.path.join(run_dir, f"{stem}.json"), obj)
    train.write_text(os.path.join(run_dir, f"{stem}.md"), "\n".join(md) + "\n")
    print("\n".join(md))


def write_check(pipe, tables: dict, specs: list, cache: dict, samples: int, max_steps: int, T: int, warm, images,
                labels, heuristic: str, read_sizes: list, stem: str) -> dict:
    """{stem}.json / .md from the cached readings; the class-only schedule's read accuracy minus the heuristic's
    per spec, with a 95% binomial interval over the read items (reals and fakes weighted equally; D's seed not varied)."""
    rows = [{"schedule": name, **cache[f"judges|{name}|{samples}"],
             **({"warmup_reward": warm.score(images[name], labels).mean().item()} if warm else {}),
             "two_sample": {s: cache[f"d3|{s}|{name}|{samples}|{max_steps}"] for s in specs}} for name in tables]
    judge = lambda k: [-r[k] if k == "recall" else r[k] for r in rows]           # a judge's badness per row
    rho = {s: {f"{by}_vs_{k}": spearman_interval([r["two_sample"][s]["acc"] if by == "acc" else -r["two_sample"][s]["loss"]
                                                  for r in rows], judge(k))
               for by in ("acc", "loss") for k in JUDGE_KEYS} for s in specs}
    out = {"T": T, "samples": samples, "max_steps": max_steps, "splits": SPLITS, "rows": rows, "spearman_two_sample": rho,
           "claim_judges": sample.claim_judges(pipe.run_dir),
           "spearman_judges": {f"{a}_vs_{b}": spearman_interval([r[a] for r in rows], [r[b] for r in rows])
                               for a, b in (("fid", "fid2"), ("fid", "fd_ssl"), ("fid2", "fd_ssl"))}}
    pair = [r["two_sample"] for r in rows if r["schedule"].startswith("class-only") or r["schedule"] == heuristic]
    if len(pair) == 2:                  # [heuristic, class-only]: is the class-only schedule harder to tell from real?
        var = lambda a: a * (1 - a) / 4 * sum(1 / n for n in read_sizes)   # a reading's binomial variance (reals, fakes)
        out["class_only_minus_heuristic"] = {s: [d := pair[1][s]["acc"] - pair[0][s]["acc"], *(
            d + k * 1.96 * (var(pair[0][s]["acc"]) + var(pair[1][s]["acc"])) ** 0.5 for k in (-1, 1))] for s in specs}
    out |= {"spearman_warmup": {k: spearman_interval([-r["warmup_reward"] for r in rows], judge(k)) for k in JUDGE_KEYS},
            "d_acc_warmup": warm.d_acc_warmup} if warm else {}
    fmt = lambda r: f"{r[0]:+.2f} [{r[1]:+.2f}, {r[2]:+.2f}]" + ("*" if r[1] > 0 or r[2] < 0 else "")
    md = [f"Reward check at T = {T}: {len(rows)} fixed schedules, {samples} samples each (seed 1); judges against "
          f"training-set statistics. Two-sample readings: a fresh D per schedule and spec trained on {SPLITS[0]:.0%} of "
          f"the fakes and of the reals, early-stopped on the loss of another {SPLITS[1]:.0%} (at most {max_steps} steps), "
          f"read on the last {SPLITS[2]:.0%}: accuracy / loss (lower accuracy, higher loss: harder to tell from real).", "",
          "| schedule | FID | featnet2 FID | SSL FD | precision | recall |" + "".join(f" {s} acc / loss |" for s in specs)
          + (" warm-up D reward |" if warm else ""), "|---" * (6 + len(specs) + bool(warm)) + "|"]
    md += [f"| {r['schedule']} | {r['fid']:.2f} | {r['fid2']:.2f} | {r['fd_ssl']:.3f} | {r['precision']:.3f} | "
           f"{r['recall']:.3f} |" + "".join(f" {r['two_sample'][s]['acc']:.3f} / {r['two_sample'][s]['loss']:.3f} |"
                                           for s in specs) + (f" {r['warmup_reward']:.4f} |" if warm else "") for r in rows]
    md += ["", "Spearman rho [95% bootstrap interval over the schedules; * excludes 0] (positive: D and the judge agree; "
           "badness = the read split's accuracy or minus its loss):", "",
           "| D spec | by | " + " | ".join(JUDGE_KEYS.values()) + " |", "|---|---|" + "---|" * len(JUDGE_KEYS)]
    md += [f"| {s} | {name} | " + " | ".join(fmt(rho[s][f"{by}_vs_{k}"]) for k in JUDGE_KEYS) + " |"
           for s in specs for by, name in (("acc", "accuracy"), ("loss", "-loss"))]
    md += [f"| warm-up D of policy_T{T}.pt (acc {out['d_acc_warmup']:.3f}) | -reward | " +
           " | ".join(fmt(out["spearman_warmup"][k]) for k in JUDGE_KEYS) + " |"] if warm else []
    if "class_only_minus_heuristic" in out:
        md += ["", f"Class-only schedule minus {heuristic}, read accuracy (95% binomial interval over the read items; D's own "
               "seed not varied): " + ", ".join(f"{s} {d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for s, (d, lo, hi) in out["class_only_minus_heuristic"].items())]
    md += ["", "Judges among themselves: " + ", ".join(f"rho({k.replace('_vs_', ', ')}) = {fmt(v)}"
                                                     for k, v in out["spearman_judges"].items()) + "."]
    publish(pipe.run_dir, stem, out, md)
    return out


def pair_check(pipe: train.Pipeline, ref: train.RealFeatures, samples: int, sweep_samples: int, specs: list[str],
               max_steps: int, folds: int = 4, T: int = 4) -> dict:
    """pair_check.md / .json: is the class-only schedule harder to tell from real than AdaNAT's heuristic, beyond D's noise?
    Each makes `samples` images (seed 2); per D spec and fold f, a fresh D per schedule on the f-th rotation of the fakes
    and the reals (three_splits of the rotated sets: each fold reads other items and trains D anew; the readings cached in
    pair_check_cache.json, `fresh`); the read accuracy, class-only minus heuristic, paired by fold: its mean and 95%
    t-interval over the folds."""
    c, tables = train.load_config(pipe.run_dir), check_schedules(pipe, ref, sweep_samples, T)
    pair = [HEURISTIC.format(train.get_w0(pipe, ref, sweep_samples))] + [n for n in tables if n.startswith("class-only")]
    if len(pair) < 2:
        raise train.UserError(f"the pair check needs the class-only schedule: run python experiments/game.py --run-dir "
                              f"{pipe.run_dir} --headroom first")
    labels, (x_real, y_real) = train.balanced_labels(samples, pipe.cfg.num_classes), train.real_images(c)
    images = {n: pipe.decode(pipe.generate(labels, T, tables[n](), seed=2, progress=True)) for n in pair}
    out, cache = {"samples": samples, "folds": folds, "pair": pair, "acc": {}}, fresh(pipe, path := os.path.join(pipe.run_dir, "pair_check_cache.json"))   # one reading per D: resumable
    for spec in specs:
        backbone, channels = train.d_backbone(pipe.run_dir, *parse_spec(spec), pipe.device)
        acc = {n: [] for n in pair}                                          # per schedule: the read accuracy per fold
        for f in tqdm(range(folds), desc=f"pair check on {spec}", disable=not train.DIST.main):
            rot = lambda x: torch.roll(x, f * len(x) // folds, 0)           # fold f: the splits over rotated sets
            xr, yr = rot(x_real), rot(y_real)
            held_out = [(backbone(xr[p].to(pipe.device)), yr[p].to(pipe.device)) for p in three_splits(len(xr))[1:]]
            for n in pair:
                if (key := f"{spec}|{n}|{samples}|{max_steps}|fold {f} of {folds}") not in cache:
                    cache[key] = fresh_d(c, backbone, channels, pipe.cfg.num_classes, (xr, yr, held_out),
                                         (rot(images[n]), rot(labels)), pipe.device, max_steps)["acc"]
                    train.write_json(path, cache)
                acc[n].append(cache[key])
        d, half = sample.claims([{"acc": a} for a in acc[pair[1]]], [{"acc": a} for a in acc[pair[0]]], ["acc"])["acc"]
        out["acc"][spec] = {"per_fold": acc, "class_only_minus_heuristic": [d, d - half, d + half]}
    md = [f"Pair check at T = {T}: {pair[1]} minus {pair[0]}, read accuracy of a fresh D ({samples} samples each, seed 2; "
          f"{folds} folds, each its own D and read split; 95% t-interval over the folds; negative: harder to tell from real).",
          "", "| D spec | heuristic acc | class-only acc | class-only minus heuristic |", "|---|---|---|---|"]
    md += [f"| {s} | {sum(r['per_fold'][pair[0]]) / folds:.3f} | {sum(r['per_fold'][pair[1]]) / folds:.3f} | "
           f"{sample.claim_text(r['class_only_minus_heuristic'][0], r['class_only_minus_heuristic'][2] - r['class_only_minus_heuristic'][0])} |"
           for s, r in out["acc"].items()]
    publish(pipe.run_dir, "pair_check", out, md)
    return out


def sweep_pairs(pipe: train.Pipeline, ref: train.RealFeatures, pairs: list, per_class: int, T: int) -> dict:
    """"w,tau2" -> {per_class: FID of each class's per_class samples against that class's training statistics,
    all: FID of them all}, on the FID network, for each (w_0, tau2_0) in pairs (seed 0, common random numbers)."""
    tables = torch.stack([nat.heuristic_table(T, tau2, w) for w, tau2 in pairs])              # (C, T, 4)
    K, C = pipe.cfg.num_classes, len(pairs)
    labels = train.balanced_labels(per_class * K, K)                                         # (n,)
    tok = pipe.generate(labels.repeat_interleave(C), T, nat.table_schedule(tables), seed=0, group=C, progress=True,
                        logits_fn=nat.dedup_logits_fn(pipe.logits_fn))
    feats = fid.extract(pipe.featnet, pipe.decode(tok), device=pipe.device)[0].view(len(labels), C, -1)   # (n, C, D)
    class_stats = [fid.statistics(ref.train_feats[ref.train_labels == k]) for k in range(K)]   # once, not per pair
    return {f"{w:g},{tau2:g}": {
        "per_class": [fid.fid_from_features(feats[labels == k, j], *class_stats[k]) for k in range(K)],
        "all": fid.fid_from_features(feats[:, j], ref.train_mu, ref.train_sigma)} for j, (w, tau2) in enumerate(pairs)}


def class_sweep(pipe: train.Pipeline, ref: train.RealFeatures, per_class: int, T: int) -> dict:
    """Each class's best (w_0, tau2_0) on a grid widened until no class picks its edge (the largest w_0, the
    smallest or largest tau2_0; w_0 = 0 is a bound, not an edge): HEADROOM_W x HEADROOM_TAU2, then another w_0
    (x 1.5) or tau2_0 (/ 2, x 2) row at a time, at most 4 times, the whole grid made again each time (common
    random numbers). Readings cached in headroom_sweep.json (`fresh`) with the chosen class_pairs.
    Returns {grid, per_class_fid (K, C), fid (C,), best (K,), best_all, edges}."""
    saved = fresh(pipe, path := os.path.join(pipe.run_dir, "headroom_sweep.json"))
    if (saved.get("per_class"), saved.get("T")) != (per_class, T) or "pairs" not in saved:
        saved = {"setup": saved["setup"], "per_class": per_class, "T": T, "pairs": {}}
    ws, taus = list(HEADROOM_W), list(HEADROOM_TAU2)
    for _ in range(5):
        grid = [(w, tau2) for w in ws for tau2 in taus]
        if any(f"{w:g},{tau2:g}" not in saved["pairs"] for w, tau2 in grid):   # the whole grid again: one set of
            saved["pairs"] = sweep_pairs(pipe, ref, grid, per_class, T)       # random numbers for every pair
            train.write_json(path, saved)
        read = [saved["pairs"][f"{w:g},{tau2:g}"] for w, tau2 in grid]
        per_class_fid = [[r["per_class"][k] for r in read] for k in range(pipe.cfg.num_classes)]
        best = [min(range(len(grid)), key=lambda j: row[j]) for row in per_class_fid]
        edges = {"w": any(grid[j][0] == ws[-1] for j in best), "tau_low": any(grid[j][1] == taus[0] for j in best),
                 "tau_high": any(grid[j][1] == taus[-1] for j in best)}
        if not any(edges.values()):
            break
        ws += [ws[-1] * 1.5] if edges["w"] else []
        taus = ([taus[0] / 2] if edges["tau_low"] else []) + taus + ([taus[-1] * 2] if edges["tau_high"] else [])
    overall = [r["all"] for r in read]
    train.write_json(path, saved | {"class_pairs": [grid[j] for j in best]})   # what the reward check reads
    return {"grid": grid, "per_class_fid": per_class_fid, "fid": overall, "best": best, "edges": edges,
            "best_all": min(range(len(grid)), key=lambda j: overall[j])}


def headroom(pipe: train.Pipeline, samples: int, sweep_samples: int, per_class: int = 150, T: int = 4) -> list:
    """headroom_T{T}.md / .json: the heuristic, the best single (w_0, tau2_0) and the class-only schedule
    (each class its best pair) on the test set over EVAL_SEEDS, every judge; the share of the best single
    pair -> floor gap each closes, and each row minus the best single pair with its 95% interval."""
    ref = sample.EvalReferences(pipe)
    w_0, sweep = train.get_w0(pipe, ref, sweep_samples), class_sweep(pipe, ref, per_class, T)
    grid, best = sweep["grid"], sweep["best"]
    tables = train.class_only_table(pipe.run_dir, T)                        # (K, T, 4): the pairs class_sweep wrote
    w_all, tau_all = grid[sweep["best_all"]]
    rows = {f"AdaNAT heuristic (tau2_0 = 1, w_0 = {w_0:g})": nat.heuristic_schedule(T, nat.ADANAT_TAU2_0, w_0),
            f"best single pair (w_0 = {w_all:g}, tau2_0 = {tau_all:g})": nat.heuristic_schedule(T, tau_all, w_all),
            "class-only schedule (each class its best pair)": nat.class_table_schedule(tables)}
    labels = train.balanced_labels(samples, pipe.cfg.num_classes)
    cell = lambda sched, s: lambda: sample.metrics(ref, pipe.decode(pipe.generate(labels, T, sched, seed=s)), labels)
    res = sample.run_cells([("floor", lambda: sample.recon_reference(ref, samples))] + [
        (name, cell(sched, s)) for name, sched in rows.items() for s in sample.EVAL_SEEDS], "headroom")
    table, pair_name = {name: sample.seed_summary(res[name], ()) for name in res}, list(rows)[1]   # the best single pair
    pair, floor = table[pair_name], table["floor"]
    keys = [k for k in ("fid", "fid_recon", "fid2", "fd_ssl") if k in floor]
    for name, r in table.items():
        r["gap_closed"] = {k: (pair[k] - r[k]) / (pair[k] - floor[k]) for k in keys}
        if name != "floor":
            r["vs_best_pair"] = sample.claims(res[name], res[pair_name], sample.claim_keys(ref))
    head = f"| schedule | {sample.metric_head(ref)} " + " | ".join(f"gap closed ({k})" for k in keys) + " |"
    md = [f"Headroom of a schedule that knows only the class, T = {T}: per-class pairs (w_0, tau2_0) chosen on {per_class} "
          f"samples per class against per-class training statistics (FID network); rows: {samples} samples x seeds "
          f"{list(sample.EVAL_SEEDS)} against the test images{sample.REF_NOTE}; gap closed = (best single pair - row) / "
          f"(best single pair - floor). Per-class pairs: " + ", ".join(f"{k}: {grid[j]}" for k, j in enumerate(best))
          + ("" if not any(sweep["edges"].values()) else f". Still at the grid's edge after widening: {sweep['edges']}"),
          "", head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in table.items():
        md.append(f"| {name} | {sample.metric_cells(r, ref)} " + " | ".join(f"{r['gap_closed'][k]:.2f}" for k in keys) + " |")
    md += ["", sample.claims_markdown([(name, r["vs_best_pair"]) for name, r in table.items()
                                       if name not in ("floor", pair_name)], pair_name, ref)]
    publish(pipe.run_dir, f"headroom_T{T}", {"rows": table, "per_class_pairs": [grid[j] for j in best], "sweep": sweep}, md)
    return table


def class_actions(run_dir: str, run: str, history: list, spec: list) -> dict:
    """Does the policy learn the class-only schedule's per-class choices? Each class's mean action (over the steps) per
    knob and iteration, drawn as {run}_classes.png; over the last ten iterations: its range across the classes and, for
    w and tau2, Spearman rho with the class-only schedule's w_0 and tau2_0 (headroom_sweep.json, when there)."""
    its = [r for r in history if "act_class" in r]
    per_class = torch.tensor([r["act_class"] for r in its], dtype=torch.float).nanmean(2)       # (iterations, K, D)
    data.plot_panels(os.path.join(run_dir, f"{run}_classes.png"), [{"title": f"{a} by class", "series": [
        {"x": [r["iter"] for r in its], "y": per_class[:, k, j].tolist(), "color": (25 * k, 140 - 14 * k, 220 - 20 * k)}
        for k in range(per_class.shape[1])]} for j, a in enumerate(spec)], f"{run}: each class's mean action (over the steps)")
    last = per_class[-10:].nanmean(0)                                                           # (K, D)
    seen = last[~last.isnan().any(1)]                                                           # (classes seen, D)
    out = {f"{a} range": (seen[:, j].amax() - seen[:, j].amin()).item() for j, a in enumerate(spec)}
    pairs = train.read_json(os.path.join(run_dir, "headroom_sweep.json"), {}).get("class_pairs")
    if pairs and "tau2" in spec and len(seen) == len(last):                                     # the NAT's knobs
        out |= {f"{a} rho vs class-only": spearman(last[:, spec.index(a)].tolist(), [p[a == "tau2"] for p in pairs]) for a in ("w", "tau2")}
    return out


def training_table(run_dir: str) -> list[dict]:
    """training.md / .json: what every finished PPO policy of the run folder did while it trained, from its checkpoint's
    history: the choice network's training-set FID (start, best, last), the held-out judges' (start, last), D's held-out
    accuracy (after its warm-up, last ten iterations) and steps, PPO's approx. KL, and per knob the drift of its mean
    action (the largest |last - first iteration| over the steps)."""
    rows, mean = [], lambda v: sum(v) / max(1, len(v))
    for path in sorted(glob.glob(os.path.join(run_dir, "*.pt"))):
        if (ck := train.load_ckpt(path)).get("done") and "history" in ck and "pi_iters" in ck["config"]:
            h = ck["history"]
            ppo_its, checks = [r for r in h if "approx_kl" in r], [r for r in h if "train_fid" in r]
            best, acts = min(checks, key=lambda r: r["train_fid"]), [torch.tensor(r["act_mean"]) for r in h if "act_mean" in r]
            rows.append({"run": os.path.basename(path)[:-3], "iterations": len(h) - 1, "best at iteration": best["iter"],
                         "FID start / best / last": [checks[0]["train_fid"], best["train_fid"], checks[-1]["train_fid"]],
                         **{f"{n} start / last": [checks[0][k], checks[-1][k]] for k, n in
                            (("train_fid2", "featnet2"), ("train_fd_ssl", "SSL FD")) if k in checks[0]},
                         "D acc. after warm-up / last 10": [ck.get("d_acc_warmup", math.nan), mean([r["d_acc"] for r in h if "d_acc" in r][-10:])],
                         "D steps": mean([r.get("d_steps", 0) for r in ppo_its]),
                         "approx. KL mean / max": [mean([r["approx_kl"] for r in ppo_its]), max((r["approx_kl"] for r in ppo_its), default=math.nan)],
                         "mean-action drift": dict(zip(ck["config"]["spec"], (acts[-1] - acts[0]).abs().amax(0).tolist()))})
            if any("act_class" in r for r in h):
                rows[-1]["per-class mean action (last 10)"] = class_actions(run_dir, rows[-1]["run"], h, ck["config"]["spec"])
    if not rows:
        raise train.UserError(f"no finished policy in {run_dir}: train one first (python train.py --stage policy, ...)")
    cell = lambda v: (" / ".join(f"{x:.3g}" for x in v) if isinstance(v, list) else
                      ", ".join(f"{k} {x:.3g}" for k, x in v.items()) if isinstance(v, dict) else f"{v:.3g}" if isinstance(v, float) else v)
    md = ["What each finished policy did while it trained (training-set statistics; D's accuracy: held-out reals vs the "
          "rollout's fakes; drift: the largest change of a knob's mean action at any step, last vs first iteration).", "",
          "| " + " | ".join(cols := list(dict.fromkeys(k for r in rows for k in r))) + " |", "|---" * len(cols) + "|"] + [
          "| " + " | ".join(str(cell(r.get(k, "–"))) for k in cols) + " |" for r in rows]
    publish(run_dir, "training", rows, md)
    return rows


def add_check_flags(p) -> None:
    """The reward check's flags (experiments/var.py has them too)."""
    p.add_argument("--reward-check", action="store_true", help="the reward's fixed point: a fresh D per fixed schedule "
                   "and --d-specs (two-sample test) against every judge, and the warm-up D: (var_)reward_check.md/.json")
    p.add_argument("--check-samples", type=int, default=2000, help="samples per schedule of --reward-check, --pair-check")
    p.add_argument("--d-specs", default=None, help="comma-separated discriminator specs of the checks, e.g. "
                   "backbone,backbone@12,dnet,dssl,backbone+dssl (default: the run's pi_d_nets at pi_d_taps)")
    p.add_argument("--check-d-steps", type=int, default=150, help="the most D steps per two-sample test")


def d_specs(args, pipe: train.Pipeline) -> list[str]:
    """--d-specs, else the run's pi_d_nets at pi_d_taps; a bad or untrained spec stops here, before any image."""
    c = train.load_config(pipe.run_dir)
    specs = args.d_specs.split(",") if args.d_specs else [c.pi_d_nets + ("" if c.pi_d_taps == (0, 1, 2) else
                                                                          "@" + "".join(map(str, c.pi_d_taps)))]
    for spec in specs:
        train.d_backbone(pipe.run_dir, *parse_spec(spec), pipe.device)
    return specs


def add_flags(p) -> None:
    """sample.py's flags of the checks and the headroom table."""
    add_check_flags(p)
    p.add_argument("--pair-check", action="store_true", help="is the class-only schedule harder to tell from real than "
                   "the heuristic? per --d-specs, 4 folds of fresh D's, a t-interval: pair_check.md/.json")
    p.add_argument("--training", action="store_true", help="what every finished policy did while it trained (its "
                   "checkpoint's history: FIDs, D's accuracy and steps, KL, mean-action drift): training.md/.json")
    p.add_argument("--headroom", action="store_true", help="the class-only schedule's headroom at T = 4: headroom_T4.md/.json")
    p.add_argument("--headroom-per-class", type=int, default=150, help="samples per class and (w_0, tau2_0) pair of "
                   "--headroom's per-class sweep")


def run(args, device: torch.device) -> None:
    """The checks the flags ask for."""
    if not (args.reward_check or args.pair_check or args.headroom or args.training):
        raise train.UserError("name a check: --reward-check, --pair-check, --headroom or --training")
    if args.training:
        training_table(args.run_dir)
    pipe = sample.nat_pipeline(args, device) if args.reward_check or args.pair_check or args.headroom else None
    if args.reward_check or args.pair_check:
        specs, ref = d_specs(args, pipe), train.RealFeatures(pipe)                           # a bad spec stops first
    if args.reward_check:
        first = train.policy_file("policy", "heuristic", 4)
        warm = Refiner(pipe, first, disc="disc_warmup") if os.path.exists(os.path.join(pipe.run_dir, f"{first}.pt")) else None
        reward_check(pipe, ref, args.check_samples, specs, args.check_d_steps, check_schedules(pipe, ref, args.sweep_samples, 4),
                     lambda y, sched: pipe.decode(pipe.generate(y, 4, sched, seed=1)), warm=warm,
                     heuristic=HEURISTIC.format(train.get_w0(pipe, ref, args.sweep_samples)))
    if args.pair_check:
        pair_check(pipe, ref, args.check_samples, args.sweep_samples, specs, args.check_d_steps)
    if args.headroom:
        headroom(pipe, args.samples, args.sweep_samples, args.headroom_per_class)


if __name__ == "__main__":
    sample.main(add_flags=add_flags, run=run, doc=__doc__)
