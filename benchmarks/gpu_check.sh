#!/usr/bin/env bash
# One command on a fresh CUDA machine with only Python 3.10+: install CUDA torch and the project, run the CUDA
# parity tests, the raw forward (ours / ours + CUDA graphs / transformers, DeiT-base fp16, batch 1 / 64 / 256)
# and end to end (c = 64 / 256, one 640×480 JPEG per request); print one table. Under 8 minutes on an H200.
#   benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${GPU_CHECK_VENV:-.venv-gpu}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install "torch==${TORCH_VERSION:-2.13.0}"  # from PyPI: the CUDA build
"${pip[@]}" install -e ".[test,fast]"
"$venv/bin/python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'"
set +e
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_cuda_parity.py tests/test_cuda_graphs.py \
  2>&1 | tee /tmp/gpu-check-pytest.log
set -e
summary=$(grep -E "passed|failed|error" /tmp/gpu-check-pytest.log | tail -1)
exec timeout 360 "$venv/bin/python" -m benchmarks.gpu_check --pytest "${summary:-no summary}"
