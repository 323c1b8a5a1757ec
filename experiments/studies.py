"""AdaGen's inference-time studies (AdaGen §III-D, §III-F1 Algorithm 2, §III-F2 Eq. 14-15), and what
the reward check (experiments/game.py) shares with them: the policy's D and critic (`Refiner`),
Spearman's rho with its bootstrap interval.

- refinement: repeated sampling (D picks among k candidates) and look-ahead (the critic picks
  among k next states), with random-pick and more-steps controls, forwards counted;
- the fidelity blend of two policies by lam; the reward-hacking table (FID on two networks).

Usage: python experiments/studies.py --run-dir runs/small --refine | --lam 0,0.5,1 | --hacking | --repeat 2 --lookahead 2
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the project's root

import itertools
import time

import numpy as np
import torch

import data  # noqa: E402
import nat
import policy
import reward
import sample  # noqa: E402
import train  # noqa: E402


class Refiner:
    """A trained policy checkpoint's auxiliary networks reused at sampling (AdaGen §III-F1): its discriminator D ranks
    finished images (repeated sampling), its critic V ranks the candidate next states of a NAT step (look-ahead,
    nat.generate). Both are the checkpoint's last weights (the policy's are its best by training FID)."""

    def __init__(self, pipe, file: str, disc: str = "disc"):
        path = os.path.join(pipe.run_dir, f"{file}.pt")
        if not os.path.exists(path):
            raise train.UserError(f"{path} not found: refinement uses a trained policy's discriminator and critic; "
                                  f"train it with python train.py --run-dir {pipe.run_dir} --stage policy")
        ck = train.load_ckpt(path)
        self.d_acc_warmup = ck.get("d_acc_warmup")                     # D's held-out accuracy after its warm-up
        _, self.V = train.build_policy(ck["config"])
        self.V.load_state_dict(ck["critic"])
        self.V.to(pipe.device).eval()
        cfg = ck["config"]
        self.backbone, channels = train.d_backbone(pipe.run_dir, cfg.get("pi_d_nets", "backbone"),
                                                      tuple(cfg.get("pi_d_taps", (0, 1, 2))), pipe.device)
        self.D = reward.ProjectedDiscriminator(channels, pipe.cfg.num_classes)
        if disc not in ck:
            raise train.UserError(f"{path} has no {disc!r}: the discriminator after its warm-up is kept from this "
                                  f"version on; retrain that policy (delete the file)")
        self.D.load_state_dict(ck[disc])
        self.D.to(pipe.device).eval()
        self.device = pipe.device

    @torch.no_grad()
    def score(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """D's reward of images (n, C, H, W) for labels (n,) -> (n,) on the CPU."""
        return torch.cat([reward.reward(self.D(self.backbone(x.to(self.device)), y.to(self.device))).cpu()
                          for x, y in zip(images.split(500), labels.split(500))])

    @torch.no_grad()
    def value(self, features: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """V(s_t) of states seen through the generator's features (B, N, C), t (B,) -> (B,)."""
        return self.V(features, t).float()


def ranks(v) -> np.ndarray:
    """Ranks 0..n-1 of a sequence, ties given the mean of their ranks."""
    v = np.asarray(v, dtype=float)
    first = np.argsort(np.argsort(v, kind="stable"), kind="stable").astype(float)
    _, group = np.unique(v, return_inverse=True)
    return (np.bincount(group, first) / np.bincount(group))[group]


def spearman(x, y) -> float:
    """Spearman's rank correlation of two equal-length sequences (ties: mean ranks; 0 when one is constant)."""
    rx, ry = ranks(x), ranks(y)
    return 0.0 if rx.std() == 0 or ry.std() == 0 else float(np.corrcoef(rx, ry)[0, 1])


def spearman_interval(x, y, draws: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(rho, 2.5% and 97.5% quantiles of rho over bootstrap resamples of the pairs)."""
    x, y, g = np.asarray(x, float), np.asarray(y, float), np.random.default_rng(seed)
    boot = [spearman(x[i], y[i]) for i in g.integers(0, len(x), (draws, len(x)))]
    return spearman(x, y), float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


def refine(make_images, labels: torch.Tensor, repeat: int, score_fn) -> torch.Tensor:
    """Repeated sampling (AdaGen Algorithm 2): make_images(labels repeated `repeat` times, each
    request's candidates consecutive) -> images (n*k, ...); keep each request's candidate with the
    highest score_fn(images, labels) (n*k,). repeat = 1 is plain sampling."""
    y = labels.repeat_interleave(repeat)
    images = make_images(y)
    return images if repeat == 1 else images[reward.best_of(score_fn(images, y), repeat)]


def random_scores(seed: int):
    """The control of repeated sampling: a scorer that ranks finished candidates at random
    (seeded; it runs on the gathered images, so every rank draws the same numbers)."""
    g = torch.Generator().manual_seed(seed + 10007)
    return lambda x, *_: torch.rand(x.shape[0], generator=g).to(x.device)


def refined_nat(pipe: train.Pipeline, labels: torch.Tensor, T: int, make, seed: int, repeat: int = 1, lookahead: int = 1,
                refiner: Refiner | None = None, random_pick: bool = False) -> tuple[torch.Tensor, float]:
    """NAT images (n, C, H, W) with repeated sampling (D) and look-ahead (V), or their random-pick
    control, and the generator forwards per image that it took (counted; a guided step is 2 rows)."""
    score_img = random_scores(seed) if random_pick else refiner.score if refiner else None
    score_state = "random" if random_pick else refiner.value if refiner else None   # nat.generate's control
    before = pipe.forwards
    images = refine(lambda y: pipe.decode(pipe.generate(y, T, make(), seed, lookahead=lookahead, score_fn=score_state)),
                    labels, repeat, score_img)
    return images, train.all_sum(pipe.forwards - before) / len(labels)


def study_table(pipe: train.Pipeline, ref: sample.EvalReferences, rows: dict, samples: int, stem: str, note: str) -> list[dict]:
    """Evaluate rows {name: fn(labels, seed) -> (images, forwards per image)} over EVAL_SEEDS on balanced
    labels; write <stem>.json / .md."""
    labels = train.balanced_labels(samples, pipe.cfg.num_classes)

    def cell(fn, s):
        def compute() -> dict:
            t0 = time.time()
            images, forwards = fn(labels, s)
            return {"images_per_s": len(labels) / (time.time() - t0), "forwards": forwards,
                    **sample.metrics(ref, images, labels)}
        return compute
    res = sample.run_cells([(name, cell(fn, s)) for name, fn in rows.items() for s in sample.EVAL_SEEDS], stem)
    table = [{"schedule": name, "samples": samples, "seeds": list(sample.EVAL_SEEDS), **sample.seed_summary(res[name], ()),
              "forwards": res[name][0]["forwards"]} for name in rows]
    train.write_json(os.path.join(pipe.run_dir, f"{stem}.json"), {"rows": table, "device": str(pipe.device)})
    head = f"| schedule | {sample.metric_head(ref)} forwards/image | images/s |"
    md = [f"{note} {samples} samples per row and seed, seeds {list(sample.EVAL_SEEDS)}; FID, precision and recall against the "
          f"test images{sample.REF_NOTE}; forwards = generator rows run per image, counted (a guided step is 2); images/s on "
          f"{pipe.device}.", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in table:
        md.append(f"| {r['schedule']} | {sample.metric_cells(r, ref)} {r['forwards']:.1f} | {r['images_per_s']:.1f} |")
    train.write_text(os.path.join(pipe.run_dir, f"{stem}.md"), "\n".join(md) + "\n")
    print("\n".join(md))
    return table


def adaptive_nat_policy(pipe: train.Pipeline, T: int, kind: str = "policy", reward_name: str = "adversarial"):
    """make_schedule of a trained NAT policy; a clear error if there is none."""
    found = sample.policy_schedule(pipe, kind, T, "heuristic", reward_name)
    if found is None:
        raise train.UserError(f"{pipe.run_dir}/{train.policy_file(kind, 'heuristic', T, reward_name)}.pt not found: "
                              f"train it with python train.py --run-dir {pipe.run_dir} --stage {kind}"
                              + (f" --set pi_reward={reward_name}" if reward_name != "adversarial" else "") + f" --set pi_T={T}")
    return found[0]


def refine_study(pipe: train.Pipeline, samples: int, T: int, sweep_samples: int, k_repeat: tuple = (2, 3),
                 k_look: int = 2) -> None:
    """refine_T{T}.json / .md (AdaGen §III-F1, Tables IX-X): the adaptive policy alone, with repeated sampling (D),
    look-ahead (V) and both; the same candidates picked at random; and the same forwards spent on more steps instead
    (policy_T{T'}.pt if trained, else AdaNAT's heuristic at T', said in the row's name)."""
    make = adaptive_nat_policy(pipe, T)
    refiner = Refiner(pipe, train.policy_file("policy", "heuristic", T))
    gen = lambda **kw: lambda y, s: refined_nat(pipe, y, T, make, s, refiner=refiner, **kw)
    rows = {"adaptive": gen(), **{f"adaptive + repeat {k} (D picks)": gen(repeat=k) for k in k_repeat}}
    rows[f"adaptive + lookahead {k_look} (V picks)"] = gen(lookahead=k_look)
    rows[f"adaptive + repeat {k_repeat[0]} + lookahead {k_look}"] = gen(repeat=k_repeat[0], lookahead=k_look)
    rows[f"control: repeat {k_repeat[0]}, random pick"] = gen(repeat=k_repeat[0], random_pick=True)
    rows[f"control: lookahead {k_look}, random pick"] = gen(lookahead=k_look, random_pick=True)
    ref = sample.EvalReferences(pipe)
    w_0 = train.get_w0(pipe, ref, sweep_samples)
    for k in k_repeat:                                                  # repeat k costs k x the forwards of T steps
        Tk = k * T
        try:
            make_k = adaptive_nat_policy(pipe, Tk)
            name = f"control: adaptive policy at T={Tk} (same forwards as repeat {k})"
        except train.UserError:
            make_k = lambda Tk=Tk: nat.heuristic_schedule(Tk, nat.ADANAT_TAU2_0, w_0)
            name = f"control: AdaNAT heuristic at T={Tk} (same forwards as repeat {k}; no policy_T{Tk}.pt)"
        rows[name] = lambda y, s, Tk=Tk, m=make_k: refined_nat(pipe, y, Tk, m, s)
    study_table(pipe, ref, rows, samples, f"refine_T{T}", f"Inference-time refinement at T = {T}.")


def blend_schedule(pipe: train.Pipeline, T: int, lam: float):
    """make_schedule of AdaGen's fidelity blend (Eq. 14) at lam: fidelity_T{T}.pt on policy_T{T}.pt."""
    file = train.policy_file("fidelity", "heuristic", T)
    path = os.path.join(pipe.run_dir, f"{file}.pt")
    if not os.path.exists(path):
        raise train.UserError(f"{path} not found: train it with python train.py --run-dir {pipe.run_dir} --stage fidelity "
                              f"--set pi_T={T} (after --stage policy)")
    pi_fid, cfg = train.load_policy(path, pipe.device)
    base, base_cfg = train.load_policy(os.path.join(pipe.run_dir, f"{cfg['base']}.pt"), pipe.device)
    if base_cfg["heuristic"] != cfg["heuristic"]:
        raise train.UserError(f"{path} and {cfg['base']}.pt start from different schedules (the w_0 sweep changed "
                              f"between them): retrain the fidelity stage")
    h_pre = policy.inverse_activation(torch.tensor(cfg["heuristic"])).to(pipe.device)
    return lambda: policy.PolicySchedule(pi_fid, h_pre, base=base, lam=lam)


def blend_study(pipe: train.Pipeline, samples: int, T: int, lams: list[float], classes: tuple = (0, 7), per_class: int = 16) -> None:
    """blend_T{T}.json / .md / _curve.png and blend_grids_T{T}.png (AdaGen §III-F2, Figure 13):
    FID / precision / recall per lam, and for two classes a 4x4 grid per lam side by side."""
    makes = {lam: blend_schedule(pipe, T, lam) for lam in lams}
    rows = {f"lam = {lam:g}": (lambda y, s, m=m: refined_nat(pipe, y, T, m, s)) for lam, m in makes.items()}
    table = study_table(pipe, sample.EvalReferences(pipe), rows, samples, f"blend_T{T}", f"Fidelity-diversity blend at T = {T}.")
    panels = [{"title": key, "series": [{"x": lams, "y": [r[key] for r in table], "color": color,
                                          "band": ([r[key] - r[key + "_sd"] for r in table], [r[key] + r[key + "_sd"] for r in table])}]}
              for key, color in (("fid", (200, 60, 30)), ("precision", (30, 90, 200)), ("recall", (20, 140, 60)))]
    path = os.path.join(pipe.run_dir, f"blend_T{T}_curve.png")
    data.plot_panels(path, panels, title=f"fidelity blend, T={T}: x = lam (0: the adaptive policy, 1: the fidelity policy)", save=train.DIST.main)
    print("wrote", path)
    side = int(per_class ** 0.5)
    C, S = pipe.vq.cfg.in_ch, pipe.vq.cfg.img_size
    blocks = []                                                          # per class: the lam grids left to right
    for cls in classes:
        labels = torch.full((per_class,), cls)
        grids = [pipe.decode(pipe.generate(labels, T, m(), seed=0)).view(side, side, C, S, S) for m in makes.values()]
        row = [torch.cat([g, torch.ones(side, 1, C, S, S)], dim=1) for g in grids]   # a white column after each
        blocks.append(torch.cat(row, dim=1))
        blocks.append(torch.ones(1, blocks[-1].shape[1], C, S, S))                   # a white row between classes
    grid = torch.cat(blocks[:-1]).reshape(-1, C, S, S)
    path = os.path.join(pipe.run_dir, f"blend_grids_T{T}.png")
    data.save_grid(grid, path, nrow=len(lams) * (side + 1), save=train.DIST.main)
    print("wrote", path, f"(classes {list(classes)} top to bottom; lam = {', '.join(f'{l:g}' for l in lams)} left to right)")


def hacking_study(pipe: train.Pipeline, samples: int, T: int, sweep_samples: int, per_class: int = 8) -> None:
    """hacking_T{T}.json / .md and hacking_grids_T{T}.png (AdaGen §III-D, Figure 3): the adaptive and
    static policies trained on each reward (train.py --set pi_reward=...), beside AdaNAT's heuristic, with the
    FID of the FID network (what the "fid" reward optimised) and of the independent featnet2."""
    ref = sample.EvalReferences(pipe)
    w_0 = train.get_w0(pipe, ref, sweep_samples)
    rows = {f"AdaNAT heuristic (w_0={w_0:g})": lambda y, s: refined_nat(
        pipe, y, T, lambda: nat.heuristic_schedule(T, nat.ADANAT_TAU2_0, w_0), s)}
    for reward_name, kind in itertools.product(train.PI_REWARDS, ("policy", "static")):
        if os.path.exists(os.path.join(pipe.run_dir, f"{train.policy_file(kind, 'heuristic', T, reward_name)}.pt")):
            make = adaptive_nat_policy(pipe, T, kind, reward_name)
            rows[f"{'adaptive' if kind == 'policy' else 'static'}, {reward_name} reward"] = \
                lambda y, s, m=make: refined_nat(pipe, y, T, m, s)
    if len(rows) == 1:
        raise train.UserError(f"no policies for T={T} in {pipe.run_dir}: train them with python train.py --run-dir "
                              f"{pipe.run_dir} --stage policy --set pi_T={T} --set pi_reward=fid (and fixed, "
                              f"adversarial; --stage static too)")
    if "fid2" not in ref.judges:
        raise train.UserError(f"{pipe.run_dir}/featnet2.pt not found: train it with python train.py --run-dir "
                              f"{pipe.run_dir} --stage featnet2")
    study_table(pipe, ref, rows, samples, f"hacking_T{T}", f"Reward-hacking study at T = {T}.")
    K = pipe.cfg.num_classes
    labels = torch.arange(K).repeat_interleave(per_class)
    C, S = pipe.vq.cfg.in_ch, pipe.vq.cfg.img_size
    panels = [fn(labels, 0)[0].view(K, per_class, C, S, S) for fn in rows.values()]     # seed 0, one class a row
    spaced = [torch.cat([p, torch.ones(K, 1, C, S, S)], dim=1) for p in panels]
    path = os.path.join(pipe.run_dir, f"hacking_grids_T{T}.png")
    data.save_grid(torch.cat(spaced, dim=1).reshape(-1, C, S, S), path, nrow=len(panels) * (per_class + 1), save=train.DIST.main)
    print("wrote", path, "(left to right: " + "; ".join(rows) + "; one class per row)")


def refined_grid(pipe: train.Pipeline, T: int, repeat: int, lookahead: int, per_class: int = 10) -> None:
    """samples_adaptive_repeat<k>_lookahead<k>_T<T>.png: the adaptive policy with refinement, a row per class."""
    make = adaptive_nat_policy(pipe, T)
    refiner = Refiner(pipe, train.policy_file("policy", "heuristic", T))
    labels = torch.arange(pipe.cfg.num_classes).repeat_interleave(per_class)
    images, forwards = refined_nat(pipe, labels, T, make, 0, repeat, lookahead, refiner)
    path = os.path.join(pipe.run_dir, f"samples_adaptive_repeat{repeat}_lookahead{lookahead}_T{T}.png")
    data.save_grid(images, path, nrow=per_class, save=train.DIST.main)
    print("wrote", path, f"({forwards:.1f} generator forwards per image)")


def add_flags(p) -> None:
    """sample.py's flags of AdaGen's studies."""
    p.add_argument("--repeat", type=int, default=1, help="grids of the adaptive policy with repeated sampling: "
                   "k candidates per image, the policy's discriminator keeps one (the NAT; experiments/flow.py sample --repeat: the flow)")
    p.add_argument("--lookahead", type=int, default=1, help="... with look-ahead: k candidates per NAT step, the critic keeps one")
    p.add_argument("--refine", action="store_true", help="the refinement table at --grid-steps: refine_T<T>.json/.md")
    p.add_argument("--lam", default=None, help="comma-separated lam values of the fidelity blend, e.g. 0,0.25,0.5,0.75,1: "
                   "table, curve and grids at --grid-steps (blend_T<T>.*)")
    p.add_argument("--hacking", action="store_true", help="the reward-hacking table at --grid-steps: hacking_T<T>.json/.md")


def check_args(args) -> None:
    """One clear line for a study flag that cannot work; args.lams = the parsed --lam values."""
    if args.repeat < 1 or args.lookahead < 1:
        raise train.UserError("--repeat and --lookahead count candidates: at least 1")
    try:
        args.lams = [float(v) for v in args.lam.split(",")] if args.lam else []
    except ValueError:
        raise train.UserError(f"--lam {args.lam!r}: expected numbers like 0,0.5,1") from None
    if any(not 0 <= v <= 1 for v in args.lams):
        raise train.UserError(f"--lam {args.lam}: lam blends two policies, each value in [0, 1]")


def run(args, device: torch.device) -> None:
    """The studies the flags ask for, on the NAT at --grid-steps."""
    pipe, T = sample.nat_pipeline(args, device), args.grid_steps
    if args.refine:
        refine_study(pipe, args.samples, T, args.sweep_samples)
    if args.lams:
        blend_study(pipe, args.samples, T, args.lams)
    if args.hacking:
        hacking_study(pipe, args.samples, T, args.sweep_samples)
    if args.repeat > 1 or args.lookahead > 1:
        refined_grid(pipe, T, args.repeat, args.lookahead)
    if not (args.refine or args.lams or args.hacking or args.repeat > 1 or args.lookahead > 1):
        raise train.UserError("name a study: --refine, --lam, --hacking, --repeat or --lookahead")


if __name__ == "__main__":
    sample.main(add_flags=add_flags, run=run, check=check_args, doc=__doc__)
