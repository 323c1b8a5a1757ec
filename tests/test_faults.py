"""Run faults, in-process through train.main / sample.main: a loss that turns NaN, a disk that fills
during a checkpoint write, out of memory. Each stops with one line and exit code train.FAULT_EXIT,
leaves a loadable finite checkpoint and no temporary file, and the run then resumes."""
import json
import os
import shutil

import pytest
import torch

import nat
import reward
import sample
import train


def exits(fn, argv) -> int:
    with pytest.raises(SystemExit) as e:
        fn(argv)
    return e.value.code


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The test preset through the policy stage's inputs (backbone, vq, featnet, featnet2, nat), in-process."""
    d = str(tmp_path_factory.mktemp("faults") / "run")
    for stage in ("backbone", "vq", "featnet", "featnet2", "nat"):
        train.main(["--preset", "test", "--run-dir", d, "--stage", stage])
    return d


def copy_run(base: str, dst, files=("config.json", "backbone.pt", "vq.pt", "featnet.pt", "featnet2.pt")) -> str:
    os.makedirs(dst, exist_ok=True)
    for f in files:
        shutil.copy(os.path.join(base, f), os.path.join(dst, f))
    return str(dst)


def error_lines(capsys) -> list[str]:
    """The 'error: ...' lines on stderr (progress bars share it)."""
    return [line[line.index("error: "):] for line in capsys.readouterr().err.splitlines() if "error: " in line]


def assert_valid_log(run_dir: str) -> None:
    def no_nan(c):
        raise AssertionError(f"log.jsonl holds {c}: not valid JSON")
    for line in open(os.path.join(run_dir, "log.jsonl")):
        json.loads(line, parse_constant=no_nan)


def assert_good_checkpoint(path: str, step: int) -> None:
    ck = train.load_ckpt(path)
    assert ck["step"] == step and not ck["done"] and train.all_finite(ck)
    assert not os.path.exists(path + ".tmp")


def test_nan_loss_stops_keeps_the_last_good_state_and_resumes(base, tmp_path, monkeypatch, capsys):
    d = copy_run(base, tmp_path / "nan")
    real, calls = nat.masked_token_loss, {"n": 0}

    def loss_nan_at_12(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] == 12 else loss
    monkeypatch.setattr(nat, "masked_token_loss", loss_nan_at_12)
    assert exits(train.main, ["--run-dir", d, "--stage", "nat"]) == train.FAULT_EXIT
    err = error_lines(capsys)
    assert len(err) == 1 and err[0].startswith("error: nat: non-finite loss (nan) at step 12; ")
    assert "step 11) is saved" in err[0] and "Re-run the same command to resume" in err[0] and "lower learning rate" in err[0]
    assert_good_checkpoint(os.path.join(d, "nat.pt"), 11)
    assert_valid_log(d)
    monkeypatch.undo()
    train.main(["--run-dir", d, "--stage", "nat"])                           # transient: the run resumes
    assert "resuming nat.pt from step 11" in capsys.readouterr().out
    assert train.load_ckpt(os.path.join(d, "nat.pt"))["done"]


def test_a_huge_learning_rate_never_saves_non_finite_weights(base, tmp_path, capsys):
    d = copy_run(base, tmp_path / "lr")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["nat_lr"] = 1e30                                                     # the run folder's own config
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    assert exits(train.main, ["--run-dir", d, "--stage", "nat"]) == train.FAULT_EXIT
    assert "nat: non-finite" in capsys.readouterr().err
    if os.path.exists(os.path.join(d, "nat.pt")):
        assert train.all_finite(train.load_ckpt(os.path.join(d, "nat.pt")))
    assert_valid_log(d)


def test_disk_full_during_a_checkpoint_write(base, tmp_path, monkeypatch, capsys):
    d = copy_run(base, tmp_path / "disk")
    real, calls = torch.save, {"n": 0}

    def save_fails_at_5(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            with open(f, "wb") as fh:                                        # a partial temp file, then the error
                fh.write(b"partial")
            raise OSError(28, "No space left on device")
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", save_fails_at_5)
    code = exits(train.main, ["--run-dir", d, "--stage", "nat", "--set", "ckpt_every_s=0"])   # a checkpoint every step
    assert code == train.FAULT_EXIT
    err = error_lines(capsys)
    assert len(err) == 1 and f"could not write {os.path.join(d, 'nat.pt')}: No space left on device" in err[0]
    assert "the previous file is intact" in err[0]
    assert_good_checkpoint(os.path.join(d, "nat.pt"), 4)                      # the 4th write, no temp file left
    monkeypatch.undo()
    train.main(["--run-dir", d, "--stage", "nat"])
    assert "resuming nat.pt from step 4" in capsys.readouterr().out


def test_out_of_memory_names_the_batch_and_resumes(base, tmp_path, monkeypatch, capsys):
    d = copy_run(base, tmp_path / "oom")
    real, calls = nat.NAT.forward, {"n": 0}

    def forward_oom_at_7(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *a, **k)
    monkeypatch.setattr(nat.NAT, "forward", forward_oom_at_7)
    assert exits(train.main, ["--run-dir", d, "--stage", "nat"]) == train.FAULT_EXIT
    err = error_lines(capsys)
    assert len(err) == 1 and err[0].startswith("error: nat: out of memory at step 7")
    assert "step 6) is saved" in err[0] and "batch (memory)" in err[0]
    assert_good_checkpoint(os.path.join(d, "nat.pt"), 6)
    monkeypatch.undo()
    train.main(["--run-dir", d, "--stage", "nat"])
    assert "resuming nat.pt from step 6" in capsys.readouterr().out


def test_policy_stops_on_a_non_finite_reward_and_resumes(base, tmp_path, monkeypatch, capsys):
    d = copy_run(base, tmp_path / "policy", ("config.json", "backbone.pt", "vq.pt", "featnet.pt", "featnet2.pt", "nat.pt"))
    real, calls = reward.reward, {"n": 0}

    def reward_nan_at_3(logits):
        calls["n"] += 1
        r = real(logits)
        return r * float("nan") if calls["n"] == 3 else r
    monkeypatch.setattr(reward, "reward", reward_nan_at_3)
    assert exits(train.main, ["--run-dir", d, "--stage", "policy"]) == train.FAULT_EXIT
    err = error_lines(capsys)
    assert len(err) == 1 and "policy_T4: non-finite reward (nan) at step 3" in err[0] and "step 2) is saved" in err[0]
    assert_good_checkpoint(os.path.join(d, "policy_T4.pt"), 2)
    assert_valid_log(d)
    monkeypatch.undo()
    train.main(["--run-dir", d, "--stage", "policy"])
    assert "resuming policy_T4.pt from step 2" in capsys.readouterr().out


def test_out_of_memory_in_generation_says_what_to_lower(base, monkeypatch, capsys):
    monkeypatch.setattr(nat.NAT, "forward", lambda self, *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    assert exits(sample.main, ["--run-dir", base, "--batch", "64"]) == train.FAULT_EXIT
    err = error_lines(capsys)
    assert len(err) == 1 and "out of memory generating 64 rows per chunk: lower --batch" in err[0]
