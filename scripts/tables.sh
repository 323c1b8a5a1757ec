#!/usr/bin/env bash
# Every results table of one run folder, in priority order, from an empty folder or resuming one:
# train the default stages, the reference rows, the reward check, the evaluation table, the
# policy on the AutoNAT table, the bench, the continuous paradigm's policies and its table, the
# refinement / blend / reward-hacking studies. Each command's output goes to $OUT/<step>.log and
# one line per step (exit code, seconds) to $OUT/steps.txt; a failing step does not stop the rest.
# At the end (or when the time budget is spent) the run folder's tables, logs and checkpoints are
# copied to $OUT/run, so a run on a borrowed machine can be carried back and resumed.
#
#   scripts/tables.sh small runs/small                 # on one GPU: the README's tables (10 000 samples x 3 seeds)
#   BUDGET_S=500 scripts/tables.sh small runs/small    # stop starting steps after 500 s (rerun to continue)
#   SAMPLE_ARGS="--samples 60 --sweep-samples 20 --check-samples 40 --batch 64" EVAL_ARGS="--decode-steps 4" \
#       scripts/tables.sh test /tmp/t                  # the CPU check of this script (tests/test_cli.py)
set -u
cd "$(dirname "$0")/.."
P=${1:-small}
R=${2:-runs/$P}
OUT=${OUT:-$R/out}
BUDGET_S=${BUDGET_S:-100000}
SAMPLE_ARGS=${SAMPLE_ARGS:-}     # added to every sample.py command
EVAL_ARGS=${EVAL_ARGS:-}         # added to the NAT's --eval
mkdir -p "$OUT"
H="--set pi_start=heuristic"    # --set values stay in the run folder's config.json: name the start after policy_search

step() {            # step NAME COMMAND...: run it unless the budget is spent
    local name=$1 t0=$SECONDS rc
    shift
    if (( SECONDS >= BUDGET_S )); then
        echo "$name skipped (budget ${BUDGET_S}s spent)" | tee -a "$OUT/steps.txt"
        return
    fi
    "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc $((SECONDS - t0))s: $*" | tee -a "$OUT/steps.txt"
}

step train python train.py --preset "$P" --run-dir "$R" $H
step floor python sample.py --run-dir "$R" --floor $SAMPLE_ARGS
step reward_check python sample.py --run-dir "$R" --reward-check $SAMPLE_ARGS
step policy_search python train.py --run-dir "$R" --stage policy --set pi_start=search
step eval python sample.py --run-dir "$R" --eval $EVAL_ARGS $SAMPLE_ARGS
step bench python sample.py --run-dir "$R" --bench $SAMPLE_ARGS
step flow python train.py --run-dir "$R" --stage flow
step flow_policy python train.py --run-dir "$R" --stage flow-policy
step flow_static python train.py --run-dir "$R" --stage flow-static
step flow_search python train.py --run-dir "$R" --stage flow-search
step flow_eval python sample.py --run-dir "$R" --flow flow --eval $SAMPLE_ARGS
step refine python sample.py --run-dir "$R" --refine $SAMPLE_ARGS
step fidelity python train.py --run-dir "$R" --stage fidelity $H
step blend python sample.py --run-dir "$R" --lam 0,0.25,0.5,0.75,1 $SAMPLE_ARGS
step policy_fid python train.py --run-dir "$R" --stage policy --reward fid $H
step policy_fixed python train.py --run-dir "$R" --stage policy --reward fixed $H
step hacking python sample.py --run-dir "$R" --hacking $SAMPLE_ARGS

mkdir -p "$OUT/run"
cp "$R"/*.md "$R"/*.json "$R"/log.jsonl "$R"/*.pt "$OUT/run/" 2>/dev/null
echo "done: $OUT/steps.txt, tables and checkpoints in $OUT/run"
