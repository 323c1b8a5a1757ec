"""Known-answer tests for fid.py: Fréchet distance, statistics, precision/recall, FeatureNet."""

import warnings

import numpy as np
import pytest
import torch

import fid


def _closed_form_commuting(mu1, a, mu2, b) -> float:
    """FID of N(mu1, Q diag(a) Q^T) and N(mu2, Q diag(b) Q^T): ||dmu||^2 + sum (sqrt a - sqrt b)^2."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    D = 16
    mu1, mu2 = rng.normal(size=D), rng.normal(size=D)
    a, b = rng.uniform(0.1, 3.0, D), rng.uniform(0.1, 3.0, D)
    got = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert isinstance(got, float)
    assert got == pytest.approx(_closed_form_commuting(mu1, a, mu2, b), rel=1e-8, abs=1e-8)


def test_frechet_commuting_rotated_closed_form():
    rng = np.random.default_rng(1)
    D = 12
    Q, _ = np.linalg.qr(rng.normal(size=(D, D)))                 # shared rotation
    mu1, mu2 = rng.normal(size=D), rng.normal(size=D)
    a, b = rng.uniform(0.1, 3.0, D), rng.uniform(0.1, 3.0, D)
    S1, S2 = Q @ np.diag(a) @ Q.T, Q @ np.diag(b) @ Q.T
    got = fid.frechet_distance(mu1, S1, mu2, S2)
    assert got == pytest.approx(_closed_form_commuting(mu1, a, mu2, b), rel=1e-6, abs=1e-6)


def test_frechet_identical_statistics_is_zero():
    rng = np.random.default_rng(2)
    mu, sigma = fid.statistics(rng.normal(size=(500, 32)) @ rng.normal(size=(32, 32)))
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_singular_covariance_is_finite_and_silent():
    rng = np.random.default_rng(3)
    D = 32
    mu1, s1 = fid.statistics(rng.normal(size=(10, D)))            # rank 9 < D
    mu2, s2 = fid.statistics(rng.normal(size=(10, D)))
    s1[:, 0] = s1[0, :] = 0.0                                      # and a dead feature
    with warnings.catch_warnings():
        warnings.simplefilter("error")                             # no scipy warnings leak out
        got = fid.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(got) and got > 0


def test_frechet_large_imaginary_part_raises():
    # sqrtm(diag(-1, 1)) = diag(i, 1): not a valid covariance product
    with pytest.raises(ValueError, match="imaginary"):
        fid.frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))


def test_frechet_shape_mismatch_raises():
    with pytest.raises(ValueError):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError):
        fid.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))


def test_statistics_and_fid_from_features():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(200, 5))
    mu_np, sigma_np = fid.statistics(x)
    mu_t, sigma_t = fid.statistics(torch.from_numpy(x).float())
    assert mu_np.shape == (5,) and sigma_np.shape == (5, 5) and mu_t.dtype == np.float64
    np.testing.assert_allclose(sigma_np, np.cov(x, rowvar=False))
    np.testing.assert_allclose(mu_t, mu_np, atol=1e-6)
    assert fid.fid_from_features(x, mu_np, sigma_np) == pytest.approx(0.0, abs=1e-6)


def _clusters(centres: torch.Tensor, n_per: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([c + 0.1 * torch.randn(n_per, centres.shape[1], generator=g) for c in centres])


def test_precision_recall_identical_and_far():
    real = torch.randn(300, 8, generator=torch.Generator().manual_seed(5))
    assert fid.precision_recall(real, real.clone(), k=3, batch_size=64) == (1.0, 1.0)
    assert fid.precision_recall(real, real + 100.0, k=3, batch_size=64) == (0.0, 0.0)


def test_precision_recall_half_the_modes():
    centres = 10.0 * torch.eye(4)                                   # 4 well-separated modes
    real = _clusters(centres, 200, seed=6)                          # all 4 modes
    fake = _clusters(centres[:2], 400, seed=7)                      # only modes 0 and 1
    p, r = fid.precision_recall(real, fake, k=3, batch_size=128)
    assert isinstance(p, float) and isinstance(r, float)
    # k-NN balls miss a few boundary points in 4-D, so "~1" and "~0.5" come out ~0.94 and ~0.47
    assert p > 0.9
    assert 0.42 < r <= 0.5
    # numpy float64 features and an explicit device give the same counts
    assert fid.precision_recall(real.double().numpy(), fake, k=3, batch_size=128, device="cpu") == (p, r)


def test_featurenet_shapes_and_extract_restores_mode():
    cfg = fid.FeatureNetConfig(width=8, feat_dim=16, img_size=16)
    net = fid.FeatureNet(cfg)
    x = torch.rand(5, 1, 16, 16) * 2 - 1                            # (B, C, H, W) in [-1, 1]
    net.eval()
    logits, feats = net.forward_both(x)
    assert logits.shape == (5, 10) and feats.shape == (5, 16)
    assert net(x).shape == (5, 10) and net.features(x).shape == (5, 16)

    net.train()
    f, l = fid.extract(net, x, batch_size=2)                        # 3 batches
    assert net.training
    assert f.shape == (5, 16) and l.shape == (5, 10)
    assert f.dtype == torch.float32 and f.device.type == "cpu"
    net.eval()
    torch.testing.assert_close(f, feats)
    torch.testing.assert_close(l, logits)
    fid.extract(net, x)
    assert not net.training


def test_kid_is_the_unbiased_mmd_with_a_standard_error_that_matches_its_spread():
    """KID (Binkowski et al. 2018): the unbiased MMD^2 under (x.y / D + 1)^3 equals the double loop; over
    repeated draws its mean is ~0 for one distribution and its standard error matches the spread of a
    shifted pair (first-order U-statistic variance)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 3, generator=g).double(), torch.randn(30, 3, generator=g).double() + 1
    k = lambda u, v: (u @ v / 3 + 1) ** 3
    mean_k = lambda u, v, same: sum(k(u[i], v[j]) for i in range(len(u)) for j in range(len(v))
                                    if not (same and i == j)) / (len(u) * (len(v) - same))
    assert fid.kid(a, b)[0] == pytest.approx((mean_k(a, a, 1) + mean_k(b, b, 1) - 2 * mean_k(a, b, 0)).item(), rel=1e-9)
    same = torch.tensor([fid.kid(torch.randn(150, 4, generator=g), torch.randn(150, 4, generator=g))[0] for _ in range(30)])
    assert abs(same.mean()) < 3 * same.std() / 30 ** 0.5                      # unbiased: no positive offset
    shifted = [fid.kid(torch.randn(300, 4, generator=g), torch.randn(300, 4, generator=g) + 0.3) for _ in range(30)]
    values, ses = torch.tensor([v for v, _ in shifted]), torch.tensor([s for _, s in shifted])
    assert values.mean() > 5 * values.std() / 30 ** 0.5                       # a shift is seen
    assert 0.6 < ses.mean() / values.std() < 1.6                              # the standard error matches the spread
    with pytest.raises(ValueError):
        fid.kid(a[:1], b)
