#!/usr/bin/env bash
# Both stages on Fashion-MNIST on one CPU core, with the numbers and figures of README "Results: stage two".
#
#   taskset -c 0 env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 bash scripts/fashion_mnist_recipe.sh
#   SMOKE=1 taskset -c 1 env OMP_NUM_THREADS=1 bash scripts/fashion_mnist_recipe.sh   # same steps, minutes
#   STAGES="evaluate grids summary" bash scripts/fashion_mnist_recipe.sh              # redo the last stages
#
# Stages (STAGES, in this order):
#   data         prepare_data.py: TRAIN_PER_CLASS train / TEST_PER_CLASS test images per class, 28x28 PNGs,
#                from Debian's dataset-fashion-mnist files (RAW_DIR) or DOWNLOAD=1
#   vqgan        stage one at 32 px (bicubic up from 28) on DATA/train, VQ_STEPS steps, f=4: 8x8 codes, 256 codes
#   transformer  stage two, class-conditional (the 10 class folders) with CFG dropout 0.1, GPT_STEPS steps;
#                writes results/transformer_final.png: original | reconstruction | completion | new sample
#   evaluate     evaluate.py on DATA/test: PSNR/SSIM/LPIPS/rFID of reconstructions, gFID/gKID of
#                EVAL_PER_CLASS samples per class at each of CFG_SCALES (1 = guidance off)
#   grids        sample_transformer.py --samples-per-class GRID_PER_CLASS: one row per class, at CFG 1 and GRID_CFG
#   summary      OUT/summary.md: wall time per stage, the metrics, validation bits per token vs log2(codes)
#
# Budgets (full run) were sized from CPU time per step measured on one core of a 2-core AMD EPYC VM: stage one
# 0.73 s/step (ch 32, batch 16, LPIPS on), stage two 0.18 s/step (GPT demo preset, 0.87M params, batch 32),
# InceptionV3 0.2 s/image; so about 23 min of stage one, 19 min of stage two and 9 min of evaluation.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python}
if [[ "${SMOKE:-0}" == 1 ]]; then
    OUT=${OUT:-runs/fashion-mnist-smoke}; DATA=${DATA:-data/fashion-mnist-smoke}
    TRAIN_PER_CLASS=${TRAIN_PER_CLASS:-20}; TEST_PER_CLASS=${TEST_PER_CLASS:-4}
    VQ_STEPS=${VQ_STEPS:-10}; GPT_STEPS=${GPT_STEPS:-20}; EVAL_PER_CLASS=${EVAL_PER_CLASS:-4}
    CFG_SCALES=${CFG_SCALES:-"1 3"}; GRID_PER_CLASS=${GRID_PER_CLASS:-2}
else
    OUT=${OUT:-runs/fashion-mnist}; DATA=${DATA:-data/fashion-mnist}
    TRAIN_PER_CLASS=${TRAIN_PER_CLASS:-2000}  # 20000 of the 60000 training images (10% held out in each stage)
    TEST_PER_CLASS=${TEST_PER_CLASS:-50}      # 500 of the 10000 test images: InceptionV3 is 0.2 s/image here
    VQ_STEPS=${VQ_STEPS:-1800}; GPT_STEPS=${GPT_STEPS:-5500}; EVAL_PER_CLASS=${EVAL_PER_CLASS:-50}
    CFG_SCALES=${CFG_SCALES:-"1 1.5 3"}; GRID_PER_CLASS=${GRID_PER_CLASS:-8}
fi
GRID_CFG=${GRID_CFG:-3}
RAW_DIR=${RAW_DIR:-/usr/share/datasets/fashion-mnist}
STAGES=${STAGES:-"data vqgan transformer evaluate grids summary"}

NUM_CODES=256
# stage one: the demo preset's layout at 32 px, channels halved (0.73 s/step vs 1.40 s at ch 64), two
# levels (f=4, an 8x8 code grid), attention at 8x8, 256 cosine codes with dead-code restarts
VQGAN_FLAGS=(--preset demo --image-size 32 --ch 32 --ch-mult 1 2 2 --attn-resolutions 8 --num-res-blocks 1
             --z-channels 64 --latent-dim 64 --num-codebook-vectors "$NUM_CODES" --batch-size 16 --epochs 1000
             --max-steps "$VQ_STEPS" --num-workers 0 --sample-every 500 --save-every 100000
             --learning-rate 1e-4 --beta1 0.5 --beta2 0.9 --warmup-steps 0 --lr-decay none --disc-start 10000)
# stage two: the demo GPT (4 layers x 4 heads x 128, about compute-optimal for ~12M training tokens),
# cosine schedule over GPT_STEPS (--epochs 0), 2 cached views per image (centre + a random flip:
# a 28 px image scaled to 32 has nothing left to crop)
GPT_FLAGS=(--preset demo --conditional --cfg-dropout 0.1 --batch-size 32 --epochs 0 --max-steps "$GPT_STEPS"
           --num-augmentations 2 --num-workers 0 --num-grid-images 10 --cfg-scale "$GRID_CFG")

mkdir -p "$OUT"
has() { [[ " $STAGES " == *" $1 "* ]]; }
timed() {  # timed NAME cmd...: run, then append "NAME<TAB>seconds" to OUT/timings.tsv
    local name=$1 t0=$SECONDS; shift
    echo "== $name: $*"
    "$@"
    printf '%s\t%s\n' "$name" "$((SECONDS - t0))" >> "$OUT/timings.tsv"
    echo "== $name: $((SECONDS - t0)) s"
}

if has data; then
    if [[ -f "$DATA/info.json" ]] && $PY -c "import json, sys; i = json.load(open('$DATA/info.json')); \
sys.exit(0 if (i['max_per_class'], i['max_test_per_class']) == ($TRAIN_PER_CLASS, $TEST_PER_CLASS) else 1)"; then
        echo "== data: $DATA already holds $TRAIN_PER_CLASS/$TEST_PER_CLASS images per class"
    else
        src=(--raw-dir "$RAW_DIR"); [[ "${DOWNLOAD:-0}" == 1 ]] && src=(--download)
        timed data $PY prepare_data.py fashion-mnist --out "$DATA" "${src[@]}" --overwrite \
            --max-per-class "$TRAIN_PER_CLASS" --max-test-per-class "$TEST_PER_CLASS"
    fi
fi
if has vqgan; then
    if [[ -f "$OUT/checkpoints/vqgan_last.pt" ]]; then
        echo "error: $OUT/checkpoints/vqgan_last.pt exists; use another OUT, or leave vqgan out of STAGES" >&2
        exit 2
    fi
    timed vqgan $PY training_vqgan.py --dataset-path "$DATA/train" --out-dir "$OUT" "${VQGAN_FLAGS[@]}"
fi
if has transformer; then
    timed transformer $PY training_transformer.py --dataset-path "$DATA/train" --out-dir "$OUT" "${GPT_FLAGS[@]}"
fi
if has evaluate; then
    # shellcheck disable=SC2086  # CFG_SCALES is a list of numbers
    timed evaluate $PY evaluate.py --checkpoint-path "$OUT/checkpoints/vqgan_last.pt" --dataset-path "$DATA/test" \
        --transformer-path "$OUT/checkpoints/transformer_last.pt" --samples-per-class "$EVAL_PER_CLASS" \
        --cfg-scales $CFG_SCALES --batch-size 50 --num-workers 0 --json "$OUT/results/eval.json"
fi
if has grids; then
    for s in 1 "$GRID_CFG"; do
        timed "grid_cfg$s" $PY sample_transformer.py --transformer-path "$OUT/checkpoints/transformer_last.pt" \
            --samples-per-class "$GRID_PER_CLASS" --cfg-scale "$s" --out-dir "$OUT/samples_cfg$s"
    done
fi
if has summary; then
    $PY - "$OUT" "$DATA" "$NUM_CODES" <<'EOF'
import json, math, sys
from pathlib import Path

out, data, k = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
timings = {}
for line in (out / "timings.tsv").read_text().splitlines():
    name, seconds = line.split("\t")
    timings[name] = int(seconds)  # the latest run of each stage
ev = json.loads((out / "results" / "eval.json").read_text())
records = [json.loads(l) for l in (out / "results" / "metrics.jsonl").read_text().splitlines() if l.strip()]
val = [r for r in records if r.get("stage") == "transformer" and "val_bits_per_token" in r]
info = json.loads((data / "info.json").read_text())
lines = [f"# Fashion-MNIST recipe: {out}", "",
         f"data: {info['images']['train']} train images ({info['max_per_class']} per class), "
         f"{info['images']['test']} test images ({info['max_test_per_class']} per class)", "",
         "| stage | wall time |", "|---|---|"]
lines += [f"| {k} | {v / 60:.1f} min |" for k, v in timings.items()]
lines += ["", "| test images | PSNR (dB) | SSIM | LPIPS | rFID | KID x1000 | codebook usage |",
          "|---|---|---|---|---|---|---|",
          f"| {ev['num_images']} | {ev['psnr']:.2f} | {ev['ssim']:.3f} | "
          + (f"{ev['lpips']:.3f}" if ev.get("lpips") is not None else "n/a") + " | "
          + (f"{ev['rfid']:.2f} | {ev['kid'] * 1000:.2f}" if ev.get("rfid") is not None else "n/a | n/a")
          + f" | {ev['codebook_usage'] * 100:.1f}% |", ""]
sweep = ev.get("cfg_sweep") or []
if sweep:
    lines += ["| CFG scale | gFID | gKID x1000 | samples |", "|---|---|---|---|"]
    lines += [f"| {r['cfg_scale']:g}{' (off)' if r['cfg_scale'] == 1 else ''} | {r['gfid']:.2f} | "
              f"{r['gkid'] * 1000:.2f} ± {r['gkid_std'] * 1000:.2f} | {r['num_samples']} |" for r in sweep]
    best = min(sweep, key=lambda r: r["gfid"])
    off = next((r for r in sweep if r["cfg_scale"] == 1), None)
    lines.append("")
    if off is not None:
        lines.append(f"best gFID {best['gfid']:.2f} at CFG {best['cfg_scale']:g} vs {off['gfid']:.2f} with CFG off "
                     f"(target: lower): {'met' if best['gfid'] < off['gfid'] else 'missed'}")
    if ev.get("rfid"):
        lines.append(f"best gFID / rFID = {best['gfid'] / ev['rfid']:.2f} (target: at most 3): "
                     f"{'met' if best['gfid'] <= 3 * ev['rfid'] else 'missed'}")
if val:
    bpt = val[-1]["val_bits_per_token"]
    lines.append(f"validation bits per token {bpt:.3f} at step {val[-1]['step']}; log2({k} codes) = "
                 f"{math.log2(k):.0f}, so {math.log2(k) - bpt:.2f} bits below (target: at least 2): "
                 f"{'met' if math.log2(k) - bpt >= 2 else 'missed'}")
lines += ["", f"figures: {out}/results/transformer_final.png (original | reconstruction | completion | new), "
          f"{out}/samples_cfg*/class_grid.png (one row per class)"]
text = "\n".join(lines) + "\n"
(out / "summary.md").write_text(text)
print(text)
EOF
fi
