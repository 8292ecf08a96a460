#!/usr/bin/env bash
# The GPU part of the performance benchmarks, prepared for a lent accelerator (the `device` tool; see
# /work/.library/device/README.md): the DiT training step of CogVideoX-2B and -5B shapes with fewer layers
# (49x480x720 clips, bf16), ours beside diffusers on the same weights, MFU against the card's measured bf16
# matmul and against its datasheet peak (989 TFLOP/s dense bf16 for an H100/H200 SXM), and the step's
# peak memory with and without model.recompute_gelu.
#
#   here:   bash benchmarks/gpu_mfu.sh prepare
#           wheels of what the device image lacks (diffusers, megatron-core; Python 3.12) -> .whl/ (git-ignored)
#   there:  device run, carry [".whl"], command "bash benchmarks/gpu_mfu.sh run"
#           -> tables on stdout, $OUT/dit_step_{2b,5b}.json
# LAYERS (default 4), REPS (default 5) and SPEC_TFLOPS (default 989) override the sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl diffusers==0.42.1 megatron-core==0.16.1
  ls -l .whl
  ;;
run)
  ls .whl/*.whl >/dev/null || { echo "no .whl/: run 'bash benchmarks/gpu_mfu.sh prepare' here and carry .whl" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
  export COGVX_BENCH_RESULTS="${OUT:-/tmp/bench}"
  mkdir -p "$COGVX_BENCH_RESULTS"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
  for preset in 2b 5b; do
    python3 benchmarks/dit_step.py --device cuda --preset "$preset" --layers "${LAYERS:-4}" --reps "${REPS:-5}" \
        --spec-tflops "${SPEC_TFLOPS:-989}" --recompute-gelu
    mv "$COGVX_BENCH_RESULTS/dit_step.json" "$COGVX_BENCH_RESULTS/dit_step_$preset.json"
  done
  ;;
*)
  echo "usage: bash benchmarks/gpu_mfu.sh prepare|run" >&2
  exit 2
  ;;
esac
