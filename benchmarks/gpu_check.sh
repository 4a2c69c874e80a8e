#!/usr/bin/env bash
# One call on a CUDA machine: install what is missing, run the gpu-marked tests, benchmark.
#   bash benchmarks/gpu_check.sh                 # every stage
#   bash benchmarks/gpu_check.sh tests speed     # some: tests kernels speed http offline counting
#                                                #       offload profile mixtral
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
stages=${*:-tests kernels speed http offline counting offload profile mixtral}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
status=0
for stage in $stages; do
  echo "=== $stage"
  case $stage in
    tests)
      # The files with gpu tests (the server tests need packages the GPU image lacks).
      python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fidelity.py \
        tests/test_offload.py tests/test_sampler.py tests/test_kernel_fused_moe.py \
        tests/test_kernel_paged_attention.py tests/test_kernel_norm_rope.py \
        tests/test_kernel_moe_routing.py tests/test_kernel_tokens.py tests/test_kernel_linear.py \
        tests/test_fast_path.py \
        tests/test_staged.py 2>&1 | tee "$OUT/gpu_tests.log" ;;
    kernels)
      python3 benchmarks/kernel_bench.py --sweep --json "$OUT/kernel_bench.json" 2>&1 \
        | tee "$OUT/kernel_bench.log" ;;
    speed)
      python3 benchmarks/gpu_speed.py --modes graphs,graphs-sync,eager,torch --json "$OUT/gpu_speed.json" 2>&1 | tee "$OUT/gpu_speed.log" ;;
    http)
      python3 benchmarks/http_vs_offline.py --json "$OUT/http_vs_offline.json" 2>&1 \
        | grep -v "it/s\]" | tee "$OUT/http.log" ;;
    offline)
      python3 benchmarks/offline_throughput.py --synthetic mixtral-4l --dtype bfloat16 \
        --num-prompts 16 --input-len 128 --output-len 128 --json "$OUT/offline_h100.json" ;;
    counting)
      python3 benchmarks/expert_count_cost.py --synthetic mixtral-4l --dtype bfloat16 \
        --batch 64 --output-len 32 --rounds 5 --json "$OUT/count_cost.json" ;;
    offload)
      python3 benchmarks/offload_bench.py --synthetic mixtral-4l --slots 4 --batch 1 64 --peer \
        --modes fetch,auto --json "$OUT/offload_4l.json" 2>&1 | tee "$OUT/offload_4l.log" ;;
    profile)
      python3 benchmarks/offload_profile.py --layers 4 --slots 4 --batch 1 \
        --trace "$OUT/trace_4l_b1.json" 2>&1 | tee "$OUT/profile.log"
      python3 benchmarks/offload_profile.py --layers 4 --slots 4 --batch 64 \
        --trace "$OUT/trace_4l_b64.json" 2>&1 | tee -a "$OUT/profile.log" ;;
    mixtral)
      # The full shape on an 80 GB H100; a larger GPU behaves as one (benchmarks/RESULTS.md).
      python3 benchmarks/offload_bench.py --dummy mixtral-8x7b --batch 1 64 --modes fetch,auto \
        --emulate-card-mib 81559 --json "$OUT/offload_8x7b.json" 2>&1 | tee "$OUT/offload_8x7b.log" ;;
    *) echo "unknown stage $stage"; status=2 ;;
  esac
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
done
exit $status
