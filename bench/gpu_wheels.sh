#!/usr/bin/env bash
# Fetch, on a machine with pip access, the wheels that bench/run_gpu.sh installs on the offline GPU machine
# (its image has torch, triton, pytest, pytest-benchmark, typer, safetensors, huggingface-hub, nvidia-ml-py,
# but not these): diffusers (the video-path oracle and model_step peer), liger-kernel (the cross-entropy
# peer) and what they need beyond the image. Pure-Python wheels, ~7 MB; name .whl in the device call's carry.
#   bash bench/gpu_wheels.sh && bash bench/run_gpu.sh ...   (on the GPU machine)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .gitignore .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  diffusers==0.42.1 liger-kernel==0.8.5 importlib_metadata==10.2.0 lazy-importer==0.1.0
ls -1 .whl
