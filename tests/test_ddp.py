"""torchrun with 2 gloo processes on the CPU: the data-parallel nat stage (one writer, resume),
and sampling that is bit-equal whatever the number of processes. Every run has a timeout, so a
hang fails instead of blocking CI."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, n=1, script="train.py"):
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)] if n > 1 else []
    return subprocess.run([sys.executable, *launcher, script, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """backbone, vq (its perceptual loss reads the backbone), featnet and nat, each on 2 processes."""
    d = tmp_path_factory.mktemp("ddp") / "run"
    for stage in ("backbone", "vq", "featnet", "nat"):
        r = run("--preset", "test", "--run-dir", str(d), "--stage", stage, n=2)
        assert r.returncode == 0, (stage, r.stderr[-3000:])
    return d


def test_nat_stage_on_two_processes_writes_once_and_resumes(run_dir, tmp_path):
    ck = torch.load(run_dir / "nat.pt", weights_only=True)
    assert ck["done"] and ck["step"] == 30
    records = [json.loads(line) for line in open(run_dir / "log.jsonl") if '"stage": "nat"' in line]
    assert [r["step"] for r in records if "step" in r] == [1, 11, 21, 30]          # one writer, not two
    assert not [f for f in os.listdir(run_dir) if f.endswith(".tmp")]
    d = tmp_path / "resume"
    shutil.copytree(run_dir, d)
    ck.update(done=False, step=20)                                                # interrupted at step 20
    torch.save(ck, d / "nat.pt")
    r = run("--run-dir", str(d), "--stage", "nat", n=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming nat.pt from step 20" in r.stdout and r.stdout.count("nat: done") == 1   # rank 0 reports
    assert torch.load(d / "nat.pt", weights_only=True)["step"] == 30


def test_a_fault_on_two_processes_stops_both_with_one_message(run_dir, tmp_path):
    """A learning rate that blows up: the loss checked is the mean over the ranks, so both ranks stop
    at the same step with the same line and exit code 3, within the timeout (no hang)."""
    d = tmp_path / "fault"
    d.mkdir()
    for f in ("config.json", "vq.pt"):
        shutil.copy(run_dir / f, d / f)
    cfg = json.load(open(d / "config.json"))
    cfg["nat_lr"] = 1e30
    json.dump(cfg, open(d / "config.json", "w"))
    r = run("--run-dir", str(d), "--stage", "nat", n=2)
    assert r.returncode != 0
    errors = [line[line.index("error: "):] for line in r.stderr.splitlines() if "error: nat: non-finite" in line]
    assert len(errors) == 2 and errors[0] == errors[1], r.stderr[-3000:]          # one line per rank, the same
    assert "exitcode  : 3" in r.stderr and "Traceback" not in r.stderr.split("error: ")[0]


GENERATE = """
import sys, torch
sys.path.insert(0, {root!r})
import nat, policy, train
device = train.init_distributed(torch.device("cpu"))
pipe = train.Pipeline({run!r}, device, batch=16)
labels = train.balanced_labels(40, pipe.cfg.num_classes)                         # 3 chunks: 16, 16, 8
tokens = pipe.generate(labels, 4, nat.heuristic_schedule(4, 1.0, 2.0), seed=7)
torch.manual_seed(0)                                                              # a policy with non-zero outputs
pi = policy.AdaptivePolicy(4, pipe.cfg.dim, pipe.cfg.num_tokens, width=8, hidden=8)
torch.nn.init.normal_(pi.out.weight, std=0.3)
sched = policy.PolicySchedule(pi, policy.inverse_activation(nat.heuristic_table(4, 1.0, 2.0)))
pipe.generate(labels, 4, sched, seed=7)
picked = pipe.generate(labels, 4, nat.heuristic_schedule(4, 1.0, 2.0), seed=7, lookahead=2, score_fn="random")
if train.DIST.main:
    torch.save({{"tokens": tokens, "actions": sched.actions(), "picked": picked}}, {out!r})
if train.DIST.world > 1:                   # a process group left alive at exit can abort in gloo's threads
    train.barrier()
    torch.distributed.destroy_process_group()
"""


def test_tokens_and_fid_are_the_same_on_one_and_two_processes(run_dir, tmp_path):
    for n in (1, 2):
        script = tmp_path / f"gen{n}.py"
        script.write_text(GENERATE.format(root=ROOT, run=str(run_dir), out=str(tmp_path / f"tokens{n}.pt")))
        r = run(n=n, script=str(script))
        assert r.returncode == 0, r.stderr[-3000:]
    one, two = (torch.load(tmp_path / f"tokens{n}.pt", weights_only=True) for n in (1, 2))
    assert one["tokens"].shape == (40, 64) and torch.equal(one["tokens"], two["tokens"])
    assert one["actions"].shape == (4, 40, 4) and torch.equal(one["actions"], two["actions"])   # every sample's, in order
    assert torch.equal(one["picked"], two["picked"]) and not torch.equal(one["picked"], one["tokens"])   # random look-ahead
    fids = {}
    for n in (1, 2):                                                              # the evaluation table itself
        d = tmp_path / f"eval{n}"
        shutil.copytree(run_dir, d)
        r = run("--run-dir", str(d), "--eval", "--samples", "40", "--sweep-samples", "20", "--decode-steps", "4",
                "--batch", "16", n=n, script="sample.py")
        assert r.returncode == 0, r.stderr[-3000:]
        fids[n] = {row["schedule"]: row["fid"] for row in json.load(open(d / "eval.json"))["rows"]}
    assert fids[1] == fids[2] and len(fids[1]) == 2


def test_policy_stage_on_two_processes(run_dir, tmp_path):
    """Each rank rolls out half of pi_batch; PPO statistics and the target-KL stop are global;
    rank 0 writes; an interrupted policy resumes on 2 processes."""
    d = tmp_path / "policy"
    shutil.copytree(run_dir, d)
    r = run("--run-dir", str(d), "--stage", "policy", n=2)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(d / "policy_T4.pt", weights_only=True)
    assert ck["done"] and ck["step"] == 4 and [h["iter"] for h in ck["history"]] == [0, 1, 2, 3, 4]
    records = [json.loads(line) for line in open(d / "log.jsonl") if '"stage": "policy_T4"' in line]
    assert [r["step"] for r in records] == [1, 2, 3, 4]                             # once, from rank 0
    assert all(0 <= r["d_acc"] <= 1 for r in records) and sum("approx_kl" in r for r in records) == 3
    ck.update(done=False, step=2, history=ck["history"][:3])
    torch.save(ck, d / "policy_T4.pt")
    r = run("--run-dir", str(d), "--stage", "policy", n=2)
    assert r.returncode == 0 and "resuming policy_T4.pt from step 2" in r.stdout, r.stderr[-3000:]
    assert torch.load(d / "policy_T4.pt", weights_only=True)["step"] == 4
    r = run("--run-dir", str(d), "--stage", "static", "--set", "pi_batch=18", "--set", "pi_group=3", n=4)
    assert r.returncode != 0 and "does not split over 4 processes" in r.stderr


def test_search_is_the_same_on_one_and_two_processes(run_dir, tmp_path):
    """The AutoNAT search shards its candidates' generations: the same table, FIDs and forwards."""
    out = {}
    for n in (1, 2):
        d = tmp_path / f"search{n}"
        shutil.copytree(run_dir, d)
        r = run("--run-dir", str(d), "--stage", "search", "--set", "search_updates=1", n=n, script="experiments/search.py")
        assert r.returncode == 0, r.stderr[-3000:]
        out[n] = json.load(open(d / "search_T4.json"))
    for key in ("table", "generator_forwards", "train_fid_best"):
        assert out[1][key] == out[2][key], key


def test_compile_for_training_and_sampling(run_dir, tmp_path):
    """--set compile=true: the nat stage trains through torch.compile; the bench times eager, then compiled."""
    d = tmp_path / "compile"
    shutil.copytree(run_dir, d)
    ck = torch.load(d / "nat.pt", weights_only=True)
    ck.update(done=False, step=28)
    torch.save(ck, d / "nat.pt")
    r = run("--run-dir", str(d), "--stage", "nat", "--set", "compile=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(d / "nat.pt", weights_only=True)["step"] == 30
    r = run("--run-dir", str(d), "--compile", "--batch", "8", "--grid-steps", "2", script="experiments/bench.py")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "eager" in r.stdout and "compiled" in r.stdout and r.stdout.count("image-steps/s") >= 2
