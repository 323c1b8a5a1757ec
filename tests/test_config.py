"""The command line's configuration: --set and the dedicated flags never contradict each other."""
import argparse

import pytest

import train



def args(tmp_path, *sets, **flags) -> argparse.Namespace:
    base = dict(run_dir=str(tmp_path / "run"), preset="test", data=None, seed=None, steps=None, stage="policy",
                set=list(sets), path=None, reward=None, compile=None)
    return argparse.Namespace(**{**base, **flags})


@pytest.mark.parametrize("key, value, flag, flag_value, other", [
    ("pi_reward", "fid", "reward", "fid", "fixed"),
    ("flow_path", "vp", "path", "vp", "flow"),
    ("compile", "true", "compile", True, None)])
def test_set_of_a_flag_key_works_or_is_refused(tmp_path, key, value, flag, flag_value, other):
    c, _ = train.build_config(args(tmp_path, f"{key}={value}"), ["backbone"])
    assert getattr(c, key) == flag_value                              # --set alone works (it was silently dropped)
    c, _ = train.build_config(args(tmp_path, **{flag: flag_value}), ["backbone"])
    assert getattr(c, key) == flag_value                              # the flag alone
    c, _ = train.build_config(args(tmp_path, f"{key}={value}", **{flag: flag_value}), ["backbone"])
    assert getattr(c, key) == flag_value                              # both, agreeing
    if other is not None:
        with pytest.raises(train.UserError, match=f"contradicts --{flag}"):
            train.build_config(args(tmp_path, f"{key}={value}", **{flag: other}), ["backbone"])
    c, _ = train.build_config(args(tmp_path), ["backbone"])
    assert getattr(c, key) == train.TrainConfig().__dict__[key]       # neither: the flag's default


def test_discriminator_never_sits_on_a_judge(tmp_path):
    for judge in ("featnet", "featnet2", "featssl"):
        with pytest.raises(train.UserError, match="a judge"):
            train.build_config(args(tmp_path, f"pi_d_nets=backbone+{judge}"), ["backbone"])
    c, _ = train.build_config(args(tmp_path, "pi_d_nets=backbone+dssl", "pi_d_taps=1,2", "pi_d_acc_band=0.6,0.8"),
                               ["backbone"])
    assert (c.pi_d_nets, c.pi_d_taps, c.pi_d_acc_band) == ("backbone+dssl", (1, 2), (0.6, 0.8))
    with pytest.raises(train.UserError, match="pi_d_acc_band"):
        train.build_config(args(tmp_path, "pi_d_acc_band=0.8,0.6"), ["backbone"])


def test_an_older_run_folder_config_loads_under_the_new_names(tmp_path):
    import json
    import os
    old = {**train.to_plain(train.TrainConfig(**train.PRESETS["test"], preset="test"))}
    for new_key in ("backbone_steps", "featnet_dim", "vq_codebook_size", "nat_mask_dist", "nat_ema_decay", "flow_ema_decay"):
        old.pop(new_key)
    old.update(bb_steps=17, feat_dim=24, codebook_size=48, mask_dist="beta", ema_decay=0.97)   # not the preset's values
    os.makedirs(tmp_path / "run")
    json.dump(old, open(tmp_path / "run" / "config.json", "w"))
    c = train.load_config(str(tmp_path / "run"))
    assert (c.backbone_steps, c.featnet_dim, c.vq_codebook_size, c.nat_mask_dist, c.nat_ema_decay, c.flow_ema_decay) == \
        (17, 24, 48, "beta", 0.97, 0.97)
    c, _ = train.build_config(args(tmp_path), ["backbone"])         # and through the command line
    assert (c.backbone_steps, c.vq_codebook_size) == (17, 48)
    with pytest.raises(train.UserError, match="now called backbone_steps"):
        train.build_config(args(tmp_path, "bb_steps=5"), ["backbone"])


def test_one_table_maps_every_stage_to_its_keys():
    import train
    assert set(train.STAGES_ALL) <= set(train.STAGE_KEYS)
    fields = {f.name for f in config.dataclasses.fields(train.TrainConfig)}
    assert all(k in fields for keys in train.STAGE_KEYS.values() for k in keys)
    for loop, stage in (("policy_T4", "policy"), ("static_search_T8", "static"), ("flow_policy_nfe4", "flow-policy"),
                        ("vp_static_nfe8", "flow-static"), ("search_T4", "search"), ("param_T8", "param-search"),
                        ("flow_search_nfe4", "flow-search"), ("vp", "flow"), ("featssl", "featssl"), ("policy_fid_T4", "policy")):
        assert train.stage_of(loop) == stage, loop
    assert train.TrainConfig().fault_keys("static_T4") == ("pi_static_lr", "pi_batch")


def test_validate_checks_only_the_stages_that_run(tmp_path):
    c, _ = train.build_config(args(tmp_path, "search_samples=0", stage="nat"), ["backbone"])   # search does not run
    assert c.search_samples == 0
    with pytest.raises(train.UserError, match="search_samples"):
        train.build_config(args(tmp_path, "search_samples=0", stage="search"), ["backbone"])
