#!/usr/bin/env bash
# Proves the trainer's pins install from wheels alone on every supported Python (no compiler, no sdist build):
# requirements-trainer-py310.txt on 3.10, requirements-trainer.txt on 3.11 and 3.12. Needs the package index;
# requirements-trainer-sdist.txt (pure Python, no wheel published) is checked by tests/test_install.py instead.
set -euo pipefail
cd "$(dirname "$0")/.."
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q --dry-run --only-binary=:all:)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
check() {  # python version, requirements file
  if ! "${pip[@]}" --target "$tmp/$1" --python-version "$1" -r "$2" >"$tmp/$1.log" 2>&1; then
    grep -v "^WARNING: Location" "$tmp/$1.log" | tail -5 >&2
    echo "$2 does not install from wheels on Python $1" >&2
    return 1
  fi
}
check 3.10 requirements-trainer-py310.txt & a=$!
check 3.11 requirements-trainer.txt & b=$!
check 3.12 requirements-trainer.txt & c=$!
status=0
for pid in $a $b $c; do wait "$pid" || status=1; done
exit $status
