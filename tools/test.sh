#!/usr/bin/env bash
# Sets up the dev environment, then runs lint (ruff), type checks (mypy) and the test suite (pytest).
# Extra arguments go to pytest, e.g. `bash tools/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy kohya_backend
echo "== wheels (the trainer's pins on Python 3.10, 3.11, 3.12)"
bash tools/check_wheels.sh
echo "== pytest"
.venv/bin/python -m pytest "$@"
echo "== pytest (Forge line: gradio 4, pydantic 2, no torch)"
.venv-gradio4/bin/python -m pytest -p no:cacheprovider tests/torchless
if [[ -x .venv-a1111/bin/python ]]; then
  echo "== pytest (AUTOMATIC1111 line: Python 3.10, gradio 3.41, pydantic 1, httpx 0.24, no torch)"
  .venv-a1111/bin/python -m pytest -p no:cacheprovider tests/torchless
fi
