#!/usr/bin/env bash
# Creates a scratch Python virtual environment with PyTorch (from PyPI) for the
# PyTorch side of `switchyard bench kernels`. The venv lives outside the repository.
#
# Usage: kernels/bench/setup_torch_venv.sh [VENV_DIR]   (default /tmp/torchvenv)
# Then:  --torch-python VENV_DIR/bin/python
#
# Plain `pip install torch` from PyPI pulls the CUDA runtime wheels on Linux
# (several GiB); they are unused here (the benchmark runs on CPU) but harmless.
# Check free disk space first (`df -h /tmp`).
set -euo pipefail
VENV_DIR="${1:-/tmp/torchvenv}"
python3 -m venv "$VENV_DIR"
"$VENV_DIR/bin/pip" install --upgrade pip
"$VENV_DIR/bin/pip" install torch numpy
"$VENV_DIR/bin/python" -c 'import torch; print("torch", torch.__version__, "threads", torch.get_num_threads())'
