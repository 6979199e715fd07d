#!/usr/bin/env bash
# The main job on the stand-in (SmolLM2-135M-Instruct), on a CPU machine; about 3 minutes on 2 cores after setup.
#   1. set up .venv (skipped when up to date; not counted in the quickstart's time)
#   2. convert the stand-in into a routed checkpoint: last 8 of 30 layers, N = 32 clusters, k = 16 kept per token
#   3. load it with trust_remote_code in a fresh process in an empty folder; generate with routing on and off
#   4. LoRA-fine-tune the routed checkpoint on SST-2 sentiment (320 train examples, 2 epochs; dev accuracy before/after)
#   5. the routing analysis: which clusters tokens keep (SST-2 and RTE dev), and what the fine-tune changed
# Everything goes to outputs/quickstart/ (replaced on each run); the last lines summarise it.
# GLUE comes from $ROUTED_LLAMA_SHARED/data/glue (default ../shared/data/glue) if present, else from the Hub.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# torch's OpenMP threads spin while they wait for work; on a machine whose cores are shared, that spinning slowed
# the fine-tune here from 64 s to 602 s (2 threads, load ~4). Passive waiting costs nothing measurable when idle.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
ROOT=$PWD
PY=$(realpath "${VENV:-.venv}")/bin/python
OUT=outputs/quickstart
CKPT=$OUT/smollm2-135m-routed-last8
GLUE=${ROUTED_LLAMA_SHARED:-$(cd .. && pwd)/shared}/data/glue
DATA=()
[ -d "$GLUE" ] && DATA=(--data-dir "$GLUE")
mkdir -p "$OUT"
: >"$OUT/times.tsv"
# step NAME CMD...: run CMD and append its wall time to times.tsv
step() {
  local name=$1 start=$SECONDS
  shift
  echo "== $name"
  "$@"
  printf '%s\t%s\n' "$name" "$((SECONDS - start))" >>"$OUT/times.tsv"
}

step convert "$PY" convert.py stand-in "$CKPT" --layers 22-29 --num-clusters 32 --top-k 16 --no-progress --overwrite
EMPTY=$(mktemp -d)  # the demo runs here: the model code must come from the checkpoint, not from this repository
trap 'rm -rf "$EMPTY"' EXIT
step generate bash -c 'cd "$1" && "$2" "$3/scripts/demo.py" "$3/$4"' _ "$EMPTY" "$PY" "$ROOT" "$CKPT"
step fine-tune "$PY" -m finetune run --routed "$CKPT" --task sst2 "${DATA[@]}" --max-train-samples 320 \
  --max-eval-samples 200 --max-length 64 --buckets 16 24 32 48 64 --epochs 2 --lr 1e-3 --seed 0 --no-eval-routing-off \
  --output-dir "$OUT/finetune"
step routing "$PY" -m finetune analyze --adapter "$OUT/finetune/adapter" --tasks sst2 rte "${DATA[@]}" \
  --max-examples 50 --n-permutations 200 --out "$OUT/routing" --no-progress --overwrite
"$PY" scripts/quickstart_summary.py "$OUT"
