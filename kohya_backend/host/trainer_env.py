"""The trainer's own virtual environment inside a WebUI: where it lives, whether it is ready, how it is built.

Why a separate environment: the trainer needs transformers 5, diffusers 0.4x, accelerate 1.x and huggingface_hub
1.x/2.x, while the WebUI pins older ones (AUTOMATIC1111 1.10: transformers 4.30, accelerate 0.21). Installing them
into the WebUI's venv would break it, and the WebUI would reinstall its pins at every start. So install.py builds
`<extension>/.venv-trainer/env` from a Python found on the machine, installs torch first (pinned, from the index
matching the WebUI's CUDA/ROCm/CPU build), then the trainer's pins, and the local runner starts
`env/bin/python -m kohya_backend train` there. The WebUI process itself only needs light packages (see
kohya_backend.host.install).

Which Python: 3.11 or 3.12 when one is found (requirements-trainer.txt: the newest pins, the ones the dev
environment tests), else 3.10, usually the WebUI's own (requirements-trainer-py310.txt: the same pins except
transformers, diffusers and huggingface-hub, whose newest releases dropped 3.10). Either way it is a venv of its
own, never the WebUI's.

Layout of the container folder (ignored by git): env/ (the venv), state.json (ready? for which Python and
requirements? and the last --train-python interpreter found good), setup.log (pip's output), setup.lock (one
setup at a time).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kohya_backend
from kohya_backend.fileio import write_json_atomic
from kohya_backend.host.flags import PYTHON_ENV

ENV_DIR_ENV = "TRAIN_MANAGEMENT_TRAINER_ENV"
TORCH_INDEX_ENV = "TRAIN_MANAGEMENT_TORCH_INDEX_URL"
WEBUI_INDEX_ENV = "INDEX_URL"  # the WebUI's own mirror setting (launch.run_pip passes it as --index-url)
CONTAINER_NAME = ".venv-trainer"
PYTORCH_INDEX = "https://download.pytorch.org/whl"
MIN_PYTHON = (3, 10)  # the last one transformers 5.20 and diffusers 0.41 support
PREFERRED_PYTHON = (3, 11)  # transformers 5.24 and diffusers 0.42 (requirements-trainer.txt) require it
MAX_PYTHON = (3, 12)  # numpy 1.26 (the tested pin) has no wheels for newer Pythons
REQUIREMENTS = "requirements-trainer.txt"
REQUIREMENTS_PY310 = "requirements-trainer-py310.txt"
REQUIREMENTS_SDIST = "requirements-trainer-sdist.txt"  # pure-Python pins without a wheel, for every Python
PIP_TIMEOUT_S = 30
SETUP_DEADLINE_S = 45 * 60
# CUDA builds assumed published for the pinned torch, by the CUDA major of the WebUI's torch. Only Windows needs
# this (PyPI's Linux torch wheels are CUDA builds); TRAIN_MANAGEMENT_TORCH_INDEX_URL overrides it.
CUDA_INDEX_TAGS = {"11": "cu126", "12": "cu126", "13": "cu130"}


def extension_root() -> Path:
    """The extension's folder (the one that holds kohya_backend/, install.py and the requirements files)."""
    return Path(kohya_backend.__file__).resolve().parent.parent


def container(environ: Mapping[str, str] | None = None) -> Path:
    """The folder that holds the trainer's environment: TRAIN_MANAGEMENT_TRAINER_ENV or <extension>/.venv-trainer."""
    env = os.environ if environ is None else environ
    chosen = env.get(ENV_DIR_ENV, "").strip()
    return Path(chosen).expanduser() if chosen else extension_root() / CONTAINER_NAME


def venv_python(folder: Path, *, windows: bool = os.name == "nt") -> Path:
    """The interpreter of the venv inside `folder` (the container's env/)."""
    env = Path(folder) / "env"
    return env / "Scripts" / "python.exe" if windows else env / "bin" / "python"


# -- what the environment must hold ------------------------------------------------------------------------


@dataclass(frozen=True)
class TorchChoice:
    """How torch is installed into the trainer's environment: the pinned requirement and the index to use."""

    requirement: str
    index_url: str | None
    reason: str


def torch_choice(
    pin: str, webui_torch: str | None, platform: str = sys.platform, override: str | None = None
) -> TorchChoice:
    """The torch build matching the WebUI's (its version's local tag: +cu121, +rocm6.1, +cpu, or none)."""
    if override:
        return TorchChoice(pin, override, f"{TORCH_INDEX_ENV} is set")
    tag = (webui_torch or "").partition("+")[2].lower()
    if platform == "darwin":
        return TorchChoice(pin, None, "macOS: PyPI's torch (MPS)")
    if tag == "cpu":
        return TorchChoice(pin, f"{PYTORCH_INDEX}/cpu", "the WebUI runs a CPU build of torch")
    if tag.startswith("rocm"):
        return TorchChoice(pin, f"{PYTORCH_INDEX}/{tag}", f"the WebUI runs a ROCm build ({tag})")
    if tag.startswith("cu"):
        if platform.startswith("linux"):
            return TorchChoice(pin, None, f"the WebUI runs CUDA ({tag}); PyPI's Linux torch is a CUDA build")
        major = tag[2:4] if len(tag) >= 5 else tag[2:3]
        cuda = CUDA_INDEX_TAGS.get(major, "cu126")
        return TorchChoice(
            pin, f"{PYTORCH_INDEX}/{cuda}", f"the WebUI runs CUDA ({tag}); using the {cuda} build"
        )
    return TorchChoice(pin, None, "PyPI's default torch build for this platform")


def read_requirements(path: Path) -> list[str]:
    """The requirement lines of a requirements file (comments and blank lines dropped)."""
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def requirement_name(line: str) -> str:
    """The normalised project name of a requirement line ('Pillow==10.4' -> 'pillow'); ValueError if malformed."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    return str(canonicalize_name(Requirement(line).name))


@dataclass(frozen=True)
class EnvSpec:
    """What a ready trainer environment holds: torch (and where from), the other pins, the no-deps extras.

    `requirements` are the pins for Python 3.11/3.12; `py310` those for a Python 3.10 environment (empty: the
    same as `requirements`).
    """

    torch: TorchChoice
    requirements: tuple[str, ...]
    no_deps: tuple[str, ...]
    py310: tuple[str, ...] = ()

    def pins(self, python: tuple[int, int] | None = None) -> tuple[str, ...]:
        """The pins (torch aside) for an environment of that Python version (None: 3.11/3.12)."""
        if python is not None and python < PREFERRED_PYTHON and self.py310:
            return self.py310
        return self.requirements

    def key(self, python: tuple[int, int] | None = None) -> str:
        """A digest of what an environment of that Python holds: it is brought up to date when this differs."""
        data = json.dumps([self.torch.requirement, self.torch.index_url, self.pins(python), self.no_deps])
        return hashlib.sha256(data.encode("utf-8")).hexdigest()[:16]


def env_spec(
    webui_torch: str | None,
    *,
    root: Path | None = None,
    platform: str = sys.platform,
    environ: Mapping[str, str] | None = None,
) -> EnvSpec:
    """The spec from requirements-trainer.txt and -py310.txt (same torch line), each with
    requirements-trainer-sdist.txt, and requirements-vocab.txt."""
    base = root or extension_root()
    env = os.environ if environ is None else environ
    torch_line, rest = _split_torch(base / REQUIREMENTS)
    sdist = (
        tuple(read_requirements(base / REQUIREMENTS_SDIST)) if (base / REQUIREMENTS_SDIST).is_file() else ()
    )
    rest += sdist
    py310: tuple[str, ...] = ()
    if (base / REQUIREMENTS_PY310).is_file():
        torch_py310, py310 = _split_torch(base / REQUIREMENTS_PY310)
        if torch_py310 != torch_line:
            raise ValueError(f"{base / REQUIREMENTS_PY310} must pin the same torch as {REQUIREMENTS}")
        py310 += sdist
    choice = torch_choice(torch_line, webui_torch, platform, env.get(TORCH_INDEX_ENV) or None)
    return EnvSpec(choice, rest, tuple(read_requirements(base / "requirements-vocab.txt")), py310)


def _split_torch(path: Path) -> tuple[str, tuple[str, ...]]:
    """A requirements file's torch line and its other lines; ValueError unless torch is pinned exactly once."""
    lines = read_requirements(path)
    torch_lines = [line for line in lines if requirement_name(line) == "torch"]
    if len(torch_lines) != 1:
        raise ValueError(f"{path} must pin torch exactly once")
    return torch_lines[0], tuple(line for line in lines if requirement_name(line) != "torch")


# -- state ------------------------------------------------------------------------------------------------


def read_state(folder: Path) -> dict[str, Any] | None:
    """The container's state.json, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads((Path(folder) / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_state(folder: Path, state: Mapping[str, Any]) -> None:
    """Write state.json atomically."""
    write_json_atomic(Path(folder) / "state.json", dict(state))


def state_python(state: Mapping[str, Any]) -> tuple[int, int] | None:
    """The Python version state.json records for the environment (None: not recorded, i.e. 3.11/3.12)."""
    value = state.get("python")
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return value[0], value[1]
    return None


def is_ready(folder: Path, spec: EnvSpec | None = None) -> bool:
    """True when the environment was built completely (for `spec`, when given) and its interpreter exists."""
    state = read_state(folder)
    if not state or state.get("ready") is not True or not venv_python(folder).exists():
        return False
    return spec is None or state.get("key") == spec.key(state_python(state))


def trainer_python(
    flag: str | None, environ: Mapping[str, str] | None = None, folder: Path | None = None
) -> tuple[list[str] | None, str | None]:
    """The interpreter that runs the trainer, or (None, why not): --train-python, TRAIN_MANAGEMENT_PYTHON, env/."""
    env = os.environ if environ is None else environ
    explicit = (flag or "").strip() or env.get(PYTHON_ENV, "").strip()
    if explicit:
        found = shutil.which(explicit) or (explicit if Path(explicit).is_file() else None)
        if found is None:
            return None, f"the trainer's interpreter {explicit} (--train-python) does not exist"
        return [found], None
    where = container(env) if folder is None else Path(folder)
    if is_ready(where):
        return [str(venv_python(where))], None
    state = read_state(where) or {}
    reason = state.get("error") or "install.py has not set it up yet"
    return None, f"the trainer's environment in {where} is not ready: {reason}"


# -- finding a base interpreter ------------------------------------------------------------------------------


def python_candidates(
    current: str, *, which: Callable[[str], str | None] = shutil.which, windows: bool = os.name == "nt"
) -> list[list[str]]:
    """Interpreters that may create the venv: the WebUI's own, python3.11, python3.12, python3, python3.10, and on
    Windows the py launcher's 3.11, 3.12 and 3.10 (pick_base_python prefers 3.11/3.12 among them)."""
    found: list[list[str]] = [[current]]
    names = [f"python{v[0]}.{v[1]}" for v in ((3, 11), (3, 12))] + ["python3", "python3.10"]
    for name in names:
        path = which(name)
        if path and [path] not in found:
            found.append([path])
    if windows and which("py"):
        found += [["py", "-3.11"], ["py", "-3.12"], ["py", "-3.10"]]
    return found


def probe_version(command: Sequence[str], *, timeout_s: float = 20.0) -> tuple[int, int] | None:
    """(major, minor) of an interpreter, or None when it does not run (or has no venv module)."""
    code = "import sys, venv; print('%d.%d' % sys.version_info[:2])"
    try:
        done = subprocess.run(
            [*command, "-c", code], capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    try:
        major, minor = (int(part) for part in done.stdout.strip().split("."))
    except ValueError:
        return None
    return major, minor


def pick_base_python(
    candidates: Sequence[Sequence[str]],
    probe: Callable[[Sequence[str]], tuple[int, int] | None] = probe_version,
) -> tuple[list[str], tuple[int, int]] | None:
    """The first candidate with Python 3.11/3.12 or, when there is none, the first with 3.10; with its version."""
    fallback = None
    for command in candidates:
        version = probe(command)
        if version is None or not MIN_PYTHON <= version <= MAX_PYTHON:
            continue
        if version >= PREFERRED_PYTHON:
            return list(command), version
        if fallback is None:
            fallback = (list(command), version)
    return fallback


def no_python_message() -> str:
    """What to do when no suitable interpreter exists."""
    low, good, high = (".".join(map(str, v)) for v in (MIN_PYTHON, PREFERRED_PYTHON, MAX_PYTHON))
    return (
        f"Train Management: the trainer needs Python {low}-{high} for its own environment and none was found "
        f"(looked for the WebUI's interpreter, python{good}, python{high}, python3, python{low}). Install Python "
        f"{good} (Debian/Ubuntu: apt install python{good} python{good}-venv) and restart the WebUI, or pass "
        f"--train-python /path/to/python of an environment with requirements-trainer.txt installed."
    )
