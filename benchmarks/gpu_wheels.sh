#!/usr/bin/env bash
# Wheels of the service's run-time packages (and pytest-asyncio) that a CUDA machine's own Python image may lack
# (its torch, torchvision, transformers, numpy, Pillow, prometheus-client, httpx, pytest and scikit-image are used
# as they are), for a machine that cannot reach PyPI:
# downloaded here, at the versions installed in .venv, for CPython 3.12 on x86-64 Linux, into .whl (git ignores it).
# gpu_check.sh installs them from there.   benchmarks/gpu_wheels.sh [DEST] [PYTHON_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
python_version=${2:-3.12}
names=(fastapi starlette uvicorn pydantic pydantic_core pydantic-settings python-dotenv annotated-types
  typing-inspection typing_extensions annotated-doc anyio python-multipart httptools orjson h11 click idna
  opentelemetry-api pytest-asyncio)
pins=$(.venv/bin/python - "${names[@]}" <<'PY'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
PY
)
platforms=()
for n in 17 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
mkdir -p "$dest"
# shellcheck disable=SC2086  # one word per pin
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" \
  --implementation cp "${platforms[@]}" -d "$dest" $pins
ls "$dest"
