"""AdaGen's autoregressive paradigm (AdaGen §III; VAR §3, var.py holds the math): the multi-scale residual
tokenizer fine-tuned from the run's VQ tokenizer, the next-scale transformer, the PPO policies that choose each
sample's [w, k_frac, p, tau] at every scale (train.py's Algorithm 1 on `var_task`), and the sampling side:
grids, the table (VAR's defaults, no guidance, a swept guidance, the learned schedules), per-scale action plots,
the policy's cost and game.py's reward check on the VAR's schedules.

    python experiments/var.py train --run-dir runs/small --stage msvq | var | var-search | var-policy | var-static
    python experiments/var.py sample --run-dir runs/small [--eval | --plot | --bench | --reward-check]
"""
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the project's root

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import autonat  # noqa: E402
import data  # noqa: E402
import fid  # noqa: E402
import policy  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
import var  # noqa: E402
import vqgan  # noqa: E402
from experiments import bench, game, search  # noqa: E402

K = len(var.SCALES)                   # decisions per trajectory: one per scale
W_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)   # the w_max sweep of VAR's ramp
DEFAULTS = "VAR defaults (w ramp 0 -> {w:g}, top-k 900/4096, top-p 0.96, tau 1)"
NO_GUIDANCE = "no guidance (top-k 900/4096, top-p 0.96)"
SEARCH_ROW = sample.SEARCH_ROWS["search"].replace("T x 4", "K x 4")   # AutoNAT search (free K x 4 table)
policy_path = lambda run_dir, kind, seed=0: os.path.join(run_dir, train.policy_file(f"var_{kind}", "heuristic", K, seed=seed) + ".pt")


class MSVQ(nn.Module):
    """The VQ tokenizer's encoder and decoder around var.MultiScaleQuantizer; tokenize / detokenize as VQModel's."""

    def __init__(self, cfg: vqgan.VQConfig, scales: tuple = var.SCALES):
        super().__init__()
        self.cfg, self.encoder, self.decoder = cfg, vqgan.Encoder(cfg), vqgan.Decoder(cfg)
        self.quant = var.MultiScaleQuantizer(cfg.codebook_size, cfg.code_dim, scales, beta=cfg.beta)
        if cfg.img_size // 2 ** len(cfg.ch_mult) != scales[-1]:
            raise train.UserError(f"the multi-scale tokenizer's last scale {scales[-1]} must be the VQ latent's side "
                                  f"{cfg.img_size // 2 ** len(cfg.ch_mult)}")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, C, S, S) -> (x_rec, codes (B, L), L_vq, f (B, C_vae, H, W))."""
        f = self.encoder(x)
        f_hat, codes, loss = self.quant(f)
        return self.decoder(f_hat), codes, loss, f

    @torch.no_grad()
    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant(self.encoder(x))[1]

    @torch.no_grad()
    def detokenize(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.quant.decode_codes(codes)).clamp(-1, 1)


def load(run_dir: str, stage: str, device: torch.device, weights: str = "model") -> nn.Module:
    """msvq.pt (MSVQ) or var.pt (var.VAR) rebuilt from its checkpoint, in eval mode; a clear error otherwise."""
    path = os.path.join(run_dir, f"{stage}.pt")
    if not train.is_done(path):
        raise train.UserError(f"{path} is missing or unfinished: run python experiments/var.py train --run-dir {run_dir} "
                              f"--stage {stage}")
    ck = train.load_ckpt(path)
    cfg = ck["config"]
    try:
        model = (MSVQ(vqgan.VQConfig(**{**cfg["vq"], "ch_mult": tuple(cfg["vq"]["ch_mult"])}), tuple(cfg["scales"]))
                 if stage == "msvq" else var.VAR(var.VARConfig(**{**cfg, "scales": tuple(cfg["scales"])})))
        model.load_state_dict(ck[weights])
    except (TypeError, KeyError, RuntimeError) as e:
        raise train.UserError(f"{path} does not match this code's {stage} model ({type(e).__name__}: {str(e)[:120]}); "
                              f"delete it to retrain that stage") from None
    return model.to(device).eval()


def usage_stats(codes: torch.Tensor, V: int, scales: tuple = var.SCALES) -> dict:
    """Per scale: the fraction of the codebook used and the perplexity of the code distribution; codes (n, L)."""
    o, out = var.offsets(scales), {}
    for k, s in enumerate(scales):
        counts = torch.bincount(codes[:, o[k]:o[k + 1]].flatten(), minlength=V).float()
        p = counts / counts.sum()
        out[f"usage_s{s}"] = (counts > 0).float().mean().item()
        out[f"perplexity_s{s}"] = torch.exp(-(p[p > 0] * p[p > 0].log()).sum()).item()
    return out


def stage_msvq(c: train.TrainConfig, run_dir: str, device: torch.device, log: train.Logger) -> None:
    """Fine-tune the VQ tokenizer into VAR's multi-scale residual tokenizer: its encoder, decoder and codebook
    are the start, every phi the identity; L = |x - G(f_hat)| + (x - G(f_hat))^2 + L_vq (averaged over the
    scales) + vq_perceptual * L_P; dead codes restarted every vq_restart_every steps until 80%. Writes msvq.pt."""
    path = os.path.join(run_dir, "msvq.pt")
    if train.is_done(path):
        print(f"msvq: done ({path}), skipped")
        return
    vq = train.build_model(run_dir, "vq", device)
    model = MSVQ(vq.cfg).to(device)
    model.encoder.load_state_dict(vq.encoder.state_dict())
    model.decoder.load_state_dict(vq.decoder.state_dict())
    model.quant.embedding.weight.data.copy_(vq.vq.embedding.weight.data)
    x_train, x_test = (data.load_dataset(c.data, split, c.img_size, c.channels, c.seed)[0] for split in ("train", "test"))
    opt = torch.optim.Adam(model.parameters(), lr=c.var_msvq_lr, betas=(0.5, 0.9))
    modules = {"model": model, "optim": opt}
    mcfg = {"vq": train.to_plain(vq.cfg), "scales": list(var.SCALES)}
    state = {**train.resume(path, mcfg, modules), "config": mcfg, "done": False}
    g = torch.Generator().manual_seed(c.seed + 21 + state["step"])
    it = data.batches(x_train, torch.zeros(len(x_train), dtype=torch.long), c.vq_batch, g, infinite=True)
    percep = train.feature_maps(train.build_model(run_dir, "backbone", device).requires_grad_(False), grad=True)[0] \
        if c.vq_perceptual > 0 else None

    def step_fn(step: int) -> dict:
        for grp in opt.param_groups:
            grp["lr"] = train.lr_at(step, c.var_msvq_steps, c.var_msvq_lr, c.vq_warmup)
        x = train.augment(data.to_float(next(it)[0]).to(device), g)
        model.train()
        x_rec, _, vq_loss, f = model(x)
        loss = (x_rec - x).abs().mean() + F.mse_loss(x_rec, x) + vq_loss
        if percep is not None:
            with torch.no_grad():
                f_x = percep(x)
            loss = loss + c.vq_perceptual * vqgan.perceptual_loss(f_x, percep(x_rec))
        train.check_finite(loss=loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        out = {"loss": loss.item(), "mse": F.mse_loss(x_rec, x).item(), "vq_loss": vq_loss.item()}
        if (step + 1) % c.vq_restart_every == 0 and step < 0.8 * c.var_msvq_steps:
            out["restarted"] = model.quant.restart_dead_codes(f.detach().permute(0, 2, 3, 1).reshape(-1, f.shape[1]))
        return out

    state = train.train_loop("msvq", path, state, modules, step_fn, c.var_msvq_steps, c, log)
    model.eval()
    with torch.no_grad():
        x = data.to_float(x_test)
        codes = torch.cat([model.tokenize(x[i:i + 500].to(device)).cpu() for i in range(0, len(x), 500)])
        rec = torch.cat([model.detokenize(codes[i:i + 500].to(device)).cpu() for i in range(0, len(x), 500)])
    state.update(metrics={"test_mse": F.mse_loss(rec, x).item(), **usage_stats(codes, vq.cfg.codebook_size)}, done=True)
    train.save_ckpt(path, state)
    log(stage="msvq", final=True, **state["metrics"])
    print("msvq:", ", ".join(f"{k} {v:.4g}" for k, v in state["metrics"].items()))


def stage_var(c: train.TrainConfig, run_dir: str, device: torch.device, log: train.Logger) -> None:
    """The next-scale transformer on the multi-scale codes of the training set and its mirror images, with the
    null class dropped in at 0.1 and an EMA of the weights (what sampling uses). Writes var.pt."""
    path = os.path.join(run_dir, "var.pt")
    if train.is_done(path):
        print(f"var: done ({path}), skipped")
        return
    x_train, y_train, num_classes = data.load_dataset(c.data, "train", c.img_size, c.channels, c.seed)
    msvq = load(run_dir, "msvq", device)
    batches = [data.to_float(x_train[i:i + 1000]).to(device) for i in range(0, len(x_train), 1000)]
    with torch.no_grad():                                                            # the images, then their mirrors
        codes = torch.cat([msvq.tokenize(x.flip(-1) if flip else x).cpu() for flip in (False, True) for x in batches])
    labels = y_train.repeat(2)                                                      # codes (2M, L), labels (2M,)
    cfg = var.VARConfig(vocab_size=msvq.cfg.codebook_size, code_dim=msvq.cfg.code_dim, num_classes=num_classes,
                        dim=c.var_dim, depth=c.var_depth, heads=c.var_heads)
    model = var.VAR(cfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=c.var_lr, betas=(0.9, 0.95), weight_decay=0.05)
    modules = {"model": model, "ema": ema, "optim": opt}
    state = {**train.resume(path, train.to_plain(cfg), modules), "config": train.to_plain(cfg), "done": False}
    g = torch.Generator().manual_seed(c.seed + 23 + state["step"])
    gd = torch.Generator(device).manual_seed(c.seed + 24 + state["step"])
    it = data.batches(codes, labels, c.var_batch, g, infinite=True)

    def step_fn(step: int) -> dict:
        lr = train.lr_at(step, c.var_steps, c.var_lr, c.var_warmup)
        for grp in opt.param_groups:
            grp["lr"] = lr
        q, y = (v.to(device) for v in next(it))
        with torch.no_grad():
            x_in = msvq.quant.next_inputs(q)                                         # (B, L - 1, C_vae)
        model.train()
        with train.autocast(device, c.bf16):
            loss = var.var_loss(model, q, x_in, y, cfg.null_label, cfg.class_drop, gd)
        return {"lr": lr, **train.generator_step(model, ema, opt, loss, step, c.var_ema_decay)}

    state = train.train_loop("var", path, state, modules, step_fn, c.var_steps, c, log)
    state["done"] = True
    train.save_ckpt(path, state)
    if os.path.exists(os.path.join(run_dir, "var_sweep_w.json")):
        os.remove(os.path.join(run_dir, "var_sweep_w.json"))                         # a sweep of other weights
    print(f"var: done, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")


class VARPipeline(train.GeneratorPipeline):
    """The multi-scale tokenizer, the next-scale transformer (EMA weights) and the FID network of a run folder."""

    W_GRID, sweep_file, sweep_what, sweep_info = W_GRID, "var_sweep_w.json", "VAR defaults' w_max", {}

    def __init__(self, run_dir: str, device: torch.device, bf16: bool = True, batch: int | None = None):
        super().__init__(run_dir, device, bf16, batch)
        self.vq = load(run_dir, "msvq", device)                   # sample.EvalReferences' tokenizer: the floor row
        self.net = load(run_dir, "var", device, weights="ema")
        self.cfg: var.VARConfig = self.net.cfg

    def logits_fn(self, x_in: torch.Tensor, labels: torch.Tensor, past: list | None = None):
        """VAR.forward counted: (logits, features, cache) of x_in's tokens (one scale's, with the cache `past`)."""
        return self.counted(self.net, x_in, labels, past)

    def generate(self, labels: torch.Tensor, schedule, seed: int, group: int = 1) -> torch.Tensor:
        """Codes (n, L) for labels (n,), chunk by chunk (train.GeneratorPipeline.chunked)."""
        make = lambda y, g: var.generate(self.logits_fn, self.vq.quant, y, schedule, self.cfg.null_label, g, group)[0].cpu()
        return self.chunked(labels, group, seed, make, schedule, "VAR")

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.vq.detokenize(codes[i:i + self.batch].to(self.device)).float().cpu()
                          for i in range(0, len(codes), self.batch)])

    def sweep_images(self, labels: torch.Tensor, w_max: float) -> torch.Tensor:
        return self.decode(self.generate(labels, var.table_schedule(var.default_table(K, w_max)), seed=0))


def policy_file(kind: str, c: train.TrainConfig) -> str:
    """var_policy_T7, var_static_T7_seed1, ...: train.policy_file's names with the prefix var_."""
    return train.policy_file("var_" + kind, "heuristic", K, c.pi_reward, c.pi_seed)


def var_task(c: train.TrainConfig, run_dir: str, device: torch.device, kind: str, n: int):
    """(task, pipeline, RealFeatures) of the next-scale MDP: K decisions, each sample's [w, k_frac, p, tau] per
    scale, from VAR's defaults with the swept w_max; the state: scale k's features on the H x H grid."""
    pipe = VARPipeline(run_dir, device, c.bf16)
    ref = train.RealFeatures(pipe)
    w_max = train.get_w0(pipe, ref, c.pi_sweep_samples)
    H = pipe.cfg.scales[-1]
    task = train.PolicyTask(
        name=policy_file(kind, c), T=K, spec=policy.VAR_ACTIONS, h=var.default_table(K, w_max),
        start=DEFAULTS.format(w=w_max), C=pipe.cfg.dim, N=H * H, num_classes=pipe.cfg.num_classes,
        generate=lambda y, sched, g, G: var.generate(pipe.logits_fn, pipe.vq.quant, y, sched, pipe.cfg.null_label, g, G)[0],
        to_images=pipe.vq.detokenize, fid_images=lambda y, sched: pipe.decode(pipe.generate(y, sched, seed=0)),
        reals=lambda: train.real_images(c), extra={"pi_width": c.var_pi_width})
    return task, pipe, ref


def search_problem(c: train.TrainConfig, run_dir: str, device: torch.device) -> search.SearchProblem:
    """AutoNAT's finite-difference search (experiments/search.py) of the free K x 4 table [w, k_frac, p, tau],
    from VAR's defaults at the swept w_max: p steps backwards (it starts near its bound 1), the fractions' learning
    rate a quarter of search_lr; projected onto w >= 0, k_frac in [1/V, 1], p in [0.05, 1], tau >= 0.05."""
    pipe = VARPipeline(run_dir, device, c.bf16)
    ref = train.RealFeatures(pipe)
    h = var.default_table(K, train.get_w0(pipe, ref, c.pi_sweep_samples))
    lo, hi = torch.tensor([0.0, 1 / pipe.cfg.vocab_size, 0.05, 0.05]), torch.tensor([1e9, 1.0, 1.0, 1e9])
    column = lambda *v: torch.tensor(v).repeat_interleave(K)                      # per column -> xi's layout (4K,)
    project = lambda xi: autonat.table_to_xi(torch.maximum(torch.minimum(autonat.xi_to_table(xi), hi), lo))

    def fids(tables: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.Tensor:
        """Training-set FID of C tables (C, K, 4) on the same labels and noise: row i of a chunk follows table i % C."""
        C, n, tab = len(tables), len(labels), tables.to(device)
        sched = lambda k, state: tuple(tab[torch.arange(len(state.labels), device=device) % C, k].unbind(-1))
        images = pipe.decode(pipe.generate(labels.repeat_interleave(C), sched, seed, group=C))
        feats = fid.extract(pipe.featnet, images, device=device)[0].view(n, C, -1)
        return torch.tensor([fid.fid_from_features(feats[:, j], ref.train_mu, ref.train_sigma) for j in range(C)])
    return search.SearchProblem(f"var_search_T{K}", K, h, var.ACTIONS, fids, pipe, autonat.table_to_xi(h),
                                column(c.search_eps, 0.05, -0.02, c.search_eps),
                                column(c.search_lr, c.search_lr / 4, c.search_lr / 4, c.search_lr),
                                torch.ones(4 * K, dtype=torch.bool), autonat.xi_to_table, project, c.search_updates, {})


def stage_search(c: train.TrainConfig, run_dir: str, device: torch.device, log: train.Logger) -> None:
    """var-search: var_search_T7.pt / .json / _curve.png (resumable after every update)."""
    if train.is_done(os.path.join(run_dir, f"var_search_T{K}.pt")):
        print(f"var_search_T{K}: done, skipped")
        return
    search.search_schedule(c, run_dir, device, log, "var", K, problem=search_problem(c, run_dir, device))


def policy_schedule(pipe: VARPipeline, path: str, weights: str = "best") -> tuple:
    """(make_schedule, h_pre (K, 4)) of a finished VAR policy checkpoint: its network on its start table."""
    pi, cfg = train.load_policy(path, pipe.device, weights)
    h_pre = policy.inverse_activation(torch.tensor(cfg["heuristic"]), policy.VAR_ACTIONS).to(pipe.device)
    return (lambda: policy.PolicySchedule(pi, h_pre, spec=policy.VAR_ACTIONS)), h_pre


def policy_rows(pipe: VARPipeline) -> dict:
    """name -> [make_schedule per training seed] of the trained VAR policies (best weights; last iterate if it differs)."""
    rows = {}
    for kind in ("static", "policy"):
        for weights in ("best", "model"):
            seeds = train.policy_seeds(pipe.run_dir, "var_" + kind, "heuristic", K)
            if weights == "model" and all(sample.last_is_best(pipe.run_dir, "var_" + kind, K, seed=s) for s in seeds):
                continue                                                          # the last iterate: a row only if it differs
            makes = [policy_schedule(pipe, policy_path(pipe.run_dir, kind, s), weights)[0] for s in seeds]
            if makes:
                rows[sample.POLICY_ROWS[kind] + (", last iterate" if weights == "model" else "")] = makes
    return rows


def evaluate(pipe: VARPipeline, samples: int, sweep_samples: int) -> None:
    """var_eval.json / var_eval.md: every row against the test images; claims against VAR's defaults at the swept
    w_max (the strongest hand-written schedule)."""
    ref = sample.EvalReferences(pipe)
    w_max = train.get_w0(pipe, ref, sweep_samples)
    swept = DEFAULTS.format(w=w_max) + ", w_max swept"
    rows = {name: [lambda w=w: var.table_schedule(var.default_table(K, w))]       # a fixed row only if it differs
            for name, w in ((DEFAULTS.format(w=1.5), 1.5), (NO_GUIDANCE, 0.0), (swept, w_max)) if w != w_max or name == swept}
    found = train.searched_table(pipe.run_dir, "var_search", K)
    if found is not None:
        rows[SEARCH_ROW] = [lambda: var.table_schedule(found[0])]
    rows.update(policy_rows(pipe))
    n = min(samples, len(ref.test_feats), len(ref.train_feats))
    labels = train.balanced_labels(samples, pipe.cfg.num_classes)
    refs = {"real training images vs test": sample.train_reference(ref, n),
            "multi-scale tokenizer reconstructions of test vs test (floor)": sample.recon_reference(ref, n)}
    cell = lambda make, s: lambda: sample.measure(ref, labels, make(), lambda sched: pipe.generate(labels, sched, seed=s), pipe.decode)
    res = sample.run_cells([(name, cell(make, s)) for name in rows for make in rows[name] for s in sample.EVAL_SEEDS], "VAR eval")
    keys = sample.claim_keys(ref)
    table = [{"schedule": name, "samples": samples, "seeds": list(sample.EVAL_SEEDS), "training_seeds": len(rows[name]),
              **sample.seed_summary(res[name], policy.VAR_ACTIONS.names), "vs_swept": sample.claims(res[name], res[swept], keys)}
             for name in rows]
    train.write_json(os.path.join(pipe.run_dir, "var_eval.json"), {"rows": table, "reference": refs, "w_max": w_max,
                                                                   "claim_judges": ref.claims, "device": str(pipe.device)})
    head = f"| schedule | {sample.metric_head(ref)} images/s |"
    md = [f"VAR, K = {K} scales {var.SCALES}: {samples} samples per row and seed, seeds {list(sample.EVAL_SEEDS)} (mean ± sd "
          f"over sampling x training seeds); every distance against the {len(ref.test_feats)} test images (reference rows: "
          f"{n} images){sample.REF_NOTE}; images/s on {pipe.device}.", "", head, "|" + "---|" * (head.count("|") - 1)]
    md += [f"| {name} | {sample.metric_cells(r, ref)} – |" for name, r in refs.items()]
    md += [f"| {r['schedule']} | {sample.metric_cells(r, ref)} {r['images_per_s']:.0f} |" for r in table]
    md += ["", sample.claims_markdown([(r["schedule"], r["vs_swept"]) for r in table if r["schedule"] != swept], swept, ref)]
    train.write_text(os.path.join(pipe.run_dir, "var_eval.md"), "\n".join(md) + "\n")
    print("\n".join(md))


def grids(pipe: VARPipeline, per_class: int = 10) -> None:
    """var_samples.png: one row per class, VAR's defaults at the swept w_max (else 1.5)."""
    w_max = train.read_json(os.path.join(pipe.run_dir, pipe.sweep_file), {}).get("w_0", 1.5)
    labels = torch.arange(pipe.cfg.num_classes).repeat_interleave(per_class)
    path = os.path.join(pipe.run_dir, "var_samples.png")
    data.save_grid(pipe.sweep_images(labels, w_max), path, nrow=per_class, save=train.DIST.main)   # VAR's defaults, seed 0
    print("wrote", path)


def adaptive(pipe: VARPipeline):
    """The adaptive VAR policy's make_schedule and its start table; a clear error if it is not trained."""
    path = policy_path(pipe.run_dir, "policy")
    if not os.path.exists(path):
        raise train.UserError(f"{path} not found: train it with python experiments/var.py train --run-dir {pipe.run_dir} "
                              f"--stage var-policy")
    make, h_pre = policy_schedule(pipe, path)
    return make, policy.activation(h_pre.cpu(), policy.VAR_ACTIONS)


def plot_policy(pipe: VARPipeline, samples: int = 1000) -> None:
    """var_policy_actions.png: the adaptive policy's knobs per scale (mean ± sd over samples; per class thin
    lines; the start dashed)."""
    make, h = adaptive(pipe)
    sched, labels = make(), train.balanced_labels(samples, pipe.cfg.num_classes)
    pipe.generate(labels, sched, seed=0)
    a, scales = sched.actions(), list(range(K))                                   # (K, n, 4)
    panels = []
    for j, name in enumerate(var.ACTIONS):
        series = [{"x": scales, "y": a[:, labels == y, j].mean(1).tolist(), "color": (150, 170, 220)}
                  for y in range(pipe.cfg.num_classes)]
        mean, sd = a[:, :, j].mean(1), a[:, :, j].std(1)
        series += [{"x": scales, "y": mean.tolist(), "color": (200, 60, 30), "band": ((mean - sd).tolist(), (mean + sd).tolist())},
                   {"x": scales, "y": h[:, j].tolist(), "color": (60, 60, 60), "dashed": True}]
        panels.append({"title": name, "series": series})
    path = os.path.join(pipe.run_dir, "var_policy_actions.png")
    data.plot_panels(path, panels, title=f"adaptive VAR policy: mean +- sd over {samples} samples per scale k (blue: each "
                                         f"class's mean; dashed: the start)", save=train.DIST.main)
    print("wrote", path)


def var_bench(pipe: VARPipeline, batch: int, repeats: int = 3) -> dict:
    """The adaptive policy's cost: its K forwards against the transformer's K guided forwards (2B rows, KV-cached),
    and images/s of sampling with the policy vs the start table."""
    make, h = adaptive(pipe)
    labels = train.balanced_labels(batch, pipe.cfg.num_classes).to(pipe.device)
    x_in = torch.randn(2 * batch, var.offsets(pipe.cfg.scales)[-1] - 1, pipe.cfg.code_dim, device=pipe.device)
    y2 = torch.cat([labels, torch.full_like(labels, pipe.cfg.null_label)])
    H = pipe.cfg.scales[-1]
    state = var.VARState(0, torch.randn(batch, H * H, pipe.cfg.dim, device=pipe.device), labels, None)
    o = var.offsets(pipe.cfg.scales)

    @torch.no_grad()
    def run_forwards():                                                           # scale by scale, KV-cached
        cache = None
        for k in range(K):
            cache = pipe.logits_fn(x_in[:, max(0, o[k] - 1):o[k + 1] - 1], y2, cache)[2]

    def run_policy():
        sched = make()
        for k in range(K):
            sched(k, state)
    fns = [("bare forwards", run_forwards), ("policy forwards", run_policy),
           ("sample", lambda: pipe.generate(labels.cpu(), var.table_schedule(h), seed=0)),
           ("sample + policy", lambda: pipe.generate(labels.cpu(), make(), seed=0))]
    res = {name: batch / secs for name, secs in bench.time_round_robin(fns, pipe.device, repeats).items()}
    res["policy_cost"] = res["bare forwards"] / res["policy forwards"]
    print(f"VAR bench ({pipe.device}, batch {batch}): sample {res['sample']:.1f} images/s, sample + policy "
          f"{res['sample + policy']:.1f} images/s; policy cost {100 * res['policy_cost']:.2f}% of the transformer's time per scale")
    return res


def reward_check(pipe: VARPipeline, args) -> dict:
    """var_reward_check.md / .json: game.py's reward check on the VAR's schedules, none a copy of another: VAR's
    defaults on the w_max sweep's grid, the searched table and each training seed's last iterate of both policies."""
    specs = game.d_specs(args, pipe)                                              # a bad spec stops first
    rows = {f"VAR defaults, w_max={w:g}": (lambda w=w: var.table_schedule(var.default_table(K, w))) for w in W_GRID}
    if (found := train.searched_table(pipe.run_dir, "var_search", K)) is not None:
        rows[SEARCH_ROW] = lambda: var.table_schedule(found[0])
    for kind in ("static", "policy"):
        for s in train.policy_seeds(pipe.run_dir, "var_" + kind, "heuristic", K):
            rows[f"{sample.POLICY_ROWS[kind]}, last iterate, seed {s}"] = policy_schedule(pipe, policy_path(pipe.run_dir, kind, s), "model")[0]
    return game.reward_check(pipe, train.RealFeatures(pipe), args.check_samples, specs, args.check_d_steps, rows,
                             lambda y, sched: pipe.decode(pipe.generate(y, sched, seed=1)), T=K, stem="var_reward_check",
                             reads=("msvq", "var", "featnet", "featssl", "backbone"))


def add_flags(p) -> None:
    p.add_argument("--bench", action="store_true", help="images/s of sampling vs bare forwards, and the policy's cost")
    game.add_check_flags(p)


def run(args, device: torch.device) -> None:
    """The sampling side, as the flags ask: the table, the plots, the bench, else the grids."""
    pipe = VARPipeline(args.run_dir, device, bf16=not args.no_bf16, batch=args.batch)
    if args.sweep_w:
        train.sweep_w(pipe, train.RealFeatures(pipe), args.sweep_samples)
    if args.eval:
        evaluate(pipe, args.samples, args.sweep_samples)
    if args.plot:
        plot_policy(pipe)
    if args.bench:
        var_bench(pipe, args.batch or (1024 if device.type == "cuda" else 256))
    if args.reward_check:
        reward_check(pipe, args)
    if args.eval or not (args.plot or args.bench or args.sweep_w or args.reward_check):
        grids(pipe)


STAGES = {"msvq": stage_msvq, "var": stage_var, "var-search": stage_search, **{f"var-{kind}": train.stage_policies(
    kind, make_task=var_task, counts=lambda c: (K,), file=lambda c, kind, n: policy_file(kind, c)) for kind in ("policy", "static")}}


if __name__ == "__main__":
    if sys.argv[1:2] == ["train"]:
        train.main(sys.argv[2:], stages=STAGES, default=["msvq", "var"], doc=__doc__)
    elif sys.argv[1:2] == ["sample"]:
        sample.main(sys.argv[2:], add_flags=add_flags, run=run, doc=__doc__)
    else:
        sys.exit(f"usage: python {sys.argv[0]} train|sample --run-dir R ... (see --help of each)")
