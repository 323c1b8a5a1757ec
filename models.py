"""Trained models rebuilt from a run folder: any stage's network from its checkpoint alone (config +
weights), the policies, and the frozen feature maps the discriminator reads.

- `build_model`: vq, the frozen networks (FROZEN_NETS: classifiers and SimCLR networks), nat, flow / vp;
- `build_policy`, `load_policy`: a policy checkpoint's policy (its best or its last weights) and critic;
- `classifier_backbone`, `d_backbone`: a frozen network's pooled feature maps; the discriminator's
  backbone (D_NETS, several joined by "+"), never a judge (JUDGES).

Usage:
    vq = build_model("runs/small", "vq", torch.device("cpu"))
    backbone, channels = d_backbone("runs/small", "backbone", (0, 1, 2), torch.device("cpu"))
"""
import os

import torch

import fid
import flow_net
import nat
import policy
import runs
import samplers
import vqgan


FROZEN_NETS = ("featnet", "featnet2", "featssl", "backbone", "dnet", "dssl")   # fid.FeatureNet checkpoints (frozen_nets.py)


JUDGES = ("featnet", "featnet2", "featssl")     # the FID network (choices) and the held-out judges: never D's backbone


def build_model(run_dir: str, stage: str, device: torch.device, weights: str = "model") -> torch.nn.Module:
    """Rebuild a finished stage's model from its checkpoint alone (config + weights), in eval mode.

    stage: "vq", one of FROZEN_NETS, "nat", "flow" or "vp"; weights: "model" or "ema" (the
    generators' EMA weights)."""
    path = os.path.join(run_dir, f"{stage}.pt")
    ck = runs.load_ckpt(path)
    if not ck.get("done"):
        raise runs.UserError(f"{path} is unfinished (step {ck.get('step')}): finish it with python train.py --run-dir {run_dir}")
    cfg = ck["config"]
    try:
        if stage == "vq":
            model = vqgan.VQModel(vqgan.VQConfig(**{**cfg, "ch_mult": tuple(cfg["ch_mult"])}))
        elif stage in FROZEN_NETS:
            model = fid.FeatureNet(fid.FeatureNetConfig(**cfg))
        elif stage in samplers.PATHS:                                   # flow.pt, vp.pt
            model = flow_net.FlowTransformer(flow_net.FlowConfig(**cfg), nat.Block)
        else:
            model = nat.NAT(nat.NATConfig(**cfg))
        model.load_state_dict(ck[weights])
    except (TypeError, KeyError, RuntimeError) as e:
        raise runs.UserError(f"{path} does not match this code's {stage} model ({type(e).__name__}: {str(e)[:120]}); "
                        f"delete it to retrain that stage") from None
    return model.to(device).eval()


def build_policy(cfg: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(policy, critic) for a policy_config: adaptive network pair, or the static table pair."""
    D = len(cfg["spec"])                                         # the actions' names: 4 (NAT) or 2 (ODE sampler)
    if cfg["kind"] == "static":
        return policy.StaticPolicy(cfg["T"], out_dim=D), policy.StaticPolicy(cfg["T"], out_dim=1)
    make = lambda out: policy.AdaptivePolicy(cfg["T"], cfg["C"], cfg["N"], cfg["pi_width"], hidden=cfg["pi_hidden"], out_dim=out)
    return make(D), make(1)


def load_policy(path: str, device: torch.device, weights: str = "best") -> tuple[torch.nn.Module, dict]:
    """The policy of a finished policy checkpoint and its config: weights "best" (by the FID network's
    training-set FID) or "model" (the last iterate)."""
    ck = runs.load_ckpt(path)
    if not ck.get("done"):
        raise runs.UserError(f"{path} is unfinished (iteration {ck.get('step')}): finish it with python train.py")
    try:
        pi, _ = build_policy(ck["config"])
        pi.load_state_dict(ck[weights])
    except (TypeError, KeyError, RuntimeError) as e:
        raise runs.UserError(f"{path} does not match this code's policy ({type(e).__name__}: {str(e)[:120]}); "
                        f"delete it to retrain that stage") from None
    return pi.to(device).eval(), ck["config"]


def classifier_backbone(net: fid.FeatureNet, grad: bool = False, taps: tuple = (0, 1, 2)):
    """A frozen classifier as the discriminator's backbone (and the tokenizer's perceptual
    network): x -> its feature maps after the chosen pooling stages (0, 1, 2: (B, w, S/2, S/2),
    (B, 2w, S/4, S/4), (B, 4w, S/8, S/8)), and their channel counts; gradients flow to x only
    with grad=True. (A discriminator on the frozen VQ encoder reaches only ~55% held-out accuracy.)"""
    layers = list(net.body)
    pools = [i for i, layer in enumerate(layers) if isinstance(layer, (torch.nn.MaxPool2d, torch.nn.AvgPool2d))]
    keep = {pools[k] for k in taps}
    w = net.cfg.width

    def backbone(x: torch.Tensor) -> list[torch.Tensor]:
        feats, h = [], x
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            for i, layer in enumerate(layers[:max(keep) + 1]):
                h = layer(h)
                if i in keep:
                    feats.append(h)
        return feats
    return backbone, [[w, 2 * w, 4 * w][k] for k in sorted(taps)]


D_NETS = ("backbone", "dnet", "dssl")      # the frozen networks the discriminator may sit on (never a judge)


def d_backbone(run_dir: str, nets: str, taps: tuple, device: torch.device):
    """The discriminator's frozen backbone: the feature maps at `taps` of each network named in
    `nets` ("+"-separated, e.g. "backbone+dssl": heads on several backbones), concatenated as one
    list, and their channel counts."""
    names = nets.split("+")
    parts = [classifier_backbone(build_model(run_dir, n, device), taps=taps) for n in names]
    return (lambda x: [f for fn, _ in parts for f in fn(x)]), [ch for _, chs in parts for ch in chs]
