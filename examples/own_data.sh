#!/usr/bin/env bash
# Your own data, end to end on a CPU: an image folder -> train -> sample -> tune -> sample tuned.
# The folder here is made from scikit-learn's 8x8 digits, upscaled to 16x16 grayscale PNGs, so the
# script runs anywhere; point DATA at your own folder of equally sized PNG / JPEG images instead.
# Prints the wall time of each stage.  Usage: bash examples/own_data.sh [WORK_DIR] [STEPS]
set -euo pipefail
WORK=${1:-own_data}
STEPS=${2:-600}
DATA=${DATA:-$WORK/images}
CONFIG="$(cd "$(dirname "$0")" && pwd)/configs/images.toml"
mkdir -p "$WORK"

stage() {  # stage NAME CMD...: run CMD and print its wall time
    local name=$1 start
    shift
    start=$EPOCHREALTIME
    "$@"
    awk -v n="$name" -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "== %s: %.1f s\n", n, b - a }' \
        | tee -a "$WORK/times.txt"
}

if [[ ! -d $DATA ]]; then
    stage "make the image folder" python - "$DATA" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
out = Path(sys.argv[1]); out.mkdir(parents=True)
for i, image in enumerate(load_digits().images):
    pixels = np.kron(image / 16.0 * 255.0, np.ones((2, 2))).round().astype(np.uint8)
    Image.fromarray(pixels, mode="L").save(out / f"{i:05d}.png")
PY
fi
stage "train ($STEPS steps)" psb-fast train --config "$CONFIG" --no-progress \
    --set data="images:$DATA" --set out_dir="$WORK/run" --set steps="$STEPS" --set device=cpu \
    --set model_kwargs.base=32 --set batch_size=64 --set warmup_steps=100 --set lr=2e-3 \
    --set ema_decay=0.995 --set eval_every=0 --set eval_samples=16 --set ckpt_every=200
stage "sample 64 at NFE 10 (defaults)" psb-fast sample "$WORK/run" --nfe 10 -n 64 --out "$WORK/samples"
# the default search: 48 settings per NFE around the package defaults (hop time, grid power 1.5 or
# 2, order 1 or 2, the two corrector variants) plus the defaults and the published settings, then a
# finer hop time around the best three
stage "tune NFE 5 10 20" psb-fast tune "$WORK/run" --nfe 5 10 20 -n 128 --out "$WORK/tuned.json"
stage "sample 64 at NFE 10 (tuned)" psb-fast sample "$WORK/run" --nfe 10 -n 64 --tuned "$WORK/tuned.json" \
    --out "$WORK/samples_tuned"
