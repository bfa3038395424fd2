#!/usr/bin/env bash
# One short GPU benchmark (< 8 minutes on one H100/H200-class GPU): the table README's "Speed" section
# asks for. Run from the repository root:
#
#     bash scripts/gpu_bench.sh                 # writes gpu_bench/*.json and gpu_bench/tables.txt
#
# 1. stage one, f16 architecture at 256 px, batch 12 (taming's), bf16 autocast, with LPIPS: training
#    images/s and MFU, eager and torch.compile'd in the same rounds (compile time reported apart),
#    before and after disc_start; plus the data loader alone;
# 2. sampling with the paper GPT (24 layers x 16 heads x 1024, 256 tokens, batch 8, top-k 100, bf16):
#    tokens/s with the static KV cache, eager and compiled (CUDA graphs), against no cache and the
#    reference's sample() loop, checking the tokens agree.
# Each step has its own time limit, so a slow compile cannot eat the whole budget. Overrides for a
# smoke test elsewhere: DEVICE=cpu PRESET=tiny SIZE=32 BATCH=2 GPT=tiny bash scripts/gpu_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_bench}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-f16}
SIZE=${SIZE:-256}
BATCH=${BATCH:-12}
GPT=${GPT:-paper}
mkdir -p "$OUT"
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" \
    | tee "$OUT/device.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null | tee -a "$OUT/device.txt" || true

# 1. stage one: ~1-3 min of compiling, then 3 rounds x 5 steps per phase
timeout 300 python benchmark.py --device "$DEVICE" --preset "$PRESET" --image-size "$SIZE" --batch-size "$BATCH" \
    --precision bf16 --compile --steps 5 --repeats 3 --warmup 1 --num-workers 8 --scan-files 0 \
    --no-stage-two --no-sampling --json "$OUT/stage_one_bf16.json" | tee "$OUT/tables.txt"

# 2. sampling with the paper GPT: seconds per round eager, a compile, then one round of each sampler
#    without a cache
timeout 180 python benchmark.py --device "$DEVICE" --preset "$PRESET" --image-size "$SIZE" --gpt-preset "$GPT" \
    --precision bf16 --compile --repeats 3 --warmup 1 --recompute-repeats 1 --no-stage-one --no-loader \
    --scan-files 0 --no-stage-two --json "$OUT/sampling_bf16.json" | tee -a "$OUT/tables.txt"
echo "tables in $OUT/tables.txt, results in $OUT/*.json"
