"""Start the stand-in WebUI (README.md) with this repository as its extension, and clean up after it.

Tests import this file by path (tests/webui_stub is not a package). The stand-in's modules are imported under the
WebUI's own top-level names (`modules`, `networks`, ...), so they are removed from sys.modules afterwards, and the
process-wide HostRuntime is reset.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STUB = Path(__file__).resolve().parent
A1111 = STUB / "a1111"
FORGE = STUB / "forge"
REPO = STUB.parents[1]
_TOP_LEVEL = ("modules", "webui", "launch", "networks", "backend", "modules_forge")


def purge() -> None:
    """Forget every stand-in module (and the WebUI-loaded helpers) so the next WebUI starts fresh."""
    for name in list(sys.modules):
        if name.split(".")[0] in _TOP_LEVEL:
            del sys.modules[name]


def write_config(data_dir: Path, values: dict[str, Any]) -> None:
    """The WebUI's config.json (saved settings) before it starts."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "config.json").write_text(json.dumps(values), encoding="utf-8")


@contextmanager
def running_webui(
    data_dir: Path,
    argv: Sequence[str] = (),
    *,
    forge: bool = False,
    config: dict[str, Any] | None = None,
    extension: Path = REPO,
) -> Iterator[Any]:
    """A started stand-in WebUI (a1111/webui.py's WebUI) with `extension` installed; stopped afterwards."""
    from kohya_backend.host.runtime import RUNTIME

    saved_path = list(sys.path)
    purge()
    sys.path[:0] = [str(A1111)] + ([str(FORGE)] if forge else [])
    if config is not None:
        write_config(data_dir, config)
    from webui import WebUI  # the stand-in's, from A1111 above

    ui = WebUI(list(argv), [extension], data_dir)
    try:
        yield ui.start()
    finally:
        ui.stop()
        RUNTIME.reset()
        sys.path[:] = saved_path
        purge()
