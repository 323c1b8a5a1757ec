"""The command line's configuration: --set and the dedicated flags never contradict each other."""
import argparse

import pytest

import config
import runs


def args(tmp_path, *sets, **flags) -> argparse.Namespace:
    base = dict(run_dir=str(tmp_path / "run"), preset="test", data=None, seed=None, steps=None, stage="policy",
                set=list(sets), path=None, reward=None, compile=None)
    return argparse.Namespace(**{**base, **flags})


@pytest.mark.parametrize("key, value, flag, flag_value, other", [
    ("pi_reward", "fid", "reward", "fid", "fixed"),
    ("flow_path", "vp", "path", "vp", "flow"),
    ("compile", "true", "compile", True, None)])
def test_set_of_a_flag_key_works_or_is_refused(tmp_path, key, value, flag, flag_value, other):
    c, _ = config.build_config(args(tmp_path, f"{key}={value}"), ["backbone"])
    assert getattr(c, key) == flag_value                              # --set alone works (it was silently dropped)
    c, _ = config.build_config(args(tmp_path, **{flag: flag_value}), ["backbone"])
    assert getattr(c, key) == flag_value                              # the flag alone
    c, _ = config.build_config(args(tmp_path, f"{key}={value}", **{flag: flag_value}), ["backbone"])
    assert getattr(c, key) == flag_value                              # both, agreeing
    if other is not None:
        with pytest.raises(runs.UserError, match=f"contradicts --{flag}"):
            config.build_config(args(tmp_path, f"{key}={value}", **{flag: other}), ["backbone"])
    c, _ = config.build_config(args(tmp_path), ["backbone"])
    assert getattr(c, key) == config.TrainConfig().__dict__[key]       # neither: the flag's default


def test_discriminator_never_sits_on_a_judge(tmp_path):
    for judge in ("featnet", "featnet2", "featssl"):
        with pytest.raises(runs.UserError, match="a judge"):
            config.build_config(args(tmp_path, f"pi_d_nets=backbone+{judge}"), ["backbone"])
    c, _ = config.build_config(args(tmp_path, "pi_d_nets=backbone+dssl", "pi_d_taps=1,2", "pi_d_acc_band=0.6,0.8"),
                               ["backbone"])
    assert (c.pi_d_nets, c.pi_d_taps, c.pi_d_acc_band) == ("backbone+dssl", (1, 2), (0.6, 0.8))
    with pytest.raises(runs.UserError, match="pi_d_acc_band"):
        config.build_config(args(tmp_path, "pi_d_acc_band=0.8,0.6"), ["backbone"])
