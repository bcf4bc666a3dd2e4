"""Building the trainer's environment (see trainer_env for why and where): venv, torch first, then the rest.

Every step is bounded (pip's own network timeout and retries, plus one deadline for the whole setup), runs under
a lock (two WebUIs starting at once do not build it twice), writes pip's output to setup.log and its outcome to
state.json, so a failure (offline, no matching wheel) is reported once with what to do, and the next start tries
again. Also a command for setting it up by hand: `python -m kohya_backend.host.trainer_setup`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import IO

from kohya_backend.host.trainer_env import (
    MAX_PYTHON,
    MIN_PYTHON,
    PIP_TIMEOUT_S,
    SETUP_DEADLINE_S,
    WEBUI_INDEX_ENV,
    EnvSpec,
    container,
    env_spec,
    is_ready,
    no_python_message,
    pick_base_python,
    probe_version,
    python_candidates,
    read_state,
    venv_python,
    write_state,
)

LOG_NAME = "setup.log"
LOCK_NAME = "setup.lock"
CONSTRAINTS_NAME = "constraints.txt"
_TAIL_BYTES = 4000
_OFFLINE_MARKERS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "ConnectTimeoutError",
    "ReadTimeoutError",
)


@dataclass(frozen=True)
class Step:
    """One command of the setup, with what it does in words."""

    title: str
    command: list[str]


@dataclass(frozen=True)
class SetupResult:
    """How a setup ended: ok, a message for the user, and whether the network looked unreachable."""

    ok: bool
    message: str
    offline: bool = False


def _pip(python: Path, timeout_s: int) -> list[str]:
    return [
        str(python), "-m", "pip", "install", "--disable-pip-version-check", "--prefer-binary",
        "--timeout", str(timeout_s), "--retries", "2",
    ]  # fmt: skip


def plan_steps(
    folder: Path,
    spec: EnvSpec,
    base: Sequence[str] | None,
    *,
    index_url: str | None = None,
    pip_timeout_s: int = PIP_TIMEOUT_S,
    python: tuple[int, int] | None = None,
) -> list[Step]:
    """The commands that bring `folder`/env (of Python `python`) to `spec`: create the venv (when `base` is
    given), torch, the rest.

    torch comes first from its own index (so nothing else pulls a different build), and is held at that build
    by a constraints file while the other pins install from the WebUI's index (INDEX_URL) or PyPI.
    """
    pip = _pip(venv_python(folder), pip_timeout_s)
    mirror = ["--index-url", index_url] if index_url else []
    torch_index = ["--index-url", spec.torch.index_url] if spec.torch.index_url else mirror
    constraints = ["-c", str(Path(folder) / CONSTRAINTS_NAME)]
    steps = []
    if base is not None:
        steps.append(
            Step("create the environment", [*base, "-m", "venv", "--clear", str(Path(folder) / "env")])
        )
    steps.append(Step(f"install {spec.torch.requirement}", [*pip, *torch_index, spec.torch.requirement]))
    steps.append(Step("install the trainer's packages", [*pip, *mirror, *constraints, *spec.pins(python)]))
    if spec.no_deps:
        steps.append(Step("install CLIP's vocabulary", [*pip, *mirror, "--no-deps", *spec.no_deps]))
    return steps


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on `path` for the block, without waiting; yields whether it was had."""
    handle = open(path, "a+")  # noqa: SIM115 (closed in finally; closing releases the lock)
    try:
        if sys.platform == "win32":
            import msvcrt

            try:
                msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
                got = True
            except OSError:
                got = False
        else:
            import fcntl

            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                got = True
            except BlockingIOError:
                got = False
        yield got
    finally:
        handle.close()


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            handle.seek(max(0, handle.tell() - _TAIL_BYTES))
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _run_step(step: Step, log: IO[str], log_path: Path, deadline: float) -> tuple[bool, str]:
    """Run one step with its output appended to the log; (ok, last lines of output when it failed)."""
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {step.title}: {' '.join(step.command)}\n")
    log.flush()
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return False, "the setup ran out of time"
    try:
        done = subprocess.run(
            step.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=remaining
        )
    except subprocess.TimeoutExpired:
        return False, f"'{step.title}' did not finish within the setup's time limit"
    except OSError as exc:
        return False, f"could not run {step.command[0]}: {exc.strerror or exc}"
    log.flush()
    return done.returncode == 0, "" if done.returncode == 0 else _tail(log_path)


def _failure(step: Step, output: str, folder: Path) -> SetupResult:
    offline = any(marker in output for marker in _OFFLINE_MARKERS)
    lines = [line for line in output.splitlines() if line.strip()][-3:]
    why = "the package index could not be reached (offline?)" if offline else "; ".join(lines) or "it failed"
    message = (
        f"Train Management: could not {step.title} for the trainer: {why}. Training on this machine stays "
        f"unavailable until it is set up; the next WebUI start tries again (full output: {folder / LOG_NAME})."
    )
    return SetupResult(False, message, offline)


def _env_version(folder: Path) -> tuple[int, int] | None:
    """The Python version of the existing venv when it is one the trainer can use, else None (make a new one)."""
    version = probe_version([str(venv_python(folder))]) if venv_python(folder).exists() else None
    return version if version is not None and MIN_PYTHON <= version <= MAX_PYTHON else None


def setup_env(
    folder: Path,
    spec: EnvSpec,
    *,
    current_python: str = sys.executable,
    index_url: str | None = None,
    deadline_s: float = SETUP_DEADLINE_S,
    pip_timeout_s: int = PIP_TIMEOUT_S,
    candidates: Sequence[Sequence[str]] | None = None,
) -> SetupResult:
    """Bring the trainer's environment in `folder` to `spec` (quick when state.json says it already is).

    A missing venv is made from the best of `candidates` (default: python_candidates(current_python)); an
    existing one keeps its Python, and gets the pins for that version.
    """
    if is_ready(folder, spec):
        return SetupResult(True, "")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with exclusive(folder / LOCK_NAME) as got:
        if not got:
            return SetupResult(False, f"Train Management: another process is setting up {folder}; skipped")
        base: list[str] | None = None
        version = _env_version(folder)
        if version is None:
            found = python_candidates(current_python) if candidates is None else candidates
            picked = pick_base_python(found)
            if picked is None:
                write_state(folder, {"ready": False, "error": "no Python 3.10-3.12 found", "at": time.time()})
                return SetupResult(False, no_python_message())
            base, version = picked
        (folder / CONSTRAINTS_NAME).write_text(spec.torch.requirement + "\n", encoding="utf-8")
        deadline = time.monotonic() + deadline_s
        with open(folder / LOG_NAME, "a", encoding="utf-8") as log:
            steps = plan_steps(
                folder, spec, base, index_url=index_url, pip_timeout_s=pip_timeout_s, python=version
            )
            for step in steps:
                ok, output = _run_step(step, log, folder / LOG_NAME, deadline)
                if not ok:
                    result = _failure(step, output, folder)
                    write_state(folder, {"ready": False, "error": result.message, "at": time.time()})
                    return result
        write_state(
            folder,
            {"ready": True, "key": spec.key(version), "python": list(version), "torch": spec.torch.requirement,
             "torch_index": spec.torch.index_url, "reason": spec.torch.reason, "at": time.time()},
        )  # fmt: skip
        where = f"{folder / 'env'} (Python {version[0]}.{version[1]})"
        return SetupResult(True, f"Train Management: the trainer's environment is ready in {where}")


def webui_torch_version() -> str | None:
    """The version of the torch installed where this runs (the WebUI's venv), e.g. '2.1.2+cu121'."""
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Set up (or check) the trainer's environment by hand, printing pip's log location and the outcome."""
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--env", type=Path, default=None, help="container folder (default: .venv-trainer)")
    parser.add_argument("--webui-torch", default=None, help="torch version to match (default: this one's)")
    parser.add_argument(
        "--python",
        default=None,
        help="the interpreter (3.10-3.12) that creates the environment (default: the first 3.11/3.12 found, "
        "else 3.10)",
    )
    args = parser.parse_args(argv)
    folder = args.env or container(env)
    spec = env_spec(args.webui_torch or webui_torch_version(), environ=env)
    print(f"setting up {folder} ({spec.torch.reason}); pip's output goes to {folder / LOG_NAME}", flush=True)
    result = setup_env(
        folder,
        spec,
        index_url=env.get(WEBUI_INDEX_ENV) or None,
        candidates=[[args.python]] if args.python else None,
    )
    state = read_state(folder) or {}
    print(result.message or f"ready ({state.get('torch')})")
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
