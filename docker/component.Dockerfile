# syntax=docker/dockerfile:1
# CPU image for every pipeline step but fine_tune, for the KServe predictor (`canaryflow serve`), the retrain
# CronJob (`canaryflow submit`) and the MLflow server: one image to build, scan and mirror, and the server
# runs the very mlflow the steps log with. Its name is BASE_IMAGE in src/canaryflow/images.py; build it from
# the repository root as the README's "On a Kubeflow cluster" says.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from PyTorch's CPU index: from PyPI it is the CUDA build, several GB of libraries this image
# never uses. --no-deps: its dependencies come from PyPI in the next step, held to constraints.txt.
RUN pip install --no-deps --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /opt/canaryflow
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
COPY components ./components
COPY pipelines ./pipelines
# kfp comes with the package: components run with install_kfp_package=False, so an air-gapped cluster
# needs no package index at run time. boto3 is the MLflow server's S3 client for --artifacts-destination.
# The constraint torch==2.13.0 accepts the installed 2.13.0+cpu, so pip keeps it.
RUN pip install -c constraints.txt . boto3 \
    && pip check \
    && python -c "import torch; assert not torch.version.cuda, torch.version.cuda"

# A numeric user, so that runAsNonRoot can verify it. KFP mounts scratch volumes where its launcher writes
# (/gcs, /minio, /s3, /.cache, /.local), so steps need no root; HF caches go to the user's home.
RUN useradd --create-home --uid 1000 canaryflow
USER 1000
WORKDIR /home/canaryflow

# `canaryflow serve` in the InferenceService; the MLflow server listens on 5000 (its Service says so).
EXPOSE 8080
