"""The run's frozen networks, trained once and then only read: classifiers (the FID network
`featnet`, the held-out judge `featnet2`, the discriminator's `backbone` and its wider, longer
variant `dnet`) and self-supervised SimCLR networks (simclr.py: the held-out judge `featssl`, the
discriminator candidate `dssl`). Each is a fid.FeatureNet; a SimCLR network's classifier layer is
its projection head g (num_classes = the projection width) and its FID features are f's
penultimate layer, as a classifier's are.

Judges and players: the FID network makes every choice (w_0, searches, checkpoints, on training
statistics); featnet2 and featssl judge the claims on the test set and are read by nothing else;
the discriminator sits on `backbone`, `dnet` or `dssl` (config pi_d_nets), never on a judge.
"""
import os

import torch
import torch.nn.functional as F

import data
import ddp
import fid
import runs
import simclr
from config import TrainConfig
from train_helpers import augment, lr_at


def setup(c: TrainConfig, run_dir: str, device: torch.device, name: str, outputs: int | None, sizes: dict, lr: float,
          batch: int, batch_key: str, seed_offset: int) -> tuple:
    """What a frozen network's training starts from: the training and test sets, a fid.FeatureNet of the
    given sizes (outputs: its classifier width, None: the number of classes), its Adam, the checkpoint
    state (resumed if there is one) and this rank's batch stream."""
    x_train, y_train, num_classes = data.load_dataset(c.data, "train", c.img_size, c.channels, c.seed)
    x_test, y_test, _ = data.load_dataset(c.data, "test", c.img_size, c.channels, c.seed)
    cfg = fid.FeatureNetConfig(in_ch=c.channels, num_classes=outputs or num_classes, img_size=c.img_size, **sizes)
    torch.manual_seed(c.seed + seed_offset)
    model = fid.FeatureNet(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    modules = {"model": model, "optim": opt}
    path = os.path.join(run_dir, f"{name}.pt")
    state = {**runs.resume(path, runs.to_plain(cfg), modules), "config": runs.to_plain(cfg), "done": False}
    g = torch.Generator().manual_seed(ddp.rank_seed(c.seed + seed_offset + state["step"]))
    it = data.batches(x_train, y_train, runs.rank_batch(batch, batch_key), g, infinite=True)
    return x_train, y_train, x_test, y_test, model, opt, modules, path, state, g, it


def train_classifier(c: TrainConfig, run_dir: str, device: torch.device, log: runs.Logger, name: str, sizes: dict,
                     steps: int, seed_offset: int) -> None:
    """Train a fid.FeatureNet classifier of the given sizes into <name>.pt (Adam, flip + shift)."""
    x_train, y_train, x_test, y_test, model, opt, modules, path, state, g, it = setup(
        c, run_dir, device, name, None, sizes, c.feat_lr, c.feat_batch, "feat_batch", seed_offset)
    net = ddp.data_parallel(model, device)                    # (batch-norm statistics per rank, rank 0's buffers kept)

    def step_fn(step: int) -> dict:
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, steps, c.feat_lr, c.feat_warmup)
        xb, yb = next(it)
        x = augment(data.to_float(xb).to(device), g)
        dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()       # random shift by up to 2 pixels
        x = torch.roll(x, (dx, dy), dims=(2, 3))
        net.train()
        logits = net(x)
        loss = F.cross_entropy(logits, yb.to(device))
        loss_v = ddp.all_mean(loss.detach()).item()
        runs.check_finite(loss=loss_v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc = (logits.argmax(1).cpu() == yb).float().mean()
        return {"loss": loss_v, "acc": ddp.all_mean(acc.to(device)).item()}

    state = runs.train_loop(name, path, state, modules, step_fn, steps, c, log)
    _, logits = fid.extract(model, data.to_float(x_test), device=device)
    acc = (logits.argmax(1) == y_test).float().mean().item()
    state["metrics"] = {"test_acc": acc}
    state["done"] = True
    runs.save_ckpt(path, state)
    log(stage=name, final=True, test_acc=acc)
    print(f"{name}: test accuracy {acc:.4f}")


def train_simclr(c: TrainConfig, run_dir: str, device: torch.device, log: runs.Logger, name: str, sizes: dict,
                 seed_offset: int) -> None:
    """Train a fid.FeatureNet by SimCLR (simclr.nt_xent on two simclr.views of each image, no labels)
    into <name>.pt; report the k-NN (k = 20) test accuracy of its features (how much class they hold)."""
    x_train, y_train, x_test, y_test, model, opt, modules, path, state, g, it = setup(
        c, run_dir, device, name, c.ssl_proj, sizes, c.ssl_lr, c.ssl_batch, "ssl_batch", seed_offset)
    net = ddp.data_parallel(model, device)

    def step_fn(step: int) -> dict:
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, c.ssl_steps, c.ssl_lr, c.feat_warmup)
        x = data.to_float(next(it)[0]).to(device)                          # (B, C, H, W)
        net.train()
        z = net(torch.cat([simclr.views(x, g), simclr.views(x, g)]))       # (2B, ssl_proj): one forward, one sync
        loss = simclr.nt_xent(*z.chunk(2), tau=c.ssl_tau)
        loss_v = ddp.all_mean(loss.detach()).item()
        runs.check_finite(loss=loss_v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss_v}

    state = runs.train_loop(name, path, state, modules, step_fn, c.ssl_steps, c, log)
    f_train, _ = fid.extract(model, data.to_float(x_train), device=device)
    f_test, _ = fid.extract(model, data.to_float(x_test), device=device)
    acc = simclr.knn_accuracy(f_train, y_train, f_test, y_test)
    state["metrics"] = {"test_knn_acc": acc}
    state["done"] = True
    runs.save_ckpt(path, state)
    log(stage=name, final=True, test_knn_acc=acc)
    print(f"{name}: k-NN (k = 20) test accuracy of its features {acc:.4f}")
