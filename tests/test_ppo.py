"""ppo.py against hand computations."""
import math

import pytest
import torch

import ppo


def test_ppo_loss_by_hand():
    logp_new = torch.tensor([0.0, math.log(1.5), math.log(0.5)])
    logp_old = torch.zeros(3)
    adv = torch.tensor([1.0, 1.0, -1.0])
    value, ret = torch.tensor([0.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 0.0])
    entropy = torch.full((3,), 2.0)
    loss, s = ppo.ppo_loss(logp_new, logp_old, adv, value, ret, entropy, clip=0.2, vf_coef=0.5, ent_coef=0.01)
    # rho = 1, 1.5, 0.5: min(rho A, clip(rho) A) = 1, 1.2 (clipped), -0.8 (clipped) -> pg = -(1.4)/3
    pg = -(1.0 + 1.2 - 0.8) / 3
    v = (1 + 0 + 1) / 3
    assert loss.item() == pytest.approx(pg + 0.5 * v - 0.01 * 2.0, abs=1e-6)
    assert s["pg_loss"] == pytest.approx(pg, abs=1e-6) and s["v_loss"] == pytest.approx(v, abs=1e-6)
    assert s["approx_kl"] == pytest.approx((0 + (0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 3, abs=1e-6)
    assert s["clipfrac"] == pytest.approx(2 / 3)


def test_normalise_and_explained_variance():
    R = torch.tensor([1.0, 2.0, 3.0, 6.0])
    n = ppo.normalise(R)
    assert n.mean().abs() < 1e-6 and n.std().item() == pytest.approx(1.0, abs=1e-5)
    assert ppo.explained_variance(n, n) == pytest.approx(1.0)
    assert ppo.explained_variance(torch.zeros(4), n) == pytest.approx(0.0, abs=1e-6)


def test_update_stops_at_target_kl():
    """A huge learning rate moves the policy far in the first epoch: the KL stop ends the update."""
    torch.manual_seed(0)
    mu = torch.zeros(1, requires_grad=True)
    o = torch.randn(64)
    logp_old = -0.5 * o ** 2
    adv = ppo.normalise(o)                                    # rewards larger actions
    ev = lambda idx: (-0.5 * (o[idx] - mu) ** 2, torch.zeros(len(idx)), torch.zeros(len(idx)))
    opt = torch.optim.SGD([mu], lr=10.0)
    s = ppo.ppo_update(ev, logp_old, adv, adv, opt, [mu], epochs=5, minibatches=1, target_kl=0.01, max_grad_norm=1e9)
    # the KL is measured before each minibatch's step: epoch 1 sees rho = 1, epoch 2 sees the jump
    assert s["stopped_early"] and s["epochs_run"] == 2 and mu.item() > 0
    mu.data.zero_()
    s = ppo.ppo_update(ev, logp_old, adv, adv, torch.optim.SGD([mu], lr=1e-3), [mu], epochs=5, minibatches=2,
                       target_kl=0.01)
    assert not s["stopped_early"] and s["epochs_run"] == 5


def test_normalise_floor_keeps_a_weak_signal_small():
    R = torch.tensor([0.50, 0.51, 0.49, 0.50])                   # a weak discriminator: rewards barely differ
    assert ppo.normalise(R).abs().max() > 1.0                    # plain std: as large as any strong signal
    n = ppo.normalise(R, floor=0.1)                              # floor 0.1 > std 0.008: (R - 0.5) / 0.1
    assert torch.allclose(n, (R - 0.5) / 0.1, atol=1e-5)
    big = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert torch.allclose(ppo.normalise(big, floor=0.1), ppo.normalise(big))   # a floor below the std changes nothing


def test_update_adds_the_penalty_and_can_run_unclipped():
    """An anchor c mu^2 alone (zero advantages) pulls mu back to 0: gradient 2 c mu, by hand."""
    mu = torch.tensor([1.0], requires_grad=True)
    zeros = torch.zeros(8)
    ev = lambda idx: (zeros[idx] + 0 * mu, torch.zeros(len(idx)), torch.zeros(len(idx)), 0.5 * (mu ** 2).sum())
    s = ppo.ppo_update(ev, zeros, zeros, zeros, torch.optim.SGD([mu], lr=0.1), [mu], epochs=1, minibatches=1,
                       target_kl=None, max_grad_norm=None)
    assert mu.item() == pytest.approx(1.0 - 0.1 * 2 * 0.5 * 1.0)     # one SGD step on 0.5 mu^2
    assert s["penalty"] == pytest.approx(0.5) and s["grad_norm"] == pytest.approx(1.0)
    mu.data.fill_(100.0)
    ppo.ppo_update(ev, zeros, zeros, zeros, torch.optim.SGD([mu], lr=0.1), [mu], epochs=1, minibatches=1,
                   target_kl=0, max_grad_norm=0)                  # 0: no clip (a clip of 1 would move it by 0.1)
    assert mu.item() == pytest.approx(100.0 - 0.1 * 100.0)
