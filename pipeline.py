"""The generation pipeline that training and sampling share: trained models rebuilt from a run
folder (models.py) turned into generation, chunked and sharded over the ranks, the w_0 sweeps and
batched candidate FIDs (the metrics and their references: evaluation.py).

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
import models
import nat
import policy
import runs
import samplers


W0_GRID = (0.0, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0)


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
    """What the NAT's and the flow's pipelines share: the run folder's config, the feature network (and
    the tokenizer `vq`, None for the flow),
    the rows per generator batch (`batch`, whose chunks key the random numbers) and per forward
    (`rows`, memory only), a forward counter, the fingerprint that keys cached results, and
    chunked generation shared over the ranks of a torchrun job."""

    vq = None

    def __init__(self, run_dir: str, device: torch.device, bf16: bool, batch: int | None, rows: int | None,
                 stages: tuple):
        self.run_dir, self.device, self.bf16 = run_dir, device, bf16
        self.batch = batch or (4096 if device.type == "cuda" else 500)   # rows per generator batch (x2 with CFG)
        self.rows = rows or None                                           # rows per forward (memory); None: whole batches
        self.config = runs.read_json(os.path.join(run_dir, "config.json"))
        if not isinstance(self.config, dict):
            raise runs.UserError(f"{run_dir}/config.json is unreadable: re-run python train.py --run-dir {run_dir}")
        self.featnet = models.build_model(run_dir, "featnet", device)
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
        self.vq = models.build_model(run_dir, "vq", device)
        self.net = models.build_model(run_dir, "nat", device, weights="ema")
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

    W_GRID, sweep_file, sweep_what, sweep_info = W0_GRID, "sweep_w.json", "T=8", {"T": 8, "tau2_0": nat.ADANAT_TAU2_0}

    def sweep_images(self, labels: torch.Tensor, w_0: float) -> torch.Tensor:
        """The w_0 sweep's images: AdaNAT's heuristic (tau2_0 = 1, w = w_0 t/T) at T = 8, seed 0."""
        return self.decode(self.generate_tokens(labels, 8, nat.ADANAT_TAU2_0, w_0, seed=0))

    def candidate_images(self, labels: torch.Tensor, tables: torch.Tensor, seed: int, C: int, progress: bool) -> torch.Tensor:
        """Images of C interleaved (T, 4) schedules (candidate_fids), one forward per distinct row (dedup)."""
        tok = self.generate(labels, tables.shape[1], nat.table_schedule(tables), seed, group=C, progress=progress, dedup=True)
        return self.decode(tok)

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


FLOW_W_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


class FlowPipeline(GeneratorPipeline):
    """The continuous generator of a run folder (flow.pt or vp.pt, EMA weights) and the feature network."""

    def __init__(self, run_dir: str, device: torch.device, path: str = "flow", bf16: bool = True, batch: int | None = None,
                 rows: int | None = None):
        if not os.path.exists(os.path.join(run_dir, f"{path}.pt")):
            raise runs.UserError(f"{run_dir}/{path}.pt not found: train it with python train.py --run-dir {run_dir} "
                                  f"--stage flow --path {path}")
        super().__init__(run_dir, device, bf16, batch, rows, (path, "featnet"))
        self.net = models.build_model(run_dir, path, device, weights="ema")
        self.cfg: flow_net.FlowConfig = self.net.cfg
        self.path = samplers.PATHS[path]
        self.sweep_file = f"{path}_sweep_w.json"

    W_GRID, sweep_what, sweep_info = FLOW_W_GRID, "Euler, NFE 8", {}

    def sweep_images(self, labels: torch.Tensor, w_0: float) -> torch.Tensor:
        """The w_0 sweep's images: constant guidance w_0, Euler on the uniform 8-step grid, seed 0."""
        return self.generate(labels, 8, samplers.heuristic_schedule(samplers.uniform_grid(8), w_0), "euler", seed=0)

    def candidate_images(self, labels: torch.Tensor, tables: torch.Tensor, seed: int, C: int, progress: bool,
                         solver: str = "euler") -> torch.Tensor:
        """Images of C interleaved (T, 2) sampler schedules [t_next, w] (candidate_fids) with `solver`."""
        return self.generate(labels, tables.shape[1], samplers.table_schedule(tables), solver, seed, group=C)

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


def candidate_fids(pipe: GeneratorPipeline, ref, tables: torch.Tensor, labels: torch.Tensor, seed: int,
                   progress: bool = False, **kw) -> torch.Tensor:
    """FID against *training* statistics of C schedules, tables (C, T, D), on the same labels (n,) and the
    same random numbers (common random numbers: candidate c of sample i draws sample i's numbers). All
    C x n generations run as few large batches (rows interleaved: pipe.candidate_images; kw: the flow's solver)."""
    C, n = tables.shape[0], len(labels)
    images = pipe.candidate_images(labels.repeat_interleave(C), tables, seed, C, progress, **kw)
    feats = fid.extract(pipe.featnet, images, device=pipe.device)[0].view(n, C, -1)            # (n, C, D)
    return torch.tensor([fid.fid_from_features(feats[:, k], ref.train_mu, ref.train_sigma) for k in range(C)])


def sweep_w(pipe: GeneratorPipeline, ref, samples: int) -> dict:
    """Pick the guidance w_0 of the generator's start schedule (the NAT: AdaNAT's heuristic at T = 8; the
    flow: constant guidance, Euler, 8 steps) over pipe.W_GRID by FID against *training* statistics;
    written to pipe.sweep_file."""
    labels = balanced_labels(samples, pipe.cfg.num_classes)
    results = {}
    bar = tqdm(pipe.W_GRID, desc=f"w_0 sweep ({pipe.sweep_what}, {samples} samples)", disable=not ddp.DIST.main)
    for w_0 in bar:
        feats, _ = fid.extract(pipe.featnet, pipe.sweep_images(labels, w_0), device=pipe.device)
        results[w_0] = fid.fid_from_features(feats, ref.train_mu, ref.train_sigma)
        bar.set_postfix(fid=f"{results[w_0]:.2f}")
    best = min(results, key=results.get)
    if best == max(pipe.W_GRID):
        print(f"warning: the best w_0 is the largest of the grid {pipe.W_GRID}; extend it in pipeline.py")
    out = {"fingerprint": pipe.fingerprint, "samples": samples, "grid": list(pipe.W_GRID), **pipe.sweep_info,
           "train_fid": {str(k): v for k, v in results.items()}, "w_0": best}
    runs.write_json(os.path.join(pipe.run_dir, pipe.sweep_file), out)
    ddp.barrier()                                                    # written before any rank reads it again
    print(f"w_0 sweep (FID vs training set, {pipe.sweep_what}): " + ", ".join(f"{k}: {v:.2f}" for k, v in results.items())
          + f" -> w_0 = {best}")
    return out


def get_w0(pipe: GeneratorPipeline, ref, samples: int) -> float:
    """The swept w_0 of this run's weights, sweeping first when there is none (or it is stale)."""
    saved = runs.read_json(os.path.join(pipe.run_dir, pipe.sweep_file), {})
    if (saved.get("fingerprint"), saved.get("samples"), saved.get("grid")) == (pipe.fingerprint, samples, list(pipe.W_GRID)):
        return saved["w_0"]
    return sweep_w(pipe, ref, samples)["w_0"]
