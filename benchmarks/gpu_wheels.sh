#!/usr/bin/env bash
# The wheels a lent GPU machine lacks for benchmarks/gpu_checks.sh, downloaded into .whl/ (ignored by git), for the
# device tool to carry. Its image has Python 3.12, torch, accelerate, huggingface_hub, safetensors, pyarrow and
# the rest of uncond's needs (the device library's KINDS.md lists them), but not these. The versions are those of
# the Python environment this runs in (the one the tests pass in).
# Usage, from the repository root, in that environment:  bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
packages=()
for name in diffusers datasets dill multiprocess importlib_metadata; do
  packages+=("$name==$(python -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name")")
done
rm -rf .whl
python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${packages[@]}"
ls .whl
