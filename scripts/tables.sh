#!/usr/bin/env bash
# Every results table of one run folder, in priority order, from an empty folder or resuming one:
# train the default stages, the reference rows, the reward check on every D backbone, the headroom table, the policy
# on the AutoNAT table, the evaluation table, the bench, the continuous and the autoregressive paradigms' policies,
# searches and tables (and VAR's reward check), the refinement / blend / reward-hacking studies. Each command's output goes to $OUT/<step>.log and
# one line per step (exit code, seconds) to $OUT/steps.txt; a failing step does not stop the rest,
# but the script exits 1. On exit (also when killed) the run folder is copied to $OUT/run, so a
# run on a borrowed machine comes back and can be carried into the next call and resumed.
#
#   scripts/tables.sh small runs/small                 # on one GPU: the README's tables (10 000 samples x 3 seeds)
#   BUDGET_S=500 scripts/tables.sh small runs/small    # start no step after 500 s (rerun to continue)
#   SAMPLE_ARGS="--samples 60 --sweep-samples 20 --batch 64 --grid-steps 4" CHECK_ARGS="--check-samples 40 --check-d-steps 25" HEADROOM_ARGS="--headroom-per-class 8" \
#       EVAL_ARGS="--decode-steps 4" scripts/tables.sh test /tmp/t   # the CPU check of this script (tests/test_cli.py)
set -u
P=${1:-small}
R=$(realpath -m "${2:-runs/$P}")
OUT=$(realpath -m "${OUT:-$R.out}")          # outside the run folder: the copy must not copy itself
BUDGET_S=${BUDGET_S:-100000}
SAMPLE_ARGS=${SAMPLE_ARGS:-}     # added to every sampling command (sample.py and the experiments' tables)
CHECK_ARGS=${CHECK_ARGS:-}       # added to the reward checks (game.py, var.py) and the headroom
HEADROOM_ARGS=${HEADROOM_ARGS:-} # added to the headroom (experiments/game.py --headroom-per-class)
EVAL_ARGS=${EVAL_ARGS:-}         # added to the NAT's --eval
H="--set pi_start=heuristic"     # --set values stay in the run folder's config.json: name the start after policy_search
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
failed=0
trap 'mkdir -p "$OUT/run" && cp -r "$R"/. "$OUT/run/"; echo "run folder copied to $OUT/run"' EXIT

step() {            # step NAME COMMAND...: run it unless the budget is spent
    local name=$1 t0=$SECONDS rc
    shift
    if (( SECONDS >= BUDGET_S )); then
        echo "$name skipped (budget ${BUDGET_S}s spent)" | tee -a "$OUT/steps.txt"
        return
    fi
    "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    (( rc == 0 )) || failed=$((failed + 1))
    echo "$name rc=$rc $((SECONDS - t0))s: $*" | tee -a "$OUT/steps.txt"
}

step train python train.py --preset "$P" --run-dir "$R" $H
step search python experiments/search.py --run-dir "$R"
step floor python sample.py --run-dir "$R" --floor $SAMPLE_ARGS
step judges python experiments/judges.py --run-dir "$R"
step d_nets python train.py --run-dir "$R" --stage dnet
step d_ssl python train.py --run-dir "$R" --stage dssl
step reward_check python experiments/game.py --run-dir "$R" --reward-check --d-specs backbone,backbone@12,dnet@12,dssl@12,backbone+dssl@12 $SAMPLE_ARGS $CHECK_ARGS
step headroom python experiments/game.py --run-dir "$R" --headroom $SAMPLE_ARGS $CHECK_ARGS $HEADROOM_ARGS
step policy_search python train.py --run-dir "$R" --stage policy --set pi_start=search
step policy_seed1 python train.py --run-dir "$R" --stage policy --set pi_seed=1 $H
step eval python sample.py --run-dir "$R" --eval $EVAL_ARGS $SAMPLE_ARGS
step bench python experiments/bench.py --run-dir "$R" $SAMPLE_ARGS
step flow python experiments/flow.py train --run-dir "$R" --stage flow
step flow_policy python experiments/flow.py train --run-dir "$R" --stage flow-policy
step flow_static python experiments/flow.py train --run-dir "$R" --stage flow-static
step flow_search python experiments/search.py --run-dir "$R" --stage flow-search
step flow_eval python experiments/flow.py sample --run-dir "$R" --eval $SAMPLE_ARGS
step var python experiments/var.py train --run-dir "$R"
step var_policy python experiments/var.py train --run-dir "$R" --stage var-policy
step var_static python experiments/var.py train --run-dir "$R" --stage var-static
step var_search python experiments/var.py train --run-dir "$R" --stage var-search
step var_eval python experiments/var.py sample --run-dir "$R" --eval $SAMPLE_ARGS
step var_reward_check python experiments/var.py sample --run-dir "$R" --reward-check $SAMPLE_ARGS $CHECK_ARGS
step refine python experiments/studies.py --run-dir "$R" --refine $SAMPLE_ARGS
step fidelity python train.py --run-dir "$R" --stage fidelity $H
step blend python experiments/studies.py --run-dir "$R" --lam 0,0.25,0.5,0.75,1 $SAMPLE_ARGS
step policy_fid python train.py --run-dir "$R" --stage policy --set pi_reward=fid $H
step static_fid python train.py --run-dir "$R" --stage static --set pi_reward=fid $H
step policy_fixed python train.py --run-dir "$R" --stage policy --set pi_reward=fixed $H
step static_fixed python train.py --run-dir "$R" --stage static --set pi_reward=fixed $H
step hacking python experiments/studies.py --run-dir "$R" --hacking $SAMPLE_ARGS

echo "done: $OUT/steps.txt, $failed step(s) failed"
(( failed == 0 ))
