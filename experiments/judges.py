"""Judges proven before they judge: every feature network's distance under disturbances of known effect.

A distance between image sets measures quality only if it rises when quality is taken away. Heusel et al. 2017 (§4, Fig. 3)
show FID rising monotonically under Gaussian noise, Gaussian blur, implanted black rectangles, swirl and salt-and-pepper
noise; Kynkäänniemi et al. 2019 separate fidelity (each image real-looking) from coverage (the set as varied as the data);
Stein et al. 2023 find self-supervised features closer to people than classifier features, once validated. This script runs
those tests on every network of a run folder and on two judges that should fail some: raw pixels, and a random-weight network
of the FID network's shape.

Sets, each of `n` test images measured against the training statistics (10 000 training images,
train.training_draw) on every network, by the Fréchet distance (FD) and KID (fid.kid):
  clean      n/K images of each of the K classes, drawn afresh per seed
  fidelity   the clean set disturbed at 4 strengths: Gaussian noise (sd, images in [-1, 1]), Gaussian blur
             (sd in pixels), black 8x8 squares implanted near the centre (count), salt-and-pepper (fraction
             of pixels), swirl (rotation at the centre, radians); class proportions unchanged
  diversity  collapse: m distinct images per class, each repeated to n/K; drop: only k of the K classes
             (n/k images each); imbalance: class shares in a geometric ladder with this largest/smallest
             ratio; typical: each class's m test images the `backbone` classifier (no judge) is most sure
             of, repeated to n/K (beside collapse at the same m: does a judge prefer typical images?)
  recon      the tokenizer's reconstructions of the clean set (what no schedule can get under)
A network passes a disturbance when its distance rises strictly with strength (clean < 1 < 2 < 3 < 4)
on every seed; `weighting`: the noise sd that costs the same distance as the strongest level (the
network's mean noise curve, interpolated), i.e. what each network cares about.

Claim judges (docs/method.md), chosen by this table alone: the trained networks that no choice reads
(never featnet, which picks w_0, searches and checkpoints; never D's backbones) that pass every
fidelity and diversity disturbance on FD and on KID. sample.py's tables read them from judges.json.

    python experiments/judges.py --run-dir runs/small [--n 1000] [--seeds 3]   # judges.json, .md, .png
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the project's root

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import fid
import sample  # noqa: E402
import train  # noqa: E402

# ----------------------------------------------------------------------------- disturbances (images in [-1, 1])


def gaussian_noise(x: torch.Tensor, sd: float, g: torch.Generator) -> torch.Tensor:
    return (x + sd * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def gaussian_blur(x: torch.Tensor, sd: float, g: torch.Generator) -> torch.Tensor:
    """Separable Gaussian filter of sd pixels, edges replicated."""
    r = math.ceil(3 * sd)
    k = torch.exp(-torch.arange(-r, r + 1.0) ** 2 / (2 * sd ** 2))
    k = (k / k.sum()).to(x.dtype)                                      # (2r + 1,)
    C = x.shape[1]
    h = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return F.conv2d(F.pad(h, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def black_squares(x: torch.Tensor, count: float, g: torch.Generator, side: int = 8) -> torch.Tensor:
    """`count` black side x side squares per image, their centres uniform in the central half (on the object)."""
    out, (B, _, H, W) = x.clone(), x.shape
    lo = (H // 4 - side // 2, W // 4 - side // 2)
    for _ in range(int(count)):
        ys = torch.randint(max(0, lo[0]), H - side - max(0, lo[0]) + 1, (B,), generator=g)
        xs = torch.randint(max(0, lo[1]), W - side - max(0, lo[1]) + 1, (B,), generator=g)
        for b in range(B):
            out[b, :, ys[b]:ys[b] + side, xs[b]:xs[b] + side] = -1.0
    return out


def salt_and_pepper(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """A fraction p of the pixels set to black or white (half each)."""
    u = torch.rand(x.shape[0], 1, *x.shape[2:], generator=g)                   # (B, 1, H, W): all channels alike
    return torch.where(u < p / 2, -1.0, torch.where(u < p, 1.0, x))


def swirl(x: torch.Tensor, strength: float, g: torch.Generator) -> torch.Tensor:
    """Each pixel taken from the point rotated by strength * exp(-rho / r0) about the centre (rho: its distance
    in pixels, r0 a quarter of the side), bilinear, edges replicated."""
    B, _, H, W = x.shape
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")   # (H, W)
    rho = (xx ** 2 + yy ** 2).sqrt()
    theta = torch.atan2(yy, xx) + strength * torch.exp(-rho * (H / 2) / (H / 4))
    grid = torch.stack([rho * theta.cos(), rho * theta.sin()], -1).expand(B, H, W, 2)           # (B, H, W, 2): x, y
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=True)


FIDELITY = {"noise": (gaussian_noise, (0.05, 0.1, 0.2, 0.4)), "blur": (gaussian_blur, (0.5, 1.0, 1.5, 2.0)),
            "squares": (black_squares, (1, 2, 3, 4)), "salt_pepper": (salt_and_pepper, (0.02, 0.05, 0.1, 0.2)),
            "swirl": (swirl, (1.0, 2.0, 3.0, 4.0))}
NOISE_CURVE = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6)      # the weighting's yardstick
KEEP = (0.7, 0.4, 0.2, 0.0)                             # drop: the share of classes kept (at least one)
RATIO = (2.0, 5.0, 20.0, 100.0)                         # imbalance: largest / smallest class share
DISTINCT = (1 / 2, 1 / 5, 1 / 20, 1 / 100)              # collapse, typical: distinct images per class, of n / K
DIVERSITY = ("collapse", "drop", "imbalance", "typical")
KID_REFERENCE = 2000                                    # training images KID compares against

# ----------------------------------------------------------------------------- the sets' indices into the test set


def per_class(pools: list[torch.Tensor], counts: list[int], g: torch.Generator) -> torch.Tensor:
    """counts[k] distinct random test indices of class k (from pools[k])."""
    out = []
    for k, c in enumerate(counts):
        if c > len(pools[k]):
            raise train.UserError(f"class {k} has {len(pools[k])} test images, {c} are needed: lower --n")
        out.append(pools[k][torch.randperm(len(pools[k]), generator=g)[:c]])
    return torch.cat(out)


def repeated(idx: torch.Tensor, c: int) -> torch.Tensor:
    """idx cycled to c entries."""
    return idx.repeat(math.ceil(c / len(idx)))[:c]


def diversity_sets(pools: list, typical_order: list, n: int, g: torch.Generator) -> dict:
    """name -> [test indices of each strength]: collapse, drop, imbalance, typical (module docstring)."""
    K = len(pools)
    c = n // K
    m = [max(1, round(c * f)) for f in DISTINCT]
    out = {"collapse": [torch.cat([repeated(per_class([p], [mi], g), c) for p in pools]) for mi in m],
           "typical": [torch.cat([repeated(o[:mi], c) for o in typical_order]) for mi in m], "drop": [], "imbalance": []}
    for share in KEEP:
        kept = torch.randperm(K, generator=g)[:max(1, round(K * share))].tolist()
        counts = [n // len(kept) + (i < n % len(kept)) for i in range(len(kept))]        # n in all
        out["drop"].append(per_class([pools[k] for k in kept], counts, g))
    for ratio in RATIO:
        rank = torch.randperm(K, generator=g).double()                         # class k's place in the ladder
        p = ratio ** (-rank / (K - 1))
        exact = n * p / p.sum()
        counts = exact.floor().long()
        counts[torch.argsort(exact - counts, descending=True)[:n - int(counts.sum())]] += 1   # largest remainders
        out["imbalance"].append(per_class(pools, counts.tolist(), g))
    return out


# ----------------------------------------------------------------------------- the networks


def networks(run_dir: str, device: torch.device) -> dict:
    """name -> images (N, C, H, W) -> features (N, D) on the CPU: every trained judge candidate of the run
    folder, featnet, raw pixels, and featnet's architecture with random weights."""
    nets = {s: train.build_model(run_dir, s, device) for s in train.JUDGES if train.is_done(os.path.join(run_dir, f"{s}.pt"))}
    if "featnet" not in nets:
        raise train.UserError(f"{run_dir}/featnet.pt is missing: python train.py --run-dir {run_dir} --stage featnet")
    with torch.random.fork_rng(devices=[]):                           # the process's generator untouched
        torch.manual_seed(0)
        nets["random"] = fid.FeatureNet(nets["featnet"].cfg).to(device).eval()
    out = {name: (lambda x, net=net: fid.extract(net, x, device=device)[0]) for name, net in nets.items()}
    return out | {"pixels": lambda x: x.flatten(1).float()}


class Judge:
    """One network against the training statistics: FD against all 10 000 training images, KID against the
    first KID_REFERENCE of them (unbiased at any size; 2 000 keep the raw pixels' 1 024-d kernels cheap)."""

    def __init__(self, features, train_images: torch.Tensor):
        self.features = features
        f = features(train_images)                                              # (10 000, D)
        self.stats, self.real = fid.statistics(f), f[:KID_REFERENCE]
        self.self_sums = fid.kid_self_sums(self.real)

    def __call__(self, images: torch.Tensor) -> dict:
        f = self.features(images)
        k, se = fid.kid(self.real, f, real_sums=self.self_sums)
        return {"fd": fid.fid_from_features(f, *self.stats), "kid": k, "kid_se": se}


def passes(curves: np.ndarray) -> bool:
    """curves (seeds, 1 + levels), clean first: strictly rising along every seed."""
    return bool((np.diff(curves, axis=1) > 0).all())


def noise_equivalent(noise: np.ndarray, value: float) -> float:
    """The noise sd whose (mean) distance equals value, interpolated on NOISE_CURVE; inf beyond its end."""
    climb = np.maximum.accumulate(noise)                                       # monotone for the interpolation
    return math.inf if value > climb[-1] else float(np.interp(value, climb, NOISE_CURVE))


# ----------------------------------------------------------------------------- the validation


def validate(run_dir: str, device: torch.device, n: int | None, seeds: int) -> dict:
    """judges.json / .md / .png: the distances of every set, pass or fail, the weighting, the claim judges."""
    c = train.load_config(run_dir)
    x_test, y_test, K = data.load_dataset(c.data, "test", c.img_size, c.channels, c.seed)
    x_test = data.to_float(x_test)
    pools = [torch.nonzero(y_test == k).flatten() for k in range(K)]
    n = K * ((min(1000, min(len(p) for p in pools)) if n is None else n) // K)       # n / K of each class
    if n < 2 * K or n > min(len(p) for p in pools):
        raise train.UserError(f"--n {n}: needs 2 x {K} <= n <= the smallest class's test images "
                              f"({min(len(p) for p in pools)}), so that one class alone can fill a set")
    t0 = time.time()
    x_train = train.training_draw(c)[0]
    judges = {name: Judge(f, x_train) for name, f in networks(run_dir, device).items()}
    backbone = train.build_model(run_dir, "backbone", device)
    sure = fid.extract(backbone, x_test, device=device)[1].softmax(1)[torch.arange(len(y_test)), y_test]   # (N,)
    typical_order = [p[torch.argsort(sure[p], descending=True)] for p in pools]
    vq = train.build_model(run_dir, "vq", device) if train.is_done(os.path.join(run_dir, "vq.pt")) else None
    names = list(FIDELITY) + list(DIVERSITY)
    raw = {j: {d: [] for d in [*names, "noise_curve", "recon"]} for j in judges}   # judge -> set -> [per seed: [level dicts]]
    bar = tqdm(total=seeds * (1 + sum(len(v[1]) for v in FIDELITY.values()) + 4 * len(DIVERSITY) + 2 + (vq is not None)),
               desc="judges: sets x networks")
    for s in range(seeds):
        g = torch.Generator().manual_seed(1000 + s)
        clean = x_test[per_class(pools, [n // K] * K, g)]

        def measure(images: torch.Tensor) -> dict:
            bar.update()
            return {j: judge(images) for j, judge in judges.items()}
        base = measure(clean)
        sets = {d: [measure(fn(clean, v, g)) for v in levels] for d, (fn, levels) in FIDELITY.items()}
        sets |= {d: [measure(x_test[idx]) for idx in ix] for d, ix in diversity_sets(pools, typical_order, n, g).items()}
        sets["noise_curve"] = sets["noise"] + [measure(gaussian_noise(clean, v, g)) for v in NOISE_CURVE[-2:]]
        if vq is not None:
            sets["recon"] = [measure(sample.reconstruct(vq, clean, device))]
        for j in judges:
            for d, levels in sets.items():
                raw[j][d].append([base[j]] + [lv[j] for lv in levels])
    bar.close()
    return summarise(run_dir, raw, n, seeds, names, time.time() - t0)


def summarise(run_dir: str, raw: dict, n: int, seeds: int, names: list, seconds: float) -> dict:
    """Pass / fail, the weighting and the claim judges from the raw readings; writes judges.json, .md, .png."""
    table = {}
    for j, sets in raw.items():
        curve = lambda d, key: np.array([[lv[key] for lv in per_seed] for per_seed in sets[d]])   # (seeds, levels)
        noise_fd, noise_kid = curve("noise_curve", "fd").mean(0), curve("noise_curve", "kid").mean(0)
        typical_gap = curve("typical", "fd")[:, 1:] - curve("collapse", "fd")[:, 1:]       # (seeds, levels)
        table[j] = {"typical_minus_collapse": typical_gap.tolist(), "prefers_typical": bool((typical_gap < 0).all())}
        table[j] |= {d: {"fd": curve(d, "fd").tolist(), "kid": curve(d, "kid").tolist(),
                        "pass_fd": passes(curve(d, "fd")), "pass_kid": passes(curve(d, "kid")),
                        "noise_equivalent": noise_equivalent(noise_fd, curve(d, "fd").mean(0)[-1]),
                        "noise_equivalent_kid": noise_equivalent(noise_kid, curve(d, "kid").mean(0)[-1])}
                    for d in [*names, "recon"] if sets[d]}
    candidates = [j for j in train.JUDGES if j != "featnet" and j in table]
    claim = [j for j in candidates if all(table[j][d]["pass_fd"] and table[j][d]["pass_kid"] for d in names)]
    out = {"n": n, "seeds": seeds, "seconds": seconds, "levels": {d: list(v[1]) for d, v in FIDELITY.items()} | {
        "collapse": list(DISTINCT), "typical": list(DISTINCT), "drop": list(KEEP), "imbalance": list(RATIO),
        "noise_curve": list(NOISE_CURVE)}, "networks": table, "candidates": candidates, "claim_judges": claim,
        "rule": CLAIM_RULE}
    train.write_json(os.path.join(run_dir, "judges.json"), train.finite_json(out))
    md = markdown(out, names)
    train.write_text(os.path.join(run_dir, "judges.md"), md)
    plot(run_dir, out, names)
    print(md)
    return out


CLAIM_RULE = ("a claim judge is a trained network no choice reads (not featnet, which picks w_0, searches and "
              "checkpoints; not D's backbones) whose Fréchet distance and KID both rise strictly with the strength "
              "of every fidelity and diversity disturbance, on every seed")


def markdown(out: dict, names: list) -> str:
    """judges.md: pass / fail, the mean distances per strength, the weighting."""
    nets = list(out["networks"])
    tick = lambda r: ("FD ✓" if r["pass_fd"] else "FD ✗") + (" KID ✓" if r["pass_kid"] else " KID ✗")
    md = [f"Disturbance tests: {out['n']} test images per set against the training statistics, seeds "
          f"{out['seeds']}; pass = the distance rises strictly with strength on every seed ({out['seconds']:.0f} s).", "",
          "| disturbance (strengths) | " + " | ".join(nets) + " |", "|---" * (len(nets) + 1) + "|"]
    for d in names:
        md.append(f"| {d} {out['levels'][d]} | " + " | ".join(tick(out["networks"][j][d]) for j in nets) + " |")
    md.append("| typical − collapse at the same m (FD, mean per m) | " + " | ".join(
        " / ".join(f"{v:+.3g}" for v in np.mean(out["networks"][j]["typical_minus_collapse"], 0))
        + (" **prefers typical**" if out["networks"][j]["prefers_typical"] else "") for j in nets) + " |")
    md += ["", f"Claim judges: **{', '.join(out['claim_judges']) or 'none'}** (candidates: {', '.join(out['candidates'])}; "
           f"rule: {out['rule']}).", ""]
    for key, what in (("fd", "Fréchet distance"), ("kid", "KID x 1000")):
        md += [f"Mean {what} over the seeds, the clean set then each strength:", "",
               "| disturbance | " + " | ".join(nets) + " |", "|---" * (len(nets) + 1) + "|"]
        for d in [*names, "recon"]:
            if d in out["networks"][nets[0]]:
                scale = 1000 if key == "kid" else 1
                md.append(f"| {d} | " + " | ".join(" → ".join(f"{scale * v:.3g}" for v in np.mean(out["networks"][j][d][key], 0))
                                                   for j in nets) + " |")
        md.append("")
    md += ["Weighting: the noise sd (images in [-1, 1]) that costs each network the same Fréchet distance as the "
           "strongest level (KID in brackets; inf: more than the noise curve's end, sd 1.6):", "",
           "| disturbance | " + " | ".join(nets) + " |", "|---" * (len(nets) + 1) + "|"]
    for d in [*names, "recon"]:
        if d in out["networks"][nets[0]]:
            md.append(f"| {d} | " + " | ".join(f"{out['networks'][j][d]['noise_equivalent']:.3g} "
                                               f"({out['networks'][j][d]['noise_equivalent_kid']:.3g})" for j in nets) + " |")
    return "\n".join(md) + "\n"


COLOURS = [(200, 60, 30), (30, 90, 200), (20, 140, 60), (120, 60, 160), (120, 120, 120), (200, 150, 20)]


def plot(run_dir: str, out: dict, names: list) -> None:
    """judges.png: per disturbance, each network's mean FD over strength, divided by its FD at noise sd 0.4."""
    panels = []
    for d in names:
        series = []
        for (j, r), colour in zip(out["networks"].items(), COLOURS):
            y = np.mean(r[d]["fd"], 0) / np.mean(r["noise"]["fd"], 0)[-1]
            series.append({"x": list(range(len(y))), "y": y.tolist(), "color": colour, "dashed": j in ("pixels", "random")})
        panels.append({"title": d, "series": series})
    legend = tuple(zip(out["networks"], COLOURS))
    data.plot_panels(os.path.join(run_dir, "judges.png"), panels, "each network's Fréchet distance / its distance at noise "
                     "sd 0.4, over strength (0: clean); dashed: the bad judges:", size=(220, 180), legend=legend)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/small")
    p.add_argument("--device", default="auto")
    p.add_argument("--n", type=int, default=None, help="test images per set (default: 1000, or the smallest class's count)")
    p.add_argument("--seeds", type=int, default=3, help="draws of every set (pass: rising on each)")
    args = p.parse_args(argv)
    try:
        if not os.path.exists(os.path.join(args.run_dir, "config.json")):
            raise train.UserError(f"{args.run_dir} is not a run folder (no config.json): train first with "
                                  f"python train.py --run-dir {args.run_dir}")
        if args.seeds < 2:
            raise train.UserError(f"--seeds {args.seeds}: at least 2 (a pass must hold on more than one draw)")
        validate(args.run_dir, train.pick_device(args.device), args.n, args.seeds)
    except (train.UserError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
