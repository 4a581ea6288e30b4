"""Container images of the pipeline's steps: the one place an image name is written.

Components run with kfp already in the image (install_kfp_package=False), so an air-gapped cluster
needs no package index at run time.
"""

BASE_IMAGE = "ghcr.io/canaryflow/canaryflow:0.1.0"
TRAIN_IMAGE = "ghcr.io/canaryflow/canaryflow-cuda:0.1.0"
