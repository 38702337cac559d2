#!/usr/bin/env bash
# One command for a lent GPU (device tool): every GPU test and benchmark, JSON results under $OUT.
# The GPU machine has torch/triton/transformers but not diffusers or peft: carry their wheels in .whl/
# (see /work/.library/device/README.md, Notes), e.g. here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers peft accelerate
# then run(command="bash benchmarks/gpu_session.sh", carry=[".whl"]).
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
# at most 8 files come back from $OUT: one log plus the six JSON results
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -m pytest -q -m gpu tests/test_kernels.py -s
  python3 -m benchmarks attention --out "$OUT"
  python3 -m benchmarks sd --preset sd15 --warmup 3 --repeat 10 --out "$OUT"
} 2>&1 | tee "$OUT/log.txt"
