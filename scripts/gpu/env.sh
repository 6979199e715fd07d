# Sourced by the scripts that run on the lent GPU machine (see scripts/gpu/README.md).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2
if [ -d .whl ] && [ ! -d /root/site/gguf ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/site .whl/*.whl
fi
export PYTHONPATH=/root/site:$PWD
MODEL_DIR=/root/model
GGUF=$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf
STANDIN_HF=/root/SmolLM2-135M-Instruct-Q4_1-hf
R=/root/out
mkdir -p $MODEL_DIR $R
stage() {  # copy whatever chunks this call carried next to the others; reassemble once all are there
  cp -n .gpu/model/* $MODEL_DIR/ 2>/dev/null || true
  if [ ! -f $GGUF ] && [ -f $MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf.part01 ] && [ -f $MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf.part00 ]; then
    (cd $MODEL_DIR && cat SmolLM2-135M-Instruct.Q4_1.gguf.part* > SmolLM2-135M-Instruct.Q4_1.gguf && sha256sum -c SmolLM2-135M-Instruct.Q4_1.gguf.sha256)
  fi
  ls -la $MODEL_DIR
}
pack() {  # everything under /root/out except adapters, as one archive (a call returns at most 8 files)
  tar -C $R --exclude='adapter' --exclude='checkpoints' -czf $OUT/results.tar.gz . && ls -la $OUT
}
