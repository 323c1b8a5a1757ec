"""The command line's configuration: presets, --set KEY=VALUE by type, the run folder's config.json, the lock
once a stage has trained, one-line errors."""
import argparse
import dataclasses
import json
import os

import pytest

import train


def args(tmp_path, *sets, **flags) -> argparse.Namespace:
    base = dict(run_dir=str(tmp_path / "run"), preset="test", data=None, seed=None, stage="policy", set=list(sets))
    return argparse.Namespace(**{**base, **flags})


def build(tmp_path, *sets, running=("policy",), **flags) -> train.TrainConfig:
    return train.build_config(args(tmp_path, *sets, **flags), train.STAGES, list(running))[0]


def test_set_parses_by_type():
    assert [train.parse_value(bool, v) for v in ("true", "0", "yes")] == [True, False, True]
    assert train.parse_value(int, "12") == 12 and train.parse_value(float, "1e-3") == 1e-3
    assert train.parse_value(tuple, "4,8") == (4, 8) and train.parse_value(tuple, "0.6,0.8") == (0.6, 0.8)
    assert train.parse_value(tuple, "") == () and train.parse_value(str, "none") is None
    with pytest.raises(ValueError):
        train.parse_value(bool, "maybe")


def test_every_stage_dataclass_joins_the_flat_config():
    fields = {f.name for f in dataclasses.fields(train.TrainConfig)}
    parts = (train.RunKeys, train.VQKeys, train.FrozenNetKeys, train.NATKeys, train.PolicyKeys, train.ExperimentKeys)
    assert fields == {f.name for p in parts for f in dataclasses.fields(p)}
    assert all(f.startswith("vq_") for f in {f.name for f in dataclasses.fields(train.VQKeys)})
    assert all(f.startswith("pi_") for f in {f.name for f in dataclasses.fields(train.PolicyKeys)})
    for preset in train.PRESETS.values():                             # every preset names real keys
        assert set(preset) <= fields


def test_set_keeps_its_value_in_the_run_folder_but_this_command_keys_do_not(tmp_path):
    c = build(tmp_path, "nat_lr=5e-4", "pi_reward=fid", "compile=true")
    assert (c.nat_lr, c.pi_reward, c.compile) == (5e-4, "fid", True)
    os.makedirs(tmp_path / "run")
    json.dump(train.to_plain(c), open(tmp_path / "run" / "config.json", "w"))
    c = build(tmp_path, preset=None)
    assert c.preset == "test" and c.nat_lr == 5e-4                    # kept
    assert (c.pi_reward, c.compile) == ("adversarial", False)         # this command only


def test_discriminator_never_sits_on_a_judge(tmp_path):
    for judge in ("featnet", "featnet2", "featssl"):
        with pytest.raises(train.UserError, match="a judge"):
            build(tmp_path, f"pi_d_nets=backbone+{judge}")
    c = build(tmp_path, "pi_d_nets=backbone+dssl", "pi_d_taps=1,2", "pi_d_acc_band=0.6,0.8")
    assert (c.pi_d_nets, c.pi_d_taps, c.pi_d_acc_band) == ("backbone+dssl", (1, 2), (0.6, 0.8))
    with pytest.raises(train.UserError, match="pi_d_acc_band"):
        build(tmp_path, "pi_d_acc_band=0.8,0.6")


def test_policy_keys_are_checked_only_when_a_policy_stage_runs(tmp_path):
    assert build(tmp_path, "pi_group=3", running=("nat",)).pi_group == 3
    with pytest.raises(train.UserError, match="pi_group 3 must be >= 1 and divide pi_batch 16"):
        build(tmp_path, "pi_group=3")
    with pytest.raises(train.UserError, match="nat_steps = 0: must be positive"):
        build(tmp_path, "nat_steps=0", running=("vq",))


@pytest.mark.parametrize("item, message", [("nat_dim", "--set nat_dim: expected KEY=VALUE"),
                                           ("bb_steps=5", "unknown config key 'bb_steps'"),
                                           ("nat_steps=ten", "--set nat_steps=ten: invalid literal"),
                                           ("preset=small", "unknown config key 'preset'")])
def test_bad_set_values_are_one_line_errors(tmp_path, item, message):
    with pytest.raises(train.UserError, match=message):
        build(tmp_path, item)


def test_a_trained_run_folder_locks_its_config_except_free_keys(tmp_path):
    c = build(tmp_path)
    os.makedirs(tmp_path / "run")
    json.dump(train.to_plain(c), open(tmp_path / "run" / "config.json", "w"))
    (tmp_path / "run" / "vq.pt").write_bytes(b"")                      # a stage has written its checkpoint
    with pytest.raises(train.UserError, match="another config .differs in nat_dim"):
        build(tmp_path, "nat_dim=64", preset=None)
    assert build(tmp_path, "pi_lr=0.5", "search_T=4", preset=None).pi_lr == 0.5   # each policy carries its own copy
    json.dump({**train.to_plain(c), "pi_start": "classonly", "pi_seed": 1}, open(tmp_path / "run" / "config.json", "w"))
    again = build(tmp_path, preset=None)                             # the policy file's name parts: this command's
    assert (again.pi_start, again.pi_seed) == ("heuristic", 0)
    with pytest.raises(train.UserError, match="unknown preset 'nope'"):
        build(tmp_path, preset="nope")
