"""Known-answer tests for vqgan.py (tiny, CPU, a few seconds)."""

import io

import pytest
import torch

from vqgan import (PatchDiscriminator, VectorQuantizer, VQConfig, VQModel, codebook_stats,
                   hinge_d_loss, hinge_g_loss)


def _vq(K: int, D: int, weight: torch.Tensor | None = None, **kw) -> VectorQuantizer:
    """A quantizer with a hand-made codebook (no data-dependent init)."""
    vq = VectorQuantizer(K, D, **kw)
    if weight is not None:
        with torch.no_grad():
            vq.embedding.weight.copy_(weight)
    vq.initialized.fill_(True)
    return vq


def test_shapes():
    torch.manual_seed(0)
    model = VQModel(VQConfig())
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    x_rec, codes, vq_loss, z_e = model(x)
    assert x_rec.shape == (2, 1, 32, 32)
    assert codes.shape == (2, 8, 8) and codes.dtype == torch.long
    assert z_e.shape == (2, 32, 8, 8) and vq_loss.dim() == 0
    assert model.grid == 8 and model.num_tokens == 64
    assert model.tokenize(x).shape == (2, 64)


def test_straight_through_is_identity():
    torch.manual_seed(0)
    vq = _vq(8, 4, torch.randn(8, 4))
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    w = torch.randn(2, 4, 3, 3)

    def loss_fn(z):  # non-linear, so the gradient depends on the value it is taken at
        return ((z * w) ** 2).sum()

    z_q_st, codes, _ = vq(z_e)
    g_e, = torch.autograd.grad(loss_fn(z_q_st), z_e)
    z_q = vq.codes_to_vectors(codes).detach().requires_grad_(True)
    g_q, = torch.autograd.grad(loss_fn(z_q), z_q)
    assert torch.allclose(z_q_st, z_q, atol=1e-6)  # forward value is the code vector
    assert torch.allclose(g_e, g_q, atol=1e-6)  # gradient passes through unchanged


def test_nearest_code_known_answer():
    e = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])  # (K=4, D=2)
    vq = _vq(4, 2, e)
    pts = torch.tensor([[0.9, 0.1], [0.1, 0.2], [-0.2, 0.8], [-2.0, -0.5]])  # (4, D)
    z_e = pts.t().reshape(1, 2, 2, 2)  # (B=1, D=2, H=2, W=2), row-major positions
    z_q, codes, _ = vq(z_e)
    assert codes.flatten().tolist() == [1, 0, 2, 3]
    assert torch.allclose(z_q.permute(0, 2, 3, 1).reshape(4, 2), e[[1, 0, 2, 3]])


def test_cosine_lookup_differs_from_l2():
    e = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    z_e = torch.tensor([0.3, 0.2]).view(1, 2, 1, 1)
    assert _vq(2, 2, e).nearest(z_e).item() == 1  # closest in L2
    assert _vq(2, 2, e, l2_norm_codes=True).nearest(z_e).item() == 0  # closest in angle


def test_loss_is_one_plus_beta_mse():
    torch.manual_seed(0)
    beta = 0.25
    vq = _vq(16, 8, torch.randn(16, 8), beta=beta)
    z_e = torch.randn(3, 8, 4, 4, requires_grad=True)
    z_q_st, codes, loss = vq(z_e)
    z_q = vq.codes_to_vectors(codes)
    expected = (1 + beta) * ((z_e - z_q) ** 2).mean()
    assert torch.allclose(loss, expected, rtol=1e-5)


def test_first_training_forward_seeds_codebook_from_data():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4)
    z_e = torch.randn(2, 4, 4, 4) * 3 + 5
    vq.train()
    vq(z_e)
    rows = z_e.permute(0, 2, 3, 1).reshape(-1, 4)
    assert bool(vq.initialized)
    assert torch.cdist(vq.embedding.weight.detach(), rows).min(1).values.max() < 0.05


def test_dead_code_restart():
    torch.manual_seed(0)
    e = torch.cat([torch.eye(4) * 10, torch.full((4, 4), 100.0)])  # codes 4..7 are far away
    vq = _vq(8, 4, e)
    vq.train()
    z_e = (torch.eye(4) * 10 + 0.1 * torch.randn(4, 4)).t().reshape(1, 4, 2, 2)  # uses 0..3
    _, codes, _ = vq(z_e)
    assert sorted(codes.flatten().tolist()) == [0, 1, 2, 3]
    assert vq.usage.tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    vq.eval()
    vq(z_e)  # eval mode does not count
    assert vq.usage.sum().item() == 4
    before = vq.embedding.weight.detach().clone()
    z_flat = torch.randn(50, 4) * 2 - 7  # (M, D) "current batch" encoder outputs
    n = vq.restart_dead_codes(z_flat)
    after = vq.embedding.weight.detach()
    assert n == 4
    assert torch.equal(after[:4], before[:4])  # used codes untouched
    assert torch.cdist(after[4:], z_flat).min(1).values.max() < 0.05  # re-seeded from rows
    assert vq.usage.sum().item() == 0
    assert vq.restart_dead_codes(z_flat, min_usage=0.0) == 0


def test_tokenize_detokenize_round_trip():
    torch.manual_seed(0)
    model = VQModel(VQConfig())
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    model.train()
    model(x)  # data-dependent codebook init
    usage = model.vq.usage.clone()
    tokens = model.tokenize(x)
    assert torch.equal(model.vq.usage, usage)  # tokenize has no side effects
    model.eval()
    tokens = model.tokenize(x)
    assert tokens.shape == (3, 64) and tokens.dtype == torch.long
    assert 0 <= tokens.min() and tokens.max() < model.cfg.codebook_size
    z_q, codes, _, _ = model.encode(x)
    assert torch.equal(tokens, codes.flatten(1))
    images = model.detokenize(tokens)
    assert images.shape == (3, 1, 32, 32)
    assert images.min() >= -1 and images.max() <= 1
    with torch.no_grad():
        ref = model.decode(z_q).clamp(-1, 1)
    assert torch.allclose(images, ref, atol=1e-5)


def test_checkpoint_round_trip_weights_only():
    torch.manual_seed(0)
    model = VQModel(VQConfig(ch=8))
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    model(x)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict()}, buf)
    buf.seek(0)
    clone = VQModel(VQConfig(ch=8))
    clone.load_state_dict(torch.load(buf, weights_only=True)["model"])
    model.eval(), clone.eval()
    assert torch.equal(model.tokenize(x), clone.tokenize(x))


def test_hinge_losses_known_answer():
    real = torch.tensor([2.0, 0.0, -1.0])  # relu(1 - r) = [0, 1, 2]
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + f) = [0, 1, 2]
    assert hinge_d_loss(real, fake).item() == pytest.approx(1.0)
    assert hinge_g_loss(fake).item() == pytest.approx(1.0 / 3.0)


def test_patch_discriminator_shape():
    disc = PatchDiscriminator(1, 8)
    logits = disc(torch.randn(2, 1, 32, 32))
    assert logits.shape == (2, 1, 8, 8)


def test_codebook_stats_known_answer():
    s = codebook_stats(torch.arange(4).repeat(5), 8)  # 4 of 8 codes, uniformly
    assert s["usage"] == pytest.approx(0.5) and s["perplexity"] == pytest.approx(4.0)
    s = codebook_stats(torch.full((3, 2, 2), 5), 8)  # one code
    assert s["usage"] == pytest.approx(1 / 8) and s["perplexity"] == pytest.approx(1.0)


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = VQModel(VQConfig(ch=8, codebook_size=16, code_dim=8))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    losses = []
    for _ in range(20):
        x_rec, _, vq_loss, _ = model(x)
        loss = ((x_rec - x) ** 2).mean() + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def _ddp_worker(rank: int, world: int, port: int, out: dict) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(rank)  # each rank sees different encoder outputs
    vq = VectorQuantizer(8, 4)
    vq.train()
    vq(torch.randn(1, 4, 2, 2) + 10 * rank)  # data-dependent init, then usage
    vq.restart_dead_codes(torch.randn(16, 4) + 10 * rank)
    out[rank] = vq.embedding.weight.detach().clone()
    torch.distributed.destroy_process_group()


def test_codebook_stays_identical_across_ranks():
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2)
    assert torch.equal(out[0], out[1])
