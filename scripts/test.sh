#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the whole suite on the CPU (about 10 minutes on 2 cores).
# Tests that need the verified GLUE copies read $ROUTED_LLAMA_SHARED (default: ../shared) and skip where absent.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export ROUTED_LLAMA_SHARED=${ROUTED_LLAMA_SHARED:-$(cd .. && pwd)/shared}
exec .venv/bin/python -m pytest -q "$@"
