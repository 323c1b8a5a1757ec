"""Compare two run folders made by two versions of the code: every checkpoint tensor, every
log.jsonl value and every eval.json number must be identical (times and speeds aside).

    git worktree add /tmp/old <commit>
    (cd /tmp/old && python train.py --preset test --run-dir /tmp/runA && python sample.py --run-dir /tmp/runA --eval --samples 60 --decode-steps 4)
    python train.py --preset test --run-dir /tmp/runB && python sample.py --run-dir /tmp/runB --eval --samples 60 --decode-steps 4
    python scripts/equivalence.py /tmp/runA /tmp/runB

Exit code 0 and "identical" when they match; otherwise the first differences.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import upgrade                                     # noqa: E402  (config keys renamed since: compared by new names)

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
    names = sorted(f for f in os.listdir(run_a) if f.endswith((".pt", ".json")) and "cache" not in f)
    for f in names:
        if not os.path.exists(os.path.join(run_b, f)):
            diffs.append(f"{f} missing in {run_b}")
            continue
        load = (lambda p: torch.load(p, weights_only=True)) if f.endswith(".pt") else (lambda p: json.load(open(p)))
        a, b = load(os.path.join(run_a, f)), load(os.path.join(run_b, f))
        if f == "config.json":
            a, b = upgrade(a), upgrade(b)
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
