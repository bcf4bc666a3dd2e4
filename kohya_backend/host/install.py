"""What install.py does at every WebUI start: light packages into the WebUI's venv, the trainer into its own.

The WebUI's venv gets only the few light packages the tab, the API and the scheduler import beyond what every
WebUI already has (UI_REQUIREMENTS), and only when they are missing: a package the WebUI has is never upgraded or
downgraded, even when it is older than we would like (a note says so), because the WebUI would put its pin back
at the next start. The trainer's packages (newer than the WebUI's) go into the trainer's own environment
(trainer_env: made from a Python 3.11/3.12 when one is found, else from 3.10, usually the WebUI's own), unless
--train-python names an interpreter to use instead. With nothing missing
this returns in a few milliseconds and starts no process: state.json says the environment is ready for the current
requirements, or that the chosen interpreter was found good (same file, same mtime, same requirements).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from kohya_backend.host.flags import PYTHON_ENV, launch_argv, parse_flags
from kohya_backend.host.trainer_env import (
    MAX_PYTHON,
    MIN_PYTHON,
    PREFERRED_PYTHON,
    REQUIREMENTS,
    REQUIREMENTS_PY310,
    WEBUI_INDEX_ENV,
    EnvSpec,
    container,
    env_spec,
    is_ready,
    read_state,
    requirement_name,
    write_state,
)
from kohya_backend.host.trainer_setup import SetupResult, setup_env

# Imported by the UI process (jobs: tomlkit, psutil) beyond the WebUI's own gradio, fastapi, pydantic, pillow and
# numpy. The ranges are ones the WebUIs' pins satisfy (AUTOMATIC1111 1.10: psutil 5.9.5, tomlkit 0.12 via gradio).
UI_REQUIREMENTS = ("tomlkit>=0.11", "psutil>=5.9")


@dataclass(frozen=True)
class WebuiPlan:
    """For the WebUI's venv: requirements to install (missing ones) and notes on ones left as they are."""

    install: tuple[str, ...]
    notes: tuple[str, ...]


def installed_version(name: str) -> str | None:
    """The installed version of a distribution in this interpreter, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def plan_webui(requirements: Sequence[str], version_of: Callable[[str], str | None]) -> WebuiPlan:
    """Install what is missing; leave every installed package alone, noting the ones outside our range."""
    from packaging.requirements import Requirement

    install, notes = [], []
    for line in requirements:
        requirement = Requirement(line)
        version = version_of(requirement.name)
        if version is None:
            install.append(line)
        elif requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
            notes.append(
                f"Train Management: {requirement.name} {version} is installed but {line} is expected; it is left "
                f"as is because the WebUI or another extension installed it (the tab may misbehave)"
            )
    return WebuiPlan(tuple(install), tuple(notes))


def applies_on(line: str, platform: str) -> bool:
    """Whether a requirement line's environment marker holds on `platform` (bitsandbytes: not on macOS)."""
    from packaging.requirements import Requirement

    marker = Requirement(line).marker
    return marker is None or marker.evaluate({"sys_platform": platform})


# One start of the chosen interpreter answers both questions: its Python version and its packages' versions.
_CHECK_CODE = """
import json, sys
from importlib import metadata
found = {}
for name in sys.argv[1:]:
    try:
        found[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        found[name] = None
print(json.dumps({"python": list(sys.version_info[:2]), "packages": found}))
"""
# In the trainer environment's state.json: the last --train-python interpreter found good.
CHECKED_KEY = "checked_interpreter"


def _interpreter_stamp(command: Sequence[str], spec: EnvSpec) -> dict[str, Any] | None:
    """What a good check of `command` is remembered by: its file, that file's mtime and the requirements' key."""
    found = shutil.which(command[0]) or command[0]
    try:
        mtime_ns = os.stat(found).st_mtime_ns
    except OSError:
        return None
    return {"path": os.path.abspath(found), "mtime_ns": mtime_ns, "key": spec.key()}


def _probe_interpreter(command: Sequence[str], names: Sequence[str]) -> dict[str, Any] | None:
    """{"python": [major, minor], "packages": {name: version or None}} from one run, or None if it does not run."""
    try:
        done = subprocess.run(
            [*command, "-c", _CHECK_CODE, *names], capture_output=True, text=True, timeout=30, check=False
        )
        answer = json.loads(done.stdout or "null") if done.returncode == 0 else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    return answer if isinstance(answer, dict) and isinstance(answer.get("packages"), dict) else None


def check_interpreter(
    command: Sequence[str], spec: EnvSpec, folder: Path | None = None, *, platform: str | None = None
) -> str | None:
    """Why a user-chosen trainer interpreter will not do (wrong Python, missing packages), or None when it will.

    Only the packages pinned for this `platform` (default: sys.platform) are asked for: no bitsandbytes on macOS.

    A good answer is remembered in `folder`'s state.json (the trainer environment's) by the interpreter's path,
    mtime and the requirements' key, so later WebUI starts skip the check and start no process.
    """
    stamp = _interpreter_stamp(command, spec)
    state = (read_state(folder) or {}) if folder is not None else {}
    if stamp is not None and state.get(CHECKED_KEY) == stamp:
        return None
    lines = (spec.torch.requirement, *spec.requirements)
    names = [requirement_name(line) for line in lines if applies_on(line, platform or sys.platform)]
    answer = _probe_interpreter(command, names)
    if answer is None:
        return f"Train Management: --train-python {' '.join(command)} does not run"
    version = tuple(answer.get("python") or (0, 0))
    if version < MIN_PYTHON:
        low = ".".join(map(str, MIN_PYTHON))
        return (
            f"Train Management: --train-python is Python {version[0]}.{version[1]}; the trainer needs {low}+"
        )
    missing = [name for name in names if not answer["packages"].get(name)]
    if missing:
        pins = REQUIREMENTS if version >= PREFERRED_PYTHON else REQUIREMENTS_PY310
        return (
            f"Train Management: --train-python {' '.join(command)} lacks {', '.join(missing)}; install them "
            f"there (pip install -r {pins}) or leave --train-python out to use the extension's own environment"
        )
    if folder is not None and stamp is not None:
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            write_state(folder, {**(read_state(folder) or {}), CHECKED_KEY: stamp})
        except OSError:  # a read-only extension folder: check again at the next start
            pass
    return None


def _install_light(
    plan: WebuiPlan, run_pip: Callable[[str, str], object], out: Callable[[str], None]
) -> None:
    for line in plan.install:
        try:
            # run_pip builds a shell command: quote the requirement so '>=' is not a redirection.
            run_pip(f'install "{line}"', f"{line} for Train Management")
        except Exception as exc:  # the WebUI reports pip's output in the exception; keep starting
            out(f"Train Management: could not install {line} into the WebUI's venv: {exc}")
    for note in plan.notes:
        out(note)


def run(
    argv: Sequence[str],
    environ: Mapping[str, str],
    *,
    run_pip: Callable[[str, str], object],
    version_of: Callable[[str], str | None] = installed_version,
    out: Callable[[str], None] = print,
    current_python: str = sys.executable,
    setup: Callable[..., SetupResult] = setup_env,
) -> int:
    """install.py's work; always 0 (problems are printed with what to do: the WebUI must start regardless)."""
    _install_light(plan_webui(UI_REQUIREMENTS, version_of), run_pip, out)
    flags = parse_flags(launch_argv(argv, environ))
    spec = env_spec(version_of("torch"), environ=environ)
    explicit = (flags.train_python or environ.get(PYTHON_ENV, "")).strip()
    folder = container(environ)
    if explicit:
        problem = check_interpreter([explicit], spec, folder)
        if problem:
            out(problem)
        return 0
    if is_ready(folder, spec):
        return 0
    good, low = ".".join(map(str, PREFERRED_PYTHON)), ".".join(map(str, MIN_PYTHON))
    high = ".".join(map(str, MAX_PYTHON))
    out(f"Train Management: setting up the trainer's environment in {folder} (Python {good}-{high}, else {low}; "
        f"torch: {spec.torch.reason}); this takes a few minutes once")  # fmt: skip
    result = setup(
        folder, spec, current_python=current_python, index_url=environ.get(WEBUI_INDEX_ENV) or None
    )
    if result.message:
        out(result.message)
    return 0


def main() -> int:
    """Entry point for the extension's install.py (the WebUI root is on sys.path: `launch` is importable)."""
    import launch  # the WebUI's launch.py: run_pip honours its INDEX_URL and --skip-install

    return run(sys.argv[1:], os.environ, run_pip=launch.run_pip)
