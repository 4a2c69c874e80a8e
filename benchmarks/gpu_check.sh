#!/usr/bin/env bash
# One call on a CUDA machine: install what is missing, run the gpu-marked tests, benchmark.
#   bash benchmarks/gpu_check.sh                 # every stage
#   bash benchmarks/gpu_check.sh tests speed     # some of them:
#     tests       the gpu-marked tests
#     kernels     benchmarks/kernel_bench.py --sweep: fused-MoE GEMMs and paged attention vs copy bw;
#                 benchmarks/pdl_probe.py: dependent launches with and without PDL;
#                 kernel_bench --linear: one-row dense projections, GEMV vs tensor-core dot
#     speed       benchmarks/gpu_speed.py: decode b1/b64 vs the HBM floor, 4k prefill vs matmul
#     profile     benchmarks/gpu_speed.py --profile: torch.profiler traces of decode steps
#     http        benchmarks/http_vs_offline.py: HTTP at 64 streams vs the offline engine
#     throughput  moeserve bench throughput: offline tok/s vs transformers and the floor
#     offload     benchmarks/offload_bench.py: Mixtral cut to 4 layers, half its experts on host
#     mixtral     benchmarks/offload_bench.py: the full Mixtral-8x7B shape on an 80 GB card
#     families    benchmarks/gpu_speed.py on DeepSeek-V2-Lite, gpt-oss-20b and Qwen3-30B-A3B
#     prefix      benchmarks/prefix_ttft.py: TTFT behind a 4k system prompt, uncached vs cached
#     quant       quantized experts: kernel_bench --quant, Mixtral-4l decode bf16 vs fp8,
#                 gpt-oss-120b in MXFP4, Qwen3-30B-A3B offloaded on a 16 GB card bf16 vs fp8,
#                 Mixtral-8x7B offloaded on a 24 GB card fp8 vs bf16
#     f16         the MXFP4 GEMVs' float16 products against their float32 ones: gpu tests,
#                 kernel_bench --gemv, gpt-oss-120b batch-1 decode alternated (not a default stage)
#     gemvs       kernel_bench --gemv --sweep at one token: the expert GEMVs' tiles around the
#                 shipped ones for gpt-oss-120b (MXFP4), gpt-oss-20b, Qwen3-30B-A3B and
#                 DeepSeek-V2-Lite (bf16) (not a default stage)
#     optin       the opt-in decode changes, the early PDL trigger (MOESERVE_PDL_EARLY=1) and the
#                 rotary in the decode kernel (paged_attention.ROPE_IN_DECODE=1): the gpu tests
#                 of the captured decode paths with both on, then batch-1 decode of
#                 $OPTIN_SHAPES (default Qwen3-30B-A3B, gpt-oss-20b, DeepSeek-V2-Lite) in the settings
#                 $OPTIN_SETS (early:sum:merge:rope, sum and merge being
#                 moe_gemv_plan.SUM_IN_DOWN_MAX_TOKENS and paged_attention.MERGE_IN_LAST),
#                 $OPTIN_ROUNDS times (default 1; not a default stage)
#     ab          decode at batch $AB_BATCH (default 1) of this tree vs the tree in $BASE,
#                 alternated twice per shape ($AB_SHAPES); make it with `mkdir bench_base; git archive REV moeserve
#                 benchmarks | tar -x -C bench_base`, carry bench_base (not a default stage)
# Results land in $OUT (the device tool's output folder) or bench_out/.
set -uo pipefail
all="tests kernels speed profile http throughput offload mixtral families prefix quant"
extra="ab optin f16 gemvs"  # stages that run only when named
case "${1:-}" in
  -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
esac
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
stages=${*:-$all}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
status=0
for stage in $stages; do
  echo "=== $stage"
  case $stage in
    tests)
      # Every file with gpu tests (none of them needs the server's packages).
      python3 -m pytest -q -p no:cacheprovider -m gpu $(grep -l "mark.gpu" tests/test_*.py) \
        2>&1 | tee "$OUT/gpu_tests.log" ;;
    kernels)
      python3 benchmarks/kernel_bench.py --sweep --json "$OUT/kernel_bench.json" 2>&1 \
        | tee "$OUT/kernel_bench.log"
      python3 benchmarks/pdl_probe.py 2>&1 | tee "$OUT/pdl_probe.log"
      for shape in gpt-oss-120b deepseek-v2-lite qwen3-30b-a3b; do
        python3 benchmarks/kernel_bench.py --shape "$shape" --linear 2>&1 | tee -a "$OUT/linear.log"
      done ;;
    speed)
      python3 benchmarks/gpu_speed.py --modes graphs,graphs-sync,eager,torch \
        --json "$OUT/gpu_speed.json" 2>&1 | tee "$OUT/gpu_speed.log" ;;
    profile)
      python3 benchmarks/gpu_speed.py --modes graphs --no-hf --prefill-len 0 \
        --profile "$OUT/traces" 2>&1 | tee "$OUT/profile.log" ;;
    http)
      python3 benchmarks/http_vs_offline.py --json "$OUT/http_vs_offline.json" 2>&1 \
        | grep -v "it/s\]" | tee "$OUT/http.log" ;;
    throughput)
      python3 -m moeserve.cli bench throughput --synthetic mixtral-4l --dtype bfloat16 \
        --max-num-seqs 16 --num-prompts 16 --input-len 128 --output-len 128 --peer --floor \
        --result-json "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.log" ;;
    offload)
      python3 benchmarks/offload_bench.py --synthetic mixtral-4l --slots 4 --batch 1 64 --peer \
        --modes fetch,auto --json "$OUT/offload_4l.json" 2>&1 | tee "$OUT/offload_4l.log" ;;
    mixtral)
      # The full shape on an 80 GB H100; a larger GPU behaves as one (benchmarks/RESULTS.md).
      python3 benchmarks/offload_bench.py --dummy mixtral-8x7b --batch 1 64 --modes fetch,auto \
        --emulate-card-mib 81559 --json "$OUT/offload_8x7b.json" 2>&1 | tee "$OUT/offload_8x7b.log" ;;
    families)
      for shape in deepseek-v2-lite gpt-oss-20b qwen3-30b-a3b; do
        python3 benchmarks/gpu_speed.py --shape "$shape" --modes graphs --prefill-len 0 \
          --json "$OUT/speed_$shape.json" 2>&1 | grep -v Warn | tee "$OUT/speed_$shape.log"
      done ;;
    prefix)
      for shape in mixtral-4l gpt-oss-20b; do
        python3 benchmarks/prefix_ttft.py --shape "$shape" --layers 4 --compare-off \
          --json "$OUT/prefix_ttft_$shape.json" 2>&1 | grep -v Warn | tee "$OUT/prefix_$shape.log"
      done ;;
    quant)
      for q in fp8 mxfp4; do
        python3 benchmarks/kernel_bench.py --quant "$q" --json "$OUT/kernel_$q.json" 2>&1 \
          | tee "$OUT/kernel_$q.log"
      done
      for q in "" fp8; do
        python3 benchmarks/gpu_speed.py --shape mixtral-8x7b --modes graphs --no-hf \
          ${q:+--quantization $q} --json "$OUT/speed_mixtral4l_${q:-bf16}.json" 2>&1 \
          | grep -v Warn | tee "$OUT/speed_mixtral4l_${q:-bf16}.log"
      done
      python3 benchmarks/gpu_speed.py --shape gpt-oss-120b --modes graphs --no-hf \
        --prefill-len 0 --json "$OUT/speed_gpt_oss_120b.json" 2>&1 | grep -v Warn \
        | tee "$OUT/speed_gpt_oss_120b.log"
      python3 benchmarks/offload_bench.py --dummy qwen3-30b-a3b --emulate-card-mib 16384 \
        --quantization none,fp8 --modes fetch --expert-cache-kernels eager,fused --batch 1 \
        --output-len 32 \
        --json "$OUT/offload_qwen3_16g.json" 2>&1 | tee "$OUT/offload_qwen3_16g.log"
      python3 benchmarks/offload_bench.py --dummy mixtral-8x7b --emulate-card-mib 24576 \
        --quantization fp8,none --modes fetch --batch 1 --output-len 16 \
        --json "$OUT/offload_mixtral_24g.json" 2>&1 | tee "$OUT/offload_mixtral_24g.log" ;;
    f16)
      python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernel_quant.py \
        -k "half_products or decodes_agree" 2>&1 | tee "$OUT/f16_tests.log"
      for mode in 1 0; do
        echo "MOESERVE_MXFP4_F16=$mode" | tee -a "$OUT/f16.log"
        MOESERVE_MXFP4_F16=$mode python3 benchmarks/kernel_bench.py --shape gpt-oss-120b --gemv \
          --tokens 1 --quant mxfp4 2>&1 | grep -v Warn | tee -a "$OUT/f16.log"
      done
      for round in 1 2; do
        for mode in 1 0; do
          printf 'gpt-oss-120b b1, MOESERVE_MXFP4_F16=%s: ' "$mode" | tee -a "$OUT/f16.log"
          MOESERVE_MXFP4_F16=$mode python3 benchmarks/gpu_speed.py --shape gpt-oss-120b \
            --modes graphs --no-hf --prefill-len 0 --batch 1 --output-len 64 2>&1 \
            | grep -m1 " b1 .*tok/s" | tee -a "$OUT/f16.log"
        done
      done ;;
    optin)
      # Each trigger setting compiles into its own Triton cache: it is a jit-time constant.
      MOESERVE_PDL_EARLY=1 TRITON_CACHE_DIR=/tmp/triton_early1 python3 -c "
import sys, pytest
from moeserve.kernels import paged_attention
paged_attention.ROPE_IN_DECODE = 1
sys.exit(pytest.main(sys.argv[1:]))" -q -p no:cacheprovider -m gpu \
        tests/test_kernel_fused_moe.py tests/test_kernel_paged_attention.py \
        tests/test_kernel_linear.py tests/test_fast_path.py tests/test_deepseek.py \
        tests/test_gpt_oss.py tests/test_offload_fused.py tests/test_decode_rows.py \
        tests/test_staged.py 2>&1 | tee "$OUT/optin_tests.log"
      for shape in ${OPTIN_SHAPES:-qwen3-30b-a3b gpt-oss-20b deepseek-v2-lite}; do
        for round in $(seq "${OPTIN_ROUNDS:-1}"); do
          for setting in ${OPTIN_SETS:-0:1:1:0 0:1:1:1 1:1:0:0 1:1:0:1 0:0:0:0}; do
            IFS=: read -r e sum merge rope <<< "$setting"
            printf '%s b1, early=%s sum_in_down=%s merge_in_last=%s rope_in_decode=%s: ' \
              "$shape" "$e" "$sum" "$merge" "$rope" | tee -a "$OUT/optin.log"
            MOESERVE_PDL_EARLY=$e TRITON_CACHE_DIR=/tmp/triton_early$e python3 \
              benchmarks/gpu_speed.py --set moe_gemv_plan.SUM_IN_DOWN_MAX_TOKENS="$sum" \
              --set paged_attention.MERGE_IN_LAST="$merge" \
              --set paged_attention.ROPE_IN_DECODE="$rope" --shape "$shape" \
              --modes graphs --no-hf --prefill-len 0 --batch 1 --output-len 64 2>&1 \
              | grep -m1 " b1 .*tok/s" | tee -a "$OUT/optin.log"
          done
        done
      done ;;
    gemvs)
      for shape in gpt-oss-120b:mxfp4 gpt-oss-20b: qwen3-30b-a3b: deepseek-v2-lite:; do
        q=${shape#*:}
        python3 benchmarks/kernel_bench.py --shape "${shape%%:*}" --gemv --tokens 1 --sweep \
          ${q:+--quant $q} 2>&1 | grep -v Warn | tee -a "$OUT/gemv_sweep.log"
      done ;;
    ab)
      # Each tree runs its own benchmarks/, which put their own checkout first on sys.path:
      # a base run from this tree's scripts would measure this tree twice.
      if [ ! -d "${BASE:-}/benchmarks" ]; then
        echo "ab: set BASE to a tree with moeserve/ and benchmarks/"; status=2; continue
      fi
      for shape in ${AB_SHAPES:-deepseek-v2-lite qwen3-30b-a3b}; do
        for round in 1 2; do
          for tree in "$PWD" "$BASE"; do
            printf '%s %s round %s: ' "$shape" "$tree" "$round" | tee -a "$OUT/ab.log"
            (cd "$tree" && python3 benchmarks/gpu_speed.py --shape "$shape" --modes graphs \
              --no-hf --prefill-len 0 --batch "${AB_BATCH:-1}" --output-len 64 2>&1) \
              | grep -m1 -E " b${AB_BATCH:-1} .*tok/s" \
              | tee -a "$OUT/ab.log"
          done
        done
      done ;;
    *) echo "unknown stage $stage (one of: $all $extra)"; status=2 ;;
  esac
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
done
exit $status
