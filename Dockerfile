# vae-serve: the HTTP service and the shipped models, on a CUDA build of torch.
#   docker build -t vae-serve .                      (GPU hosts; see docker-compose.yml)
#   docker build -t vae-serve:cpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# The training code (train/) and its extras are not in the image.
FROM python:3.11-slim-bookworm

# The artifacts are TorchScript, which any torch 2.x reads; the service needs 2.5+ (torch.OutOfMemoryError).
# cu124 wheels run on NVIDIA drivers >= 525. Pinned: a rebuild gets the same torch.
ARG TORCH_VERSION=2.6.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124
# true: the OpenTelemetry SDK and OTLP exporter too (pyproject's `tracing` extra), for FASTAPI_OTEL_AUTO_CONFIGURE.
ARG VAE_TRACING=false

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app

# Dependencies first, in their own layers: they change far less often than the code.
# torch comes alone from the CUDA index; the rest are the service's dependencies from pyproject.toml
# (torch among them, already satisfied, so pip keeps the CUDA build), and with VAE_TRACING=true its tracing extra.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY pyproject.toml /tmp/src/
RUN python -c "import os, tomllib; p = tomllib.load(open('/tmp/src/pyproject.toml', 'rb'))['project']; tracing = p['optional-dependencies']['tracing'] if os.environ['VAE_TRACING'] == 'true' else []; print('\n'.join(p['dependencies'] + tracing))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir --requirement /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The shipped models: a volume mounted at /app/models replaces them.
COPY models/ /app/models/

# The service itself, installed without dependencies (they are above) for the `vae-serve` command.
COPY README.md /tmp/src/
COPY service/ /tmp/src/service/
RUN pip install --no-cache-dir --no-deps /tmp/src \
    && rm -rf /tmp/src

# A numeric USER, so Kubernetes runAsNonRoot can verify it; 10001 is the `vae` user made here.
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin vae
USER 10001:10001

# Listen on every interface inside the container only; the host decides what to publish (compose: 127.0.0.1).
ENV VAE_HOST=0.0.0.0 \
    VAE_PORT=8000 \
    VAE_MODEL_DIR=/app/models
EXPOSE 8000

# Liveness: the process answers. Readiness (models loaded and warm) is /readyz, for load balancers.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('VAE_PORT', '8000')}/healthz\", timeout=4)"]

# One container per GPU. VAE_WORKERS (default 1) starts that many server processes on the port, each with
# every model: on a GPU one Python process is the limit long before the GPU (see README, Deployment).
# Never uvicorn --workers or gunicorn: they would skip the models' drain and the shared metrics.
# Exec form: vae-serve is PID 1 and gets SIGTERM itself, so it drains (VAE_DRAIN_TIMEOUT_S) before exiting.
CMD ["vae-serve"]
