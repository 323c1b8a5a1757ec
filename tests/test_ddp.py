"""torchrun: the data-parallel stages with 2 gloo processes on the CPU (every run has a timeout,
so a hang fails instead of blocking CI)."""
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(*args, n=2):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                           "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_nat_stage_on_two_processes_writes_once_and_resumes(tmp_path):
    d = tmp_path / "ddp"
    for stage in ("vq", "featnet"):                                               # what nat needs, one process
        r = subprocess.run([sys.executable, "train.py", "--preset", "test", "--run-dir", str(d), "--stage", stage],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    r = torchrun("--run-dir", str(d), "--stage", "nat")
    assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(d / "nat.pt", weights_only=True)
    assert ck["done"] and ck["step"] == 30
    records = [json.loads(line) for line in open(d / "log.jsonl") if '"stage": "nat"' in line]
    assert [r["step"] for r in records if "step" in r] == [1, 11, 21, 30]          # one writer, not two
    assert not [f for f in os.listdir(d) if f.endswith(".tmp")]
    assert "run folder" in r.stdout and r.stdout.count("nat: done") == 1             # rank 0 reports
    ck.update(done=False, step=20)                                                # interrupted at step 20
    torch.save(ck, d / "nat.pt")
    r = torchrun("--run-dir", str(d), "--stage", "nat")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming nat.pt from step 20" in r.stdout
    assert torch.load(d / "nat.pt", weights_only=True)["step"] == 30
    r = torchrun("--run-dir", str(d), "--stage", "backbone")                       # not data-parallel yet: said
    assert r.returncode != 0 and "does not run data-parallel yet" in r.stderr
