"""The evaluation: real-feature references and the metrics of every table.

- `RealFeatures`: feature statistics of the test and training images on the FID network, of the
  tokenizer's reconstructions of the test images, and on each held-out judge (HELD_OUT: featnet2,
  the independent classifier, and featssl, the self-supervised network), cached in fid_ref.pt;
- `metrics`: FID (vs test, vs reconstructions), the held-out judges' Fréchet distances
  (`judge_fids`), precision/recall, conditional accuracy; the two reference rows;
- the tables' cells: metric columns, mean ± sd over seeds, measured cells cached per run folder.

Usage:
    ref = RealFeatures.of(pipe)                         # pipe: a pipeline.Pipeline of a run folder
    print(metrics(ref, pipe.decode(tokens), labels))
"""
import os
import time

import numpy as np
import torch
from tqdm import tqdm

import data
import ddp
import fid
import policy
import runs
from models import build_model


HELD_OUT = {"featnet2": "fid2", "featssl": "fd_ssl"}   # held-out judge -> its metric key: read by no choice


def judge_feats_key(split: str, metric: str) -> str:
    """fid_ref.pt's key of a held-out judge's features ("test2_feats" for featnet2, as older caches name them)."""
    return f"{split}2_feats" if metric == "fid2" else f"{split}_{metric}_feats"


class RealFeatures:
    """Feature-network features of real images: the 10 000 test images and 10 000 training images;
    and the references every table adds beside FID against the test images: FID against the
    tokenizer's reconstructions of the test images (`recon_*`; a generator that matched the token
    distribution exactly would score 0 there) and the Fréchet distance on each held-out judge
    (HELD_OUT: featnet2, the independent classifier, and featssl, the self-supervised network;
    `judges`, `held_out[key][split]` = (mu, sigma), when trained). `net2`, `test2_*`, `train2_*`
    name featnet2's.

    Cached in <run_dir>/fid_ref.pt, keyed by the fingerprints of the networks involved."""

    def __init__(self, run_dir: str, device: torch.device, featnet: torch.nn.Module, vq: torch.nn.Module | None = None):
        self.run_dir, self.device, self.featnet, self.vq = run_dir, device, featnet, vq   # device: where P/R run too
        path = os.path.join(run_dir, "fid_ref.pt")
        nets = tuple(s for s in ("featnet", "vq", *HELD_OUT) if s == "featnet" or runs.is_done(os.path.join(run_dir, f"{s}.pt")))
        key = runs.fingerprint(run_dir, nets)
        try:
            cached = torch.load(path, weights_only=True) if os.path.exists(path) else None
        except Exception:
            cached = None                                                  # unreadable cache: recompute
        self.judges = {HELD_OUT[s]: build_model(run_dir, s, device) for s in HELD_OUT if s in nets}
        if "vq" in nets and self.vq is None:
            self.vq = build_model(run_dir, "vq", device)
        if cached is None or cached.get("key") != key or "train_labels" not in cached:
            cached = self._compute(key)
            runs.save_ckpt(path, cached)
        self.test_images, self.test_labels = cached["test_images"], cached["test_labels"]   # uint8, long
        self.test_feats, self.train_feats = cached["test_feats"], cached["train_feats"]     # (N, D)
        self.train_correct, self.train_labels = cached["train_correct"], cached["train_labels"]   # (N,) bool, long
        self.key = key
        self.test_mu, self.test_sigma = fid.statistics(self.test_feats)
        self.train_mu, self.train_sigma = fid.statistics(self.train_feats)
        stats = lambda k: fid.statistics(cached[k]) if k in cached else (None, None)
        self.recon_mu, self.recon_sigma = stats("recon_feats")
        self.held_out = {m: {split: stats(judge_feats_key(split, m)) for split in ("test", "train")} for m in self.judges}
        self.net2 = self.judges.get("fid2")
        (self.test2_mu, self.test2_sigma), (self.train2_mu, self.train2_sigma) = (
            self.held_out.get("fid2", {}).get(s, (None, None)) for s in ("test", "train"))

    @classmethod
    def of(cls, pipe) -> "RealFeatures":
        """The references of a generator pipeline's run folder, on its device and feature network."""
        return cls(pipe.run_dir, pipe.device, pipe.featnet, pipe.vq)

    def _compute(self, key: str) -> dict:
        c = runs.read_json(os.path.join(self.run_dir, "config.json"))
        x_test, y_test, _ = data.load_dataset(c["data"], "test", c["img_size"], c["channels"], c["seed"])
        x_train, y_train, _ = data.load_dataset(c["data"], "train", c["img_size"], c["channels"], c["seed"])
        pick = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))[:10000]
        test, train_x = data.to_float(x_test), data.to_float(x_train[pick])
        test_feats, _ = fid.extract(self.featnet, test, device=self.device)
        train_feats, train_logits = fid.extract(self.featnet, train_x, device=self.device)
        out = {"key": key, "test_images": x_test, "test_labels": y_test, "test_feats": test_feats,
               "train_feats": train_feats, "train_correct": train_logits.argmax(1) == y_train[pick], "train_labels": y_train[pick]}
        if self.vq is not None:                                            # the tokenizer's reconstructions of test
            out["recon_feats"] = fid.extract(self.featnet, reconstruct(self.vq, test, self.device), device=self.device)[0]
        for m, net in self.judges.items():                                 # featnet2's keep their old names
            for split, x in (("test", test), ("train", train_x)):
                out[judge_feats_key(split, m)] = fid.extract(net, x, device=self.device)[0]
        return out


@torch.no_grad()
def reconstruct(vq: torch.nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The tokenizer's reconstructions of images x (n, C, H, W) in [-1, 1], 500 at a time: float, on the CPU."""
    return torch.cat([vq.detokenize(vq.tokenize(x[i:i + 500].to(device))).float().cpu() for i in range(0, len(x), 500)])


def metrics(ref: RealFeatures, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """FID / precision / recall against the test images and conditional accuracy; FID against the
    tokenizer's reconstructions of the test images ("fid_recon") and the Fréchet distance on each
    held-out judge ("fid2": featnet2, "fd_ssl": featssl) when there are."""
    feats, logits = fid.extract(ref.featnet, images, device=ref.device)
    P, R = fid.precision_recall(ref.test_feats, feats, k=3, device=ref.device)
    out = {"fid": fid.fid_from_features(feats, ref.test_mu, ref.test_sigma),
           "precision": P, "recall": R, "cond_acc": (logits.argmax(1) == labels).float().mean().item()}
    if ref.recon_mu is not None:
        out["fid_recon"] = fid.fid_from_features(feats, ref.recon_mu, ref.recon_sigma)
    return {**out, **judge_fids(ref, images, "test", feats)}


def judge_fids(ref: RealFeatures, images: torch.Tensor, split: str, feats: torch.Tensor | None = None,
               fid_net: bool = False) -> dict:
    """The Fréchet distance of images against the `split` ("test" or "train") statistics on each held-out
    judge {"fid2", "fd_ssl"}, and with fid_net on the FID network too ("fid"; its features `feats` if given)."""
    out = {}
    if fid_net:
        feats = feats if feats is not None else fid.extract(ref.featnet, images, device=ref.device)[0]
        mu, sigma = (ref.test_mu, ref.test_sigma) if split == "test" else (ref.train_mu, ref.train_sigma)
        out["fid"] = fid.fid_from_features(feats, mu, sigma)
    for m, net in ref.judges.items():
        out[m] = fid.fid_from_features(fid.extract(net, images, device=ref.device)[0], *ref.held_out[m][split])
    return out


def recon_reference(ref: RealFeatures, n: int) -> dict:
    """The floor row: the tokenizer's reconstructions of the first n test images, measured as a generated row."""
    return metrics(ref, reconstruct(ref.vq, data.to_float(ref.test_images[:n]), ref.device), ref.test_labels[:n])


def train_reference(ref: "RealFeatures", n: int) -> dict:
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


def metric_head(ref: "RealFeatures") -> str:
    """The metric columns of every table: FID vs test, vs the tokenizer's reconstructions, on featnet2, P, R, acc."""
    return ("FID | " + ("FID vs recon | " if ref.recon_mu is not None else "") +
            ("featnet2 FID | " if ref.net2 is not None else "") + ("SSL FD | " if "fd_ssl" in ref.judges else "") +
            "precision | recall | cond. acc. |")


def metric_cells(r: dict, ref: "RealFeatures") -> str:
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


def measure(ref: RealFeatures, labels: torch.Tensor, sched, generate, to_images=lambda x: x) -> dict:
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


def seeded_cells(pipe, ref: RealFeatures, stem: str, cells: list, desc: str) -> dict:
    """The measured cells of a multi-seed table, cached in <run_dir>/<stem>_cache.json as they are
    made (an interrupted table resumes) and reused only under the same weights, numerics, chunking
    and reference networks. cells: [(row, key, compute)], compute() -> a dict with "fid"; returns
    {row: [the row's results, in cell order]}."""
    path, fp = os.path.join(pipe.run_dir, f"{stem}_cache.json"), f"{pipe.eval_key}|{ref.key}"
    cache = runs.read_json(path, {})
    if cache.get("fingerprint") != fp:
        cache = {"fingerprint": fp}                                    # other weights, device or chunking: start over
    out: dict = {}
    bar = tqdm(cells, desc=desc, disable=not ddp.DIST.main)
    for row, key, compute in bar:
        if key not in cache:
            cache[key] = compute()
            runs.write_json(path, cache)
        out.setdefault(row, []).append(cache[key])
        bar.set_postfix(fid=f"{cache[key]['fid']:.2f}")
    return out
