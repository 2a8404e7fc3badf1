#!/usr/bin/env bash
# Sets up a fresh machine for this project: a virtual environment in .venv with PyTorch, this package and its
# training/test extras, and Debian's Fashion-MNIST (the offline demo/benchmark data). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch and torchvision must come as a matching pair (the CPU-only torch 2.13.0 wheel has no working torchvision).
.venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install -q -e ".[dev]"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; }
fi
echo "environment ready: .venv (activate with: source .venv/bin/activate)"
