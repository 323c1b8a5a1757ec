"""Compare two run folders made by two versions of the code: every checkpoint tensor, every
log.jsonl value and every eval.json number must be identical (times and speeds aside).

    git worktree add /tmp/old <commit>
    for s in backbone vq featnet featnet2 featssl nat policy static smooth; do     # one process per stage: the
        (cd /tmp/old && python train.py --preset test --run-dir /tmp/runA --stage $s)  # global random stream of a
        python train.py --preset test --run-dir /tmp/runB --stage $s                  # process runs on across stages
    done
    (cd /tmp/old && python sample.py --run-dir /tmp/runA --eval --samples 60 --decode-steps 4)
    python sample.py --run-dir /tmp/runB --eval --samples 60 --decode-steps 4
    python scripts/equivalence.py /tmp/runA /tmp/runB

Exit code 0 and "identical" when they match; otherwise the first differences. config.json is
compared on the keys both have (a key the newer code dropped is listed, not a difference); files
only one folder has are listed, and a checkpoint missing from the second fails unless it is a cache
(fid_ref.pt, *_cache.json: things the newer code recomputes instead of keeping).
"""
import json
import os
import sys

import torch


TIMES = ("time", "wall_seconds", "train_seconds", "minutes", "images_per_s", "images_per_s_sd",
         "fingerprint", "key", "generator")    # fingerprints are "stage:step:training seconds": times too


def same(a, b, where: str, diffs: list) -> None:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b)):
            diffs.append(where)
    elif isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k in TIMES or str(k).startswith("sec_"):
                continue
            if k not in a or k not in b:
                diffs.append(f"{where}/{k} (only in one)")
            else:
                same(a[k], b[k], f"{where}/{k}", diffs)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            diffs.append(f"{where} (length {len(a)} vs {len(b)})")
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]", diffs)
    elif a != b and not (a != a and b != b):                   # NaN == NaN here
        diffs.append(f"{where}: {a!r} vs {b!r}")


def main(run_a: str, run_b: str) -> int:
    diffs: list = []
    files = {r: {f for f in os.listdir(r) if f.endswith((".pt", ".json"))} for r in (run_a, run_b)}
    caches = lambda f: f == "fid_ref.pt" or "cache" in f
    for r, other in ((run_a, run_b), (run_b, run_a)):
        if files[r] - files[other]:
            print(f"only in {r}: {', '.join(sorted(files[r] - files[other]))}")
    diffs += [f"{f} missing in {run_b}" for f in sorted(files[run_a] - files[run_b]) if not caches(f)]
    names = sorted(f for f in files[run_a] & files[run_b] if not caches(f))
    for f in names:
        load = (lambda p: torch.load(p, weights_only=True)) if f.endswith(".pt") else (lambda p: json.load(open(p)))
        a, b = load(os.path.join(run_a, f)), load(os.path.join(run_b, f))
        if f == "config.json":
            dropped = sorted(set(a) ^ set(b))
            if dropped:
                print(f"config.json keys in one folder only: {', '.join(dropped)}")
            a, b = ({k: v for k, v in x.items() if k in a and k in b} for x in (a, b))
        same(a, b, f, diffs)
    logs = [[json.loads(line) for line in open(os.path.join(r, "log.jsonl"))] for r in (run_a, run_b)]
    same(logs[0], logs[1], "log.jsonl", diffs)
    if diffs:
        print(f"{len(diffs)} differences, first ones:\n  " + "\n  ".join(diffs[:20]))
        return 1
    print(f"identical: {len(names)} checkpoints / JSON files and {len(logs[0])} log records")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
