#!/usr/bin/env bash
# Sets up .venv and starts the standalone app on the default home (./train_management_home): the Train Management
# tab at http://127.0.0.1:7861/ and the REST API under /train-management/v1, with the scheduler that trains. On a
# home without models or datasets, --demo writes a tiny model, tokenizer and captioned dataset and pre-fills the
# tab with a config that trains them in seconds on a CPU. Ctrl-C stops it.
# Extra arguments go to `python -m kohya_backend serve` (e.g. --port 7870, --home DIR, --host 0.0.0.0 --token T).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
exec .venv/bin/python -m kohya_backend serve --demo "$@"
