#!/usr/bin/env bash
# The classification -> detection transfer demo, run by `make demo` after the classification
# demo: convert the Fashion-MNIST RandWire checkpoint into Detectron2 weights (conv1 spread over
# RGB, stem strides 2..32 for FPN, classifier dropped, graphs embedded), then fine-tune
# configs/frcnn_randwire_demo.yaml on the deepforest tree-crown photos on CPU and print COCO AP.
#
#   bash tools/demo_det.sh [CLASSIFICATION_CHECKPOINT] [KEY VALUE ...]
#
# Default checkpoint: the one `python tools/train_cls.py --gen ws` writes, {best,last}.pth in
# the folder `python tools/train_cls.py --gen ws --print-output-dir` names. Extra KEY VALUE pairs go
# to tools/train_net.py as config overrides (e.g. SOLVER.MAX_ITER 100).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
# One thread: the detector runs thousands of small ops per step, and on a busy 2-core machine
# two threads cost ~10x more time per iteration (measured 14 s vs 1.2 s). Override if you like.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
RUN=$($PY tools/train_cls.py --gen ws --print-output-dir)
CKPT=${1:-}
[ $# -gt 0 ] && shift
if [ -z "$CKPT" ]; then
  for f in "$RUN/best.pth" "$RUN/last.pth"; do
    if [ -f "$f" ]; then CKPT=$f; break; fi
  done
fi
if [ -z "$CKPT" ] || [ ! -f "$CKPT" ]; then
  echo "demo_det: no classification checkpoint (${CKPT:-$RUN/best.pth}); run the classification" >&2
  echo "demo first: $PY tools/train_cls.py --gen ws   (or pass a checkpoint path)" >&2
  exit 1
fi
WEIGHTS=output/d2_weights/demo_randwire_small.pkl
OUT=output/det/frcnn_randwire_demo
mkdir -p output/det
start=$(date +%s)
echo "demo_det: converting $CKPT -> $WEIGHTS"
$PY tools/convert_cls_to_d2.py "$CKPT" "$WEIGHTS" --overwrite  # the demo remakes it each run
echo "demo_det: fine-tuning Faster R-CNN + FPN on the tree crowns (CPU; log in $OUT/log.txt)"
# A fresh fine-tune each time: the demo checkpoint (and its graphs) may have changed.
$PY tools/train_net.py --config-file configs/frcnn_randwire_demo.yaml --no-auto-resume \
  MODEL.WEIGHTS "$WEIGHTS" OUTPUT_DIR "$OUT" "$@" 2>&1 | tee "$OUT.console.txt" |
  grep --line-buffered -E "eta:|Overall training speed|Total inference time|rwdet backbone" || true
line=$(grep -E "^\[rwdet\] treecrowns_val bbox" "$OUT.console.txt" | tail -1 || true)
if [ -z "$line" ]; then
  echo "demo_det: training failed; see $OUT.console.txt" >&2
  tail -20 "$OUT.console.txt" >&2
  exit 1
fi
echo "demo_det: done in $(( $(date +%s) - start )) s; tree-crown val (9 held-out tiles, 206 trees):"
echo "$line"
# The detector's boxes on the first held-out tile next to its annotated crowns (one PNG).
if ! $PY tools/visualize_det.py --config-file configs/frcnn_randwire_demo.yaml \
    MODEL.WEIGHTS "$OUT/model_final.pth" OUTPUT_DIR "$OUT" "$@" > "$OUT.visualize.txt" 2>&1; then
  echo "demo_det: drawing the boxes failed; see $OUT.visualize.txt" >&2
  tail -3 "$OUT.visualize.txt" >&2
  exit 1
fi
grep "^visualize_det.py: wrote" "$OUT.visualize.txt" | sed 's/^visualize_det.py/demo_det/'
