"""install.py's decisions (what gets installed where) and its runs: quick when nothing is missing, bounded offline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kohya_backend.host import install, trainer_env
from kohya_backend.host.trainer_env import (
    EnvSpec,
    TorchChoice,
    env_spec,
    pick_base_python,
    python_candidates,
    read_requirements,
    requirement_name,
    torch_choice,
    trainer_python,
    venv_python,
    write_state,
)
from kohya_backend.host.trainer_setup import plan_steps, setup_env

REPO = Path(__file__).resolve().parents[1]
STUB_ROOT = REPO / "tests" / "webui_stub" / "a1111"
PIN = "torch==2.13.0"


def _pins(path: Path) -> dict[str, str]:
    """name -> pinned version; a package pinned twice (a merge can repeat a block) fails the test that reads it."""
    pins: dict[str, str] = {}
    for line in read_requirements(path):
        name, _, version = line.split(";")[0].partition("==")
        assert requirement_name(name) not in pins, f"{path.name} pins {name} twice"
        pins[requirement_name(name)] = version.strip()
    return pins


def test_requirement_names_are_the_canonical_project_names() -> None:
    assert requirement_name("Pillow==10.4.0") == "pillow"
    assert requirement_name('bitsandbytes==0.50.2; sys_platform != "darwin"') == "bitsandbytes"
    assert requirement_name("Huggingface_Hub[cli]>=1.0") == "huggingface-hub"
    assert requirement_name("zope.interface @ https://example.invalid/z.whl") == "zope-interface"
    with pytest.raises(ValueError):
        requirement_name("torch===")


def test_the_trainers_requirements_match_the_tested_pins() -> None:
    trainer = _pins(REPO / "requirements-trainer.txt")
    tested = _pins(REPO / "requirements.txt")
    torch_pin = re.search(r'"torch==([0-9.]+)"', (REPO / "tools" / "setup.sh").read_text(encoding="utf-8"))
    assert torch_pin is not None and trainer.pop("torch") == torch_pin.group(1)
    assert trainer == {name: tested[name] for name in trainer}
    for ui_only in ("gradio", "fastapi", "pydantic", "uvicorn"):
        assert ui_only not in trainer  # the trainer's environment holds the trainer only


def test_the_sdist_only_pins_are_pure_python_and_reach_every_trainer_environment() -> None:
    """requirements-trainer-sdist.txt is the one place a pin may lack a wheel: only pure-Python packages (they
    build without a compiler), installed with either Python's pins, and tested in the dev environment."""
    import importlib.metadata

    sdist = read_requirements(REPO / "requirements-trainer-sdist.txt")
    tested = _pins(REPO / "requirements.txt")
    assert sdist, "an empty file: remove it and its mentions instead"
    spec = env_spec(None, platform="linux", environ={})
    for line in sdist:
        name, _, version = line.partition("==")
        assert version and tested[requirement_name(line)] == version  # the version the suite tests
        wheel = importlib.metadata.distribution(name).read_text("WHEEL") or ""
        assert "Root-Is-Purelib: true" in wheel, f"{name} builds native code: it cannot stay sdist-only"
        assert line in spec.pins((3, 10)) and line in spec.pins((3, 11))
        for other in ("requirements-trainer.txt", "requirements-trainer-py310.txt"):
            assert requirement_name(line) not in _pins(REPO / other)  # in one file only


# The only pins the Python 3.10 set may hold differently: their newest releases need Python 3.11.
PY310_OWN = {"diffusers", "transformers", "huggingface-hub"}


def test_the_python_3_10_pins_differ_only_where_3_10_forces_them_to() -> None:
    from packaging.version import Version

    main = _pins(REPO / "requirements-trainer.txt")
    py310 = _pins(REPO / "requirements-trainer-py310.txt")
    assert set(py310) == set(main)  # the same packages, torch included
    differ = {name for name in main if main[name] != py310[name]}
    assert differ == PY310_OWN
    assert all(Version(py310[name]) < Version(main[name]) for name in differ)  # older releases, never newer
    markers = [
        line.partition(";")[2].strip() for line in read_requirements(REPO / "requirements-trainer.txt")
    ]
    markers_310 = [
        line.partition(";")[2].strip() for line in read_requirements(REPO / "requirements-trainer-py310.txt")
    ]
    assert sorted(m for m in markers if m) == sorted(
        m for m in markers_310 if m
    )  # bitsandbytes: not on macOS


def test_a_python_3_10_environment_gets_its_own_pins_and_key(tmp_path: Path) -> None:
    spec = env_spec("2.1.2+cu121", platform="linux", environ={})
    assert spec.pins((3, 10)) == spec.py310 != spec.requirements
    assert spec.pins((3, 11)) == spec.pins((3, 12)) == spec.pins(None) == spec.requirements
    assert "transformers==5.20.2" in spec.py310 and PIN not in spec.py310  # torch is installed on its own
    assert spec.key((3, 10)) != spec.key((3, 11)) == spec.key(None) == spec.key((3, 12))
    # an environment built before 3.10 was supported (no "python" in state.json) keeps its key: no rebuild
    legacy = EnvSpec(spec.torch, spec.requirements, spec.no_deps)
    assert legacy.key() == spec.key() and legacy.pins((3, 10)) == spec.requirements
    python = _ready(tmp_path, spec)
    assert trainer_env.is_ready(tmp_path, spec)
    write_state(tmp_path, {"ready": True, "key": spec.key(), "python": [3, 10]})
    assert not trainer_env.is_ready(tmp_path, spec)  # a 3.10 environment holding the 3.11 pins is not ready
    write_state(tmp_path, {"ready": True, "key": spec.key((3, 10)), "python": [3, 10]})
    assert trainer_env.is_ready(tmp_path, spec) and python.exists()
    rest = plan_steps(tmp_path, spec, None, python=(3, 10))[1].command
    assert rest[-len(spec.py310) :] == list(spec.py310)
    assert plan_steps(tmp_path, spec, None, python=(3, 11))[1].command[-len(spec.requirements) :] == list(
        spec.requirements
    )


def test_the_python_3_10_file_must_pin_the_same_torch(tmp_path: Path) -> None:
    for name in ("requirements-trainer.txt", "requirements-vocab.txt"):
        (tmp_path / name).write_text((REPO / name).read_text())
    (tmp_path / "requirements-trainer-py310.txt").write_text("torch==2.12.0\ndiffusers==0.41.0\n")
    with pytest.raises(ValueError, match="same torch"):
        env_spec(None, root=tmp_path, environ={})
    (tmp_path / "requirements-trainer-py310.txt").unlink()
    assert env_spec(None, root=tmp_path, environ={}).py310 == ()  # no 3.10 file: one set for all


def test_the_webuis_venv_gets_only_missing_light_packages() -> None:
    versions = {"tomlkit": "0.12.0", "psutil": "5.9.5"}
    assert install.plan_webui(install.UI_REQUIREMENTS, versions.get) == install.WebuiPlan((), ())
    plan = install.plan_webui(install.UI_REQUIREMENTS, {"psutil": "5.9.5"}.get)
    assert plan.install == ("tomlkit>=0.11",) and plan.notes == ()
    old = install.plan_webui(install.UI_REQUIREMENTS, {"tomlkit": "0.7.0", "psutil": "5.9.5"}.get)
    assert old.install == () and "tomlkit 0.7.0" in old.notes[0] and "left as is" in old.notes[0]


@pytest.mark.parametrize(
    ("webui_torch", "platform", "index", "why"),
    [
        ("2.1.2+cu121", "linux", None, "PyPI's Linux torch is a CUDA build"),
        ("2.1.2", "linux", None, "default"),
        ("2.1.2+cu121", "win32", "https://download.pytorch.org/whl/cu126", "cu126"),
        ("2.3.1+cu118", "win32", "https://download.pytorch.org/whl/cu126", "cu126"),
        ("2.1.2+cpu", "linux", "https://download.pytorch.org/whl/cpu", "CPU build"),
        ("2.3.1+rocm6.0", "linux", "https://download.pytorch.org/whl/rocm6.0", "ROCm"),
        ("2.1.2", "darwin", None, "macOS"),
        (None, "linux", None, "default"),
    ],
)
def test_torch_follows_the_webuis_build(
    webui_torch: str | None, platform: str, index: str | None, why: str
) -> None:
    choice = torch_choice(PIN, webui_torch, platform)
    assert (choice.requirement, choice.index_url) == (PIN, index) and why in choice.reason
    forced = torch_choice(PIN, webui_torch, platform, override="https://mirror.example/whl/cu130")
    assert forced.index_url == "https://mirror.example/whl/cu130"


def test_setup_steps_install_torch_first_then_the_rest_held_to_that_build(tmp_path: Path) -> None:
    spec = EnvSpec(
        TorchChoice(PIN, "https://download.pytorch.org/whl/cpu", "cpu"), ("diffusers==1",), ("clip==2",)
    )
    steps = plan_steps(
        tmp_path, spec, ["/usr/bin/python3.11"], index_url="https://mirror/simple", pip_timeout_s=9
    )
    assert [s.title for s in steps] == [
        "create the environment", f"install {PIN}", "install the trainer's packages", "install CLIP's vocabulary"
    ]  # fmt: skip
    create, torch, rest, vocab = (s.command for s in steps)
    assert create == ["/usr/bin/python3.11", "-m", "venv", "--clear", str(tmp_path / "env")]
    python = str(venv_python(tmp_path))
    assert torch[0] == python and torch[-3:] == ["--index-url", "https://download.pytorch.org/whl/cpu", PIN]
    assert "--timeout" in torch and torch[torch.index("--timeout") + 1] == "9"
    assert rest[-3:] == ["-c", str(tmp_path / "constraints.txt"), "diffusers==1"]
    assert rest[rest.index("--index-url") + 1] == "https://mirror/simple" and PIN not in rest
    assert vocab[-2:] == ["--no-deps", "clip==2"]
    assert plan_steps(tmp_path, spec, None)[0].title == f"install {PIN}"  # venv already there


def test_the_base_interpreter_is_the_first_python_3_11_or_3_12_else_3_10(tmp_path: Path) -> None:
    found = {
        "python3.11": "/usr/bin/python3.11",
        "python3": "/usr/bin/python3",
        "python3.10": "/usr/bin/python3.10",
    }
    candidates = python_candidates("/webui/venv/bin/python", which=found.get, windows=False)
    assert candidates == [
        ["/webui/venv/bin/python"], ["/usr/bin/python3.11"], ["/usr/bin/python3"], ["/usr/bin/python3.10"]
    ]  # fmt: skip
    versions = {
        "/webui/venv/bin/python": (3, 10),
        "/usr/bin/python3.11": (3, 11),
        "/usr/bin/python3": (3, 13),
        "/usr/bin/python3.10": (3, 10),
    }
    # With 3.11/3.12 present nothing changes: the WebUI's 3.10 comes first in the list but is not taken.
    assert pick_base_python(candidates, lambda c: versions[c[0]]) == (["/usr/bin/python3.11"], (3, 11))
    # The WebUI's own 3.10 when it is the only usable one (3.9 and 3.13 are not).
    only = {"/webui/venv/bin/python": (3, 10), "/usr/bin/python3": (3, 13), "/usr/bin/python3.9": (3, 9)}
    listed = [["/usr/bin/python3.9"], ["/usr/bin/python3"], ["/webui/venv/bin/python"]]
    assert pick_base_python(listed, lambda c: only[c[0]]) == (["/webui/venv/bin/python"], (3, 10))
    assert pick_base_python([["/x"], ["/y"]], lambda c: (3, 9) if c == ["/x"] else None) is None
    windows = python_candidates("C:\\webui\\python.exe", which={"py": "C:\\py.exe"}.get, windows=True)
    assert windows[-3:] == [["py", "-3.11"], ["py", "-3.12"], ["py", "-3.10"]]


def _ready(folder: Path, spec: EnvSpec) -> Path:
    python = venv_python(folder)
    python.parent.mkdir(parents=True)
    python.symlink_to(sys.executable)
    write_state(folder, {"ready": True, "key": spec.key()})
    return python


def test_the_trainers_interpreter_is_resolved_or_explained(tmp_path: Path) -> None:
    folder = tmp_path / "trainer"
    assert trainer_python(sys.executable, {}, folder) == ([sys.executable], None)
    assert trainer_python(None, {"TRAIN_MANAGEMENT_PYTHON": sys.executable}, folder) == (
        [sys.executable],
        None,
    )
    missing, why = trainer_python("/no/such/python", {}, folder)
    assert missing is None and "does not exist" in (why or "")
    _, why = trainer_python(None, {}, folder)
    assert "not ready" in (why or "") and "install.py has not set it up yet" in (why or "")
    folder.mkdir()
    write_state(folder, {"ready": False, "error": "the package index could not be reached"})
    assert "could not be reached" in (trainer_python(None, {}, folder)[1] or "")
    spec = env_spec("2.1.2+cu121", platform="linux", environ={})
    (folder / "state.json").unlink()
    python = _ready(folder, spec)
    assert trainer_python(None, {}, folder) == ([str(python)], None)
    assert trainer_env.is_ready(folder, spec)
    assert not trainer_env.is_ready(folder, env_spec("2.1.2+cpu", platform="linux", environ={}))


def test_install_run_installs_what_is_missing_and_skips_a_ready_trainer(tmp_path: Path) -> None:
    folder = tmp_path / "trainer"
    environ = {"TRAIN_MANAGEMENT_TRAINER_ENV": str(folder)}
    spec = env_spec(install.installed_version("torch"), environ=environ)
    _ready(folder, spec)
    pip_calls: list[tuple[str, str]] = []
    printed: list[str] = []

    def no_setup(*args: object, **kwargs: object) -> object:
        raise AssertionError("a ready environment is not set up again")

    def without_tomlkit(name: str) -> str | None:
        return None if name == "tomlkit" else install.installed_version(name)

    assert install.run([], environ, run_pip=lambda c, d: pip_calls.append((c, d)), version_of=without_tomlkit,
                       out=printed.append, setup=no_setup) == 0  # fmt: skip
    assert pip_calls == [('install "tomlkit>=0.11"', "tomlkit>=0.11 for Train Management")]
    assert printed == []


def test_install_run_checks_a_chosen_interpreter_instead_of_building_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "trainer"
    environ = {"TRAIN_MANAGEMENT_TRAINER_ENV": str(folder), "COMMANDLINE_ARGS": ""}
    printed: list[str] = []
    started: list[list[str]] = []
    real_run = subprocess.run

    def counted(command: list[str], **kwargs: object) -> object:
        started.append(command)
        return real_run(command, **kwargs)

    monkeypatch.setattr(install.subprocess, "run", counted)

    def install_with(python: str) -> list[str]:
        printed.clear()
        started.clear()
        environ["COMMANDLINE_ARGS"] = f"--api --train-python {python}"
        install.run([], environ, run_pip=lambda c, d: None, out=printed.append,
                    setup=lambda *a, **k: pytest.fail("no build with --train-python"))  # fmt: skip
        return list(printed)

    gradio4 = REPO / ".venv-gradio4" / "bin" / "python"
    assert gradio4.exists(), "the test environments are missing: run `bash tools/setup.sh dev`"
    assert "lacks torch" in install_with(str(gradio4))[0] and len(started) == 1  # one start answers it all
    assert "lacks torch" in install_with(str(gradio4))[0] and len(started) == 1  # a refusal is not remembered
    # A good interpreter is checked once (one start), then remembered by its file, mtime and the requirements.
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    assert install_with(str(wrapper)) == [] and len(started) == 1
    assert install_with(str(wrapper)) == [] and started == []  # the next WebUI start runs nothing
    checked = json.loads((folder / "state.json").read_text())[install.CHECKED_KEY]
    assert checked["path"] == str(wrapper) and not (folder / "env").exists()
    os.utime(wrapper, ns=(checked["mtime_ns"] + 10**9, checked["mtime_ns"] + 10**9))  # e.g. Python upgraded
    assert install_with(str(wrapper)) == [] and len(started) == 1
    assert "does not run" in install_with(str(tmp_path / "missing-python"))[0]


def test_a_chosen_interpreter_needs_only_the_packages_of_its_platform(tmp_path: Path) -> None:
    """bitsandbytes is pinned for every system but macOS: a Mac's interpreter without it is good, a Linux one not."""
    fake = tmp_path / "python"  # answers the check as an interpreter with every package but bitsandbytes
    fake.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        'print(json.dumps({"python": [3, 11], "packages": {n: None if n == "bitsandbytes" else "1" for n in '
        "sys.argv[3:]}}))\n"
    )
    fake.chmod(0o755)
    spec = env_spec(None, environ={})
    assert any(line.startswith("bitsandbytes") for line in spec.requirements)
    problem = install.check_interpreter([str(fake)], spec, platform="linux")
    assert problem is not None and "lacks bitsandbytes;" in problem
    assert install.check_interpreter([str(fake)], spec, platform="darwin") is None


def test_install_py_as_the_webui_runs_it_returns_at_once_when_nothing_is_missing(tmp_path: Path) -> None:
    folder = tmp_path / "trainer"
    environ = {"TRAIN_MANAGEMENT_TRAINER_ENV": str(folder)}
    _ready(folder, env_spec(install.installed_version("torch"), environ=environ))
    env = {
        **os.environ,
        **environ,
        "PYTHONPATH": str(STUB_ROOT),
    }  # what the WebUI's run_extension_installer sets
    done = subprocess.run([sys.executable, str(REPO / "install.py")], cwd=STUB_ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "" and json.loads((folder / "state.json").read_text())["ready"] is True


@pytest.mark.slow
def test_offline_setup_fails_fast_with_a_clear_message_and_retries_next_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.startswith("PIP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no local wheel folder or mirror: only our index
    dead = "http://127.0.0.1:9/simple"  # nothing listens on the discard port
    folder = tmp_path / "trainer"
    spec = EnvSpec(TorchChoice(PIN, dead, "test"), ("tomlkit==0.15.2",), ())
    result = setup_env(folder, spec, index_url=dead, pip_timeout_s=3, deadline_s=240)
    assert not result.ok and result.offline
    assert "could not be reached" in result.message and str(folder / "setup.log") in result.message
    state = json.loads((folder / "state.json").read_text())
    assert state["ready"] is False and "could not be reached" in state["error"]
    assert venv_python(folder).exists()  # the venv was made; the next start only retries the downloads
    assert "not ready" in (trainer_python(None, {}, folder)[1] or "")
