# syntax=docker/dockerfile:1
# CUDA image for fine_tune: PyTorch's official runtime image, whose torch is the version constraints.txt
# pins, built against its CUDA and cuDNN. Its name is TRAIN_IMAGE in src/canaryflow/images.py; build it from
# the repository root as the README's "On a Kubeflow cluster" says. The CUDA version is the one choice left
# (--build-arg BASE=...): the GPU nodes' NVIDIA driver must support it.
ARG BASE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Fail here, not mid-install: a base whose torch differs from the pin would make pip replace it with PyPI's
# build, and the image would no longer be the one its tag names.
RUN python -c "import torch; v = torch.__version__.split('+')[0]; assert v == '2.13.0', v; assert torch.version.cuda"

WORKDIR /opt/canaryflow
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
COPY components ./components
COPY pipelines ./pipelines
# kfp comes with the package: components run with install_kfp_package=False (see component.Dockerfile).
# No `pip check` here, unlike component.Dockerfile: it would also judge the base image's own conda packages.
RUN pip install -c constraints.txt . \
    && python -c "import torch; assert torch.version.cuda"

# Newer Ubuntu bases already have a user 1000; either way the steps run as 1000 in a directory it owns.
RUN (id -u 1000 >/dev/null 2>&1 || useradd --create-home --uid 1000 canaryflow) \
    && mkdir -p /workspace && chown 1000 /workspace
USER 1000
WORKDIR /workspace
