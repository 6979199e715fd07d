#!/usr/bin/env bash
# The test command (what CI runs, through .ci/run): set up .venv if needed, then run the whole suite on the CPU.
# Every skipped test is listed by name with its reason (-ra --no-fold-skipped); the 10 slowest are listed too.
# Tests that use the verified GLUE copies read $ROUTED_LLAMA_SHARED/data/glue (default: ../shared); the others write
# their own tiny GLUE folders. Extra arguments go to pytest (e.g. `./scripts/test.sh tests/test_config.py`).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # no spinning OpenMP threads on shared cores (see quickstart.sh)
export ROUTED_LLAMA_SHARED=${ROUTED_LLAMA_SHARED:-$(cd .. && pwd)/shared}
exec "${VENV:-.venv}/bin/python" -m pytest -q -ra --no-fold-skipped --durations=10 "$@"
