"""The judges' validation (experiments/judges.py), KID by hand, the claims' intervals, the reward check's splits."""
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import data  # noqa: E402
import fid  # noqa: E402
import game  # noqa: E402
import judges  # noqa: E402
import sample  # noqa: E402
import studies  # noqa: E402


def test_kid_hand_computed_on_tiny_features():
    """D = 1, k(x, y) = (x y + 1)^3; real {0, 1}, fake {0, 2}: k(0, 1) = k(0, 2) = 1 off the diagonals, and the
    cross terms k(0,0) + k(0,2) + k(1,0) + k(1,2) = 1 + 1 + 1 + 27 = 30: KID = 1 + 1 - 2 * 30 / 4 = -13."""
    value, _ = fid.kid(torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [2.0]]))
    assert value == pytest.approx(-13.0, abs=1e-12)
    real = torch.tensor([[0.0], [1.0], [3.0]])
    assert fid.kid(real, torch.tensor([[0.0], [2.0]]), real_sums=fid.kid_self_sums(real)) == fid.kid(real, torch.tensor([[0.0], [2.0]]))


def test_kid_of_two_samples_of_one_distribution_is_zero_within_three_standard_errors():
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        value, se = fid.kid(torch.randn(400, 8, generator=g), torch.randn(300, 8, generator=g))
        assert abs(value) < 3 * se
    value, se = fid.kid(torch.randn(400, 8, generator=g), torch.randn(300, 8, generator=g) + 0.5)
    assert value > 3 * se                                              # a shift is seen


def test_a_pixel_distance_passes_the_noise_test_on_synthetic_data():
    x, _ = data.synthetic(900, seed=5)
    reference, clean = data.to_float(x[:600]), data.to_float(x[600:])
    judge = judges.Judge(lambda im: im.flatten(1).float(), reference)
    levels = judges.FIDELITY["noise"][1]
    curves = {key: np.array([[r[key] for r in [judge(clean)] + [judge(judges.gaussian_noise(clean, v, torch.Generator().manual_seed(s)))
                                                              for v in levels]] for s in range(2)]) for key in ("fd", "kid")}
    assert judges.passes(curves["fd"]) and judges.passes(curves["kid"])
    assert not judges.passes(curves["fd"][:, ::-1])


def test_disturbances_do_what_they_say():
    g = torch.Generator().manual_seed(0)
    x = data.to_float(data.synthetic(40, seed=1)[0])
    assert torch.allclose(judges.swirl(x, 0.0, g), x, atol=1e-5)                   # no rotation: the image itself
    flat = torch.full((2, 1, 32, 32), 0.3)
    assert torch.allclose(judges.gaussian_blur(flat, 1.5, g), flat, atol=1e-6)      # blur keeps a constant image
    sp = judges.salt_and_pepper(torch.zeros(200, 1, 32, 32), 0.1, g)
    assert (sp != 0).float().mean().item() == pytest.approx(0.1, abs=0.01) and set(sp.unique().tolist()) == {-1.0, 0.0, 1.0}
    sq = judges.black_squares(x, 2, g)
    assert (sq <= x).all() and ((sq == -1).float().mean() > (x == -1).float().mean())
    assert judges.gaussian_noise(x, 5.0, g).abs().max() <= 1


def test_diversity_sets_keep_or_change_the_classes_as_named():
    K, per, n = 10, 200, 200
    labels = torch.arange(K).repeat_interleave(per)                                  # test index -> class
    pools = [torch.nonzero(labels == k).flatten() for k in range(K)]
    sets = judges.diversity_sets(pools, [p.flip(0) for p in pools], n, torch.Generator().manual_seed(0))
    for name in ("collapse", "typical"):                                             # balanced, fewer distinct images
        for idx, f in zip(sets[name], judges.DISTINCT):
            assert labels[idx].bincount(minlength=K).tolist() == [n // K] * K
            assert len(idx.unique()) == K * max(1, round(n // K * f))
    assert sets["typical"][-1].unique().tolist() == sorted(p[-1].item() for p in pools)   # each class's first in its order
    assert [len(labels[idx].unique()) for idx in sets["drop"]] == [7, 4, 2, 1] and all(len(i) == n for i in sets["drop"])
    for idx, ratio in zip(sets["imbalance"], judges.RATIO):
        counts = labels[idx].bincount(minlength=K).float()
        assert len(idx) == n and len(idx.unique()) == n and counts.max() / counts.min() == pytest.approx(ratio, rel=0.35)


def test_noise_equivalent_interpolates_the_noise_curve():
    curve = np.array([0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0])                     # at NOISE_CURVE 0 .. 1.6
    assert judges.noise_equivalent(curve, 3.0) == pytest.approx(0.15)
    assert judges.noise_equivalent(curve, 64.0) == math.inf


def test_claims_are_paired_intervals_over_sampling_and_training_seeds():
    """One training seed: the paired differences' t-interval. Two: the spread over training seeds is added, with
    Welch-Satterthwaite degrees of freedom (here 1: every sampling seed moved alike, the seeds differ)."""
    base = [{"fid": v} for v in (6.0, 7.0, 8.0)]
    mean, half = sample.claims([{"fid": v} for v in (5.0, 6.0, 8.0)], base, ["fid"])["fid"]
    assert mean == pytest.approx(-2 / 3) and half == pytest.approx(4.30 * (1 / 3 / 3) ** 0.5)
    cells = [{"fid": v} for v in (5.0, 6.0, 7.0, 5.5, 6.5, 7.5)]                  # 2 training seeds x 3 sampling seeds
    mean, half = sample.claims(cells, base, ["fid"])["fid"]
    assert mean == pytest.approx(-0.75) and half == pytest.approx(12.71 * 0.25)     # b = var(6, 6.5) / 2 = 1/16
    assert sample.claim_text(mean, half) .endswith("–") and sample.claim_text(-1.0, 0.5).endswith("better")
    assert sample.claim_text(-1.0, 0.5, lower_is_better=False).endswith("worse")
    assert sample.claim_text(-1.0, 0.5, verdict=False) == "-1 [-1.5, -0.5]"
    assert sample.claims([{"fid": 1.0}], [{"fid": 2.0}], ["fid"])["fid"][1] != sample.claims([{"fid": 1.0}], [{"fid": 2.0}],
                                                                                          ["fid"])["fid"][1]   # nan: no claim


def test_the_reward_checks_three_splits_are_disjoint():
    for n in (8, 20, 2000, 11000):
        parts = [set(range(s.start, s.stop)) for s in game.three_splits(n)]
        assert all(parts) and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert set().union(*parts) == set(range(n))
    with pytest.raises(Exception, match="three splits"):
        game.three_splits(2)


def test_the_checks_cache_survives_other_paradigms_checkpoints_but_not_the_nats(tmp_path):
    from types import SimpleNamespace
    pipe = SimpleNamespace(run_dir=str(tmp_path), batch=64, bf16=False, device=torch.device("cpu"))
    path = os.path.join(tmp_path, "cache.json")
    game.train.write_json(path, {"setup": [64, False, "cpu"], "judges|x": 1})
    touch = lambda name, t: (open(os.path.join(tmp_path, name), "w").close(), os.utime(os.path.join(tmp_path, name), (t, t)))
    later = os.path.getmtime(path) + 10
    for name in ("var_policy_T7.pt", "msvq.pt", "flow.pt", "dnet.pt"):
        touch(name, later)
    assert game.fresh(pipe, path)["judges|x"] == 1                     # another paradigm, a D candidate: kept
    assert "judges|x" not in game.fresh(SimpleNamespace(**{**vars(pipe), "batch": 32}), path)   # other settings
    touch("policy_T4.pt", later)
    assert game.fresh(pipe, path) == {"setup": [64, False, "cpu"]}      # a NAT checkpoint changed: started over


def test_spearman_interval_with_ties():
    assert studies.spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)
    rho, lo, hi = studies.spearman_interval(list(range(16)), list(range(16)))
    assert rho == pytest.approx(1.0) and lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    rho, lo, hi = studies.spearman_interval(np.random.default_rng(0).normal(size=16), np.random.default_rng(1).normal(size=16))
    assert lo < 0 < hi
