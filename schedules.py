"""The schedules of a run folder that sample.py and the experiments compare: file names of the
trained policies, the finished searches' tables, the trained policies as schedules, the rows'
names and the evaluation seeds.

Usage:
    found = policy_schedule(pipe, "policy", 8)          # (make_schedule, config, fingerprint) or None
    table, cfg, fp = searched_table(pipe, "search", 4)
"""
import os

import torch

import models
import policy
import runs


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


def searched_table(pipe, name: str, T: int) -> tuple | None:
    """(table (T, 4), config, fingerprint) of a finished search `name` ("search" or "param") for T, or None."""
    path = os.path.join(pipe.run_dir, f"{name}_T{T}.pt")
    if not os.path.exists(path):
        return None
    ck = runs.load_ckpt(path)
    if not ck.get("done"):
        return None
    return ck["table"], ck["config"], runs.fingerprint(pipe.run_dir, (f"{name}_T{T}",))


POLICY_ROWS = {"static": "learned static (PPO, no state)", "policy": "adaptive policy (PPO)",
               "smooth": "adaptive + smoothing (PPO, beta_ema={beta_ema:g})"}


def policy_schedule(pipe, kind: str, T: int, start: str = "heuristic",
                    reward_name: str = "adversarial", weights: str = "best") -> tuple | None:
    """(make_schedule, config, fingerprint) of the trained `kind` policy for T whose residual
    starts from `start` (PI_STARTS), trained on `reward_name`, or None if there is none;
    weights "best" (by training-set FID) or "model" (the last iterate)."""
    name = policy_file(kind, start, T, reward_name)
    path = os.path.join(pipe.run_dir, f"{name}.pt")
    if not os.path.exists(path):
        return None
    pi, cfg = models.load_policy(path, pipe.device, weights)
    h_pre = policy.inverse_activation(torch.tensor(cfg["heuristic"])).to(pipe.device)
    make = lambda: policy.PolicySchedule(pi, h_pre, beta_ema=cfg["beta_ema"])
    return make, cfg, runs.fingerprint(pipe.run_dir, (name,))


def last_is_best(run_dir: str, kind: str, T: int, start: str = "heuristic") -> bool:
    """Whether a policy checkpoint's last iterate is its best-by-training-FID weights (one row suffices)."""
    ck = runs.load_ckpt(os.path.join(run_dir, f"{policy_file(kind, start, T)}.pt"))
    return all(torch.equal(ck["best"][k], ck["model"][k]) for k in ck["best"])


SEARCH_ROWS = {"param": "parametric family (searched, 6 shape parameters)", "search": "AutoNAT search (free T x 4 table)"}
