# syntax=docker/dockerfile:1
# gpuphase container image: `docker build -t gpuphase:0.1.0 .` from the repository root.
#
# The image carries no NVIDIA software: the NVIDIA container runtime (or CDI) mounts the host
# driver's libnvidia-ml.so.1 and /dev/nvidia* into the container at start, as requested by the
# NVIDIA_* variables below. nvidia-smi is neither needed nor used.
#
# Two stages: the builder compiles the wheels and a virtualenv; the final image is the slim Python
# base plus that virtualenv, running as an unprivileged numeric user (65532, the "nonroot" UID of
# distroless images), so Kubernetes' runAsNonRoot can check it without a passwd entry.

# Pinned to an exact patch release; bump deliberately (and pin a digest in your own registry).
ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
COPY pyproject.toml README* ./
# What pyproject packages (its package-dir folders and gpuphase/); tests/test_packaging.py checks they agree.
COPY gpuphase ./gpuphase
COPY agent ./agent
COPY exporters ./exporters
COPY alerts ./alerts
COPY dashboards ./dashboards
RUN python -m venv /opt/gpuphase/venv \
 && /opt/gpuphase/venv/bin/pip install --no-cache-dir --disable-pip-version-check . \
 && /opt/gpuphase/venv/bin/pip uninstall --yes pip \
 && /opt/gpuphase/venv/bin/gpuphase --help > /dev/null

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="gpuphase" \
      org.opencontainers.image.description="GPU observability agent for LLM serving: NVML counters split by prefill/decode phase, exported to Prometheus" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /opt/gpuphase/venv /opt/gpuphase/venv
ENV PATH=/opt/gpuphase/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=utility
USER 65532:65532
# metrics (/metrics, /-/healthy, /-/ready), OTLP/gRPC, OTLP/HTTP. The receivers listen on
# loopback unless told otherwise: pass --otlp.grpc-listen-address=0.0.0.0:4317 to publish them.
EXPOSE 9842 4317 4318
ENTRYPOINT ["gpuphase", "run"]
