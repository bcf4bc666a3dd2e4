#!/usr/bin/env bash
# Creates or updates .venv with everything the project needs; idempotent (skips when the requirements are unchanged).
# Usage: bash tools/setup.sh [dev]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
want=${1:-run}
reqs=(requirements.txt requirements-vocab.txt)
[[ $want == dev ]] && reqs+=(requirements-dev.txt requirements-gradio4.txt requirements-a1111.txt
  requirements-trainer.txt requirements-trainer-py310.txt requirements-trainer-sdist.txt)
stamp=".venv/.setup-$want"
sum=$(cat "${reqs[@]}" tools/setup.sh | sha256sum | cut -c1-16)
if [[ -f $stamp && $(cat "$stamp") == "$sum" ]]; then
  exit 0
fi
if [[ $want == dev && ! -x /usr/bin/chromium ]]; then
  # Browser tests drive Debian's Chromium; Playwright never downloads a browser.
  sudo_=(); [[ $(id -u) == 0 ]] || sudo_=(sudo)
  "${sudo_[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${sudo_[@]}" apt-get install -y -q chromium
fi
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
# torch first and pinned: an unpinned or newer torch would pull gigabytes of CUDA wheels.
"${pip[@]}" "torch==2.13.0"
if [[ $want == dev ]]; then
  "${pip[@]}" -r requirements-dev.txt
else
  "${pip[@]}" -r requirements.txt
fi
# open-clip-torch only for CLIP's BPE vocabulary file; --no-deps keeps torchvision out.
"${pip[@]}" --no-deps -r requirements-vocab.txt
# This checkout, editable, with the `train-management` command (.venv/bin/train-management works from any folder).
# A .venv that is a symlink is another checkout's environment: it is not pointed at this one.
if [[ ! -L .venv ]]; then
  "${pip[@]}" --no-deps --no-build-isolation -e .
fi
if [[ $want == dev ]]; then
  # The Forge line (gradio 4, pydantic 2) in a second venv without torch: the tab and the API must build there.
  [[ -x .venv-gradio4/bin/python ]] || "$PY" -m venv .venv-gradio4
  .venv-gradio4/bin/python -m pip install --disable-pip-version-check -q -r requirements-gradio4.txt
  # The AUTOMATIC1111 1.10 line on its Python 3.10, also without torch.
  py310=""
  for cand in "$(command -v python3.10 || true)" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.10.*/bin/python3.10; do
    if [[ -x $cand ]] && "$cand" -c 'import sys, venv; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then
      py310=$cand
      break
    fi
  done
  if [[ -n $py310 ]]; then
    [[ -x .venv-a1111/bin/python ]] || "$py310" -m venv .venv-a1111
    .venv-a1111/bin/python -m pip install --disable-pip-version-check -q -r requirements-a1111.txt
    # The trainer's environment as install.py builds it from a WebUI's only Python 3.10, through the product's own
    # setup, cached outside the repository by the pins' digest (~/.cache/train-management; a few GB with PyPI's
    # CUDA torch, downloaded once per machine here rather than inside the test suite's time).
    .venv/bin/python tests/trainer_env_support.py \
      || echo "WARNING: the Python 3.10 trainer environment could not be built; its test will try again" >&2
  else
    echo "WARNING: no python3.10 found: the AUTOMATIC1111-line tests (Python 3.10) will not run" >&2
  fi
fi
echo "$sum" > "$stamp"
