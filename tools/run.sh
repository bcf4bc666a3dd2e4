#!/usr/bin/env bash
# Sets up .venv and runs the main job on the embedded default: the bundled demo (a tiny model and captioned
# dataset generated under ./demo_home) trained end to end; prints where the LoRA was written.
# Extra arguments go to `python -m kohya_backend demo` (e.g. --fm-type sd_xl --steps 80 --home DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
exec .venv/bin/python -m kohya_backend demo "$@"
