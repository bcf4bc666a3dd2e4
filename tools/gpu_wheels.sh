#!/usr/bin/env bash
# Run HERE (network to the package registry) before a GPU check: downloads into .whl/ (git-ignored) the wheels the
# lent GPU machine lacks for the trainer. That machine's python3 (3.12) has torch with CUDA, accelerate, peft,
# safetensors, Pillow, psutil and pytest, but no diffusers or tomlkit, and an older transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
pin() { grep -E "^$1==" requirements-trainer.txt | head -1; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "$(pin diffusers)" "$(pin transformers)" "$(pin tomlkit)" importlib_metadata==8.7.0
ls -la .whl
