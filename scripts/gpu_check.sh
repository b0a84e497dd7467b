#!/usr/bin/env bash
# On a machine with a CUDA GPU: the GPU-marked tests and a short kernel benchmark (one round: under 5 minutes).
# Uses .venv when its torch sees CUDA, else the python on PATH (which must have a CUDA torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if ! [ -x "$PY" ] || ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  PY=python3
  "$PY" -m pip install --quiet --no-deps -e . >/dev/null
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; print(torch.__version__, torch.cuda.get_device_name())"
"$PY" -m pytest -q -m gpu tests/test_gpu.py
"$PY" -m transformer_comparison bench kernels --device cuda --lengths 1024,4096,16384 --timeout 60 --min_run_time 0.2 --repeats 1 --out "${OUT:-results}/gpu_bench"
