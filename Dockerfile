# deit-serve image: a virtualenv with PyTorch and the service, the embedded demo model, nothing else.
#
#   docker build -t deit-serve .                                       # CPU build of PyTorch (default)
#   docker run --rm -p 8000:8000 deit-serve
#   docker run --rm -p 8000:8000 -v "$PWD/model_store":/models:ro deit-serve  # serve your model store
#   docker run --rm -p 8000:8000 -v hf-cache:/cache deit-serve --model facebook/deit-base-distilled-patch16-224
#                                                                      # a model by hub id, cached in the volume
#
# PyTorch, CPU or CUDA. The default installs the CPU-only wheel from PyTorch's CPU index (~200 MB download); an
# unpinned `pip install torch` from PyPI would pull the CUDA build and several GB of nvidia-* packages, which only
# pay off on a GPU node. For a GPU image choose the CUDA wheel index that matches TORCH_VERSION and the nodes'
# driver (see https://pytorch.org/get-started/locally/), e.g.
#
#   docker build -t deit-serve:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#     --build-arg TORCH_VERSION=2.13.0+cu128 .
#   docker run --rm --gpus all -e DEIT_DEVICE=cuda -p 8000:8000 deit-serve:cuda
#
# (The +cu128 local version keeps a CPU wheel found in WHEELS_DIR from being taken instead.)
#
# The CUDA wheels bring their own CUDA runtime, cuDNN and NCCL as pip packages, so the slim Python base image is
# enough: the host only needs the NVIDIA driver and the NVIDIA Container Toolkit. A CUDA base image
# (BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 with a Python 3.11 installed at the same path in both
# stages) works as well but adds nothing PyTorch uses. docs/deployment.md has the details.
#
# Builds that cannot reach PyTorch's index: a BASE_IMAGE that carries the wheel in WHEELS_DIR (default /opt/wheels)
# gets PyTorch from there first; the index is used only when no matching wheel is there (WHEELS_DIR= : never).

ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG WHEELS_DIR=/opt/wheels

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

RUN python3 -m venv /opt/venv

# PyTorch first, on its own layer: by far the largest and the least often changed. The second command installs
# its dependencies (sympy, networkx, ...; nvidia-* for CUDA builds) from PyPI and keeps the build already installed.
# Then drop what serving never uses: C++ headers, C++ test binaries and protoc (for building extensions or testing
# PyTorch itself; there is no compiler in this image anyway). torch/bin/torch_shm_manager stays: torch needs it.
RUN ({ [ -n "${WHEELS_DIR}" ] && pip install --no-index --find-links "${WHEELS_DIR}" --no-deps "torch==${TORCH_VERSION}"; } \
      || pip install --index-url "${TORCH_INDEX_URL}" --no-deps "torch==${TORCH_VERSION}") \
 && pip install "torch==${TORCH_VERSION}" \
 && site=$(python -c "import sysconfig; print(sysconfig.get_path('purelib'))") \
 && rm -rf "${site}/torch/include" "${site}/torch/test" "${site}"/torch/bin/test_* "${site}"/torch/bin/*Test \
      "${site}"/torch/bin/protoc*

WORKDIR /src

# The service's dependencies, with the OpenVINO and ONNX Runtime runtimes (--runtime, README "Runtimes"), resolved
# from pyproject.toml alone (an empty stand-in package), so that editing the
# service's code does not reinstall them. Versions are pyproject.toml's ranges (hence DL3013 off here).
COPY pyproject.toml ./
# hadolint ignore=DL3013
RUN mkdir service && touch README.md service/__init__.py \
 && pip install ".[fast,hub,grpc,tracing,openvino,onnxruntime]" \
 && pip uninstall --yes deit-serve \
 && rm -rf service README.md build ./*.egg-info

COPY README.md ./
COPY service ./service
RUN pip install --no-deps . \
 && pip uninstall --yes pip

# ---------------------------------------------------------------------------------------------------------------
# The demo model, readable by the service's user whatever the modes in the build context (checkpoint writers often
# create 0600 files); root-owned, so the service cannot change it.
FROM ${BASE_IMAGE} AS models
COPY service/data/model_store/deit-tiny-digits/ /models/deit-tiny-digits/
RUN chmod -R u=rwX,go=rX /models

# ---------------------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

LABEL org.opencontainers.image.title="deit-serve" \
      org.opencontainers.image.description="HTTP inference for DeiT image classifiers with dynamic batching" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric UID/GID so that Kubernetes' runAsNonRoot can verify it and mounted stores can be chowned to it.
RUN groupadd --system --gid 10001 deit \
 && useradd --system --uid 10001 --gid deit --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin deit \
 && mkdir -p /cache/huggingface \
 && chown -R 10001:10001 /cache

COPY --from=builder /opt/venv /opt/venv
# The embedded demo model is the default store. Mount another directory over /models (read-only is enough) or
# point DEIT_MODEL_STORE elsewhere to serve other models. No VOLUME here: it would leave an anonymous volume behind
# every container and keep derived images from adding models under /models.
COPY --from=models /models /models

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DEIT_HOST=0.0.0.0 \
    DEIT_PORT=8000 \
    DEIT_GRPC_PORT=8001 \
    DEIT_MODEL_STORE=/models \
    DEIT_RUNTIME_CACHE=/tmp/deit-serve-runtimes \
    HF_HOME=/cache/huggingface

USER 10001:10001
WORKDIR /tmp
# HTTP (REST, metrics, health) and the Open Inference Protocol over gRPC.
EXPOSE 8000 8001

# Liveness only (/healthz); orchestrators route traffic on /readyz. The Python one-liner works on images without curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:' + os.environ.get('DEIT_PORT', '8000') + '/healthz', timeout=4)"]

# Exec form: deit-serve is PID 1 and receives SIGTERM itself, stops taking requests (/readyz turns 503), finishes
# the accepted ones within DEIT_DRAIN_TIMEOUT_S and exits 0. Give `docker stop -t` / terminationGracePeriodSeconds
# more than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["deit-serve"]
