#!/bin/sh
# Print `--gpus all` when this host can give containers a GPU (an NVIDIA driver that answers
# and the NVIDIA container runtime/toolkit registered with the engine), else nothing.
#   docker run $(sh docker/gpu-flags.sh [docker-client]) ...
docker=${1:-docker}
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 || exit 0
if "$docker" info --format '{{json .Runtimes}}' 2>/dev/null | grep -q nvidia ||
    command -v nvidia-container-cli >/dev/null 2>&1; then
    echo "--gpus all"
fi
