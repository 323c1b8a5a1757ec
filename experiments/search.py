"""AutoNAT's searches as training stages (AutoNAT §4.2-4.3, Eq. 4-6, App. A.2; autonat.py holds the math).

- search / param-search / flow-search: descend the training-set FID of a static schedule (the free T x 4 table, a 6-parameter
  hand-written family, or the ODE sampler's [t_next, w] table) by forward finite differences with momentum; every candidate
  of an update runs as one interleaved batch with common random numbers; checkpointed after every update.
- pr-search: the greedy Beta(alpha, beta) line search over the NAT's training mask-ratio distribution, each candidate scored
  by a short proxy training; then one full training.

Usage: python experiments/search.py --run-dir runs/small [--stage search | param-search | flow-search | pr-search]
(--stage all: search and param-search; every train.py flag and stage works here too)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the project's root

import dataclasses
import filecmp
import functools
import math
import shutil
from dataclasses import dataclass
from typing import Callable

import torch

import autonat
import data
import fid
import nat
import samplers
import train  # noqa: E402
from experiments import flow  # noqa: E402


SEARCH_KINDS = {"search": "free", "param-search": "param", "flow-search": "flow"}   # stage -> what is searched
SEARCH_FILES = {"free": "search", "param": "param"}              # -> <file>_T{T}.pt / .json / _curve.png


@dataclass
class SearchProblem:
    """What one search descends: the start schedule h, the candidates' FID function, the vector's
    coordinates (steps eps, learning rates, which are active) and how a vector becomes a table."""
    name: str                      # <file>_T{T} / <path>_search_nfe{nfe}
    T: int
    h: torch.Tensor                # (T, K) the start schedule
    columns: tuple
    candidate_fids: Callable       # (tables (C, T, K), labels, seed) -> (C,) training-set FIDs
    pipe: object
    xi0: torch.Tensor
    eps: torch.Tensor
    lr: torch.Tensor
    active: torch.Tensor
    to_table: Callable
    project: Callable
    updates: int
    extra: dict


def candidate_fids(pipe, ref: train.RealFeatures, tables: torch.Tensor, labels: torch.Tensor, seed: int,
                   solver: str | None = None) -> torch.Tensor:
    """FID against training statistics of C schedules, tables (C, T, K), on the same labels (n,) and random
    numbers (candidate c of sample i draws sample i's numbers), all C x n as interleaved rows (group = C). The
    NAT's tables [m, tau1, tau2, w]; with `solver`, the flow's [t_next, w] (experiments/flow.py)."""
    C, n = tables.shape[0], len(labels)
    y = labels.repeat_interleave(C)
    if solver is None:
        images = pipe.decode(pipe.generate(y, tables.shape[1], nat.table_schedule(tables), seed, group=C,
                                           logits_fn=nat.dedup_logits_fn(pipe.logits_fn)))
    else:
        images = pipe.generate(y, tables.shape[1], samplers.table_schedule(tables), solver, seed, group=C)
    feats = fid.extract(pipe.featnet, images, device=pipe.device)[0].view(n, C, -1)     # (n, C, D)
    return torch.tensor([fid.fid_from_features(feats[:, k], ref.train_mu, ref.train_sigma) for k in range(C)])


def search_problem(c: train.TrainConfig, run_dir: str, device: torch.device, kind: str, T: int) -> SearchProblem:
    """The problem of a search `kind` for T steps (for "flow": an NFE budget T), starting from the heuristic."""
    extra = {}
    if kind == "flow":
        nfe, solver = T, c.flow_pi_solver
        pipe = flow.FlowPipeline(run_dir, device, c.flow_path, c.bf16)
        ref = train.RealFeatures(pipe)
        T = samplers.steps_for_nfe(solver, nfe)
        h = samplers.grid_table(samplers.uniform_grid(T), train.get_w0(pipe, ref, c.pi_sweep_samples))  # (T, 2)
        fids = lambda tables, labels, seed: candidate_fids(pipe, ref, tables, labels, seed, solver=solver)
        name, columns, extra = f"{c.flow_path}_search_nfe{nfe}", ("t_next", "w"), {"solver": solver, "nfe": nfe}
    else:
        pipe = train.Pipeline(run_dir, device, c.bf16)
        ref = train.RealFeatures(pipe)
        w_0 = train.get_w0(pipe, ref, c.pi_sweep_samples)
        h = nat.heuristic_table(T, nat.ADANAT_TAU2_0, w_0)                # (T, 4)
        fids = lambda tables, labels, seed: candidate_fids(pipe, ref, tables, labels, seed)
        name, columns = f"{SEARCH_FILES[kind]}_T{T}", autonat.COLUMNS
    K = h.shape[1]
    if kind in ("free", "flow"):
        project = lambda xi: autonat.table_to_xi(autonat.project_table(autonat.xi_to_table(xi, K)))
        return SearchProblem(name, T, h, columns, fids, pipe, project(autonat.table_to_xi(h)),   # = h, m_{T-1} exactly 0
                             autonat.step_sizes(T, c.search_eps_m, c.search_eps, K),
                             autonat.step_sizes(T, c.search_lr_m, c.search_lr, K), autonat.free_coordinates(T, K),
                             lambda xi: autonat.xi_to_table(xi, K), project, c.search_updates, extra)
    n = len(autonat.PARAMS)
    return SearchProblem(name, T, h, columns, fids, pipe, autonat.parametric_init(nat.ADANAT_TAU2_0, w_0),
                         torch.full((n,), c.search_eps), torch.full((n,), c.search_lr), torch.ones(n, dtype=torch.bool),
                         lambda theta: autonat.parametric_table(theta, T), autonat.project_params, c.search_param_updates,
                         extra)


def search_schedule(c: train.TrainConfig, run_dir: str, device: torch.device, log: train.Logger, kind: str, T: int,
                    problem: SearchProblem | None = None) -> None:
    """AutoNAT §4.2 for one T: finite-difference gradient descent on training-set FID.

    kind "free": xi = the whole T x 4 table [m, tau1, tau2, w] (the paper's search);
    kind "param": theta = the six shape parameters of autonat.parametric_table;
    kind "flow": the ODE sampler's T x [t_next, w] table, T = the steps of flow_pi_solver that
    fit in the NFE budget `T` (AdaGen's continuous paradigm; the static-search baseline).
    All start from the heuristic (NAT: AdaNAT's, tau2_0 = 1, w_0 from the training-FID sweep; flow: uniform grid, constant
    swept w_0). One update generates its 1 + A candidates (A perturbed coordinates) on the same labels and random numbers as
    one interleaved batch; the checkpoint is written after every update. Another paradigm passes its own `problem`
    (experiments/var.py: kind "var", its eps signed already)."""
    P = problem or search_problem(c, run_dir, device, kind, T)
    path = os.path.join(run_dir, f"{P.name}.pt")
    scfg = {"kind": kind, "T": P.T, "start": P.h.tolist(), **P.extra, "samples": c.search_samples, "seed": c.search_seed,
            "eps": P.eps.tolist(), "lr": P.lr.tolist(), "momentum": c.search_momentum, "clip": c.search_clip}
    if os.path.exists(path):
        state = train.load_ckpt(path, expect_config=scfg)
        if state.get("final_step") == state["step"] < P.updates:          # extending a finished search
            state["history"].pop()                                        # its end point is update `step`'s start
            state["done"] = False
            del state["final_step"]
        print(f"resuming {P.name} from update {state['step']}")
    else:
        state = {"config": scfg, "step": 0, "model": {"xi": P.xi0, "v": torch.zeros_like(P.xi0)}, "best_xi": P.xi0,
                 "best_fid": math.inf, "history": [], "forwards": 0, "train_seconds": 0.0}
    labels = train.balanced_labels(c.search_samples, P.pipe.cfg.num_classes)
    C = 1 + int(P.active.sum())

    def F(X: torch.Tensor) -> torch.Tensor:                                # (C', D) -> (C',) training-set FIDs
        before = P.pipe.forwards
        values = P.candidate_fids(torch.stack([P.to_table(x) for x in X]), labels, c.search_seed)
        state["forwards"] += int(train.all_sum(P.pipe.forwards - before))    # image-forwards run on all ranks (CFG: 2 per step)
        if not torch.isfinite(values).all():                               # before the update (CPU values)
            raise FloatingPointError(f"candidate FID ({values.tolist()})")
        return values

    def step_fn(k: int) -> dict:
        xi = state["model"]["xi"]
        e = autonat.signed_steps(xi, P.eps, K=P.h.shape[1]) if kind in ("free", "flow") else P.eps   # candidates valid
        new, v, values, g = autonat.fd_update(F, xi, state["model"]["v"], e, P.lr, P.project, c.search_momentum,
                                              P.active, c.search_clip)          # values (C,): F(xi) first
        if values[0] < state["best_fid"]:
            state["best_fid"], state["best_xi"] = float(values[0]), xi.clone()
        state["model"] = {"xi": new, "v": v}
        out = {"train_fid": float(values[0]), "best_fid": state["best_fid"], "grad_norm": g.norm().item()}
        state["history"].append({"update": k, **out, "grad": [round(x, 4) for x in g.tolist()]})
        return out

    print(f"{P.name}: {C} candidates x {len(labels)} samples per update, {P.updates} updates")
    state = train.train_loop(P.name, path, state, {}, step_fn, P.updates,
                            dataclasses.replace(c, log_every=1, ckpt_every_s=0.0), log)
    if state.get("final_step") != state["step"]:                          # the last update's result, measured once
        # in the updates' batch layout (C rows per sample), so with the same random numbers as every F(xi)
        final = float(F(state["model"]["xi"].expand(C, -1))[0])
        if final < state["best_fid"]:
            state["best_fid"], state["best_xi"] = final, state["model"]["xi"].clone()
        state["history"].append({"update": state["step"], "train_fid": final, "best_fid": state["best_fid"]})
        state["final_step"] = state["step"]
    state.update(done=True, table=P.to_table(state["best_xi"]))
    train.save_ckpt(path, state)
    write_search_summary(P, state, kind, scfg, C, len(labels), run_dir, device)


def write_search_summary(P: SearchProblem, state: dict, kind: str, scfg: dict, C: int, n: int, run_dir: str,
                         device: torch.device) -> None:
    """<name>.json (the searched table, the FID history, the cost) and <name>_curve.png."""
    name, T, h, table = P.name, P.T, P.h, state["table"]
    start = state["history"][0]["train_fid"]
    summary = {"kind": kind, "T": T, "columns": list(P.columns), "table": table.tolist(),
               "start_table": h.tolist(), "train_fid_start": start, "train_fid_best": state["best_fid"],
               "updates": state["step"], "candidates_per_update": C, "samples_per_candidate": n,
               "generator_forwards": state["forwards"],
               "generator_forwards_without_dedup": (state["step"] + 1) * C * n * T * 2
               if kind in ("free", "param") else None,                     # the others' candidates share no prefix
               "minutes": state["train_seconds"] / 60, "device": str(device), "history": state["history"], "config": scfg}
    if kind == "param":
        summary["theta"] = dict(zip(autonat.PARAMS, state["best_xi"].tolist()))
    train.write_json(os.path.join(run_dir, f"{name}.json"), summary)
    ups = [r["update"] for r in state["history"]]
    panels = [{"title": "train FID per update (best: red)", "series": [
        {"x": ups, "y": [r["train_fid"] for r in state["history"]], "color": (40, 90, 200)},
        {"x": ups, "y": [r["best_fid"] for r in state["history"]], "color": (200, 40, 40), "dashed": True}]}]
    steps = list(range(T))
    panels += [{"title": f"{a} per step (start dashed)", "series": [
        {"x": steps, "y": h[:, j].tolist(), "color": (120, 120, 120), "dashed": True},
        {"x": steps, "y": table[:, j].tolist(), "color": (40, 90, 200)}]} for j, a in enumerate(P.columns)]
    data.plot_panels(os.path.join(run_dir, f"{name}_curve.png"), panels, title=f"{name}: AutoNAT search", save=train.DIST.main)
    print(f"{name}: training-set FID {start:.2f} -> {state['best_fid']:.2f} in {state['step']} updates, "
          f"{state['forwards'] / 1e6:.2f}M generator forwards, {state['train_seconds'] / 60:.1f} min; {name}.json")


def stage_search(stage: str):
    """The stage function of `search` / `param-search` (one search per T in search_T) and of
    `flow-search` (one per NFE budget in flow_pi_nfe)."""
    kind = SEARCH_KINDS[stage]

    def run(c: train.TrainConfig, run_dir: str, device: torch.device, log: train.Logger) -> None:
        for T in (c.flow_pi_nfe if kind == "flow" else c.search_T):
            name = f"{c.flow_path}_search_nfe{T}" if kind == "flow" else f"{SEARCH_FILES[kind]}_T{T}"
            path = os.path.join(run_dir, f"{name}.pt")
            updates = c.search_param_updates if kind == "param" else c.search_updates
            if os.path.exists(path):
                ck = train.load_ckpt(path)
                if ck.get("done") and ck["step"] >= updates:
                    print(f"{name}: done ({path}), skipped")
                    continue
            search_schedule(c, run_dir, device, log, kind, T)
    return run


def sub_run(c: train.TrainConfig, run_dir: str, sub: str, **changes) -> train.TrainConfig:
    """A run folder sharing this run's tokenizer and feature network (copied), its config = c + changes."""
    if train.DIST.main:                                                           # one rank touches the files
        if os.path.exists(os.path.join(sub, "vq.pt")) and not all(
                filecmp.cmp(os.path.join(sub, f), os.path.join(run_dir, f), shallow=False) for f in ("vq.pt", "featnet.pt")):
            shutil.rmtree(sub)                                              # made with another tokenizer: start over
        os.makedirs(sub, exist_ok=True)
        for f in ("vq.pt", "featnet.pt"):
            if os.path.exists(os.path.join(run_dir, f)) and not os.path.exists(os.path.join(sub, f)):
                shutil.copyfile(os.path.join(run_dir, f), os.path.join(sub, f))
    c2 = dataclasses.replace(c, **changes)
    train.write_json(os.path.join(sub, "config.json"), train.to_plain(c2))
    train.barrier()
    return c2


def stage_pr_search(c: train.TrainConfig, run_dir: str, device: torch.device, log: train.Logger, train_nat: Callable) -> None:
    """AutoNAT §4.3 and one round of its Algorithm 1, with short proxy trainings.

    Each candidate p(r) = Beta(alpha, beta) trains a NAT for pr_steps in pr/beta_<alpha>_<beta>_s<steps>/ (same tokenizer,
    data and seed) and is scored by the training-set FID of its samples at T = pr_T under the searched schedule
    (search_T{pr_T}.pt, else AdaNAT's heuristic); the greedy line search in (alpha/beta, beta) (autonat.beta_line_search)
    spends at most pr_budget trainings. A proxy of the default cosine p(r) is trained as the reference (outside the budget).
    With pr_final, the chosen p(r) then trains the full generator in beta/ and the schedule is searched again for it
    (Algorithm 1, lines 5-9: sample.py adds its rows). train_nat: the NAT stage (train.py gives its stage_nat)."""
    pipe = train.Pipeline(run_dir, device, c.bf16)
    ref = train.RealFeatures(pipe)
    found = train.searched_table(run_dir, "search", c.pr_T)
    table = found[0] if found else nat.heuristic_table(c.pr_T, nat.ADANAT_TAU2_0, train.get_w0(pipe, ref, c.pi_sweep_samples))
    labels = train.balanced_labels(c.pr_samples, pipe.cfg.num_classes)
    path = os.path.join(run_dir, "pr_search.json")
    setup = {"steps": c.pr_steps, "T": c.pr_T, "schedule": table.tolist(), "samples": c.pr_samples, "seed": c.search_seed}
    saved = train.read_json(path, {})
    results = saved if saved.get("setup") == setup else {"setup": setup, "cache": {}}

    def proxy_fid(sub: str, **changes) -> float:
        d = os.path.join(run_dir, "pr", sub)
        c2 = sub_run(c, run_dir, d, nat_steps=c.pr_steps, **changes)
        if not train.is_done(os.path.join(d, "nat.pt")):
            train_nat(c2, d, device, train.Logger(d))
            train.barrier()                                                       # rank 0's nat.pt before anyone reads it
        value = float(candidate_fids(train.Pipeline(d, device, c.bf16), ref, table[None], labels, c.search_seed)[0])
        log(stage="pr-search", candidate=sub, train_fid=value, **changes)
        print(f"pr-search: {sub}: training-set FID {value:.2f} (T={c.pr_T}, {c.pr_samples} samples)")
        return value

    if "cosine_proxy" not in results:
        results["cosine_proxy"] = proxy_fid(f"cosine_s{c.pr_steps}", nat_mask_dist="cosine")
        train.write_json(path, results)

    def F(alpha: float, beta: float) -> float:
        value = proxy_fid(f"beta_{alpha:.4g}_{beta:.4g}_s{c.pr_steps}", nat_mask_dist="beta", nat_mask_alpha=alpha, nat_mask_beta=beta)
        train.write_json(path, results)                       # the cache entry is added by the line search, after
        return value

    (alpha, beta), _ = autonat.beta_line_search(F, budget=c.pr_budget, cache=results["cache"])
    best = min(results["cache"].values())
    results.update(alpha=alpha, beta=beta, train_fid=best, trainings=len(results["cache"]))
    train.write_json(path, results)
    print(f"pr-search: Beta(alpha={alpha:.3g}, beta={beta:.3g}), proxy FID {best:.2f} vs the cosine proxy's "
          f"{results['cosine_proxy']:.2f}, {len(results['cache'])} trainings of {c.pr_steps} steps; {path}")
    if c.pr_final:
        d = os.path.join(run_dir, "beta")
        c2 = sub_run(c, run_dir, d, nat_mask_dist="beta", nat_mask_alpha=alpha, nat_mask_beta=beta)
        ck = os.path.join(d, "nat.pt")
        trained = train.load_ckpt(ck) if os.path.exists(ck) else None
        if trained is not None and (trained["config"]["alpha"], trained["config"]["beta"]) != (alpha, beta):
            raise train.UserError(f"{ck} was trained with another p(r); delete {d} to train the chosen one")
        if not (trained and trained.get("done")):
            train_nat(c2, d, device, train.Logger(d))
            train.barrier()
        STAGES["search"](c2, d, device, train.Logger(d))                      # skips the T already searched
        print(f"pr-search: the Beta-trained generator and its searched schedules are in {d}; sample.py --eval adds their rows")


STAGES = {**{stage: stage_search(stage) for stage in SEARCH_KINDS},
          "pr-search": functools.partial(stage_pr_search, train_nat=train.stage_nat)}

if __name__ == "__main__":
    train.main(stages=STAGES, default=["search", "param-search"], doc=__doc__)
