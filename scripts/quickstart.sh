#!/usr/bin/env bash
# The main job on the embedded default (the stand-in SmolLM2-135M-Instruct), on a fresh CPU machine:
#   1. set up .venv;  2. convert the stand-in into a routed checkpoint (last 8 of 30 layers, N=32, k=16);
#   3. load it with trust_remote_code in a fresh process, print a summary and sample generations;
#   4. a short CPU-sized LoRA comparison on RTE (plain vs routed, 2 seeds, a few hundred examples).
# Outputs go to outputs/ (replaced on each run). About 17 minutes on 2 cores, most of it step 4.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
PY=.venv/bin/python
mkdir -p outputs
CKPT=outputs/smollm2-135m-routed-last8
$PY convert.py stand-in $CKPT --layers 22-29 --num-experts 32 --top-k 16 --overwrite
(cd "$(mktemp -d)" && "$OLDPWD/$PY" "$OLDPWD/scripts/demo.py" "$OLDPWD/$CKPT")
DATA=()
GLUE=${ROUTED_LLAMA_SHARED:-$(cd .. && pwd)/shared}/data/glue
[ -d "$GLUE" ] && DATA=(--data-dir "$GLUE")  # else GLUE comes from the Hub through `datasets`
$PY -m finetune compare --model stand-in --task rte "${DATA[@]}" --max-train-samples 240 --max-eval-samples 120 \
  --max-length 128 --epochs 2 --lr 5e-4 --seeds 0 1 --arm name=routed-last8,checkpoint=$CKPT \
  --output outputs/quickstart-rte --overwrite
