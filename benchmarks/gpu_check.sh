#!/usr/bin/env bash
# One call on a CUDA machine: install what is missing, run the gpu-marked tests, benchmark.
#   bash benchmarks/gpu_check.sh            # tests + offline throughput on mixtral-4l (bf16)
# Results land in $OUT (the device tool's output folder) or bench_out/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
status=0
python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log" || status=1
python3 benchmarks/offline_throughput.py --synthetic mixtral-4l --dtype bfloat16 \
  --num-prompts 16 --input-len 128 --output-len 128 --json "$OUT/offline_h100.json" \
  2>&1 | grep -v Warning | tee "$OUT/offline_h100.log" || status=1
exit $status
