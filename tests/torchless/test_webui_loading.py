"""The extension as a WebUI process loads it: a fresh interpreter, preload.py, scripts/*.py, the tab, the API.

Run in a subprocess so that nothing this test process imported hides a missing import or a heavy one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kohya_backend.host.flags import add_flags, launch_argv, parse_flags

STUB = Path(__file__).resolve().parents[1] / "webui_stub"
REPO = STUB.parents[1]
HEAVY = ("torch", "diffusers", "transformers", "accelerate", "peft", "bitsandbytes", "safetensors.torch")

LOAD = """
import json, sys, time
sys.path.insert(0, {a1111!r})
import gradio, fastapi  # a WebUI has these loaded before it loads extensions
from webui import WebUI
from modules import script_callbacks, script_loading, scripts, shared
ui = WebUI(["--api-auth", "u:p"], [{repo!r}], {data!r}).start()
import httpx
status = httpx.get(ui.url + "/train-management/v1/trainings", auth=("u", "p"), timeout=30).status_code
print(json.dumps({{
    "reported": script_callbacks.reported + scripts.reported + script_loading.reported,
    "heavy": [m for m in {heavy!r} if m in sys.modules],
    "extension_on_path": any(p.rstrip("/") == {repo!r} for p in sys.path),
    "status": status,
    "worker_flag": shared.cmd_opts.train_worker,
}}))
ui.stop()
from kohya_backend.host.runtime import RUNTIME
RUNTIME.reset()
"""


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COMMANDLINE_ARGS")}
    env["TRAIN_MANAGEMENT_TRAINER_ENV"] = str(tmp_path / "no-trainer-env")
    return env


def test_a_fresh_webui_process_loads_the_extension_without_heavy_imports(tmp_path: Path) -> None:
    code = LOAD.format(a1111=str(STUB / "a1111"), repo=str(REPO), data=str(tmp_path / "webui"), heavy=HEAVY)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=_clean_env(tmp_path),
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    assert result["reported"] == []  # every callback found kohya_backend after sys.path was restored
    assert result["heavy"] == []
    assert result["extension_on_path"] is False  # the WebUI put it there only while loading
    assert result["status"] == 200
    assert result["worker_flag"] is None


def test_preload_adds_the_extensions_flags_through_the_webuis_loader(tmp_path: Path) -> None:
    sys.path.insert(0, str(STUB / "a1111"))
    try:
        from modules import script_loading

        parser = argparse.ArgumentParser()
        parser.add_argument("--api-auth")
        script_loading.preload_extensions([str(REPO)], parser)
        assert script_loading.reported == []
    finally:
        sys.path.remove(str(STUB / "a1111"))
        for name in [n for n in sys.modules if n.split(".")[0] == "modules"]:
            del sys.modules[name]
    args = parser.parse_args(
        ["--train-home", "/data/tm", "--train-worker", "http://gpu-1:7870", "--train-worker", "http://gpu-2:7870",
         "--train-worker-token-file", "/secrets/token", "--train-python", "/opt/py311/bin/python", "--api-auth", "a:b"]
    )  # fmt: skip
    assert args.train_home == "/data/tm"
    assert args.train_worker == ["http://gpu-1:7870", "http://gpu-2:7870"]
    assert args.train_worker_token_file == "/secrets/token"
    assert args.train_python == "/opt/py311/bin/python"
    defaults = parser.parse_args([])
    assert (defaults.train_home, defaults.train_worker, defaults.train_python) == (None, None, None)


def test_flags_are_unique_and_readable_where_argparse_never_ran() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    with pytest.raises(argparse.ArgumentError):
        add_flags(parser)  # a second extension with the same names would fail loudly, not shadow ours
    argv = launch_argv(["--xformers"], {"COMMANDLINE_ARGS": "--api --train-python '/opt/my py/bin/python'"})
    assert argv == ["--xformers", "--api", "--train-python", "/opt/my py/bin/python"]
    assert parse_flags(argv).train_python == "/opt/my py/bin/python"
    assert parse_flags(["--medvram"]).train_python is None


def test_every_style_rule_is_scoped_to_the_tab_and_the_stamp_is_hidden() -> None:
    import re

    css = re.sub(r"/\*.*?\*/", "", (REPO / "style.css").read_text(encoding="utf-8"), flags=re.S)
    rules = re.findall(r"([^{}]+)\{([^}]*)\}", css)
    selectors = [s.strip() for selector_list, _ in rules for s in selector_list.split(",")]
    assert selectors and all(s.startswith("#train_management") for s in selectors), selectors
    hidden = [body for selector_list, body in rules if "#train_management_delivery_stamp" in selector_list]
    assert any("display: none" in body for body in hidden)


def test_every_global_of_the_script_is_prefixed() -> None:
    import re

    script = (REPO / "javascript" / "train_management.js").read_text(encoding="utf-8")
    names = re.findall(r"^(?:var|let|const|function)\s+([A-Za-z_$][\w$]*)", script, flags=re.M)
    assert names and all(name.startswith("trainManagement") for name in names), names
