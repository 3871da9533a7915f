#!/usr/bin/env bash
# Create .venv and install sds3d into it.
#
# torch is chosen before anything else so that no dependency can pull a build we do not want:
# - a torch the base interpreter already has (often a CUDA build) is reused through
#   --system-site-packages and never replaced;
# - with an NVIDIA GPU and no torch, the default PyPI build (CUDA) is installed;
# - otherwise the CPU build: a local wheel when pip's find-links has one, else PyTorch's CPU index.
set -euo pipefail
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev,study,ray,app}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    echo "setup: reusing the torch of $PY ($("$PY" -c 'import torch; print(torch.__version__)'))"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true

if ! "$VPY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing the CUDA build of torch"
    "$VPY" -m pip install "torch>=2.1"
  elif "$VPY" -m pip install --no-index --no-deps "torch==2.13.0" 2>/dev/null; then
    # The local wheel alone first (so no index can swap in a CUDA build), then its dependencies.
    "$VPY" -m pip install "torch==2.13.0"
    echo "setup: installed the local CPU build of torch"
  else
    echo "setup: no GPU, installing the CPU build of torch from PyTorch's CPU index"
    "$VPY" -m pip install torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"$VPY" -m pip install -e ".[$EXTRAS]"
"$VPY" -c "import torch, sds3d; print(f'setup: sds3d {sds3d.__version__}, torch {torch.__version__}, cuda={torch.cuda.is_available()}')"
