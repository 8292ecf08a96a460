#!/usr/bin/env bash
# The GPU part of the performance benchmarks, prepared for a GPU machine without internet access (the wheels it
# lacks are downloaded beside the repo first, then carried over with it): the DiT training step of CogVideoX-2B
# and -5B shapes with fewer layers (49x480x720 clips, bf16), ours beside diffusers on the same weights, MFU
# against the card's measured bf16 matmul and against its datasheet peak (989 TFLOP/s dense bf16 for an H100/H200 SXM), and the step's
# peak memory with and without model.recompute_gelu.
#
#   here:   bash benchmarks/gpu_mfu.sh prepare
#           wheels of what the GPU machine's Python 3.12 lacks (diffusers, megatron-core, DeepSpeed built here as a
#           pure-Python wheel, and DeepSpeed's own dependencies) -> .whl/ (git-ignored)
#   there:  bash benchmarks/gpu_mfu.sh all      (with .whl/ copied along; smoke, then run; about 8 min)
#     run:   tables on stdout, $OUT/dit_step_{2b,5b}.json
#     smoke: the training code paths that only a GPU takes, in a few minutes: the tiny DiT trained on NCCL in bf16
#            with EMA and a profiled window, then resumed (the host-tensor all_reduces, EMA onto the GPU, the CUDA
#            trace), the VAE trainer with its export (batches and LPIPS on the engine's device), a pipeline export
#            from the ZeRO-3 checkpoint, and sampling with everything on the GPU (cogvx_ds.sample --device)
#            -> $OUT/smoke.log
# LAYERS (default 4), REPS (default 5) and SPEC_TFLOPS (default 989) override the sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  py=.venv/bin/python  # the project's venv (make venv): it holds torch and DeepSpeed, which the wheel build needs
  $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl diffusers==0.42.1 megatron-core==0.16.1 hjson pydantic pydantic-core annotated-types \
      typing-inspection
  # DeepSpeed publishes a source archive only: build it here (no compiled ops: ZeRO with torch's AdamW needs none)
  $py -m pip wheel -q --no-deps --no-build-isolation "deepspeed==$($py -m pip show deepspeed | sed -n 's/^Version: //p')" -w .whl
  ls -l .whl
  ;;
run|smoke|all)
  ls .whl/*.whl >/dev/null || { echo "no .whl/: run 'bash benchmarks/gpu_mfu.sh prepare' here and carry .whl" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
  export COGVX_BENCH_RESULTS="${OUT:-/tmp/bench}"
  mkdir -p "$COGVX_BENCH_RESULTS"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
  if [ "$1" != run ]; then
    (
      set -x
      s=/tmp/smoke; rm -rf $s
      python3 -c "import sys; from pathlib import Path; sys.path.insert(0, 'tests'); from train_helpers import make_shards; make_shards(Path('$s/shards'), n_video=8, n_image=4)"
      common=(--config tiny parallel.backend=auto train.precision=bf16 "data.shards=[$s/shards]" train.run_dir=$s/dit
              train.save_every=2 train.ema_decay=0.9 train.peak_tflops=989)
      python3 -m cogvx_ds.train "${common[@]}" train.max_steps=4 "train.profile_steps=[2,3]"
      python3 -m cogvx_ds.train "${common[@]}" train.max_steps=6          # resumes from step 4 (EMA included)
      ls -l $s/dit/profile/steps_2-3 $s/dit/final_model_ema; tail -n 2 $s/dit/metrics.jsonl
      python3 -m cogvx_ds.train_vae --run-dir $s/vae --steps 3 ckpt_every=2 model.latent_channels=4
      ls -l $s/vae/export
      python3 -c "from cogvx_ds.models.text_encoder import build_tiny_t5; build_tiny_t5('$s/t5', d_model=32)"
      python3 -m cogvx_ds.export --run-dir $s/dit --out $s/pipe --vae $s/vae/export --text-encoder $s/t5 --checkpoint latest
      python3 -c "
import torch; from cogvx_ds.sample import load_components, generate
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dit, vae, enc = load_components('$s/dit', '$s/vae/export', '$s/t5', torch.bfloat16, device)
v = generate(dit, vae, enc, ['a red circle', 'a blue square'], frames=9, height=64, width=64, steps=3, progress=False)
assert v.shape == (2, 3, 9, 64, 64) and v.device.type == device and torch.isfinite(v).all(), (v.shape, v.device)
print('sampled', tuple(v.shape), 'on', v.device)"
      echo "SMOKE OK"
    ) 2>&1 | tee "$COGVX_BENCH_RESULTS/smoke.log" || true
    # the benchmarks below still run (the device time is spent either way); the script's status says it failed
    grep -q "SMOKE OK" "$COGVX_BENCH_RESULTS/smoke.log" || { echo "SMOKE FAILED (see smoke.log)"; SMOKE_FAILED=1; }
  fi
  if [ "$1" != smoke ]; then
    for preset in 2b 5b; do
      python3 benchmarks/dit_step.py --device cuda --preset "$preset" --layers "${LAYERS:-4}" --reps "${REPS:-5}" \
          --spec-tflops "${SPEC_TFLOPS:-989}" --recompute-gelu
      mv "$COGVX_BENCH_RESULTS/dit_step.json" "$COGVX_BENCH_RESULTS/dit_step_$preset.json"
    done
  fi
  ;;
*)
  echo "usage: bash benchmarks/gpu_mfu.sh prepare|run|smoke|all" >&2
  exit 2
  ;;
esac
exit "${SMOKE_FAILED:-0}"
