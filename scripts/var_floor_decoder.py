"""Is the VAR's floor set by its decoder or by its tokens? (issue 33: the floor must be <= 1/3 of the best row.)

Fine-tunes only the multi-scale tokenizer's decoder G of a run folder (encoder, codebook and phi convs frozen, so the
token maps, var.pt and every policy stay valid) with experiments/var.py's msvq loss, |x - G(f_hat)| + (x - G(f_hat))^2 +
vq_perceptual * L_P, plus an optional hinge patch-GAN term (vqgan.PatchDiscriminator, weight --gan). Every --every steps
it decodes the same two sets again and prints each judge's distance for both and their ratio:
  - the floor: the tokenizer's reconstructions of the first --samples test images (sample.recon_reference);
  - a generated row: --samples token maps of VAR's defaults at --w-max (balanced labels, seed 1).
Nothing is written to the run folder (the fine-tuned decoder is thrown away).

    python scripts/var_floor_decoder.py --run-dir runs/small --steps 500 --every 250 [--gan 0.1]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the project's root

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import data  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
import var  # noqa: E402
import vqgan  # noqa: E402
from experiments import var as xvar  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--run-dir", required=True)
p.add_argument("--steps", type=int, default=500)
p.add_argument("--every", type=int, default=250)
p.add_argument("--lr", type=float, default=2e-4)
p.add_argument("--gan", type=float, default=0.0, help="hinge GAN weight (0: none)")
p.add_argument("--samples", type=int, default=2000)
p.add_argument("--w-max", type=float, default=4.0)
args = p.parse_args()
torch.manual_seed(0)
dev = torch.device("cpu")
pipe = xvar.VARPipeline(args.run_dir, dev)
ref, c = sample.EvalReferences(pipe), train.load_config(args.run_dir)
labels = train.balanced_labels(args.samples, pipe.cfg.num_classes)
codes = pipe.generate(labels, var.table_schedule(var.default_table(xvar.K, args.w_max)), seed=1)   # (n, L), kept
KEYS = ("fid", "fid2", "fd_ssl", "kid_ssl")


def report(step: int) -> None:
    pipe.vq.eval()
    floor, row = sample.recon_reference(ref, args.samples), sample.metrics(ref, pipe.decode(codes), labels)
    print(f"| {step} | " + " | ".join(f"{floor[k]:.4g} / {row[k]:.4g} ({floor[k] / row[k]:.2f})" for k in KEYS)
          + f" | {floor['recall']:.3f} / {row['recall']:.3f} |", flush=True)


print(f"decoder steps | {' | '.join(f'{k}: floor / row (ratio)' for k in KEYS)} | recall floor / row")
print("|---" * (len(KEYS) + 2) + "|")
report(0)
G, model = pipe.vq.decoder, pipe.vq
model.requires_grad_(False)
G.requires_grad_(True)
opt = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.5, 0.9))
D = vqgan.PatchDiscriminator(c.channels).to(dev)
opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.5, 0.9))
x_train = data.load_dataset(c.data, "train", c.img_size, c.channels, c.seed)[0]
g = torch.Generator().manual_seed(5)
it = data.batches(x_train, torch.zeros(len(x_train), dtype=torch.long), c.vq_batch, g, infinite=True)
percep = train.feature_maps(train.build_model(args.run_dir, "backbone", dev).requires_grad_(False), grad=True)[0]
for step in range(1, args.steps + 1):
    x = train.augment(data.to_float(next(it)[0]), g)
    G.train()
    with torch.no_grad():
        f_hat, fx = model.quant(model.encoder(x))[0], percep(x)        # the frozen tokens' f_hat (B, C_vae, H, H)
    x_rec = G(f_hat)
    loss = (x_rec - x).abs().mean() + F.mse_loss(x_rec, x) + c.vq_perceptual * vqgan.perceptual_loss(fx, percep(x_rec))
    if args.gan > 0:
        loss = loss + args.gan * vqgan.hinge_g_loss(D(x_rec))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if args.gan > 0:
        d_loss = vqgan.hinge_d_loss(D(x), D(x_rec.detach()))
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
    if step % args.every == 0:
        report(step)
