# syntax=docker/dockerfile:1
# exitserve, in two stages (BuildKit: Docker 23+ or `docker buildx build`):
#   build    Debian + Python 3.12 + the [train] extra (CPU PyTorch): exports and calibrates
#            every committed checkpoint (models/weights/*.pt) into /models with
#            scripts/build_repository.sh, on the Fashion-MNIST data of Debian's
#            dataset-fashion-mnist package (Ubuntu does not ship it).
#   runtime  CUDA 13 + cuDNN 9 (what onnxruntime-gpu links: libcublas/libcudart .so.13,
#            cuDNN 9) + Python 3.12, `pip install ".[grpc]"` (serving only, no torch), /models
#            baked in. `docker run --gpus all -p 8000:8000 IMAGE` serves the three models;
#            with no GPU visible the server falls back to ONNX Runtime's CPU provider.
#            Mounting another repository at /models (docker-compose.yml) replaces them.

FROM python:3.12-slim-bookworm AS build

# Fashion-MNIST's IDX files in /usr/share/datasets/fashion-mnist: calibration's held-out
# split (and the test split the report scores). Bookworm's only version of this package.
RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist=0.0~git20200523.55506a9-1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY exitserve exitserve
COPY server server
COPY models models
COPY exporter exporter
COPY loadtest loadtest
COPY scripts/build_repository.sh scripts/build_repository.sh

# The [train] extra (torch, onnx) in .venv, where scripts/build_repository.sh looks for it.
# PyTorch's CPU index: its torch==X+cpu wheel sorts above PyPI's torch==X, which would pull
# several GB of CUDA wheels that export and calibration do not use.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m venv .venv \
    && .venv/bin/pip install --extra-index-url "${TORCH_INDEX_URL}" ".[train]"

RUN bash scripts/build_repository.sh /models


FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04 AS runtime

ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH

# Ubuntu 24.04's Python 3.12. Not version-pinned: the pinned base tag fixes the release,
# and an exact apt pin breaks the build as soon as a security update supersedes it.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# The serving dependencies only, with the gRPC protocol's (the grpc extra): no torch. The
# source is bind-mounted (read-write, writes discarded), so neither it nor models/weights
# stays in the image.
# tests/test_container.py runs this same `pip install` command in a fresh venv.
WORKDIR /tmp/src
# DL3013 reads ".[grpc]" as an unpinned package: it is this project, with its own extra
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,target=/tmp/src,rw \
    pip install ".[grpc]"

COPY --from=build /models /models

# A non-root user, named by number so that runAsNonRoot-style checks can verify it.
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin exitserve
USER 10001:10001
WORKDIR /home/exitserve

EXPOSE 8000 8081
# 200 once every model is loaded and warmed; python's urllib (no curl in the image):
# an HTTP error or a refused connection raises, and the exit status is 1.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
CMD ["exitserve", "serve", "--model-repository", "/models", "--host", "0.0.0.0", "--port", "8000"]
