# moeserve on a CUDA runtime image: `docker build -t moeserve:0.1.0 .`
#
# Two stages: `build` makes a virtual environment with torch and moeserve (the demo model
# inside the package); the final stage copies only that environment onto a fresh base, so
# no build tools, pip caches or sources end up in the image. The same image runs on CPU
# nodes (torch falls back to the CPU when no GPU is visible).
#
#   docker run --gpus all -p 8000:8000 -v /srv/models:/models:ro \
#       -e MOESERVE_MODEL=/models/Mixtral-8x7B-Instruct-v0.1 moeserve:0.1.0
#
# Without MOESERVE_MODEL (or --model) the server runs the packaged demo model.

ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------- build
FROM ${CUDA_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Ubuntu's python3 (3.12 on 24.04): the final stage installs the same one, so the venv's
# interpreter link stays valid. Versions float with the base image's security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/moeserve
ENV PATH=/opt/moeserve/bin:$PATH
# torch first and alone: its layer (GBs) stays cached while moeserve's code changes.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY moeserve ./moeserve
# A non-editable install: the package, its data files (the demo model) and its dependencies.
# demo_model_path() raises when the demo model did not make it into the package: no image.
RUN pip install --no-cache-dir . \
    && python -c "from moeserve.assets import demo_model_path; print(demo_model_path())"

# ---------------------------------------------------------------------------------- final
FROM ${CUDA_IMAGE}
LABEL org.opencontainers.image.title="moeserve" \
      org.opencontainers.image.description="Inference server for Mixture-of-Experts LLMs" \
      org.opencontainers.image.licenses="Apache-2.0"
# tini is PID 1: it forwards SIGTERM to the server (which drains) and reaps zombies.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 moeserve \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin moeserve \
    && mkdir -p /models
COPY --from=build /opt/moeserve /opt/moeserve
# HOST is 0.0.0.0 here on purpose (the CLI's default is 127.0.0.1): inside a container the
# server must listen on the pod's interface. HOME and the caches point at /tmp, the one
# writable place when the root filesystem is read-only (Kubernetes mounts an emptyDir there).
ENV PATH=/opt/moeserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    MOESERVE_HOST=0.0.0.0 \
    MOESERVE_PORT=8000
# Real checkpoints come from a volume mounted here (read-only is enough).
WORKDIR /models
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 8000
# Liveness for plain Docker (Kubernetes uses its own probes). /health is 200 while the model
# loads, so a long load does not mark the container unhealthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('MOESERVE_PORT', '8000'), timeout=4)"]
# Exec form: no shell in between, so SIGTERM reaches tini and then the server.
ENTRYPOINT ["tini", "--", "moeserve", "serve"]
CMD []
