"""The experiments beside the core: what the papers compare AdaNAT with, and what they add to it.

The core (train.py, sample.py, pipeline.py and the concept files) is the method a reader learns
from; these modules plug into the same command lines:

- search.py       AutoNAT's finite-difference schedule search (stages search, param-search,
                  flow-search) and its Beta(alpha, beta) training-strategy search (pr-search);
- flow_train.py   AdaGen's continuous paradigm, training side: the flow / VP generator (stage
                  flow) and its PPO policies (flow-policy, flow-static, flow-smooth) through
                  train.py's Algorithm 1;
- flow_sample.py  its sampling side: grids, the solver x grid table, per-sample time-grid plots,
                  the policy's cost (sample.py --flow);
- studies.py      the reward check (sample.py --reward-check), AdaGen's refinement, fidelity
                  blend and reward-hacking tables (--refine, --lam, --hacking, --repeat,
                  --lookahead);
- throughput.py   decoding throughput against bare forwards, and the policy's cost (--bench).

Training-side modules export STAGES (stage name -> function(c, run_dir, device, log)); train.py
imports one only when one of its stages is asked for. Sampling-side modules never import
train.py, so sample.py and train.py stay apart.
"""
