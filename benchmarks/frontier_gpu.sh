#!/usr/bin/env bash
# Issue 22 on one GPU: the decode-path KL frontier (bench_quality.py --ablation frontier, evaluation part of the
# prose) and retrieval (retrieval.py, --samples per cell) on an embedded model, each split over $PROCS processes
# sharing the GPU (eager steps are launch-bound, so processes overlap): quality by shards, retrieval by claiming the
# next free unit of $CHUNK samples, costliest first. Every process writes its rows after each config (quality) or
# sample (retrieval), so a step stopped by its `timeout` keeps what it answered. The processes write under a scratch
# folder; the end packs it into one archive, $OUT/WHAT_MODEL.tgz (the device tool brings back only a few files),
# and so does a TERM or INT from an outer `timeout` (give that one more than FLOOR_LIMIT + LIMIT + ~40 s of loading).
#   bash benchmarks/frontier_gpu.sh quality smollm2          # then: python benchmarks/bench_quality.py --from-json ...
#   bash benchmarks/frontier_gpu.sh retrieval gemma3 2048,4096,8000,16000
#     then: tar xzf retrieval_gemma3.tgz -C DIR; python benchmarks/retrieval.py --from-json 'DIR/*.json' \
#             --merge-into benchmarks/rows/retrieval_gemma3_h200.json.gz --wide
# Knobs: PROCS (8), LIMIT (seconds per step, 500), WINDOWS (16), CTX (1024), DECODE (64), SAMPLES (50), CHUNK (10),
# SOURCE (pydoc), SKIP_DONE (space-separated globs of earlier retrieval rows, each matching a file: run only the
# units they lack), MODE (retrieval's generate_greedy steps: eager to skip graph captures, which short answers may not
# repay), FLOOR (retrieval: fp16's units first, within FLOOR_LIMIT seconds (150); the other configs then skip cells
# where fp16 scored below FLOOR), CONFIGS and TASKS (retrieval: only these ';'-separated specs and these tasks, to fill
# the cells a costliest-first run left short)
set -uo pipefail
what=$1 model=$2 lengths=${3:-2048,4096,8000}
PROCS=${PROCS:-8} LIMIT=${LIMIT:-500}
OUT=${OUT:-benchmarks/raw}; mkdir -p "$OUT"
read -ra globs <<< "${SKIP_DONE:-}"   # space-separated globs, expanded by retrieval.py, not the shell
done_args=()
for g in "${globs[@]}"; do
  # a glob that matches nothing would rerun every unit it was meant to skip (and --floor would find no fp16 rows)
  compgen -G "$g" > /dev/null || { echo "SKIP_DONE: no file matches '$g' (globs are space-separated)" >&2; exit 2; }
  done_args+=(--skip-done "$g")
done
final=$OUT; OUT=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
git log -1 --format='commit %h %cI' 2>/dev/null || true
date -u +'start %FT%TZ'
# one step: $PROCS processes of `what`, each bounded by $1 seconds; the rest of the arguments go to every process
step() {
  local limit=$1 tag=$2; shift 2
  for i in $(seq 0 $((PROCS - 1))); do
    case $what in
      quality) timeout "$limit" python benchmarks/bench_quality.py --model "$model" --ablation frontier \
                 --source "${SOURCE:-pydoc}" --part evaluation --ctx "${CTX:-1024}" --decode "${DECODE:-64}" \
                 --windows "${WINDOWS:-16}" --shard "$i/$PROCS" --json "$OUT/quality_${model}_${SOURCE:-pydoc}.$i.json" \
                 > "$OUT/quality_${model}.$i.log" 2>&1 & ;;
      retrieval) timeout "$limit" python benchmarks/retrieval.py --model "$model" --lengths "$lengths" \
                   --samples "${SAMPLES:-50}" --chunk "${CHUNK:-10}" --claim-dir "$OUT/claims_${model}$tag" \
                   ${MODE:+--mode "$MODE"} ${TASKS:+--tasks "$TASKS"} --json "$OUT/retrieval_${model}$tag.$i.json" "$@" \
                   > "$OUT/retrieval_${model}$tag.$i.log" 2>&1 & ;;
      *) echo "usage: frontier_gpu.sh quality|retrieval MODEL [LENGTHS]" >&2; exit 2 ;;
    esac
  done
  wait
}
# the archive is the only way rows come back: a step cut short by an outer `timeout` still packs what it answered
finish() {
  date -u +'end %FT%TZ'
  tail -qn 2 "$OUT"/"${what}"_"${model}"*.log | grep -v "^\[transformers\]" | cut -c1-160
  grep -l FAILED "$OUT"/*.log 2>/dev/null | head -3
  tar czf "$final/${what}_${model}.tgz" -C "$OUT" . && echo "packed: $final/${what}_${model}.tgz"
}
# (each process runs under its own `timeout`, in its own process group: the outer signal reaches them from here)
trap 'echo "stopped: packing what was answered" >&2; kill $(jobs -p) 2>/dev/null; wait; finish; exit 143' TERM INT
if [[ $what == retrieval && -n ${FLOOR:-} ]]; then
  # fp16 first; then the other configs skip the cells where fp16 is below $FLOOR (every method at the model's floor)
  step "${FLOOR_LIMIT:-150}" _fp16 --configs fp16 "${done_args[@]}"
  step "$LIMIT" "" "${done_args[@]}" ${CONFIGS:+--configs "$CONFIGS"} --skip-done "$OUT/retrieval_${model}_fp16.*.json" --floor "$FLOOR"
else
  step "$LIMIT" "" "${done_args[@]}" ${CONFIGS:+--configs "$CONFIGS"}
fi
finish
