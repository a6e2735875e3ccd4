#!/usr/bin/env bash
# The prepared GPU check (`make gpu-check`): every GPU measurement and smoke test of the project
# in one run of under 8 minutes on one H100/H200, written to one report (report.md +
# report.json) in the folder given as argument.
#
#   bash scripts/gpu_check.sh OUTPUT_DIR
#
# Steps, each under its own timeout (their sum is under 8 minutes, so one hang cannot eat the
# budget); the report records each step's status, seconds and log:
#   pytest_gpu  the `gpu`-marked tests
#   train_step  benchmarks/train_step.py, bf16 autocast + channels_last, batch 128
#   pad_step    the same for C=109 and C=109 with its widths padded to multiples of 8
#               (`+pad8`, rwdet.nn.pad_channels: the tensor-core hypothesis of issue #19)
#   det_step    benchmarks/det_step.py, bf16 autocast
#   decode      benchmarks/decode.py (PIL on CPU workers vs JPEG decode on the GPU)
#   train_cls   1-GPU torchrun (NCCL) smoke of tools/train_cls.py: 20 iterations on Fashion-MNIST
#   train_net   1-GPU torchrun smoke of tools/train_net.py: the demo config, SOLVER.MAX_ITER 20
#
# Without CUDA it prints one line saying so, after a dry run that checks each step would run
# (each tool's --help, the configs load, the models are registered, pytest collects the gpu
# tests, the data is there), and exits 0 (1 if a check failed).
# Fashion-MNIST: $RWDET_FMNIST_DIR, else /usr/share/datasets/fashion-mnist, else
# shared/fashion-mnist. PY: the interpreter (default .venv/bin/python, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/gpu_check.sh OUTPUT_DIR}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p "$OUT/logs" || exit 1
OUT=$(cd "$OUT" && pwd)
FMNIST=${RWDET_FMNIST_DIR:-}
for d in /usr/share/datasets/fashion-mnist shared/fashion-mnist; do
  [ -n "$FMNIST" ] || { [ -d "$d" ] && FMNIST=$(cd "$d" && pwd); }
done
export PY OUT FMNIST

if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  MODE=gpu
else
  MODE=dry
fi

TRAIN_MODELS="resnet50 randwire_c109 randwire_c154 randwire_small mobilenetv1_dnw_x0225 resnet50_popup mobilenet_v2"
PAD_MODELS="randwire_c109 randwire_c109+pad8"
DET_MODELS="r50_fpn r101_fpn randwire_c109 randwire_c154"
# 20 iterations: 1280 training images at a global batch of 64, one epoch.
CLS_ARGS="--gen ws --epochs 1 --batch-size 64 --warmup-epochs 0 --no-resume --amp bf16"
CLS_OPTS="data.train_subset 1280"
NET_OPTS="MODEL.RWDET.NAME randwire_small MODEL.RWDET.STEM imagenet SOLVER.MAX_ITER 20 SOLVER.CHECKPOINT_PERIOD 1000"
export TRAIN_MODELS PAD_MODELS DET_MODELS CLS_ARGS CLS_OPTS NET_OPTS
TORCHRUN="$PY -m torch.distributed.run --standalone --nproc_per_node=1"
export TORCHRUN

# ------------------------------------------------------------------ the steps on a GPU
gpu_pytest_gpu() { "$PY" -m pytest -m gpu -q -p no:cacheprovider tests; }
gpu_train_step() {
  # shellcheck disable=SC2086
  "$PY" benchmarks/train_step.py --device cuda --batch 128 --amp bf16 --channels-last \
    --models $TRAIN_MODELS --rounds 2 --iters 6 --warmup 2 --json "$OUT/train_step.json"
}
gpu_pad_step() {
  # shellcheck disable=SC2086
  "$PY" benchmarks/train_step.py --device cuda --batch 128 --amp bf16 --channels-last \
    --models $PAD_MODELS --rounds 1 --iters 6 --warmup 2 --json "$OUT/pad_step.json"
}
gpu_det_step() {
  # shellcheck disable=SC2086
  "$PY" benchmarks/det_step.py --device cuda --amp bf16 --batch 2 --size 800 1216 \
    --models $DET_MODELS --rounds 2 --iters 8 --warmup 3 --timeout 45 --json "$OUT/det_step.json"
}
gpu_decode() { "$PY" benchmarks/decode.py --device cuda --workers 4; }
gpu_train_cls() {
  [ -n "$FMNIST" ] || { echo "no Fashion-MNIST (set RWDET_FMNIST_DIR)"; return 1; }
  # shellcheck disable=SC2086
  NCCL_DEBUG=${NCCL_DEBUG:-WARN} $TORCHRUN tools/train_cls.py $CLS_ARGS --device cuda \
    --output-dir "$OUT/runs/cls" $CLS_OPTS data.fashion_mnist_dir "$FMNIST"
}
gpu_train_net() {
  # shellcheck disable=SC2086
  $TORCHRUN tools/train_net.py --config-file configs/frcnn_randwire_demo.yaml --no-auto-resume \
    $NET_OPTS MODEL.DEVICE cuda OUTPUT_DIR "$OUT/runs/det"
}

# ------------------------------------------------------------------ the dry run (no CUDA)
dry_pytest_gpu() {
  # exit 5 (nothing collected) fails the check too
  "$PY" -m pytest -m gpu --collect-only -q -p no:cacheprovider tests
}
dry_train_step() {
  "$PY" benchmarks/train_step.py --help >/dev/null || return 1
  # shellcheck disable=SC2086
  "$PY" - $TRAIN_MODELS <<'EOF'
import sys
from rwdet.models import list_models
known = set(list_models()) | {"resnet50", "mobilenet_v2"}
missing = [m for m in sys.argv[1:] if m not in known]
print("models:", sys.argv[1:], "not registered:", missing)
sys.exit(1 if missing else 0)
EOF
}
dry_pad_step() {
  # builds both models on the CPU, through the benchmark's own spec parser
  # shellcheck disable=SC2086
  "$PY" - $PAD_MODELS <<'EOF'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("train_step", "benchmarks/train_step.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
for name in sys.argv[1:]:
    model = bench.build(name, {})
    print(name, "built:", model is not None)
    if model is None:
        sys.exit(1)
EOF
}
dry_det_step() {
  "$PY" benchmarks/det_step.py --help >/dev/null || return 1
  # shellcheck disable=SC2086
  "$PY" - $DET_MODELS <<'EOF'
import sys
sys.path.insert(0, ".")
from benchmarks.det_step import model_config
for name in sys.argv[1:]:
    cfg = model_config(name, "cpu", [], 0.0)
    print(name, "config loads:", cfg.MODEL.BACKBONE.NAME, cfg.MODEL.RWDET.NAME or "")
EOF
}
dry_decode() { "$PY" benchmarks/decode.py --help; }
dry_train_cls() {
  [ -n "$FMNIST" ] && [ -f "$FMNIST/train-images-idx3-ubyte.gz" ] || {
    echo "no Fashion-MNIST found (set RWDET_FMNIST_DIR)"
    return 1
  }
  echo "Fashion-MNIST: $FMNIST"
  $TORCHRUN --help >/dev/null && "$PY" tools/train_cls.py --help >/dev/null
}
dry_train_net() {
  "$PY" tools/train_net.py --help >/dev/null || return 1
  # shellcheck disable=SC2086
  "$PY" - $NET_OPTS <<'EOF'
import sys
sys.path.insert(0, ".")
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
import rwdet.d2  # noqa: F401
from benchmarks.det_step import model_config
cfg = model_config("configs/frcnn_randwire_demo.yaml", "cpu", sys.argv[1:])
assert cfg.SOLVER.MAX_ITER == 20, cfg.SOLVER.MAX_ITER
build_model(cfg)
print("demo config loads, backbone builds;", len(DatasetCatalog.get(cfg.DATASETS.TRAIN[0])),
      "training images")
EOF
}
export -f gpu_pytest_gpu gpu_train_step gpu_pad_step gpu_det_step gpu_decode gpu_train_cls
export -f gpu_train_net dry_pytest_gpu dry_train_step dry_pad_step dry_det_step dry_decode
export -f dry_train_cls dry_train_net

# ------------------------------------------------------------------ run and record
STEPS="$OUT/steps.tsv"
: >"$STEPS"
step() { # NAME GPU_TIMEOUT_S (the report lists the GPU timeout; a dry check gets 180 s)
  local name=$1 limit=$2 log="$OUT/logs/$1.log" start rc status secs
  [ "$MODE" = dry ] && limit=180
  [ "$MODE" = gpu ] && echo "gpu_check: $name (timeout ${limit} s) ..."
  start=$(date +%s.%N)
  timeout -k 10 "$limit" bash -c "${MODE}_$name" >"$log" 2>&1
  rc=$?
  secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  if [ "$rc" -eq 0 ]; then
    status=$([ "$MODE" = dry ] && echo "dry-run ok" || echo ok)
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status="timeout after ${limit} s"
  else
    status="$([ "$MODE" = dry ] && echo "dry-run ")failed (exit $rc)"
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$secs" "$2" >>"$STEPS"
  [ "$MODE" = gpu ] && echo "gpu_check: $name: $status in $secs s"
  return 0
}
# Timeouts sum to 470 s: under 8 minutes with the report.
step pytest_gpu 50
step train_step 150
step pad_step 40
step det_step 90
step decode 25
step train_cls 55
step train_net 60

"$PY" - "$MODE" "$OUT" <<'EOF'
import json, os, platform, subprocess, sys

mode, out = sys.argv[1], sys.argv[2]
steps = []
with open(os.path.join(out, "steps.tsv")) as f:
    for line in f:
        name, status, secs, limit = line.rstrip("\n").split("\t")
        steps.append({"step": name, "status": status, "seconds": float(secs),
                      "timeout_s": int(limit), "log": f"logs/{name}.log"})
env = {"mode": "gpu" if mode == "gpu" else "dry-run (no CUDA)", "python": platform.python_version()}
try:
    import torch
    env["torch"] = torch.__version__
    env["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cudnn"] = torch.backends.cudnn.version()
    import detectron2
    env["detectron2"] = detectron2.__version__
except Exception as e:  # the report is still written
    env["import_error"] = repr(e)
try:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    env["commit"] = rev.stdout.strip() or None
except OSError:
    pass
bench = {}
for name in ("train_step", "pad_step", "det_step"):
    path = os.path.join(out, f"{name}.json")
    if os.path.isfile(path):
        with open(path) as f:
            bench[name] = json.load(f)
report = {"environment": env, "steps": steps, "benchmarks": bench}
with open(os.path.join(out, "report.json"), "w") as f:
    json.dump(report, f, indent=1)

md = ["# GPU check", "", f"Mode: {env['mode']}. " + ", ".join(
    f"{k} {v}" for k, v in env.items() if k != "mode"), "",
    "| step | status | seconds | GPU timeout s |", "|---|---|---|---|"]
md += [f"| {s['step']} | {s['status']} | {s['seconds']:.1f} | {s['timeout_s']} |" for s in steps]
if mode == "gpu":
    for s in steps:
        with open(os.path.join(out, s["log"]), errors="replace") as f:
            tail = f.read().splitlines()[-25:]
        md += ["", f"## {s['step']}: {s['status']}", "", "```", *tail, "```"]
with open(os.path.join(out, "report.md"), "w") as f:
    f.write("\n".join(md) + "\n")
EOF

failed=$(awk -F'\t' '$2 != "ok" && $2 != "dry-run ok" { printf "%s%s", sep, $1; sep = ", " }' "$STEPS")
if [ "$MODE" = dry ]; then
  echo "gpu_check: no CUDA device here; dry run only, nothing measured: $([ -z "$failed" ] &&
    echo "every step would run" || echo "FAILED: $failed") (report: $OUT/report.md)"
  [ -z "$failed" ] || exit 1
  exit 0
fi
echo "gpu_check: report in $OUT/report.md and $OUT/report.json${failed:+; failed: $failed}"
[ -z "$failed" ]
