"""The generation pipeline that training and sampling share: trained models rebuilt from a run
folder, chunked and sharded generation, the w_0 sweeps and batched candidate FIDs (the metrics
and their references: evaluation.py).

- `build_model`, `build_policy`, `load_policy`, `classifier_backbone`, `d_backbone`: any stage's
  model from its checkpoint alone (config + weights), the discriminator's frozen feature maps;
- `Pipeline` (tokenizer + NAT + feature network) and `FlowPipeline` (the continuous generator):
  generation in chunks whose random numbers are keyed by (seed, chunk), shared over the ranks
  of a torchrun job, with `rows` per forward (memory) independent of the chunk (the images);
- the w_0 sweep of AdaNAT's heuristic and batched candidate FIDs (common random numbers), against
  the training statistics of an evaluation.RealFeatures `ref`.

Usage:
    pipe = Pipeline("runs/small", torch.device("cpu"))
    tokens = pipe.generate(balanced_labels(1000, 10), 8, nat.heuristic_schedule(8, 1.0, 5.0), seed=1)
    images = pipe.decode(tokens)                                  # (1000, 1, 32, 32) in [-1, 1]
"""
import os

import torch
from tqdm import tqdm

import ddp
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
    with grad=True. (The frozen VQ encoder was tried first: D reached only ~55% held-out accuracy.)"""
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


PI_STARTS = {"heuristic": "AdaNAT's heuristic", "search": "the AutoNAT table", "param": "the searched family"}


PI_REWARDS = ("adversarial", "fixed", "fid")


def policy_file(kind: str, start: str, T: int, reward_name: str = "adversarial") -> str:
    """policy_T8; policy_search_T8 for a policy whose residual starts from the searched table;
    policy_fixed_T8 / policy_fid_T8 for one trained on another reward (the reward-hacking study)."""
    parts = [kind] + ([start] if start != "heuristic" else []) + ([reward_name] if reward_name != "adversarial" else [])
    return "_".join(parts) + f"_T{T}"


def flow_policy_file(path: str, kind: str, nfe: int, reward_name: str = "adversarial") -> str:
    return f"{path}_{kind}_nfe{nfe}" + (f"_{reward_name}" if reward_name != "adversarial" else "")


EVAL_SEEDS = (1, 2, 3)       # sampling seeds of the final table; the w_0 sweep uses seed 0


W0_GRID = (0.0, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0)


MASKGIT = dict(tau2_0=4.5, w_0=0.0)


ADANAT_TAU2_0 = 1.0


def in_rows(fn, rows: int | None, *args: torch.Tensor) -> torch.Tensor:
    """fn(*args) on at most `rows` rows at a time, concatenated: the same result in less memory (the
    random numbers of a generation are drawn for the whole chunk, outside fn)."""
    n = args[0].shape[0]
    if not rows or n <= rows:
        return fn(*args)
    parts = [fn(*(a[i:i + rows] for a in args)) for i in range(0, n, rows)]
    if isinstance(parts[0], tuple):                                         # e.g. the NAT's (logits, features)
        return tuple(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)


class GeneratorPipeline:
    """What the NAT's and the flow's pipelines share: the run folder's config, the feature network,
    the rows per generator batch (`batch`, whose chunks key the random numbers) and per forward
    (`rows`, memory only), a forward counter, the fingerprint that keys cached results, and
    chunked generation shared over the ranks of a torchrun job."""

    def __init__(self, run_dir: str, device: torch.device, bf16: bool, batch: int | None, rows: int | None,
                 stages: tuple):
        self.run_dir, self.device, self.bf16 = run_dir, device, bf16
        self.batch = batch or (4096 if device.type == "cuda" else 500)   # rows per generator batch (x2 with CFG)
        self.rows = rows or None                                           # rows per forward (memory); None: whole batches
        self.config = runs.read_json(os.path.join(run_dir, "config.json"))
        if not isinstance(self.config, dict):
            raise runs.UserError(f"{run_dir}/config.json is unreadable: re-run python train.py --run-dir {run_dir}")
        self.featnet = build_model(run_dir, "featnet", device)
        self.forwards = 0
        # identifies weights + numerics: cached results are reused only for the same fingerprint
        self.fingerprint = f"{runs.fingerprint(run_dir, stages)}|{device.type}|bf16={bf16 and device.type == 'cuda'}"
        self.eval_key = f"{self.fingerprint}|chunk={self.batch}"             # + how randomness is keyed: table caches

    def forward_rows(self, net, *args: torch.Tensor):
        """One generator forward on a batch, counted (image-forwards so far), autocast, in `rows` slices."""
        self.forwards += args[0].shape[0]
        with runs.autocast(self.device, self.bf16):
            return in_rows(net, self.rows, *args)

    def chunked(self, labels: torch.Tensor, group: int, seed: int, make_chunk, schedule, desc: str = "",
                progress: bool = False) -> torch.Tensor:
        """make_chunk(labels of chunk j, its generator) for every chunk of `batch` rows (whole groups of
        `group`), each chunk's random numbers keyed by (seed, j), shared over the ranks, concatenated."""
        step = max(group, self.batch // group * group)                     # whole groups per chunk

        def run_chunk(j: int) -> torch.Tensor:                             # chunk j: rows [j step, (j + 1) step)
            g = torch.Generator(self.device).manual_seed(ddp.chunk_seed(seed, j))
            return make_chunk(labels[j * step:(j + 1) * step].to(self.device), g)
        return torch.cat(sharded_with_actions(-(-len(labels) // step), run_chunk, schedule, desc, progress))


class Pipeline(GeneratorPipeline):
    """The trained models of a run folder (tokenizer, NAT with EMA weights, feature network), and
    generation through them."""

    def __init__(self, run_dir: str, device: torch.device, bf16: bool = True, batch: int | None = None,
                 rows: int | None = None):
        super().__init__(run_dir, device, bf16, batch, rows, ("vq", "featnet", "nat"))
        self.vq = build_model(run_dir, "vq", device)
        self.net = build_model(run_dir, "nat", device, weights="ema")
        self.forward = self.net                                            # or its torch.compile (compile())
        self.cfg: nat.NATConfig = self.net.cfg
        if (self.cfg.vocab_size, self.cfg.num_tokens) != (self.vq.cfg.codebook_size, self.vq.num_tokens):
            raise runs.UserError(f"{run_dir}: nat.pt expects {self.cfg.vocab_size} codes x {self.cfg.num_tokens} tokens but "
                                 f"vq.pt makes {self.vq.cfg.codebook_size} x {self.vq.num_tokens}; retrain the nat stage")

    def compile(self) -> None:
        """Generate through torch.compile of the transformer from now on (sample.py --compile)."""
        self.forward = torch.compile(self.net)

    def logits_fn(self, tokens: torch.Tensor, labels: torch.Tensor):
        return self.forward_rows(self.forward, tokens, labels)

    def generate(self, labels: torch.Tensor, T: int, schedule: nat.Schedule, seed: int, guided: bool = True,
                 progress: bool = False, group: int = 1, dedup: bool = False, lookahead: int = 1,
                 score_fn=None) -> torch.Tensor:
        """Generate tokens (n, N) for labels (n,) in chunks of `batch` rows, with any schedule (a
        heuristic table, a policy); each chunk's random numbers are keyed by (seed, chunk index) and
        the chunks are shared over the ranks of a torchrun job, so any number of processes makes
        the same tokens. guided=False skips the null-class forward (the schedule's w is ignored).
        group = G: consecutive blocks of G rows share their random numbers (nat.decode_step).
        dedup: one forward per distinct (tokens, label) row of a step (see `dedup_logits_fn`).
        lookahead, score_fn: nat.generate's look-ahead sampling (k candidates per transition)."""
        null = self.cfg.null_label if guided else None
        fn = dedup_logits_fn(self.logits_fn) if dedup else self.logits_fn
        make = lambda y, g: nat.generate(fn, y, T, schedule, self.cfg.mask_id, self.cfg.num_tokens, null, g, group,
                                         lookahead, score_fn).cpu()
        return self.chunked(labels, group, seed, make, schedule, f"T={T}", progress)

    def generate_tokens(self, labels: torch.Tensor, T: int, tau2_0: float, w_0: float, seed: int) -> torch.Tensor:
        """Generate tokens (n, N) for labels (n,) with the heuristic schedule (tau2_0, w_0)."""
        return self.generate(labels, T, nat.heuristic_schedule(T, tau2_0=tau2_0, w_0=w_0), seed, guided=w_0 != 0)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Decode tokens (n, N) to float images (n, C, H, W) in [-1, 1] on the CPU."""
        return torch.cat([self.vq.detokenize(tokens[i:i + self.batch].to(self.device)).float().cpu()
                          for i in range(0, len(tokens), self.batch)])


def sharded_with_actions(n_chunks: int, run_chunk, schedule, desc: str = "", progress: bool = False) -> list:
    """sharded over the chunks of a generation; a PolicySchedule's executed actions are
    gathered with them, in chunk order, so its actions() cover every sample on every rank."""
    if not isinstance(schedule, policy.PolicySchedule):
        return ddp.sharded(n_chunks, run_chunk, desc, progress)
    outs = ddp.sharded(n_chunks, lambda j: (run_chunk(j), torch.stack(schedule.executed).cpu()), desc, progress)
    actions = [a for _, a in outs]                                     # (T, rows, D) per chunk
    schedule.finished, schedule.executed = actions[:-1], list(actions[-1])
    return [out for out, _ in outs]


def dedup_logits_fn(logits_fn):
    """logits_fn run once per distinct (tokens, label) row, its outputs copied to the duplicates.

    In a search update the candidates that perturb step t decode steps 0..t-1 exactly like the
    unperturbed schedule (same random numbers), so at step t only 1 + (candidates perturbed
    earlier) rows are distinct: about half the generator forwards of the update are skipped."""
    def fn(tokens: torch.Tensor, labels: torch.Tensor):
        key = torch.cat([tokens, labels[:, None]], 1)                     # (B, N+1)
        uniq, inv = torch.unique(key, dim=0, return_inverse=True)         # (U, N+1), (B,)
        logits, feats = logits_fn(uniq[:, :-1], uniq[:, -1])
        return logits[inv], feats[inv]
    return fn


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    return torch.arange(n) % num_classes



def candidate_fids(pipe: Pipeline, ref, tables: torch.Tensor, labels: torch.Tensor, seed: int,
                   progress: bool = False) -> torch.Tensor:
    """FID against *training* statistics of C schedules, tables (C, T, 4), on the same labels (n,)
    and the same random numbers (common random numbers: candidate c of sample i decodes with
    sample i's draws). All C x n generations run as few large batches (rows interleaved)."""
    C, T, _ = tables.shape
    n = len(labels)
    tok = pipe.generate(labels.repeat_interleave(C), T, nat.table_schedule(tables), seed, group=C, progress=progress,
                        dedup=True)
    feats, _ = fid.extract(pipe.featnet, pipe.decode(tok), device=pipe.device)                 # (n*C, D)
    feats = feats.view(n, C, -1)
    return torch.tensor([fid.fid_from_features(feats[:, k], ref.train_mu, ref.train_sigma) for k in range(C)])


def sweep_w(pipe: Pipeline, ref, samples: int, T: int = 8) -> dict:
    """Pick w_0 of AdaNAT's heuristic (tau2_0 = 1, w = w_0 t/T) by FID against *training* statistics."""
    labels = balanced_labels(samples, pipe.cfg.num_classes)
    results = {}
    bar = tqdm(W0_GRID, desc=f"w_0 sweep (T={T}, {samples} samples)", disable=not ddp.DIST.main)
    for w_0 in bar:
        images = pipe.decode(pipe.generate_tokens(labels, T, ADANAT_TAU2_0, w_0, seed=0))
        feats, _ = fid.extract(pipe.featnet, images, device=pipe.device)
        results[w_0] = fid.fid_from_features(feats, ref.train_mu, ref.train_sigma)
        bar.set_postfix(fid=f"{results[w_0]:.2f}")
    best = min(results, key=results.get)
    if best == max(W0_GRID):
        print(f"warning: the best w_0 is the largest of the grid {W0_GRID}; extend W0_GRID in pipeline.py")
    out = {"fingerprint": pipe.fingerprint, "T": T, "samples": samples, "grid": list(W0_GRID), "tau2_0": ADANAT_TAU2_0,
           "train_fid": {str(k): v for k, v in results.items()}, "w_0": best}
    runs.write_json(os.path.join(pipe.run_dir, "sweep_w.json"), out)
    ddp.barrier()                                                    # written before any rank reads it again
    print(f"w_0 sweep (FID vs training set, T={T}): " + ", ".join(f"{k}: {v:.2f}" for k, v in results.items()) + f" -> w_0 = {best}")
    return out


def get_w0(pipe: Pipeline, ref, samples: int) -> float:
    """The swept w_0 of this run's weights, sweeping first when there is none (or it is stale)."""
    saved = runs.read_json(os.path.join(pipe.run_dir, "sweep_w.json"), {})
    if (saved.get("fingerprint"), saved.get("samples"), saved.get("grid")) == (pipe.fingerprint, samples, list(W0_GRID)):
        return saved["w_0"]
    return sweep_w(pipe, ref, samples)["w_0"]


def searched_table(pipe: Pipeline, name: str, T: int) -> tuple | None:
    """(table (T, 4), config, fingerprint) of a finished search `name` ("search" or "param") for T, or None."""
    path = os.path.join(pipe.run_dir, f"{name}_T{T}.pt")
    if not os.path.exists(path):
        return None
    ck = runs.load_ckpt(path)
    if not ck.get("done"):
        return None
    return ck["table"], ck["config"], runs.fingerprint(pipe.run_dir, (f"{name}_T{T}",))


FLOW_W_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


FLOW_INTERVAL = (0.1, 0.8)           # guidance only for t in (0.1, 0.8] (Kynkaanniemi et al. 2024)


class FlowPipeline(GeneratorPipeline):
    """The continuous generator of a run folder (flow.pt or vp.pt, EMA weights) and the feature network."""

    def __init__(self, run_dir: str, device: torch.device, path: str = "flow", bf16: bool = True, batch: int | None = None,
                 rows: int | None = None):
        if not os.path.exists(os.path.join(run_dir, f"{path}.pt")):
            raise runs.UserError(f"{run_dir}/{path}.pt not found: train it with python train.py --run-dir {run_dir} "
                                  f"--stage flow --path {path}")
        super().__init__(run_dir, device, bf16, batch, rows, (path, "featnet"))
        self.net = build_model(run_dir, path, device, weights="ema")
        self.cfg: flow_net.FlowConfig = self.net.cfg
        self.path = samplers.PATHS[path]

    def velocity_fn(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor):
        return self.forward_rows(self.net, x, t, labels)

    def generate(self, labels: torch.Tensor, T: int, schedule: samplers.Schedule, solver: str, seed: int,
                 guided: bool = True, group: int = 1) -> torch.Tensor:
        """Images (n, C, H, W) in [-1, 1] on the CPU: T solver steps from seeded noise, in chunks of
        `batch` rows keyed by (seed, chunk) and shared over the ranks of a torchrun job;
        group = G: consecutive blocks of G rows start from the same noise (common random numbers)."""
        c = self.cfg

        def make(y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
            x = torch.randn((len(y) // group, c.channels, c.img_size, c.img_size), device=self.device,
                            generator=g).repeat_interleave(group, 0)
            x = samplers.sample(self.velocity_fn, x, y, T, schedule, solver, c.null_label if guided else None, self.path)
            return x.clamp(-1, 1).float().cpu()
        return self.chunked(labels, group, seed, make, schedule)


def flow_candidate_fids(pipe: FlowPipeline, ref, tables: torch.Tensor, labels: torch.Tensor, seed: int,
                        solver: str) -> torch.Tensor:
    """FID against *training* statistics of C sampler schedules, tables (C, T, 2) of [t_next, w],
    on the same labels (n,) and noise; all C x n generations interleaved in a few batches."""
    C, T, _ = tables.shape
    n = len(labels)
    images = pipe.generate(labels.repeat_interleave(C), T, samplers.table_schedule(tables), solver, seed, group=C)
    feats, _ = fid.extract(pipe.featnet, images, device=pipe.device)
    feats = feats.view(n, C, -1)                                           # (n, C, D)
    return torch.tensor([fid.fid_from_features(feats[:, k], ref.train_mu, ref.train_sigma) for k in range(C)])


def flow_sweep_w(pipe: FlowPipeline, ref, samples: int, nfe: int = 8) -> float:
    """w_0 of constant guidance (Euler, uniform grid, `nfe` steps) by FID against *training*
    statistics; cached in <path>_sweep_w.json."""
    out_path = os.path.join(pipe.run_dir, f"{pipe.path.name}_sweep_w.json")
    saved = runs.read_json(out_path, {})
    if (saved.get("fingerprint"), saved.get("samples"), saved.get("grid")) == (pipe.fingerprint, samples, list(FLOW_W_GRID)):
        return saved["w_0"]
    labels = balanced_labels(samples, pipe.cfg.num_classes)
    results = {}
    for w_0 in tqdm(FLOW_W_GRID, desc=f"{pipe.path.name} w_0 sweep (Euler, NFE {nfe}, {samples} samples)",
                     disable=not ddp.DIST.main):
        images = pipe.generate(labels, nfe, samplers.heuristic_schedule(samplers.uniform_grid(nfe), w_0), "euler", seed=0)
        feats, _ = fid.extract(pipe.featnet, images, device=pipe.device)
        results[w_0] = fid.fid_from_features(feats, ref.train_mu, ref.train_sigma)
    best = min(results, key=results.get)
    runs.write_json(out_path, {"fingerprint": pipe.fingerprint, "samples": samples, "grid": list(FLOW_W_GRID),
                                "train_fid": {str(k): v for k, v in results.items()}, "w_0": best})
    ddp.barrier()
    print(f"{pipe.path.name} w_0 sweep (FID vs training set): " + ", ".join(f"{k}: {v:.2f}" for k, v in results.items())
          + f" -> w_0 = {best}")
    return best


POLICY_ROWS = {"static": "learned static (PPO, no state)", "policy": "adaptive policy (PPO)",
               "smooth": "adaptive + smoothing (PPO, beta_ema={beta_ema:g})"}


def policy_schedule(pipe: Pipeline, kind: str, T: int, start: str = "heuristic",
                    reward_name: str = "adversarial", weights: str = "best") -> tuple | None:
    """(make_schedule, config, fingerprint) of the trained `kind` policy for T whose residual
    starts from `start` (PI_STARTS), trained on `reward_name`, or None if there is none;
    weights "best" (by training-set FID) or "model" (the last iterate)."""
    name = policy_file(kind, start, T, reward_name)
    path = os.path.join(pipe.run_dir, f"{name}.pt")
    if not os.path.exists(path):
        return None
    pi, cfg = load_policy(path, pipe.device, weights)
    h_pre = policy.inverse_activation(torch.tensor(cfg["heuristic"])).to(pipe.device)
    make = lambda: policy.PolicySchedule(pi, h_pre, beta_ema=cfg["beta_ema"])
    return make, cfg, runs.fingerprint(pipe.run_dir, (name,))


def last_is_best(run_dir: str, kind: str, T: int, start: str = "heuristic") -> bool:
    """Whether a policy checkpoint's last iterate is its best-by-training-FID weights (one row suffices)."""
    ck = runs.load_ckpt(os.path.join(run_dir, f"{policy_file(kind, start, T)}.pt"))
    return all(torch.equal(ck["best"][k], ck["model"][k]) for k in ck["best"])


SEARCH_ROWS = {"param": "parametric family (searched, 6 shape parameters)", "search": "AutoNAT search (free T x 4 table)"}
