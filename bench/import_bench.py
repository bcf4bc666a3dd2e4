"""What the extension costs a WebUI at start: import time and wall time of each phase, and what it imports.

Starts the stand-in WebUI (tests/webui_stub) in a fresh interpreter under `python -X importtime`, with gradio and
fastapi imported first (a WebUI has them before it loads extensions), and times each phase the extension takes
part in: preload.py, executing scripts/*.py, the settings and the tab (building the services and the Blocks),
and app_started (mounting the API, starting the scheduler); `ui` also holds the stand-in's own two tabs and
`webui_launch` is the WebUI's gradio server start, for scale. Prints JSON; nothing is asserted (tests check that no
heavy module is imported, this measures how long the rest takes).

    .venv/bin/python bench/import_bench.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STUB = REPO / "tests" / "webui_stub" / "a1111"
HEAVY = ("torch", "diffusers", "transformers", "accelerate", "peft", "bitsandbytes", "safetensors.torch")
MARK = "##phase "
_IMPORT_LINE = re.compile(r"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)")

PROGRAM = """
import json, sys, time
sys.path.insert(0, {stub!r})
import gradio, fastapi
phases = {{}}
def mark(name):
    sys.stderr.write("{mark}" + name + "\\n"); sys.stderr.flush()
    phases[name] = time.perf_counter()
from modules import script_callbacks, scripts, shared_init, ui
mark("preload")
shared_init.initialize([], [{repo!r}], {data!r})
mark("load_scripts")
scripts.load_scripts([{repo!r}])
mark("ui")
demo = ui.create_ui()
mark("webui_launch")
from webui import free_port
app, _url, _share = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(),
                                quiet=True)
mark("app_started")
script_callbacks.app_started_callback(demo, app)
mark("end")
names = list(phases)
print(json.dumps({{
    "wall_s": {{a: round(phases[b] - phases[a], 4) for a, b in zip(names, names[1:])}},
    "heavy_imported": [m for m in {heavy!r} if m in sys.modules],
    "reported": script_callbacks.reported,
}}))
demo.close()
from kohya_backend.host.runtime import RUNTIME
RUNTIME.reset()
"""


def parse_importtime(stderr: str) -> dict[str, dict[str, Any]]:
    """Per phase: total self import time (ms), number of modules, and the slowest top-level imports."""
    phases: dict[str, dict[str, Any]] = {}
    current = "before"
    for line in stderr.splitlines():
        if line.startswith(MARK):
            current = line[len(MARK) :].strip()
            continue
        match = _IMPORT_LINE.match(line)
        if not match:
            continue
        self_us, cumulative_us, indent, name = int(match[1]), int(match[2]), match[3], match[4]
        phase = phases.setdefault(current, {"self_ms": 0.0, "modules": 0, "top": []})
        phase["self_ms"] += self_us / 1000
        phase["modules"] += 1
        if len(indent) <= 1:  # a module imported by the phase itself, not by another import
            phase["top"].append((round(cumulative_us / 1000, 1), name))
    for phase in phases.values():
        phase["self_ms"] = round(phase["self_ms"], 1)
        phase["top"] = [
            {"module": n, "cumulative_ms": ms} for ms, n in sorted(phase["top"], reverse=True)[:8]
        ]
    return phases


def run_once(data_dir: Path) -> dict[str, Any]:
    """One fresh WebUI start with the extension, measured."""
    data_dir.mkdir(parents=True, exist_ok=True)
    program = PROGRAM.format(stub=str(STUB), repo=str(REPO), data=str(data_dir), heavy=HEAVY, mark=MARK)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TRAIN_MANAGEMENT_TRAINER_ENV"] = str(data_dir / "no-trainer-env")
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", program], cwd=data_dir, env=env,
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    imports = parse_importtime(done.stderr)
    result["imports"] = {k: v for k, v in imports.items() if k not in ("before", "end")}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=3, help="fresh starts to measure (median reported)")
    args = parser.parse_args(argv)
    runs = []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(run_once(Path(tmp) / f"webui{i}"))
    phases = list(runs[0]["wall_s"])
    summary = {
        "python": sys.version.split()[0],
        "runs": args.repeat,
        "median_wall_s": {p: round(statistics.median(r["wall_s"][p] for r in runs), 3) for p in phases},
        "median_import_self_ms": {
            p: round(statistics.median(r["imports"].get(p, {}).get("self_ms", 0.0) for r in runs), 1)
            for p in phases
        },
        "heavy_imported": sorted({m for r in runs for m in r["heavy_imported"]}),
        "errors_reported": sum(len(r["reported"]) for r in runs),
        "last_run_imports": runs[-1]["imports"],
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
