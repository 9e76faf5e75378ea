# turboserve on a CUDA host:
#   docker build -t turboserve .
#   docker run --gpus all -p 8000:8000 turboserve --host 0.0.0.0
# Arguments after the image name replace CMD and go to `turboserve serve` (add --device cuda for the GPU).
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv \
    && pip install --upgrade pip

# torch first and pinned exactly, as the Makefile does; its own layer, so code changes don't fetch it again.
RUN pip install torch==2.13.0

# The project itself, as a regular (non-editable) install; the source tree is not kept.
COPY . /tmp/turboserve
RUN pip install "/tmp/turboserve[gpu]" \
    && rm -rf /tmp/turboserve

RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin turboserve \
    && mkdir /models
# Model folders (model.path, recommend.model_path) must lie under /models: mount them there, read-only.
# The embedded all-MiniLM-L6-v2 is always allowed.
ENV TURBOSERVE_SERVER__MODEL_DIRS='["/models"]'
# The address as settings, not flags, so that `docker run -e TURBOSERVE_SERVER__PORT=...` moves it (a flag would win).
ENV TURBOSERVE_SERVER__HOST=0.0.0.0 TURBOSERVE_SERVER__PORT=8000
USER turboserve
WORKDIR /home/turboserve

EXPOSE 8000
# KServe v2 gRPC when started with --grpc-port 8001 (off by default)
EXPOSE 8001

# No curl in the image: probe /health with the standard library (200 only once the model is warm).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, sys, urllib.request; port = os.environ.get('TURBOSERVE_SERVER__PORT', '8000'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["turboserve", "serve"]
