"""End to end through the real command line: train.py --preset test, the experiments' scripts, sample.py; bad input."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import train


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("run") / "test")
    r = run("train.py", "--preset", "test", "--run-dir", d)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run("experiments/search.py", "--run-dir", d)                      # AutoNAT's searches: search, param-search
    assert r.returncode == 0, r.stderr[-3000:]
    return d


def copy(run_dir: str, d, *files: str) -> None:
    d.mkdir()
    for f in files:
        (d / f).write_bytes(open(os.path.join(run_dir, f), "rb").read())


def test_train_writes_everything(run_dir):
    policies = [f"{k}_T4" for k in ("policy", "static", "smooth")]
    searches = ["search_T4", "param_T4"]
    for f in ["config.json", "log.jsonl", "vq.pt", "featnet.pt", "featnet2.pt", "featssl.pt", "nat.pt", "backbone.pt", "sweep_w.json"] + \
             [f"{p}.pt" for p in policies + searches] + [f"{p}_curve.png" for p in policies + searches] + \
             [f"{p}.json" for p in searches]:
        assert os.path.exists(os.path.join(run_dir, f)), f
    records = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
    assert {r["stage"] for r in records} == {"vq", "featnet", "featnet2", "featssl", "nat", "search", "param-search", "backbone",
                                             "policy", "static", "smooth"} | set(policies) | set(searches)
    vq_records = [r for r in records if r["stage"] == "vq" and "percep" in r]
    assert vq_records and all(r["percep"] >= 0 for r in vq_records)      # the perceptual loss on the backbone
    for name, C in (("search_T4", 1 + 4 * 4 - 2), ("param_T4", 1 + 6)):
        ck = torch.load(os.path.join(run_dir, f"{name}.pt"), weights_only=True)
        summary = json.load(open(os.path.join(run_dir, f"{name}.json")))
        assert ck["done"] and ck["step"] == 2 and summary["candidates_per_update"] == C
        assert [h["update"] for h in summary["history"]] == [0, 1, 2]       # + the final point, measured once
        assert summary["train_fid_best"] == min(h["train_fid"] for h in summary["history"])
        full = (2 + 1) * C * 40 * 4 * 2                                    # (updates + final) x C x samples x T x CFG
        assert summary["generator_forwards_without_dedup"] == full and 0 < summary["generator_forwards"] < full
        table = torch.tensor(summary["table"])                              # valid: m strictly decreasing to 0
        assert table.shape == (4, 4) and (table[1:, 0] < table[:-1, 0]).all() and table[-1, 0] == 0
        assert (table[:, 1:] >= 0).all() and torch.equal(ck["table"], table)
    for p in policies:
        ck = torch.load(os.path.join(run_dir, f"{p}.pt"), weights_only=True)
        assert ck["done"] and ck["step"] == 4 and ck["best_fid"] >= 0
        ppo_records = [r for r in records if r["stage"] == p and "approx_kl" in r]
        assert len(ppo_records) == 3                                     # 4 iterations, the first trains D only
        assert all(0 <= r["d_acc"] <= 1 and 0 < r["reward"] < 1 for r in ppo_records)
        assert all(len(r["act_mean"]) == 4 and len(r["act_mean"][0]) == 4 and r["residual_rms"] >= 0 and
                   "penalty" in r for r in ppo_records)                  # the mean action per step, the anchor
        for r in ppo_records:                                           # per class (nan: absent): the mean lies between
            per_class = torch.tensor([[[math.nan if a is None else a for a in row] for row in k] for k in r["act_class"]])   # (K, T, D)
            mean = torch.tensor(r["act_mean"])                          # (T, D)
            seen = per_class[~per_class.isnan().any(-1).any(-1)]
            assert per_class.shape == (10, 4, 4) and 0 < len(seen) < 10 and (seen.amin(0) - 1e-4 <= mean).all() and (mean <= seen.amax(0) + 1e-4).all()
        assert "disc_warmup" in ck and 0 <= ck["d_acc_warmup"] <= 1 and "replay" not in ck
    assert ck["config"]["beta_ema"] == 0.5 and ck["config"]["kind"] == "smooth"
    for stage in ("vq", "featnet", "nat"):
        ck = torch.load(os.path.join(run_dir, f"{stage}.pt"), weights_only=True)   # plain types + tensors
        assert ck["done"] and ck["step"] > 0 and isinstance(ck["config"], dict)
    vq = torch.load(os.path.join(run_dir, "vq.pt"), weights_only=True)["metrics"]
    assert set(vq) == {"test_mse", "test_usage", "test_perplexity"}


def test_rerun_skips_finished_stages(run_dir):
    before = os.path.getmtime(os.path.join(run_dir, "nat.pt"))
    r = run("train.py", "--run-dir", run_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "nat: done" in r.stdout and "skipped" in r.stdout
    assert os.path.getmtime(os.path.join(run_dir, "nat.pt")) == before


def test_resume_continues_an_interrupted_stage(run_dir, tmp_path):
    """A checkpoint with done=False at step k: re-running continues from k to the end."""
    d = tmp_path / "resume"
    copy(run_dir, d, "config.json", "vq.pt", "featnet.pt")
    ck = torch.load(os.path.join(run_dir, "nat.pt"), weights_only=True)
    ck.update(done=False, step=20)
    torch.save(ck, d / "nat.pt")
    r = run("train.py", "--run-dir", str(d))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming nat.pt from step 20" in r.stdout
    steps = [json.loads(line)["step"] for line in open(d / "log.jsonl") if '"nat"' in line and '"step"' in line]
    assert min(steps) > 20 and max(steps) == 30


def test_policy_stage_resumes(run_dir, tmp_path):
    """An interrupted policy checkpoint (done=False at iteration 2) continues to the end."""
    d = tmp_path / "policy"
    copy(run_dir, d, "config.json", "vq.pt", "featnet.pt", "nat.pt", "backbone.pt", "sweep_w.json")
    ck = torch.load(os.path.join(run_dir, "policy_T4.pt"), weights_only=True)
    ck.update(done=False, step=2, history=ck["history"][:3])
    torch.save(ck, d / "policy_T4.pt")
    r = run("train.py", "--stage", "policy", "--run-dir", str(d))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming policy_T4.pt from step 2" in r.stdout
    back = torch.load(d / "policy_T4.pt", weights_only=True)
    assert back["done"] and back["step"] == 4 and [h["iter"] for h in back["history"]] == [0, 1, 2, 3, 4]
    # another pi_* value against the same checkpoint: a clear error, nothing overwritten
    back.update(done=False)
    torch.save(back, d / "policy_T4.pt")
    _fails(run("train.py", "--stage", "policy", "--set", "pi_lr=0.5", "--run-dir", str(d)), "another config")


def test_official_recipe_and_the_concept_self_checks(run_dir, tmp_path):
    """The README's other commands: the AdaNAT release's PPO (--set pi_recipe=official) and the concept
    files' self-checks (python samplers.py: the solvers' convergence orders)."""
    d = tmp_path / "official"
    copy(run_dir, d, "config.json", "vq.pt", "featnet.pt", "nat.pt", "backbone.pt", "sweep_w.json")
    r = run("train.py", "--stage", "policy", "--run-dir", str(d), "--set", "pi_recipe=official", "--set", "pi_iters=2")
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = torch.load(d / "policy_T4.pt", weights_only=True)["config"]
    assert (cfg["pi_lr"], cfg["pi_minibatches"], cfg["pi_sigma_schedule"]) == (1e-5, 1, "step")   # OFFICIAL_RECIPE
    for concept in ("samplers.py", "policy.py", "ppo.py", "var.py"):
        r = run(concept)
        assert r.returncode == 0, (concept, r.stderr[-2000:])


def test_policy_on_the_searched_table(run_dir, tmp_path):
    """pi_start=search: the residual's zero point is the finished AutoNAT table (its own file,
    its own eval row); a missing search or an unknown start is a one-line error."""
    d = tmp_path / "start"
    copy(run_dir, d, "config.json", "vq.pt", "featnet.pt", "nat.pt", "backbone.pt", "sweep_w.json", "search_T4.pt")
    r = run("train.py", "--stage", "static", "--run-dir", str(d), "--set", "pi_start=search", "--set", "pi_iters=1")
    assert r.returncode == 0, r.stderr[-2000:]
    ck = torch.load(d / "static_search_T4.pt", weights_only=True)
    table = torch.load(d / "search_T4.pt", weights_only=True)["table"]
    assert ck["done"] and ck["config"]["pi_start"] == "search"
    assert torch.tensor(ck["config"]["heuristic"]).allclose(table.float())
    assert not os.path.exists(d / "static_T4.pt")
    r = run("sample.py", "--run-dir", str(d), "--eval", "--samples", "20", "--sweep-samples", "30", "--decode-steps", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["schedule"] for row in json.load(open(d / "eval.json"))["rows"]}
    assert "learned static (PPO, no state, on the AutoNAT table)" in rows
    _fails(run("train.py", "--stage", "static", "--run-dir", str(d), "--set", "pi_start=param"), "no finished param_T4.pt")
    _fails(run("train.py", "--stage", "static", "--run-dir", str(d), "--set", "pi_start=best"), "pi_start 'best'")


def test_flow_stage_and_its_table(run_dir, tmp_path):
    """experiments/flow.py train --stage flow (both paths) trains the continuous generator; its sample side
    draws grids and evaluates every solver x grid at an NFE budget, counting network evaluations."""
    d = tmp_path / "flow"
    copy(run_dir, d, "config.json", "featnet.pt", "backbone.pt")
    flow = lambda *a: run("experiments/flow.py", *a)
    for path in ("flow", "vp"):
        r = flow("train", "--stage", "flow", "--set", f"flow_path={path}", "--run-dir", str(d))
        assert r.returncode == 0, r.stderr[-2000:]
        ck = torch.load(d / f"{path}.pt", weights_only=True)
        assert ck["done"] and ck["step"] == 20 and ck["config"]["path"] == path
    r = flow("sample", "--run-dir", str(d), "--path", "vp", "--nfe", "3")
    assert r.returncode == 0 and os.path.exists(d / "vp_samples_nfe3.png"), r.stderr[-2000:]
    r = flow("train", "--stage", "flow-policy", "--run-dir", str(d))        # PPO on the ODE sampler's MDP
    assert r.returncode == 0, r.stderr[-2000:]
    ck = torch.load(d / "flow_policy_nfe4.pt", weights_only=True)
    assert ck["done"] and ck["step"] == 4 and ck["config"]["spec"] == ["f", "w"] and ck["config"]["T"] == 4
    r = run("experiments/search.py", "--stage", "flow-search", "--run-dir", str(d), "--set", "search_updates=1")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.load(open(d / "flow_search_nfe4.json"))
    assert summary["candidates_per_update"] == 1 + 2 * 4 - 1 and summary["columns"] == ["t_next", "w"]
    table = torch.tensor(summary["table"])                                     # a valid grid: decreasing to 0
    assert (table[1:, 0] < table[:-1, 0]).all() and table[-1, 0] == 0 and table[0, 0] < 1 and (table[:, 1] >= 0).all()
    r = flow("sample", "--run-dir", str(d), "--eval", "--samples", "20", "--sweep-samples", "20", "--nfe", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.load(open(d / "flow_eval.json"))["rows"]
    assert len(rows) == 14 and all(r["fid"] >= 0 for r in rows)       # 3 solvers x (3 grids + interval) + search + policy
    assert {(r["solver"], r["T"], r["nfe"]) for r in rows} == {("euler", 4, 4), ("heun", 2, 3), ("dpmpp2s", 2, 3)}
    adaptive = [r for r in rows if r["schedule"] == "adaptive policy (PPO, euler)"][0]
    assert len(adaptive["actions_sd_per_step"]) == 4 and adaptive["actions"] == ["f", "w"]
    r = flow("sample", "--run-dir", str(d), "--plot", "--nfe", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    r = flow("sample", "--run-dir", str(d), "--bench", "--nfe", "4", "--batch", "8")
    assert r.returncode == 0 and "policy cost" in r.stdout, r.stderr[-2000:]
    r = flow("sample", "--run-dir", str(d), "--nfe", "4", "--repeat", "2")   # D keeps the best of 2: 2 x 4 steps x [cond; null]
    assert r.returncode == 0 and "16.0 network rows per image" in r.stdout, r.stderr[-2000:]
    for f in ("flow_policy_grids_nfe4.png", "flow_heuristic_vs_adaptive_nfe4.png", "flow_samples_adaptive_repeat2_nfe4.png"):
        assert os.path.exists(d / f), f
    _fails(flow("sample", "--run-dir", str(run_dir)), "--stage flow")
    _fails(flow("sample", "--run-dir", str(d), "--lookahead", "2"), "unrecognized arguments: --lookahead")   # NAT only
    _fails(flow("--run-dir", str(d)), "train|sample")


def test_var_stages_and_table(run_dir, tmp_path):
    """experiments/var.py: the multi-scale tokenizer from vq.pt, the next-scale transformer, both PPO stages on the
    K = 7 scale MDP, then the table (floor row, VAR's defaults, no guidance, the swept w_max, the policies), the
    per-scale action plot, the reward check, the bench and the grids; a missing stage is a one-line error naming the command."""
    d = tmp_path / "var"
    copy(run_dir, d, "config.json", "vq.pt", "featnet.pt", "featnet2.pt", "featssl.pt", "backbone.pt")
    v = lambda *a: run("experiments/var.py", *a, "--run-dir", str(d))
    _fails(v("sample"), "--stage msvq")
    for stage in ("all", "var-search", "var-policy", "var-static"):                 # all: msvq, then var
        r = v("train", "--stage", stage, "--set", "search_updates=1")
        assert r.returncode == 0, (stage, r.stderr[-2000:])
    ms = torch.load(d / "msvq.pt", weights_only=True)
    assert ms["done"] and ms["step"] == 10 and {f"usage_s{s}" for s in (1, 2, 3, 4, 5, 6, 8)} <= set(ms["metrics"])
    ck = torch.load(d / "var_policy_T7.pt", weights_only=True)
    assert ck["done"] and ck["config"]["spec"] == ["w", "k_frac", "p", "tau"] and ck["config"]["T"] == 7
    assert ck["config"]["pi_width"] == 32                                    # var_pi_width, over the preset's pi_width
    assert len(ck["history"][-1]["act_mean"]) == 7                           # a decision per scale
    summary = json.load(open(d / "var_search_T7.json"))                      # 1 + 7 x 4 candidates, a valid table
    table = torch.tensor(summary["table"])
    assert summary["candidates_per_update"] == 29 and summary["columns"] == ["w", "k_frac", "p", "tau"]
    assert (table[:, 0] >= 0).all() and (table[:, 1:3] <= 1).all() and (table[:, 1:] > 0).all()
    r = v("train")                                                           # finished: both skipped
    assert r.returncode == 0 and "msvq: done" in r.stdout and "var: done" in r.stdout, r.stderr[-2000:]
    r = v("sample", "--eval", "--plot", "--samples", "20", "--sweep-samples", "20")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.load(open(d / "var_eval.json"))
    names = [row["schedule"] for row in out["rows"]]
    w_max = json.load(open(d / "var_sweep_w.json"))["w_0"]
    swept = f"VAR defaults (w ramp 0 -> {w_max:g}, top-k 900/4096, top-p 0.96, tau 1), w_max swept"
    assert swept in names and ("VAR defaults (w ramp 0 -> 1.5, top-k 900/4096, top-p 0.96, tau 1)" in names) == (w_max != 1.5)
    assert ("no guidance (top-k 900/4096, top-p 0.96)" in names) == (w_max != 0)   # a fixed row only if it differs
    assert {"learned static (PPO, no state)", "adaptive policy (PPO)", "AutoNAT search (free K x 4 table)"} <= set(names)
    assert "multi-scale tokenizer reconstructions of test vs test (floor)" in out["reference"]
    assert all(math.isfinite(row["fid"]) and "kid" in row for row in out["rows"])
    for f in ("var_eval.md", "var_samples.png", "var_policy_actions.png", "var_sweep_w.json"):
        assert os.path.exists(d / f), f
    r = v("sample", "--reward-check", "--check-samples", "20", "--check-d-steps", "25")   # the evidence's reward check
    assert r.returncode == 0, r.stderr[-2000:]
    check = json.load(open(d / "var_reward_check.json"))             # 8 w_max, the search, each policy's last iterate
    assert len(check["rows"]) == 11 and len(check["spearman_two_sample"]) == 1 and "class_only_minus_heuristic" not in check
    r = v("sample", "--bench", "--batch", "8")
    assert r.returncode == 0 and "policy cost" in r.stdout, r.stderr[-2000:]
    r = run("scripts/var_floor_decoder.py", "--run-dir", str(d), "--steps", "2", "--every", "1", "--samples", "20", "--gan", "0.1")
    assert r.returncode == 0 and len([x for x in r.stdout.splitlines() if x.startswith("| ")]) == 3, r.stderr[-2000:]
    _fails(run("experiments/var.py", "--run-dir", str(d)), "train|sample")


def test_adagen_refinement_blend_and_reward_study(run_dir, tmp_path):
    """AdaGen's unreleased parts through the command line: featnet2, the rewards fixed and fid, the fidelity
    stage; experiments/studies.py --refine (forwards counted), --lam, --hacking, --repeat/--lookahead."""
    d = tmp_path / "adagen"
    copy(run_dir, d, "config.json", "vq.pt", "featnet.pt", "nat.pt", "backbone.pt", "sweep_w.json", "policy_T4.pt")
    for args in (["--stage", "featnet2"], ["--stage", "fidelity", "--set", "pi_iters=2"],
                 ["--stage", "policy", "--set", "pi_reward=fixed"], ["--stage", "static", "--set", "pi_reward=fid"]):
        r = run("train.py", "--run-dir", str(d), *args)
        assert r.returncode == 0, (args, r.stderr[-2000:])
    fidelity = torch.load(d / "fidelity_T4.pt", weights_only=True)
    assert fidelity["done"] and fidelity["config"]["base"] == "policy_T4" and fidelity["config"]["kind"] == "fidelity"
    records = [json.loads(line) for line in open(d / "log.jsonl")]
    fixed = [r for r in records if r["stage"] == "policy_fixed_T4" and "r_fid" in r]
    assert fixed and all(r["reward"] == r["r_fid"] <= 0 for r in fixed)          # r_fid = log p(y|x)
    fid_rw = [r for r in records if r["stage"] == "static_fid_T4" and "reward" in r]
    assert fid_rw and all(r["reward"] < 0 for r in fid_rw)                      # minus a chunk's FID
    assert not os.path.exists(d / "policy_T4_curve.png")                         # the adversarial policy untouched
    study = lambda *a: run("experiments/studies.py", "--run-dir", str(d), *a)
    r = study("--grid-steps", "4", "--refine", "--samples", "10")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["schedule"]: row for row in json.load(open(d / "refine_T4.json"))["rows"]}
    forwards = {name.split(" (")[0]: row["forwards"] for name, row in rows.items()}
    assert forwards["adaptive"] == 8 and forwards["adaptive + repeat 2"] == 16 and forwards["adaptive + repeat 3"] == 24
    assert forwards["adaptive + lookahead 2"] == 2 * (1 + 2 * 3) and forwards["adaptive + repeat 2 + lookahead 2"] == 28
    assert forwards["control: repeat 2, random pick"] == 16 and len(rows) == 9
    r = study("--grid-steps", "4", "--lam", "0,1", "--samples", "10")
    assert r.returncode == 0, r.stderr[-2000:]
    assert [row["schedule"] for row in json.load(open(d / "blend_T4.json"))["rows"]] == ["lam = 0", "lam = 1"]
    r = study("--grid-steps", "4", "--hacking", "--samples", "10")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["schedule"]: row for row in json.load(open(d / "hacking_T4.json"))["rows"]}
    assert {"adaptive, adversarial reward", "adaptive, fixed reward", "static, fid reward"} <= set(rows)
    assert all(row["fid2"] >= 0 and row["fid_recon"] >= 0 for row in rows.values())
    r = study("--grid-steps", "4", "--repeat", "2", "--lookahead", "2")
    assert r.returncode == 0 and "28.0 generator forwards per image" in r.stdout, r.stderr[-2000:]
    for f in ("blend_T4_curve.png", "blend_grids_T4.png", "hacking_grids_T4.png", "samples_adaptive_repeat2_lookahead2_T4.png"):
        assert os.path.exists(d / f), f
    _fails(study("--lam", "1.5"), "each value in [0, 1]")
    _fails(study("--repeat", "0"), "at least 1")
    _fails(study(), "name a study")
    os.remove(d / "featnet2.pt")
    _fails(study("--grid-steps", "4", "--hacking", "--samples", "10"), "--stage featnet2")
    _fails(run("train.py", "--run-dir", str(d), "--stage", "policy", "--set", "pi_reward=clip"), "pi_reward 'clip'")
    _fails(run("train.py", "--run-dir", str(d), "--stage", "fidelity", "--set", "pi_reward=fid"), "drop --set pi_reward")


def test_search_resumes_after_an_interrupt(run_dir, tmp_path):
    """A search stopped after update 1 (done=False, as Ctrl-C leaves it) continues with update 2 and
    ends like the uninterrupted run: same candidates, seed and samples give the same FIDs."""
    d = tmp_path / "search"
    copy(run_dir, d, "config.json", "vq.pt", "featnet.pt", "nat.pt", "sweep_w.json")
    r = run("experiments/search.py", "--stage", "search", "--run-dir", str(d), "--set", "search_updates=1")
    assert r.returncode == 0, r.stderr[-2000:]
    ck = torch.load(d / "search_T4.pt", weights_only=True)
    ck.update(done=False, history=ck["history"][:1])
    del ck["final_step"]
    torch.save(ck, d / "search_T4.pt")
    r = run("experiments/search.py", "--stage", "search", "--run-dir", str(d), "--set", "search_updates=2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming search_T4 from update 1" in r.stdout
    back = torch.load(d / "search_T4.pt", weights_only=True)
    full = torch.load(os.path.join(run_dir, "search_T4.pt"), weights_only=True)
    assert back["done"] and back["step"] == 2
    assert [h["train_fid"] for h in back["history"]] == pytest.approx([h["train_fid"] for h in full["history"]], abs=1e-4)
    assert torch.allclose(back["model"]["xi"], full["model"]["xi"], atol=1e-3)       # float round-off only


def test_pr_search_then_beta_rows(run_dir, tmp_path):
    """The Beta line search within its budget (plus the cosine reference), the chosen p(r) trained
    in beta/ with its schedule searched, and sample.py --eval adding the Beta-trained rows."""
    d = tmp_path / "pr"
    copy(run_dir, d, "config.json", "vq.pt", "featnet.pt", "nat.pt", "sweep_w.json", "search_T4.pt")
    r = run("experiments/search.py", "--stage", "pr-search", "--run-dir", str(d))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.load(open(d / "pr_search.json"))
    assert res["trainings"] == len(res["cache"]) == 2 and res["cosine_proxy"] > 0     # pr_budget = 2 in `test`
    assert res["train_fid"] == min(res["cache"].values())
    assert res["setup"]["schedule"] == torch.load(d / "search_T4.pt", weights_only=True)["table"].tolist()
    nat_ck = torch.load(d / "beta" / "nat.pt", weights_only=True)
    assert nat_ck["done"] and nat_ck["config"]["mask_dist"] == "beta"
    assert (nat_ck["config"]["alpha"], nat_ck["config"]["beta"]) == pytest.approx((res["alpha"], res["beta"]))
    assert torch.load(d / "beta" / "search_T4.pt", weights_only=True)["done"]
    r = run("experiments/search.py", "--stage", "pr-search", "--run-dir", str(d))     # re-run: nothing retrained
    assert r.returncode == 0 and "training-set FID" not in r.stdout, r.stdout[-2000:]
    r = run("sample.py", "--run-dir", str(d), "--eval", "--samples", "30", "--sweep-samples", "20", "--decode-steps", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    names = {row["schedule"] for row in json.load(open(d / "eval.json"))["rows"]}
    assert sum(n.startswith("Beta(") for n in names) == 2                           # heuristic + searched, beta/ generator


def test_sample_grid_eval_bench(run_dir):
    r = run("sample.py", "--run-dir", run_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.exists(os.path.join(run_dir, "samples_adanat_T8.png"))
    r = run("experiments/judges.py", "--run-dir", run_dir, "--seeds", "2")    # the validation first: the table reads it
    assert r.returncode == 0, r.stderr[-2000:]
    j = json.load(open(os.path.join(run_dir, "judges.json")))
    assert set(j["networks"]) == {"featnet", "featnet2", "featssl", "random", "pixels"} and j["candidates"] == ["featnet2", "featssl"]
    sets = {"noise", "blur", "squares", "salt_pepper", "swirl", "collapse", "drop", "imbalance", "typical", "recon"}
    assert all(sets <= set(r) and len(r["noise"]["fd"]) == 2 and len(r["noise"]["fd"][0]) == 5 for r in j["networks"].values())
    assert set(j["claim_judges"]) <= {"featnet2", "featssl"} and "Claim judges" in open(os.path.join(run_dir, "judges.md")).read()
    assert os.path.exists(os.path.join(run_dir, "judges.png"))
    _fails(run("experiments/judges.py", "--run-dir", run_dir, "--n", "5000"), "--n 5000")
    r = run("sample.py", "--run-dir", run_dir, "--eval", "--samples", "60", "--sweep-samples", "30", "--decode-steps", "2,4")
    assert r.returncode == 0, r.stderr[-2000:]
    ev = json.load(open(os.path.join(run_dir, "eval.json")))
    best = [r for r in ev["rows"] if not r["schedule"].endswith("last iterate")]     # (+ the policies' last iterates)
    assert len(best) == 9 and all(r["fid"] >= 0 for r in ev["rows"])   # 2 heuristics x T=2,4 + 2 searches, 3 policies at T=4
    assert {"AutoNAT search (free T x 4 table)", "parametric family (searched, 6 shape parameters)"} <= \
        {r["schedule"] for r in ev["rows"] if r["T"] == 4}
    adaptive = [r for r in ev["rows"] if r["schedule"].startswith("adaptive policy")][0]
    assert adaptive["T"] == 4 and len(adaptive["actions_sd_per_step"]) == 4
    assert os.path.exists(os.path.join(run_dir, "eval.md")) and os.path.exists(os.path.join(run_dir, "sweep_w.json"))
    assert all(r["fid_recon"] >= 0 and r["fid2"] >= 0 for r in ev["rows"])          # FID vs reconstructions, featnet2
    assert ev["reference"]["tokenizer reconstructions of test vs test (floor)"]["fid_recon"] < 1e-2   # ~0: the same images
    md = open(os.path.join(run_dir, "eval.md")).read()
    assert "| FID | KID FID | FID vs recon | featnet2 FD" in md and "T = 4. Row minus AdaNAT heuristic" in md   # KID, claims
    assert all(r["kid"] == r["kid"] and r["kid2"] == r["kid2"] and set(r.get("vs_heuristic", {})) >= {"fid", "recall"}
               for r in ev["rows"] if not r["schedule"].startswith("AdaNAT heuristic"))
    real = ev["reference"]["real training images vs test"]
    assert {"fid", "kid", "fid2", "kid2", "fd_ssl", "kid_ssl"} <= set(real)          # every network at the same n
    r = run("sample.py", "--run-dir", run_dir, "--floor")                  # the reference rows alone
    assert r.returncode == 0 and "(floor)" in r.stdout, r.stderr[-2000:]
    rows = json.load(open(os.path.join(run_dir, "floor.json")))["rows"]
    assert rows["tokenizer reconstructions of test vs test (floor)"]["fid_recon"] < 1e-2 and len(rows) == 2
    classonly = ("train.py", "--run-dir", run_dir, "--stage", "policy", "--set", "pi_start=classonly")
    _fails(run(*classonly), "game.py --headroom")                            # a policy on the class-only schedule: not yet
    r = run("experiments/game.py", "--run-dir", run_dir, "--headroom", "--samples", "20", "--sweep-samples", "30",
            "--headroom-per-class", "8")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run(*classonly)                                                      # now its residual starts from each class's pair
    assert r.returncode == 0 and train.is_done(os.path.join(run_dir, "policy_classonly_T4.pt")), r.stderr[-2000:]
    head = json.load(open(os.path.join(run_dir, "headroom_T4.json")))
    only = head["rows"]["class-only schedule (each class its best pair)"]
    assert len(head["per_class_pairs"]) == 10 and all(math.isfinite(v) for v in only["gap_closed"].values())
    assert set(only["gap_closed"]) == {"fid", "fid_recon", "fid2", "fd_ssl"}
    r = run("experiments/game.py", "--run-dir", run_dir, "--reward-check", "--check-samples", "20", "--sweep-samples", "30",
            "--d-specs", "backbone,backbone@12", "--check-d-steps", "25")
    assert r.returncode == 0, r.stderr[-2000:]
    check = json.load(open(os.path.join(run_dir, "reward_check.json")))
    assert len(check["rows"]) >= 16 and set(check["spearman_two_sample"]) == {"backbone", "backbone@12"}
    assert not any("perturbed" in row["schedule"] for row in check["rows"])
    assert {"adaptive policy (PPO)", "learned static (PPO, no state)"} <= {row["schedule"] for row in check["rows"]}
    assert all(0 <= row["two_sample"][s]["acc"] <= 1 and row["two_sample"][s]["steps"] in (0, 25)
               for row in check["rows"] for s in ("backbone", "backbone@12"))
    assert all(-1 <= lo <= rho <= hi <= 1 for d in check["spearman_two_sample"].values() for rho, lo, hi in d.values())
    assert set(check["spearman_warmup"]) == {"fid", "fid2", "fd_ssl", "recall"}      # the warm-up reading beside it
    assert os.path.exists(os.path.join(run_dir, "reward_check.md")) and any(r["schedule"].startswith("class-only") for r in check["rows"])
    assert all(lo <= d <= hi for d, lo, hi in check["class_only_minus_heuristic"].values())   # after --headroom's sweep
    _fails(run("experiments/game.py", "--run-dir", run_dir, "--reward-check", "--d-specs", "featnet2"), "never a judge")
    r = run("experiments/game.py", "--run-dir", run_dir, "--pair-check", "--check-samples", "40", "--sweep-samples", "30",
            "--d-specs", "backbone@12", "--check-d-steps", "25")                 # class-only vs heuristic, 4 folds
    pair = json.load(open(os.path.join(run_dir, "pair_check.json")))["acc"]["backbone@12"]
    d, lo, hi = pair["class_only_minus_heuristic"]
    assert r.returncode == 0 and lo <= d <= hi and all(len(a) == 4 for a in pair["per_fold"].values()), r.stderr[-2000:]
    r = run("experiments/game.py", "--run-dir", run_dir, "--training")               # what each policy did in training
    assert r.returncode == 0, r.stderr[-2000:]
    trained = {row["run"]: row for row in json.load(open(os.path.join(run_dir, "training.json")))}
    assert {"policy_T4", "static_T4"} <= set(trained) and set(trained["policy_T4"]["mean-action drift"]) == {"m", "tau1", "tau2", "w"}
    assert trained["policy_T4"]["iterations"] == 4 and 0 <= trained["policy_T4"]["D acc. after warm-up / last 10"][1] <= 1
    per_class = trained["policy_T4"]["per-class mean action (last 10)"]                  # across the classes seen
    assert per_class["tau2 range"] >= 0 and os.path.exists(os.path.join(run_dir, "policy_T4_classes.png"))
    r = run("experiments/bench.py", "--run-dir", run_dir, "--batch", "16", "--grid-steps", "4")
    assert r.returncode == 0 and "decoding overhead" in r.stdout, r.stderr[-2000:]
    assert "policy cost" in r.stdout                                   # the adaptive policy's share of generation
    r = run("sample.py", "--run-dir", run_dir, "--plot", "--decode-steps", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    for f in ("policy_actions_T4.png", "heuristic_vs_adaptive_T4.png"):
        assert os.path.exists(os.path.join(run_dir, f)), f


def _fails(r, text):
    assert r.returncode != 0
    assert text in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_bad_input_one_line_errors(run_dir, tmp_path):
    _fails(run("train.py", "--preset", "nope", "--run-dir", str(tmp_path / "a")), "unknown preset")
    _fails(run("train.py", "--stage", "nope", "--run-dir", str(tmp_path / "a")), "unknown stage")
    _fails(run("train.py", "--preset", "test", "--set", "nat_steps=0", "--run-dir", str(tmp_path / "a")), "nat_steps = 0")
    _fails(run("train.py", "--preset", "test", "--set", "nat_lr", "--run-dir", str(tmp_path / "a")), "--set nat_lr")
    _fails(run("train.py", "--preset", "test", "--set", "nat_steps=ten", "--run-dir", str(tmp_path / "a")), "--set nat_steps=ten")
    _fails(run("train.py", "--preset", "test", "--data", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "b")),
           "no such file or folder")
    _fails(run("sample.py", "--run-dir", str(tmp_path / "nothing")), "not a run folder")
    # another config in the same run folder
    _fails(run("train.py", "--preset", "test", "--set", "nat_dim=64", "--run-dir", run_dir), "another config")


def test_corrupt_and_mismatched_checkpoints(run_dir, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    for f in ("config.json", "vq.pt", "featnet.pt", "nat.pt"):
        (d / f).write_bytes(open(os.path.join(run_dir, f), "rb").read())
    good = (d / "nat.pt").read_bytes()
    (d / "nat.pt").write_bytes(good[: len(good) // 2])                 # truncated
    _fails(run("sample.py", "--run-dir", str(d)), "corrupt")
    _fails(run("train.py", "--run-dir", str(d)), "corrupt")
    assert (d / "nat.pt").read_bytes() == good[: len(good) // 2]       # nothing overwritten
    ck = torch.load(os.path.join(run_dir, "nat.pt"), weights_only=True)
    ck["config"]["dim"] = 999
    ck["done"] = False
    torch.save(ck, d / "nat.pt")
    _fails(run("train.py", "--run-dir", str(d)), "another config")


def test_checkpoint_round_trip(tmp_path):
    path = str(tmp_path / "x.pt")
    obj = {"model": {"w": torch.randn(3)}, "config": {"a": 1, "b": [1, 2]}, "step": 7}
    train.save_ckpt(path, obj)
    back = train.load_ckpt(path, expect_config={"a": 1, "b": [1, 2]})
    assert torch.equal(back["model"]["w"], obj["model"]["w"]) and back["step"] == 7
    assert not os.path.exists(path + ".tmp")
    with pytest.raises(train.UserError, match="another config"):
        train.load_ckpt(path, expect_config={"a": 2, "b": [1, 2]})


def test_tables_script_runs_every_step(tmp_path):
    """scripts/tables.sh (the README's tables on a borrowed GPU) on the test preset: every step exits 0,
    the tables and the checkpoints come back under $OUT/run."""
    out, run_dir = tmp_path / "out", tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "OUT": str(out), "EVAL_ARGS": "--decode-steps 4",
           "SAMPLE_ARGS": "--samples 60 --sweep-samples 20 --batch 64 --grid-steps 4",
           "CHECK_ARGS": "--check-samples 40 --check-d-steps 25", "HEADROOM_ARGS": "--headroom-per-class 8"}
    r = subprocess.run(["bash", "scripts/tables.sh", "test", str(run_dir)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=env)
    steps = (out / "steps.txt").read_text().splitlines()
    assert r.returncode == 0 and len(steps) == 31 and all(" rc=0 " in s for s in steps), steps
    back = set(os.listdir(out / "run"))
    assert {"eval.md", "floor.json", "judges.json", "policy_T4_seed1.pt", "reward_check.json", "headroom_T4.md", "dssl.pt", "flow_eval.md", "var_eval.md", "var_reward_check.md", "refine_T4.md", "blend_T4.md", "hacking_T4.md",
            "nat.pt", "policy_T4.pt", "policy_search_T4.pt", "fidelity_T4.pt", "policy_fid_T4.pt"} <= back
    assert "static_search_T4.pt" not in back                   # the search start does not leak into later stages
