#!/usr/bin/env bash
# Train on one machine: torchrun with one process per GPU (or NPROC CPU processes on gloo).
#   launch/local.sh --config model/5b --config stages/hq_finetune data.shards=[/data/hq] parallel.sequence_parallel=2
# NPROC defaults to the number of GPUs, or 1 without any.
set -euo pipefail
cd "$(dirname "$0")/.."
# the project's venv (make venv) when there is one, as launch/demo.sh
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
if [ -z "${NPROC:-}" ]; then
    NPROC=$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
# Validate before starting processes.
WORLD_SIZE=$NPROC "$PYTHON" -m cogvx_ds.train "$@" --print-config > /dev/null
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m cogvx_ds.train "$@"
