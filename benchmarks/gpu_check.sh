#!/usr/bin/env bash
# One command on a CUDA machine: run the CUDA parity tests, the GPU decoding path against the CPU path
# (device_decoding.py, tiny), the raw forward (ours / ours + CUDA graphs / transformers, DeiT-base fp16, batch 1 / 64 / 256)
# and end to end (c = 64 / 256, one 640×480 JPEG per request; CPU decoding, then --preprocess-device cuda); print
# one table. Under 8 minutes on an H200.
#   benchmarks/gpu_check.sh
# Python: the machine's python3 when its torch sees a GPU (GPU images ship torch, torchvision, transformers); the
# packages it lacks come from wheels in .whl when that folder exists (benchmarks/gpu_wheels.sh downloads them on a
# machine that reaches PyPI), else from PyPI. With no such python3, .venv-gpu is made and torch installed from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=${GPU_CHECK_WHEELS:-.whl}
if python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  py=python3
  site=${GPU_CHECK_SITE:-/tmp/deit-serve-site}
  if [ -d "$wheels" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl
  else
    python3 -m pip install -q --target "$site" fastapi uvicorn pydantic-settings python-multipart httptools orjson \
      pytest-asyncio
  fi
  export PYTHONPATH=$PWD:$site${PYTHONPATH:+:$PYTHONPATH}
else
  venv=${GPU_CHECK_VENV:-.venv-gpu}
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
  "${pip[@]}" install "torch==${TORCH_VERSION:-2.13.0}" "torchvision==${TORCHVISION_VERSION:-0.28.0}"  # CUDA builds
  "${pip[@]}" install -e ".[test,fast]"
  py=$venv/bin/python
fi
export PYTHONUNBUFFERED=1
"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; print(torch.__version__)"
set +e
timeout 150 "$py" -m pytest -q -p no:cacheprovider tests/test_cuda_parity.py tests/test_cuda_graphs.py \
  tests/test_device_decoding.py 2>&1 | tee /tmp/gpu-check-pytest.log
timeout 90 "$py" -m benchmarks.device_decoding --model tiny --repeats 10 2>&1 | tee /tmp/gpu-check-decoding.log
set -e
summary=$(grep -E "passed|failed|error" /tmp/gpu-check-pytest.log | tail -1 || true)
exec timeout 300 "$py" -m benchmarks.gpu_check --pytest "${summary:-no summary}"
