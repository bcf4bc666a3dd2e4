"""A Python 3.10 trainer environment for the tests, built by the product's own setup and cached per machine.

It lives outside the repository, in ~/.cache/train-management/trainer-py310-<key> ($XDG_CACHE_HOME respected),
keyed by the digest of what it holds (torch, requirements-trainer-py310.txt, the vocabulary package), so a change
of pins builds a new one (and one unused for a week is removed). `tools/setup.sh dev` builds it (the downloads, a few GB with PyPI's
CUDA torch, belong to setup, not to the test suite's time); a test that finds it missing builds it the same way.
Run as a script, it builds it and prints its folder.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from kohya_backend.host.trainer_env import EnvSpec, env_spec, is_ready, probe_version  # noqa: E402
from kohya_backend.host.trainer_setup import setup_env  # noqa: E402

PY310 = (3, 10)
PREFIX = "trainer-py310-"
USED_NAME = "last-used"
STALE_S = 7 * 24 * 3600


def cache_root() -> Path:
    """~/.cache/train-management (or $XDG_CACHE_HOME/train-management)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "train-management"


def find_python310() -> str | None:
    """A Python 3.10 that runs: python3.10 on PATH, else pyenv's (where tools/setup.sh finds it too)."""
    pyenv = os.environ.get("PYENV_ROOT") or str(Path.home() / ".pyenv")
    # a pyenv shim on PATH is there but fails unless 3.10 is pyenv's selected version: probe each one
    for found in [shutil.which("python3.10"), *sorted(glob.glob(f"{pyenv}/versions/3.10.*/bin/python3.10"))]:
        if found and probe_version([found]) == PY310:
            return found
    return None


def spec() -> EnvSpec:
    """The spec a WebUI without a recognisable torch build gets on this machine (PyPI's torch)."""
    return env_spec(None, root=REPO)


def folder_for(env: EnvSpec) -> Path:
    """Where the environment for `env` is cached."""
    return cache_root() / f"{PREFIX}{env.key(PY310)}"


def ensure(python: str) -> tuple[Path, str]:
    """Build (or find ready) the cached 3.10 environment with `python`; (its folder, "" or why it failed)."""
    env = spec()
    folder = folder_for(env)
    if not is_ready(folder, env):
        result = setup_env(folder, env, current_python=python, candidates=[[python]])
        if not result.ok:
            return folder, result.message
    (folder / USED_NAME).touch()
    for other in cache_root().glob(f"{PREFIX}*"):
        # Environments for other pins (a few GB each) go once unused for a while: not at once, since another
        # checkout on this machine (another branch) may be using its own.
        if other != folder and time.time() - _last_touched(other) > STALE_S:
            shutil.rmtree(other, ignore_errors=True)
    return folder, ""


def _last_touched(folder: Path) -> float:
    """When an environment was last used, or its setup last wrote (one being built elsewhere is fresh)."""
    times = [p.stat().st_mtime for p in (folder / USED_NAME, folder / "setup.log", folder) if p.exists()]
    return max(times, default=0.0)


if __name__ == "__main__":
    python = find_python310()
    if python is None:
        print("WARNING: no python3.10 found: the Python 3.10 trainer test will be skipped", file=sys.stderr)
        raise SystemExit(0)
    where, problem = ensure(python)
    print(problem or where)
    raise SystemExit(1 if problem else 0)
