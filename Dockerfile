# syntax=docker/dockerfile:1
#
# idforge images. One Dockerfile, three targets:
#
#   docker build --target api        -t idforge-api .          # FastAPI only, no torch
#   docker build --target worker-cpu -t idforge-worker-cpu .   # Celery worker, CPU torch wheel
#   docker build --target worker-gpu -t idforge-worker-gpu .   # Celery worker, CUDA torch wheel
#
# Every image runs as the non-root user `idforge` (uid 10001), works offline (HF_HUB_OFFLINE=1)
# and reads model weights from /models (IDFORGE_MODEL_DIR); mount a volume there. Workers copy the
# tiny presets (*-tiny), which ship inside the idforge package, into /models when they are missing.
# Every pip install is constrained by constraints.txt, the locked versions `make install` uses.

ARG PYTHON_VERSION=3.11
# Keep equal to the torch pin of the `worker` extra in pyproject.toml (tests/deploy/test_deploy_files.py checks).
ARG TORCH_VERSION=2.13.0
# CPU-only wheels: no CUDA libraries, a far smaller image.
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
# PyPI's Linux x86_64 torch wheels are CUDA builds (the CUDA runtime comes as nvidia-* wheels; the
# driver comes from the host through the NVIDIA container toolkit). To pick another CUDA version,
# build with e.g. --build-arg TORCH_CUDA_INDEX_URL=https://download.pytorch.org/whl/cu130
ARG TORCH_CUDA_INDEX_URL=https://pypi.org/simple

# ---------------------------------------------------------------------------------------------
# base: python, a virtual environment owned by root, and the unprivileged runtime user.
FROM python:${PYTHON_VERSION}-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/home/idforge \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HOME=/home/idforge/.cache/huggingface \
    TOKENIZERS_PARALLELISM=false \
    IDFORGE_MODEL_DIR=/models

RUN groupadd --system --gid 10001 idforge \
 && useradd --system --uid 10001 --gid idforge --home-dir /home/idforge --create-home \
        --shell /usr/sbin/nologin idforge \
 && mkdir -p /models /app \
 && chown idforge:idforge /models /app \
 && python -m venv /opt/venv

WORKDIR /app
# The lock (`make lock` refreshes it): every later pip install takes its versions from here.
COPY constraints.txt /etc/idforge/constraints.txt
ENV PIP_CONSTRAINT=/etc/idforge/constraints.txt
RUN pip install pip

# ---------------------------------------------------------------------------------------------
# wheel: builds the idforge wheel once; the runtime images install it and never see the sources.
FROM base AS wheel
COPY pyproject.toml README.md ./
COPY app ./app
COPY workers ./workers
COPY models ./models
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------
# api: the base install only. No torch, no `worker` extra.
FROM base AS api
COPY --from=wheel /wheels /wheels
RUN set -- /wheels/idforge-*.whl \
 && pip install "$1" \
 && rm -rf /wheels
USER idforge:idforge
EXPOSE 8000
# Liveness only: /readyz (Redis, storage, broker) is for load balancers, not for restarts.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["idforge"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------------------
# worker-cpu: the `worker` extra with the CPU torch wheel. Runs the tiny presets on a laptop.
FROM base AS worker-cpu
ARG TORCH_VERSION
ARG TORCH_CPU_INDEX_URL
COPY --from=wheel /wheels /wheels
# torch first, from the CPU index only; the rest of the extra then comes from PyPI, where the
# installed torch==${TORCH_VERSION}+cpu already satisfies the torch==${TORCH_VERSION} pin.
RUN pip install --index-url "${TORCH_CPU_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && set -- /wheels/idforge-*.whl \
 && pip install "$1[worker]" \
 && python -c "import torch; assert not torch.version.cuda, torch.__version__" \
 && rm -rf /wheels
ENV IDFORGE_DEVICE=cpu
USER idforge:idforge
# Celery finishes the task in hand on SIGTERM (warm shutdown); give it time (stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["idforge"]
CMD ["worker", "--queues", "gpu,cpu", "--concurrency", "1"]

# ---------------------------------------------------------------------------------------------
# worker-gpu: the `worker` extra with a CUDA torch wheel. One container (one process) per GPU.
FROM base AS worker-gpu
ARG TORCH_VERSION
ARG TORCH_CUDA_INDEX_URL
COPY --from=wheel /wheels /wheels
RUN pip install --index-url "${TORCH_CUDA_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && set -- /wheels/idforge-*.whl \
 && pip install "$1[worker]" \
 && python -c "import torch; assert torch.version.cuda, 'CPU-only torch in the GPU image: ' + torch.__version__" \
 && rm -rf /wheels
# No NVIDIA_VISIBLE_DEVICES here: the GPU a container sees comes from its device request
# (compose `deploy.resources.reservations.devices`, `docker run --gpus device=N`), never "all".
ENV IDFORGE_DEVICE=cuda \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER idforge:idforge
STOPSIGNAL SIGTERM
ENTRYPOINT ["idforge"]
CMD ["worker", "--queues", "gpu", "--concurrency", "1"]
