#!/usr/bin/env bash
# Everything that needs a GPU, for a session that is lent one (device tool): at most 20 minutes of GPU time (the
# stages' limits add up to 1200 s) in four commands of < 10 minutes, each stage with its own time limit (one that
# hangs or fails costs only itself):
#   part 1 (<= 5 min): kernels: compile check on the machine's triton, the GPU tests (bf16 SD shapes, the custom
#                      ops, the compiled UNet through our kernel with and without CUDA graphs), attention benchmark
#   part 2 (<= 6.5 min): SD 1.5 at 512 px: the trainer's step per mode, eager / --compile on / --compile graphs
#                      against diffusers' script eager and under torch.compile (benchmarks/step.py)
#   part 3 (<= 4.5 min): SD 1.5: the UNet with MFU per variant at batch 1/2/8, sampling, the VAE
#   part 4 (<= 4 min): SDXL LoRA at 1024 px: the step and the UNet
# The limits are estimates until a GPU session has run them (compiling takes about a minute per variant and shape).
# Every stage writes its JSON under $OUT (at most 8 files come back per command).
#
# The GPU machine has torch/triton/transformers but not diffusers or peft: carry their wheels in .whl/
# (see /work/.library/device/README.md, Notes), e.g. here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers peft accelerate
# then run(command="bash benchmarks/gpu_session.sh 1", carry=[".whl"]) and the same with 2, 3 and 4; copy the JSON
# into benchmarks/results/ and render the README tables with `python -m benchmarks report`.
set -uo pipefail
PART=${1:-1}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1

stage() {  # stage SECONDS COMMAND...: run it, but never for longer than SECONDS
  local secs=$1; shift
  echo "== $* (at most ${secs}s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$secs" "$@" || echo "!! exit $? after $((SECONDS - t0))s: $*"
  echo "== done in $((SECONDS - t0))s"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  if [ "$PART" = 1 ]; then
    stage 60 python3 -m minidream.kernels.compile_check --out "$OUT/kernel-compile-gpu-machine.json"
    stage 120 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_compile.py -p no:cacheprovider
    stage 120 python3 -m benchmarks attention --warmup 5 --repeat 20 --out "$OUT"
  elif [ "$PART" = 2 ]; then
    stage 390 python3 -m benchmarks sd --only step --preset sd15 --warmup 3 --repeat 10 --out "$OUT"
  elif [ "$PART" = 3 ]; then
    stage 150 python3 -m benchmarks sd --only unet --preset sd15 --warmup 3 --repeat 10 --out "$OUT"
    stage 60 python3 -m benchmarks sd --only sampling --preset sd15 --warmup 1 --repeat 10 --out "$OUT"
    stage 60 python3 -m benchmarks sd --only vae --preset sd15 --warmup 3 --repeat 10 --out "$OUT"
  else
    stage 180 python3 -m benchmarks sd --only step --preset sdxl --warmup 2 --repeat 5 --out "$OUT"
    stage 60 python3 -m benchmarks sd --only unet --preset sdxl --warmup 2 --repeat 5 --out "$OUT"
  fi
  python3 -m benchmarks report --out "$OUT" > "$OUT/tables-part$PART.md" 2>&1 || true
} 2>&1 | tee "$OUT/log-part$PART.txt"
