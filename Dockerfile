# exitserve: CUDA runtime base with onnxruntime-gpu; the server falls back to CPU when no
# GPU is visible. The image serves a model repository; it does not need PyTorch.
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    EXITSERVE_HOST=0.0.0.0 EXITSERVE_PORT=8000 EXITSERVE_MODEL_REPOSITORY=/models
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv curl \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml README.md ./
COPY exitserve exitserve
COPY server server
COPY models models
COPY exporter exporter
COPY loadtest loadtest
# runtime dependencies only (no [train] extra: no torch in the serving image)
RUN pip install .
# the model repository is mounted at /models (see docker-compose.yml)
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s CMD curl -fs http://127.0.0.1:8000/readyz || exit 1
CMD ["exitserve", "serve", "--model-repository", "/models", "--host", "0.0.0.0", "--port", "8000"]
