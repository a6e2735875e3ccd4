#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs everything rwdet needs from the project's own files.
# Idempotent: a stamp holding the hash of the install inputs makes a second run finish at once.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=.venv
PY=$VENV/bin/python
STAMP=$VENV/.rwdet-setup
WHEELS=.cache/wheels
D2_VERSION=0.7.2
DEEPFOREST_VERSION=2.1.0

inputs_hash=$(cat scripts/setup.sh constraints.txt pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$inputs_hash" ] && [ -x "$PY" ]; then
  echo "rwdet: environment up to date ($VENV)"
  exit 0
fi

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "rwdet setup: '$PYTHON' not found. Install Python 3.11 or run 'make setup PYTHON=/path/to/python3.11'." >&2
  exit 1
fi
[ -x "$PY" ] || "$PYTHON" -m venv "$VENV"
# The CUDA build of torch makes the environment ~6 GB; pip's own error on a full disk
# ("[Errno 28] No space left on device") does not say how much is needed.
NEED_GB=7
free_gb=$(df -Pk "$VENV" | awk 'NR==2 {print int($4 / 1048576)}')
if [ "$(du -sk "$VENV" | cut -f1)" -lt 1048576 ] && [ "${free_gb:-$NEED_GB}" -lt "$NEED_GB" ]; then
  echo "rwdet setup: WARNING only ${free_gb} GB free for $VENV; a new environment needs about" \
    "$NEED_GB GB (torch's CUDA build). Free some space if the install fails." >&2
fi
# pip warns once per package about this machine's index mirrors; keep only real messages.
pip_() { "$PY" -m pip --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
PIP=pip_

echo "rwdet setup: installing pinned dependencies (constraints.txt)"
$PIP install -q -c constraints.txt "setuptools<80" "numpy<2" wheel
$PIP install -q -c constraints.txt torch torchvision
$PIP install -q -c constraints.txt fvcore iopath pycocotools networkx matplotlib tensorboard tqdm \
  pyyaml pillow pytest ruff psutil torchdiffeq \
  termcolor yacs tabulate cloudpickle omegaconf hydra-core black packaging
# Export (tools/export.py: ONNX, checked with onnx.reference) and OpenCV for detectron2's
# Visualizer; opencv-python-headless 4.11 is the last release built for numpy<2.
$PIP install -q -c constraints.txt onnx onnxscript opencv-python-headless
# make mutate only (mutation testing of the rules' modules, docs/testing.md).
$PIP install -q -c constraints.txt mutmut

# Detectron2: keep one that is already importable (e.g. built from its git repository);
# otherwise install the faithful PyPI repackaging. Its wheel is tagged cp310 but is pure
# Python once its compiled extension is ignored, so it is installed under a py3-none-any name.
if $PY -c "import detectron2" >/dev/null 2>&1; then
  echo "rwdet setup: keeping the detectron2 already importable in $VENV"
else
  mkdir -p "$WHEELS"
  whl="$WHEELS/sal_detectron2-$D2_VERSION-py3-none-any.whl"
  if [ ! -f "$whl" ]; then
    tmp=$(mktemp -d)
    $PIP download -q --no-deps --only-binary=:all: --python-version 3.10 \
      "sal-detectron2==$D2_VERSION" -d "$tmp"
    mv "$tmp"/sal_detectron2-"$D2_VERSION"-*.whl "$whl"
    rm -rf "$tmp"
  fi
  $PIP install -q --no-deps "$whl"
fi

# Embedded data: deepforest's data files only (installed without its dependencies, never imported).
$PIP install -q --no-deps "deepforest==$DEEPFOREST_VERSION"

# The project itself, editable.
$PIP install -q --no-deps -e .

# Embedded data: Fashion-MNIST from Debian.
FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -d "$FMNIST" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "rwdet setup: installing Debian package dataset-fashion-mnist"
    if ! { apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
           { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }; }; then
      echo "rwdet setup: WARNING could not install dataset-fashion-mnist; the demo needs it." >&2
    fi
  else
    echo "rwdet setup: Fashion-MNIST not found at $FMNIST. The classification demo needs it:"
    echo "    sudo apt-get install dataset-fashion-mnist    (Debian/Ubuntu)"
    echo "  or pass --data to a folder in ImageNet layout. Continuing."
  fi
fi

# tcmalloc (Debian libtcmalloc-minimal4), the allocator PyTorch's CPU tuning guide recommends:
# the tools preload it on CPU (rwdet/run/allocator.py). Without it they use glibc's malloc,
# which keeps more memory resident (docs/performance.md).
if ! ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "rwdet setup: installing Debian package libtcmalloc-minimal4 (CPU memory allocator)"
    if ! { apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 || \
           { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1; }; }; then
      echo "rwdet setup: WARNING could not install libtcmalloc-minimal4; the tools use glibc malloc." >&2
    fi
  else
    echo "rwdet setup: tcmalloc not found; for less CPU memory: sudo apt-get install libtcmalloc-minimal4"
  fi
fi

$PY -c "import rwdet, classification, detectron2, torchvision; from torchvision.ops import nms"
echo "$inputs_hash" > "$STAMP"
echo "rwdet setup: done ($VENV)"
