# dnnrun on a CUDA PyTorch runtime.
#   docker build -t dnnrun .
#   docker run --gpus all -v "$PWD/outputs:/work/outputs" -v "$HOME/.cache/dnnrun-data:/data" dnnrun data=fashion_mnist
# The base image brings CUDA, torch and torchvision; pick another tag with --build-arg BASE_IMAGE=...
ARG BASE_IMAGE=pytorch/pytorch:2.10.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DNNRUN_DATA=/data

WORKDIR /opt/dnnrun
COPY pyproject.toml README.md ./
COPY dnnrun ./dnnrun
COPY conf ./conf
# The README's install step, unchanged.
RUN pip install -e ".[dev]"

RUN useradd --create-home --uid 1000 dnnrun \
    && mkdir -p /work/outputs /data \
    && chown -R dnnrun:dnnrun /work /data
USER dnnrun
# Runs write to /work/outputs/...; datasets are cached in /data.
WORKDIR /work
VOLUME ["/work/outputs", "/data"]

ENTRYPOINT ["dnnrun"]
