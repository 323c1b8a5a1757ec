"""Run folders: errors, devices, checkpoints, config I/O, fingerprints, logs, the loop every stage shares.

A run folder holds config.json, log.jsonl (one JSON object per logged step) and one checkpoint
per stage: a dict of plain types and tensors, written atomically (temp file + os.replace) by
rank 0, loadable with torch.load(path, weights_only=True). `train_loop` runs a stage's steps
with a tqdm bar, logs, periodic / final / Ctrl-C checkpoints, and stops on run faults:

    bad input (UserError)           one line on stderr, exit code 2, nothing overwritten
    run fault (RunFault)            one line on stderr, exit code FAULT_EXIT = 3: a non-finite
                                    loss, gradient norm, reward or FID (checked before the
                                    update), a failed write (disk full), out of memory; the
                                    last good checkpoint stays loadable, re-running resumes

Usage:
    state = {**resume(path, cfg, modules), "config": cfg, "done": False}
    state = train_loop("nat", path, state, modules, step_fn, total, c, Logger(run_dir))
"""
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable

import torch
from tqdm import tqdm

import ddp


FAULT_EXIT = 3          # exit code of a run fault (non-finite values, a failed write, out of memory); bad input: 2


class RunFault(Exception):
    """A fault of a running stage (non-finite loss, failed checkpoint write, out of memory): one
    line on stderr, exit code FAULT_EXIT; the last good checkpoint stays loadable."""


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device auto or cpu")
    if name.startswith("cuda:") and name[5:].isdigit() and int(name[5:]) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name}: {e}") from None


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA (TF32 is set in main); a no-op on CPU."""
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def rank_batch(global_batch: int, name: str) -> int:
    """This rank's share of a preset's global batch."""
    if global_batch % ddp.DIST.world:
        raise UserError(f"{name} = {global_batch} does not split over {ddp.DIST.world} processes: use a multiple")
    return global_batch // ddp.DIST.world


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """write(tmp) then os.replace(tmp, path) (rank 0 only): an interrupt never leaves a truncated
    file. A failed write (disk full, permission) removes the temp file, leaves `path` as it was
    and raises RunFault naming the path and the reason."""
    if not ddp.DIST.main:
        return
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        was = "the previous file is intact" if os.path.exists(path) else "nothing was written"
        raise RunFault(f"could not write {path}: {e.strerror or e} ({was}); free space or fix the folder's permissions, "
                       f"then re-run the same command to resume") from None


def save_ckpt(path: str, obj: dict) -> None:
    """Atomic checkpoint write (temp file + os.replace, rank 0 only); see atomic_write."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_ckpt(path: str, expect_config: dict | None = None) -> dict:
    """Load a checkpoint with weights_only=True; clear errors for corrupt or mismatched files."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path} not found: run the stage that makes it (python train.py --run-dir {os.path.dirname(path)})") from None
    except Exception as e:  # truncated zip, pickle error, ...
        raise UserError(f"{path} is corrupt or not a checkpoint ({type(e).__name__}); delete it to retrain that stage") from None
    if not isinstance(ck, dict) or "model" not in ck or "config" not in ck:
        raise UserError(f"{path} is not a checkpoint of this project (no 'model'/'config'); delete it to retrain that stage")
    if expect_config is not None and ck["config"] != expect_config:
        diff = sorted(k for k in set(ck["config"]) | set(expect_config) if ck["config"].get(k) != expect_config.get(k))
        raise UserError(f"{path} was trained with another config (differs in {', '.join(diff)}); "
                        f"use the run folder's own flags, another --run-dir, or delete the file to retrain")
    return ck


def to_plain(cfg) -> dict:
    """A dataclass as a dict of plain types (tuples become lists, as in JSON)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def fingerprint(run_dir: str, stages: tuple = ("vq", "featnet", "nat")) -> str:
    """Identifies the trained models of a run folder (step and training time of each checkpoint),
    so that cached evaluation results are never reused for other weights."""
    parts = []
    for s in stages:
        ck = load_ckpt(os.path.join(run_dir, f"{s}.pt"))
        parts.append(f"{s}:{ck.get('step')}:{round(ck.get('train_seconds', 0.0), 1)}")
    return "|".join(parts)


def write_json(path: str, obj) -> None:
    """Atomic JSON write (temp file + os.replace, rank 0 only); see atomic_write."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    atomic_write(path, write)


def finite_json(v):
    """v with every non-finite float replaced by None: json.dumps then writes null, valid JSON (not NaN)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [finite_json(x) for x in v]
    if isinstance(v, dict):
        return {k: finite_json(x) for k, x in v.items()}
    return v


def read_json(path: str, default=None):
    """JSON from path, or `default` when the file is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


class Logger:
    """Appends one JSON object per record to <run_dir>/log.jsonl."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, "log.jsonl")

    def __call__(self, **record) -> None:
        if not ddp.DIST.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(finite_json({"time": round(time.time(), 1), **record}), allow_nan=False) + "\n")


def train_loop(name: str, ck_path: str, state: dict, modules: dict, step_fn, total: int, c,
               log: Logger) -> dict:
    """The loop every stage shares: tqdm bar, log.jsonl, checkpoints (periodic, final, on Ctrl-C).

    state: the checkpoint dict, state["step"] = steps done (the loop resumes there);
    modules: name -> module or optimizer, saved as state[name] = its state_dict();
    step_fn(step) -> dict of floats trains one step in place; c: the run's TrainConfig (log_every,
    ckpt_every_s, and fault_keys(name): the keys a run fault's advice names).
    """
    def snapshot() -> dict:
        state.update({k: m.state_dict() for k, m in modules.items()}, rng=torch.get_rng_state())
        return state

    def fault(what: str, step: int, advice: str, note: str = "") -> RunFault:
        """Save the state before this step if it is finite (else keep the last checkpoint); the one-line error."""
        bar.close()
        if all_finite(snapshot()):
            save_ckpt(ck_path, state)
            kept = f"its last good state (step {state['step']}) is saved in {ck_path}"
        else:
            kept = f"nothing non-finite was saved: the last checkpoint in {ck_path} is kept" if os.path.exists(ck_path) \
                else "nothing was saved"
        return RunFault(f"{name}: {what} at step {step + 1}{note}; {kept}. {advice}")

    last_save, t0, last_loss = time.time(), time.time(), None
    lr_key, batch_key = c.fault_keys(name)
    bar = tqdm(range(state["step"], total), initial=state["step"], total=total, desc=name, dynamic_ncols=True,
               disable=not ddp.DIST.main)
    try:
        for step in bar:
            try:
                metrics = step_fn(step)
            except FloatingPointError as e:                          # a step_fn found a non-finite value before its update
                value = getattr(c, lr_key)
                raise fault(f"non-finite {e}", step,
                            f"Try a lower learning rate in a new run folder (a run folder's config is fixed), e.g. "
                            f"--set {lr_key}={value / 10:g} --run-dir <new>; or, if the fault was transient, re-run "
                            f"the same command to resume",
                            f" (last finite loss {last_loss:.6g})" if last_loss is not None else "") from None
            except torch.OutOfMemoryError:
                raise fault("out of memory", step, f"Lower the batch: {oom_advice(c, batch_key)}; or, if memory was "
                            f"short only for a while, re-run the same command to resume") from None
            last_loss = metrics.get("loss", last_loss)
            state["step"] = step + 1
            if step % c.log_every == 0 or step + 1 == total:
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if not isinstance(v, list)})
                log(stage=name, step=step + 1, **{k: v if isinstance(v, list) else round(float(v), 6)
                                                  for k, v in metrics.items()})
            if time.time() - last_save > c.ckpt_every_s:
                save_ckpt(ck_path, snapshot())
                last_save = time.time()
    except KeyboardInterrupt:
        bar.close()
        state["train_seconds"] = state.get("train_seconds", 0.0) + time.time() - t0
        save_ckpt(ck_path, snapshot())
        print(f"\ninterrupted: {name} saved at step {state['step']} in {ck_path}; re-run the same command to resume")
        sys.exit(130)
    bar.close()
    state["train_seconds"] = state.get("train_seconds", 0.0) + time.time() - t0
    save_ckpt(ck_path, snapshot())                     # trained weights are safe before the final evaluation
    return state


def all_finite(obj) -> bool:
    """True when every floating-point tensor in a (nested) checkpoint dict is finite."""
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    return True


def check_finite(**values: float) -> None:
    """Raise FloatingPointError naming the first non-finite value (a float the loop has already
    synchronised for its log, so the check costs no extra host synchronisation)."""
    for k, v in values.items():
        if not math.isfinite(v):
            raise FloatingPointError(f"{k} ({v})")


def oom_advice(c, key: str) -> str:
    """What to lower after an out-of-memory error, for the batch key of the stage."""
    if key == "gen_rows":
        now = f"gen_rows = {c.gen_rows}" if c.gen_rows else "gen_rows = 0 (whole chunks: 500 rows on CPU, 4096 on CUDA)"
        return (f"generating at {now}: set fewer rows per generator forward, e.g. --set gen_rows=128; it splits the "
                f"forwards only, so the samples do not change")
    value = getattr(c, key)
    extra = "" if key != "pi_batch" else ", or lower gen_rows (rows per generator forward; the samples do not change)"
    return f"at {key} = {value}: lower it in a new run folder, e.g. --set {key}={max(1, value // 2)} --run-dir <new>{extra}"


def resume(ck_path: str, model_cfg: dict, modules: dict) -> dict:
    """Load a stage checkpoint into `modules` (name -> module/optimizer) if one exists."""
    if not os.path.exists(ck_path):
        return {"step": 0}
    ck = load_ckpt(ck_path, expect_config=model_cfg)
    for k, m in modules.items():
        m.load_state_dict(ck[k])
    if "rng" in ck:
        torch.set_rng_state(ck["rng"])
        if ddp.DIST.world > 1:                              # ranks go on from rank 0's saved state, each its own way
            torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,))) + ddp.DIST.rank)
    print(f"resuming {os.path.basename(ck_path)} from step {ck['step']}")
    return ck


def is_done(path: str) -> bool:
    """Whether a stage checkpoint exists and is finished."""
    return os.path.exists(path) and bool(load_ckpt(path).get("done"))


def write_text(path: str, text: str) -> None:
    """A text file, written by rank 0 alone in a torchrun job."""
    if ddp.DIST.main:
        with open(path, "w") as f:
            f.write(text)
