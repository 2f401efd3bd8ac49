# dnnrun on a CUDA PyTorch runtime.
#   docker build -t dnnrun .
#   docker run --gpus all --user "$(id -u):$(id -g)" -v "$PWD/outputs:/work/outputs" \
#       -v "$HOME/.cache/dnnrun-data:/data" dnnrun data=fashion_mnist
# The base image brings CUDA, torch and torchvision; pick another tag with --build-arg BASE_IMAGE=...
ARG BASE_IMAGE=pytorch/pytorch:2.10.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DNNRUN_DATA=/data \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/cache

WORKDIR /opt/dnnrun
COPY pyproject.toml README.md ./
COPY dnnrun ./dnnrun
COPY conf ./conf
COPY hydra_plugins ./hydra_plugins
# The README's install step, unchanged.
RUN pip install -e ".[dev]"

# A non-root user by default; `docker run --user "$(id -u):$(id -g)"` runs as the owner of the
# mounted folders instead, so the folders are writable for any user (caches go to /tmp).
RUN useradd --create-home --uid 1000 dnnrun \
    && mkdir -p /work/outputs /data \
    && chown -R dnnrun:dnnrun /work /data \
    && chmod 1777 /work /work/outputs /data
USER dnnrun
# Runs write to /work/outputs/...; datasets are cached in /data.
WORKDIR /work
VOLUME ["/work/outputs", "/data"]

ENTRYPOINT ["dnnrun"]
