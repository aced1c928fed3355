# syntax=docker/dockerfile:1.7
# Two images from one file:
#   docker buildx build --platform linux/arm64,linux/amd64 --target engine   -t ghcr.io/pie-project/pie-engine:0.1.0 .
#   docker buildx build --platform linux/arm64,linux/amd64 --target operator -t ghcr.io/pie-project/pie-operator:0.1.0 .
# GH200 is linux/arm64 (Grace); amd64 is built too for x86 GPU nodes and CI. PyTorch's PyPI wheels carry their CUDA
# libraries on both architectures, so the engine only needs the CUDA runtime base for the driver-facing pieces.

ARG PYTHON_VERSION=3.11
ARG CUDA_BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---- wheel: build the project wheel once, shared by both targets ----
FROM python:${PYTHON_VERSION}-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine/ engine/
COPY operator/ operator/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- operator: slim, no torch ----
FROM python:${PYTHON_VERSION}-slim AS operator
LABEL org.opencontainers.image.title="pie-operator" \
      org.opencontainers.image.description="Pie Kubernetes operator: sizes GH200 host KV memory from measurement"
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir "$(ls /wheels/pie-*.whl)[operator]" && rm -rf /wheels
# NOTE: numeric UID so runAsNonRoot can be verified by the kubelet without reading /etc/passwd.
USER 65532:65532
ENTRYPOINT ["pie-operator"]
CMD ["run", "--all-namespaces"]

# ---- engine: CUDA runtime + PyTorch + Triton ----
FROM ${CUDA_BASE} AS engine
LABEL org.opencontainers.image.title="pie-engine" \
      org.opencontainers.image.description="Pie LLM engine: paged KV with performance-transparent host-memory swapping"
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# Triton compiles kernels at runtime and needs a C compiler and Python headers. Versions come from the pinned base
# image's Ubuntu release; exact apt pins break as soon as the archive moves on, so reproducibility rests on the base.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir "$(ls /wheels/pie-*.whl)[engine]" && rm -rf /wheels
# Triton's and torch's caches must be writable with a read-only root filesystem: the pod mounts an emptyDir at /tmp.
ENV TRITON_CACHE_DIR=/tmp/triton HOME=/tmp
USER 65532:65532
EXPOSE 8000
HEALTHCHECK NONE
ENTRYPOINT ["pie-engine"]
CMD ["serve", "--model", "/models/model", "--host", "0.0.0.0", "--port", "8000"]
