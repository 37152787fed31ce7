# RORem-4S object removal on Ray Serve: the serving image, also the Ray node image for KubeRay.
#
#   docker build --target gpu -t rorem-serve:0.1.0-cuda12.9 .   (the default target: the last stage)
#   docker build --target cpu -t rorem-serve:0.1.0-cpu .        (no GPU; serves the tiny bundle)
#
# requirements (not a target): the dependencies of the project and its EXTRAS, listed from pyproject.toml.
# gpu: NVIDIA's TensorRT image 25.06 (Ubuntu 24.04, CUDA 12.9.1, Python 3.12, TensorRT 10 with its
#      Python bindings), plus the CUDA build of torch 2.13.0 from PyTorch's wheel index (its own
#      CUDA 12.8 runtime; both need an NVIDIA driver >= 575 on the node).
# cpu: python 3.11 slim (the dev/CI Python) with the CPU build of torch 2.13.0.
#
# No weights inside: mount a bundle and point ROREM_BUNDLE at it (docker run), or bundle.path in the
# Serve config (Kubernetes: the rorem-models volume, see docs/kubernetes.md). Without one, the
# service generates the tiny bundle (random weights) at start and says so.
#
# Everything is installed into the image's system Python (no virtualenv): KubeRay starts Ray with
# `bash -c 'ray start ...'`, or `bash -lc` (an operator with ENABLE_LOGIN_SHELL=true; before v1.4 always),
# and a login shell resets PATH, so `ray` must be in /usr/local/bin.

ARG TORCH_VERSION=2.13.0
ARG EXTRAS=serve,export

# ---------------------------------------------------------------------------------------------------
# Not a target: the project's dependencies with the EXTRAS, read from pyproject.toml, for both targets.
FROM python:3.11.13-slim-bookworm AS requirements
ARG EXTRAS
COPY pyproject.toml /tmp/
RUN python3 -c "import os, tomllib; p = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']; \
extras = os.environ['EXTRAS'].split(','); \
print('\n'.join(p['dependencies'] + [d for e in extras for d in p['optional-dependencies'][e]]))" \
        > /requirements.txt

# ---------------------------------------------------------------------------------------------------
FROM python:3.11.13-slim-bookworm AS cpu
ARG TORCH_VERSION
ARG EXTRAS

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    RAY_USAGE_STATS_ENABLED=0

# The CPU wheel first, so the project's torch pin is already satisfied (no CUDA packages pulled).
RUN python3 -m pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu

# The dependencies alone (the requirements stage), then the sources without them: an edit of the code
# rebuilds only the last layer, not ray, diffusers and the rest.
COPY --from=requirements /requirements.txt /tmp/deps/
RUN python3 -m pip install -r /tmp/deps/requirements.txt && rm -rf /tmp/deps
COPY pyproject.toml README.md /tmp/src/
COPY engines /tmp/src/engines
COPY serve /tmp/src/serve
COPY export /tmp/src/export
RUN python3 -m pip install --no-deps "/tmp/src[${EXTRAS}]" \
    && rm -rf /tmp/src \
    && python3 -c "import ray, torch, serve.app; print('ray', ray.__version__, 'torch', torch.__version__)"

RUN useradd --uid 1000 --user-group --create-home --shell /bin/bash rorem \
    && mkdir -p /models \
    && chown rorem:rorem /models
USER 1000:1000
WORKDIR /home/rorem

# HTTP, gRPC, Ray's Prometheus export of `python -m serve run`
EXPOSE 8000 9000 9464
HEALTHCHECK --interval=30s --timeout=10s --start-period=10m --retries=3 \
    CMD ["python3", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8000/readyz', timeout=8)"]
CMD ["python3", "-m", "serve", "run", "--host", "0.0.0.0"]

# ---------------------------------------------------------------------------------------------------
FROM nvcr.io/nvidia/tensorrt:25.06-py3 AS gpu
ARG TORCH_VERSION
ARG EXTRAS
# A CUDA 12.x wheel index of PyTorch that has torch ${TORCH_VERSION} (cu126 / cu128 / cu129). Not PyPI:
# its Linux torch 2.13.0 wheel is built for CUDA 13 (it requires cuda-toolkit 13.0.3).
ARG TORCH_CUDA=cu128

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    HF_HUB_OFFLINE=1 \
    RAY_USAGE_STATS_ENABLED=0

# The CUDA build of the pinned torch first, so `pip install .` sees torch==2.13.0 satisfied.
RUN python3 -m pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"

# The dependencies alone (the requirements stage), then the sources without them: an edit of the code
# rebuilds only the last layer, not ray, diffusers and the rest.
COPY --from=requirements /requirements.txt /tmp/deps/
RUN python3 -m pip install -r /tmp/deps/requirements.txt && rm -rf /tmp/deps
COPY pyproject.toml README.md /tmp/src/
COPY engines /tmp/src/engines
COPY serve /tmp/src/serve
COPY export /tmp/src/export
RUN python3 -m pip install --no-deps "/tmp/src[${EXTRAS}]" \
    && rm -rf /tmp/src \
    && python3 -c "import ray, tensorrt, torch, serve.app; print('ray', ray.__version__, 'torch', torch.__version__, 'tensorrt', tensorrt.__version__)"

# Ubuntu 24.04 ships a user `ubuntu` with uid 1000: the service's user takes that uid (the one the
# Kubernetes manifests run as).
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --uid 1000 --user-group --create-home --shell /bin/bash rorem \
    && mkdir -p /models \
    && chown rorem:rorem /models
USER 1000:1000
WORKDIR /home/rorem

EXPOSE 8000 9000 9464
HEALTHCHECK --interval=30s --timeout=10s --start-period=10m --retries=3 \
    CMD ["python3", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8000/readyz', timeout=8)"]
CMD ["python3", "-m", "serve", "run", "--host", "0.0.0.0"]
