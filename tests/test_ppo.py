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
