"""reward.py: the projected discriminator learns an easy split; augmentation; reward range."""
import math

import torch

import reward


def test_discriminator_loss_decreases_on_an_easy_split():
    torch.manual_seed(0)
    B = 64
    real = torch.randn(B, 1, 1, 1).expand(B, 1, 16, 16).contiguous()         # smooth images
    fake = torch.randn(B, 1, 16, 16)                                         # pixel noise, same moments
    conv = torch.nn.Conv2d(1, 8, 3, stride=2, padding=1).requires_grad_(False)
    backbone = lambda x: [x, conv(x)]
    D = reward.ProjectedDiscriminator([1, 8], num_classes=2, width=16)
    opt = torch.optim.Adam(D.parameters(), 1e-3, betas=(0.5, 0.999))
    y = torch.randint(0, 2, (B,))
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        loss = reward.d_loss(D(backbone(reward.diff_augment(real, g)), y), D(backbone(reward.diff_augment(fake, g)), y))
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    assert losses[0] > 1.3 and sum(losses[-10:]) / 10 < losses[0] - 0.2
    with torch.no_grad():
        lr, lf = D(backbone(real), y), D(backbone(fake), y)
    assert reward.accuracy(lr, lf) > 0.8
    r = reward.reward(lf)
    assert r.shape == (B,) and ((r > 0) & (r < 1)).all() and reward.reward(lr).mean() > r.mean()


def test_loss_at_zero_logits_is_2_log_2():
    z = [torch.zeros(4, 10), torch.zeros(4, 3)]
    assert abs(reward.d_loss(z, z).item() - 2 * math.log(2)) < 1e-6


def test_every_head_weighs_the_same():
    # head 1: 16 positions of logit 2, head 2: one position of logit -2 -> score 0 (not (32 - 2) / 17)
    logits = [torch.full((3, 16), 2.0), torch.full((3, 1), -2.0)]
    assert torch.allclose(reward.score(logits), torch.zeros(3))
    assert torch.allclose(reward.reward(logits), torch.full((3,), 0.5))
    # loss: mean over heads of each head's BCE, by hand
    real, fake = [torch.full((1, 4), 1.0), torch.full((1, 1), 3.0)], [torch.full((1, 4), -1.0), torch.full((1, 1), 0.0)]
    sp = lambda v: math.log1p(math.exp(v))
    by_hand = 0.5 * ((sp(-1.0) + sp(-1.0)) + (sp(-3.0) + sp(0.0)))
    assert abs(reward.d_loss(real, fake).item() - by_hand) < 1e-6


def test_scoring_in_eval_mode_leaves_the_discriminator_unchanged():
    torch.manual_seed(0)
    D = reward.ProjectedDiscriminator([2], num_classes=2, width=8)
    f, y = [torch.randn(5, 2, 4, 4)], torch.randint(0, 2, (5,))
    D.eval()
    with torch.no_grad():
        first = reward.score(D(f, y))
        again = reward.score(D(f, y))
    assert torch.equal(first, again)                     # training mode would step the spectral norms' power iteration


def test_diff_augment_translates_and_cuts_out():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(8, 1, 1, 1) + 1            # no zeros before augmenting
    out = reward.diff_augment(x, torch.Generator().manual_seed(0), shift=0.25, cutout=0.5)
    assert out.shape == x.shape
    for b in range(8):                                                       # every kept pixel is a shifted input pixel
        nz = out[b, 0][out[b, 0] != 0]
        assert len(nz) >= 4 and set(nz.tolist()) <= set(x[b, 0].flatten().tolist())
    assert (out == 0).any()                                                  # the cutout (or the zero fill) is there
    x.requires_grad_(True)
    reward.diff_augment(x).sum().backward()                                  # differentiable
    assert x.grad is not None


def test_fidelity_reward_blend_and_best_of():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([0, 2])
    r_fid = reward.fidelity_reward(logits, y)                                # log p(y | x)
    z = math.log(math.exp(2) + 1 + math.exp(-1))
    assert torch.allclose(r_fid, torch.tensor([2 - z, -math.log(3)]))
    r_adv = torch.tensor([0.3, 0.9])
    assert torch.equal(reward.blended_reward(r_adv, r_fid, torch.zeros(2)), r_adv)       # lam = 0: r_adv exactly
    assert torch.allclose(reward.blended_reward(r_adv, r_fid, torch.ones(2)), r_fid)
    assert torch.allclose(reward.blended_reward(r_adv, r_fid, torch.tensor([0.25, 0.5])),
                          torch.tensor([0.75 * 0.3 + 0.25 * (2 - z), 0.5 * 0.9 - 0.5 * math.log(3)]))
    scores = torch.tensor([0.1, 0.7, 0.2, 0.9, 0.3, 0.5])                    # 2 requests x 3 candidates
    assert reward.best_of(scores, 3).tolist() == [1, 3]
    assert reward.best_of(scores, 2).tolist() == [1, 3, 5]
    assert reward.best_of(scores, 1).tolist() == list(range(6))
