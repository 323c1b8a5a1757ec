"""Throughput (python experiments/bench.py): images/s of generation against the same bare forwards of the
generator, i.e. what decoding, guidance and the policy add on top of the transformer.

Usage: python experiments/bench.py --run-dir runs/small [--compile] [--batch 1024]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the project's root

import time

import torch

import nat
import sample  # noqa: E402
import train  # noqa: E402


def time_round_robin(fns: list, device: torch.device, repeats: int) -> dict:
    """name -> best seconds of each (name, fn) over `repeats` rounds, run round-robin so that
    drift hits all alike; the first round warms up."""
    times: dict = {name: [] for name, _ in fns}
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for r in range(repeats + 1):
        for name, fn in fns:
            sync()
            t0 = time.time()
            fn()
            sync()
            if r > 0:
                times[name].append(time.time() - t0)
    return {name: min(ts) for name, ts in times.items()}


def bench(pipe: train.Pipeline, batch: int, T: int = 8, repeats: int = 3) -> dict:
    """images/s of `generate` (AdaNAT's heuristic, w_0 = 2, with CFG) vs the same T bare forwards of 2B rows."""
    labels = train.balanced_labels(batch, pipe.cfg.num_classes).to(pipe.device)
    sched = nat.heuristic_schedule(T, tau2_0=nat.ADANAT_TAU2_0, w_0=2.0)
    g = torch.Generator(pipe.device).manual_seed(0)
    tokens = torch.randint(0, pipe.cfg.vocab_size, (2 * batch, pipe.cfg.num_tokens), device=pipe.device)
    y2 = torch.cat([labels, torch.full_like(labels, pipe.cfg.null_label)])

    def run_generate(schedule):
        nat.generate(pipe.logits_fn, labels, T, schedule, pipe.cfg.mask_id, pipe.cfg.num_tokens, pipe.cfg.null_label, g)

    @torch.no_grad()
    def run_forwards():
        for _ in range(T):
            pipe.logits_fn(tokens, y2)

    fns = [("generate", lambda: run_generate(sched)), ("bare forwards", run_forwards)]
    found = sample.policy_schedule(pipe, "policy", T)
    if found is not None:                                               # the adaptive policy as the schedule
        make_policy = found[0]
        fns.append(("generate + policy", lambda: run_generate(make_policy())))
        feats = torch.randn(batch, pipe.cfg.num_tokens, pipe.cfg.dim, device=pipe.device)     # (B, N, C)
        state = nat.NATState(0, tokens[:batch], feats, labels)

        def run_policy():                                               # the policy's own T forwards
            sched = make_policy()
            for t in range(T):
                sched(t, state)
        fns.append(("policy forwards", run_policy))
    res = {name: batch / secs for name, secs in time_round_robin(fns, pipe.device, repeats).items()}
    res["overhead"] = res["bare forwards"] / res["generate"] - 1
    mode = "compiled" if pipe.forward is not pipe.net else "eager"
    print(f"bench ({pipe.device}, {mode}, batch {batch}, T={T}, CFG): generate {res['generate']:.1f} images/s "
          f"= {T * res['generate']:.0f} image-steps/s, bare forwards {T * res['bare forwards']:.0f} image-steps/s; "
          f"decoding at {100 / (1 + res['overhead']):.1f}% of bare-forward throughput "
          f"(decoding overhead {100 * res['overhead']:.1f}%)")
    if "generate + policy" in res:
        res["policy_cost"] = res["bare forwards"] / res["policy forwards"]
        print(f"  adaptive policy (policy_T{T}.pt): generate + policy {res['generate + policy']:.1f} images/s; "
              f"policy cost {100 * res['policy_cost']:.2f}% of the generator's forward time per step")
    return res


def run(args, device: torch.device) -> None:
    """The bench at --grid-steps on --batch rows (default 1024 on CUDA, 256 on the CPU); with --compile
    eager first, then compiled."""
    pipe = train.Pipeline(args.run_dir, device, bf16=not args.no_bf16, batch=args.batch)   # eager first
    batch = args.batch or (1024 if device.type == "cuda" else 256)
    bench(pipe, batch, T=args.grid_steps)
    if args.compile:
        pipe.compile()
        bench(pipe, batch, T=args.grid_steps)


if __name__ == "__main__":
    sample.main(run=run, doc=__doc__)
