"""What the host (the WebUI adapter or the standalone app) lends the tab; no gradio import here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kohya_backend.service.guard import GuardPolicy


@dataclass
class UiHooks:
    """What the host (WebUI adapter or standalone app) lends the tab."""

    interrogate: Callable[[Path], str] | None = None  # the WebUI's captioner: image file -> caption text
    default_config: Callable[[str], str] | None = None  # fm_type -> starting config_params TOML
    # (None: config.schema.template_toml(fm_type))
    workers_locked: str | None = None  # why the tab may not add or remove remote workers (None: it may)
    send_to_txt2img: bool = False  # the host has a txt2img tab (the WebUI): show "Send to txt2img"
    load_script: bool = (
        False  # the page does not load javascript/*.js itself (the standalone app): the tab runs it
    )
    # Who besides the page's own origin may press the tab's buttons (its origins, origin_regex and origin_hosts;
    # None: nobody): the WebUI's --cors-allow-origins(-regex) and --train-allowed-hosts, serve's guard policy.
    origins: GuardPolicy | None = None
