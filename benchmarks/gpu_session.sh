#!/usr/bin/env bash
# Everything that needs a GPU, for a session that is lent one (device tool), in commands of < 10 minutes:
#   part 1: kernels: compile check on the machine's triton, the bf16 SD-shape kernel tests, the attention benchmark
#   part 2: the whole model: DreamBooth step vs diffusers, UNet, sampling, VAE, then the levers ablation
#   part 3: the same for SDXL at 1024 px (LoRA / attention step, UNet, sampling, VAE)
# Each stage has its own time limit, so one that hangs or fails costs only itself; every stage writes its JSON
# under $OUT (at most 8 files come back per command: part 1 writes 3, part 2 writes 6).
#
# The GPU machine has torch/triton/transformers but not diffusers or peft: carry their wheels in .whl/
# (see /work/.library/device/README.md, Notes), e.g. here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers peft accelerate
# then run(command="bash benchmarks/gpu_session.sh 1", carry=[".whl"]) and the same with 2 (and 3: SDXL);
# copy the JSON into benchmarks/results/ and render the README tables with `python -m benchmarks report`.
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
    stage 90 python3 -m kernels.compile_check --out "$OUT/kernel-compile-gpu-machine.json"
    stage 150 python3 -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider
    stage 300 python3 -m benchmarks attention --out "$OUT"
  elif [ "$PART" = 3 ]; then
    stage 200 python3 -m benchmarks sd --only step --preset sdxl --warmup 2 --repeat 5 --out "$OUT"
    stage 90 python3 -m benchmarks sd --only unet --preset sdxl --warmup 2 --repeat 5 --out "$OUT"
    stage 180 python3 -m benchmarks sd --only sampling --preset sdxl --warmup 1 --repeat 5 --out "$OUT"
    stage 60 python3 -m benchmarks sd --only vae --preset sdxl --warmup 2 --repeat 5 --out "$OUT"
  else
    stage 150 python3 -m benchmarks sd --only step --preset sd15 --warmup 3 --repeat 10 --out "$OUT"
    stage 60 python3 -m benchmarks sd --only unet --preset sd15 --warmup 3 --repeat 10 --out "$OUT"
    stage 90 python3 -m benchmarks sd --only sampling --preset sd15 --warmup 1 --repeat 15 --out "$OUT"
    stage 90 python3 -m benchmarks sd --only vae --preset sd15 --warmup 3 --repeat 10 --out "$OUT"
    stage 200 python3 -m benchmarks sd --only levers --preset sd15 --warmup 3 --repeat 10 --out "$OUT"
  fi
} 2>&1 | tee "$OUT/log-part$PART.txt"
