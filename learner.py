"""What Algorithm 1 (train.py: `algorithm1`, `train_policy`) works on, built from a run folder.

AdaNAT §4.2 casts decoding as an MDP: the state s_t is the generator's features at step t, the
action a_t the step's schedule knobs (the NAT: mask ratio m, temperatures tau1, tau2, guidance w);
AdaGen §III applies the same to an ODE sampler (experiments/flow_train.py: `flow_task`). Here:
  PolicyTask   a paradigm's MDP as callables: generate with a schedule, decode to images, the
               start schedule h (the policy learns a residual eta_phi on it), D's reals;
  nat_task     the NAT's task for T decoding steps;
  Learner      the policy pi (eta_phi), critic V, discriminator D (reward.py, on the frozen
               backbone classifier), their optimisers; `build_learner`, `fidelity_base` (AdaGen §III-F2);
  reward_hook  the reward R from D's score r_adv (AdaNAT Eq. 13), or a variant: the fidelity
               blend (AdaGen Eq. 15), the fixed classifier reward, minus a chunk's FID (AdaGen §III-D).
"""
import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import data
import ddp
import evaluation
import fid
import models
import nat
import pipeline
import policy
import reward
import runs
import schedules
from config import TrainConfig


def policy_config(c: TrainConfig, kind: str, T: int, h: torch.Tensor, C: int, N: int) -> dict:
    """What a policy checkpoint needs to be rebuilt and resumed: the kind, T, the heuristic
    table its residual starts from, the network sizes and the training hyper-parameters."""
    return {"kind": kind, "T": T, "heuristic": h.tolist(), "C": C, "N": N,
            "beta_ema": c.pi_beta_ema if kind == "smooth" else 0.0,
            **{k: v for k, v in runs.to_plain(c).items() if k.startswith("pi_") and k not in ("pi_T", "pi_beta_ema")}}


def start_table(pipe, start: str, T: int, w_0: float) -> torch.Tensor:
    """The (T, 4) schedule a policy's zero residual reproduces: AdaNAT's heuristic (tau2_0 = 1,
    w = w_0 t/T), or a finished AutoNAT search of this run ("search": the free table, "param":
    the family), AdaNAT's "residual on the best hand-made schedule" taken one step further."""
    if start == "heuristic":
        return nat.heuristic_table(T, nat.ADANAT_TAU2_0, w_0)
    found = schedules.searched_table(pipe, start, T)
    if found is None:
        stage = "search" if start == "search" else "param-search"
        raise runs.UserError(f"pi_start={start}: {pipe.run_dir} has no finished {start}_T{T}.pt; run python train.py "
                        f"--run-dir {pipe.run_dir} --stage {stage} --set search_T={T} first")
    table, cfg, _ = found
    if cfg["generator"] != pipe.fingerprint:
        print(f"warning: {start}_T{T}.pt was searched on other weights or numerics ({cfg['generator']})")
    return table.float()


@dataclass
class PolicyTask:
    """What the PPO loop needs from a paradigm (the NAT, or an ODE sampler on the flow generator)."""
    name: str                  # checkpoint / log name, e.g. policy_T8, flow_policy_nfe4
    T: int                     # steps, i.e. decisions per trajectory
    spec: policy.ActionSpec
    h: torch.Tensor            # (T, D) the schedule a zero residual reproduces
    start: str                 # what h is, for the log
    C: int                     # the generator's feature width and number of positions (B, N, C)
    N: int
    num_classes: int
    generate: Callable         # (labels (B,), schedule, generator g, group G) -> final (B, ...) on the device
    to_images: Callable        # final -> images (B, C, H, W) in [-1, 1] on the device
    fid_images: Callable       # (labels, schedule) -> images on the CPU (seed 0), for the training-set FID
    reals: Callable            # () -> (x (n, C, H, W) float CPU, y (n,)): what D calls real
    to_step: Optional[Callable] = None   # policy.PolicySchedule's to_step (the ODE sampler's [f, w] -> (t', w))
    extra: dict = dataclasses.field(default_factory=dict)   # recorded in the policy's config


def real_images(c: TrainConfig, n: int = 11000) -> tuple[torch.Tensor, torch.Tensor]:
    """n random training images (float, [-1, 1]) and labels: the discriminator's reals."""
    x_train, y_train, _ = data.load_dataset(c.data, "train", c.img_size, c.channels, c.seed)
    pick = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(c.seed + 5))[:n]
    return data.to_float(x_train[pick]), y_train[pick]


def nat_task(c: TrainConfig, run_dir: str, device: torch.device, kind: str, T: int):
    """(task, pipeline, RealFeatures) of the NAT MDP for T decoding steps (AdaNAT)."""
    pipe = pipeline.Pipeline(run_dir, device, c.bf16, rows=c.gen_rows)
    ref = evaluation.RealFeatures.of(pipe)
    w_0 = pipeline.get_w0(pipe, ref, c.pi_sweep_samples)
    cfg = pipe.cfg

    def reals():                                    # raw training images, or (pi_d_real = recon) their reconstructions
        x, y = real_images(c)
        if c.pi_d_real == "recon":
            x = evaluation.reconstruct(pipe.vq, x, device)
        return x, y

    task = PolicyTask(
        name=schedules.policy_file(kind, c.pi_start, T, c.pi_reward), T=T, spec=policy.NAT_ACTIONS, h=start_table(pipe, c.pi_start, T, w_0),
        start=f"{schedules.PI_STARTS[c.pi_start]} (w_0 = {w_0:g})", C=cfg.dim, N=cfg.num_tokens, num_classes=cfg.num_classes,
        generate=lambda y, sched, g, G: nat.generate(pipe.logits_fn, y, T, sched, cfg.mask_id, cfg.num_tokens,
                                                     cfg.null_label, g, group=G),
        to_images=pipe.vq.detokenize,
        fid_images=lambda y, sched: pipe.decode(pipe.generate(y, T, sched, seed=0)),
        reals=reals)
    return task, pipe, ref


@dataclass
class Learner:
    """What Algorithm 1 trains and reads, for one task: the policy pi (eta_phi) and critic V, the
    discriminator D (r_psi) on the frozen backbone classifier, their optimisers, D's reals."""
    c: TrainConfig
    task: PolicyTask
    device: torch.device
    pi: torch.nn.Module
    V: torch.nn.Module
    D: reward.ProjectedDiscriminator
    opt: torch.optim.Optimizer
    d_opt: torch.optim.Optimizer
    classifier: torch.nn.Module          # the frozen backbone classifier (r_fid's logits)
    backbone: Callable                   # images -> D's frozen feature maps (pi_d_nets at pi_d_taps)
    h_pre: torch.Tensor                  # (T, D) pre-activations of the start schedule
    active: torch.Tensor                 # (T, D) knobs that act
    beta_ema: float
    B: int                               # this rank's trajectories per iteration
    base: Optional[torch.nn.Module] = None   # the fidelity blend's frozen main policy
    x_real: Optional[torch.Tensor] = None    # (n, C, H, W) D's reals and their labels y_real (n,) ...
    y_real: Optional[torch.Tensor] = None
    f_hold: Optional[list] = None            # ... and 1 000 held-out reals as the backbone's feature maps, labels y_hold
    y_hold: Optional[torch.Tensor] = None

    def __post_init__(self):
        self.pi_dp, self.V_dp, self.D_dp = (ddp.data_parallel(m, self.device) for m in (self.pi, self.V, self.D))

    def schedule(self, sigma: float = 0.0, g: Optional[torch.Generator] = None, lam=None) -> policy.PolicySchedule:
        """The policy as a schedule: the mean (sigma = 0) or exploring; with lam, blended with base (Eq. 14)."""
        return policy.PolicySchedule(self.pi, self.h_pre, sigma, self.beta_ema, g, spec=self.task.spec,
                                     to_step=self.task.to_step, base=self.base if lam is not None else None, lam=lam)

    def explore(self, sigma: float, g: torch.Generator):
        """B trajectories' labels (groups of pi_group share one; the blend's lam per group) and the generator."""
        G = self.c.pi_group
        y = torch.randint(0, self.task.num_classes, (self.B // G,), device=self.device, generator=g).repeat_interleave(G)
        lam = None
        if self.base is not None:
            lam = torch.rand(self.B // G, device=self.device, generator=g).repeat_interleave(G)
        return y, lam, lambda y_, sched: self.task.generate(y_, sched, g, G)


def build_learner(c: TrainConfig, run_dir: str, device: torch.device, kind: str, task: PolicyTask) -> tuple:
    """(Learner, its checkpoint config, modules to checkpoint) for a policy of `kind` on `task`."""
    T, spec = task.T, task.spec
    pcfg = {**policy_config(c, kind, T, task.h, task.C, task.N), "spec": list(spec.names), **task.extra}
    pi, V = (m.to(device) for m in models.build_policy(pcfg))
    classifier = models.build_model(run_dir, "backbone", device)                 # r_fid's classifier
    for name in c.pi_d_nets.split("+"):
        if not os.path.exists(os.path.join(run_dir, f"{name}.pt")):
            raise runs.UserError(f"pi_d_nets={c.pi_d_nets}: {run_dir}/{name}.pt is missing; train it with python train.py "
                                 f"--run-dir {run_dir} --stage {name}")
    backbone, channels = models.d_backbone(run_dir, c.pi_d_nets, c.pi_d_taps, device)   # D's frozen backbone
    D = reward.ProjectedDiscriminator(channels, task.num_classes).to(device)
    base = fidelity_base(run_dir, device, task, pcfg, (pi, V, D)) if kind == "fidelity" else None
    B = runs.rank_batch(c.pi_batch, "pi_batch")                                   # this rank's trajectories
    if B % c.pi_group:
        raise runs.UserError(f"pi_group {c.pi_group} must divide each process's share of pi_batch ({B} of {c.pi_batch})")
    opt = torch.optim.Adam(list(pi.parameters()) + list(V.parameters()), lr=c.pi_static_lr if kind == "static" else c.pi_lr)
    d_opt = torch.optim.Adam(D.parameters(), lr=c.pi_d_lr, betas=(0.5, 0.999))
    L = Learner(c, task, device, pi, V, D, opt, d_opt, classifier, backbone, policy.inverse_activation(task.h, spec).to(device),
                spec.active(T, device), pcfg["beta_ema"], B, base)
    modules = {"model": pi, "critic": V, "disc": D, "optim": opt, "d_optim": d_opt}
    return L, pcfg, modules


def fidelity_base(run_dir: str, device: torch.device, task: PolicyTask, pcfg: dict, nets: tuple) -> torch.nn.Module:
    """AdaGen §III-F2: the frozen adaptive policy the fidelity policy is blended with (Eq. 14); a new
    fidelity policy, its critic and D start as copies of the adaptive policy's."""
    base_name = task.name.replace("fidelity", "policy", 1)
    base_path = os.path.join(run_dir, f"{base_name}.pt")
    if not os.path.exists(base_path):
        raise runs.UserError(f"the fidelity stage blends with the adaptive policy {base_path}, which is missing: "
                             f"run python train.py --run-dir {run_dir} --stage policy first")
    base, base_cfg = models.load_policy(base_path, device)
    if base_cfg["heuristic"] != task.h.tolist() or base_cfg["beta_ema"] != 0:
        raise runs.UserError(f"{base_path} starts from another schedule than this run's (the w_0 sweep changed since) or "
                             f"smooths its actions: the blend needs both policies on the same start; retrain it")
    pcfg["base"] = base_name
    if not os.path.exists(os.path.join(run_dir, f"{task.name}.pt")):   # start: the main policy, critic and D
        main = runs.load_ckpt(base_path)
        for net, key in zip(nets, ("best", "critic", "disc")):
            net.load_state_dict(main[key])
    return base.requires_grad_(False)


def reward_hook(c: TrainConfig, kind: str, pipe, ref) -> Callable:
    """The policy's reward R (B,) from (r_adv, r_fid, fake images, lam): D's score (AdaNAT Eq. 13) by
    default; the fidelity blend (AdaGen Eq. 15); or, for the reward-hacking study, the fixed reward
    r_fid = log p(y|x) or minus the FID of the trajectory's chunk (AdaGen §III-D)."""
    if kind == "fidelity":
        return lambda r_adv, r_fid, fake, lam: reward.blended_reward(r_adv, r_fid, lam)
    if c.pi_reward == "fid":                                                  # chunks of the global batch
        def chunk_fid(r_adv, r_fid, fake, lam):
            feats = ddp.all_cat(fid.extract(pipe.featnet, fake, device=fake.device)[0].to(fake.device)).cpu()
            return ddp.my_rows(chunk_fid_reward(feats, ref, c.pi_fid_chunk)).to(fake.device)
        return chunk_fid
    if c.pi_reward == "fixed":
        return lambda r_adv, r_fid, fake, lam: r_fid
    return lambda r_adv, r_fid, fake, lam: r_adv


def chunk_fid_reward(feats: torch.Tensor, ref, chunk: int) -> torch.Tensor:
    """The batch-FID reward of the reward-hacking study (AdaGen §III-D option 1): trajectory i's
    reward is minus the FID (training statistics) of its chunk, i mod (B // chunk); consecutive
    trajectories (a group) land in different chunks, so group baselines still see a difference.
    feats (B, D) of the FID network -> (B,) on the CPU."""
    B = feats.shape[0]
    chunk_of = torch.arange(B) % max(2, B // chunk)
    R = torch.empty(B)
    for j in chunk_of.unique():
        R[chunk_of == j] = -fid.fid_from_features(feats[chunk_of == j], ref.train_mu, ref.train_sigma)
    return R
