#!/usr/bin/env bash
# The CPU miniature of cogvx_ds (`make demo`). Extra arguments go to `python -m cogvx_ds.demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec "$PY" -m cogvx_ds.demo "$@"
