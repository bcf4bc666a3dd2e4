"""The differences between gradio 3.41 (AUTOMATIC1111 1.10) and 4.x (Forge) the tab runs into, in one place.

Everything else in the tab uses only what both lines accept: no `.style()`, no `Component.update()`, no gr.Box,
`gr.update(...)` for every change, and only constructor arguments both lines know.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import gradio as gr

GRADIO_MAJOR = int(gr.__version__.split(".")[0])


def file_input(
    label: str, *, file_count: str, file_types: list[str] | None = None, elem_id: str | None = None
) -> Any:
    """A gr.File that hands the callback files on disk: type "file" on 3.x (temp files), "filepath" on 4.x."""
    kwargs: dict[str, Any] = {"label": label, "file_count": file_count, "elem_id": elem_id}
    if file_types is not None and file_count != "directory":
        kwargs["file_types"] = file_types
    kwargs["type"] = "file" if GRADIO_MAJOR < 4 else "filepath"
    return gr.File(**kwargs)


def uploaded_paths(value: Any) -> list[tuple[str, Path]]:
    """(client file name, file on disk) for whatever a gr.File gave: None, one, or a list; paths or temp files."""
    if value is None:
        return []
    items: Iterable[Any] = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        path = Path(item if isinstance(item, (str, Path)) else item.name)
        original = getattr(item, "orig_name", None) or path.name
        out.append((Path(str(original)).name, path))
    return out


def mount(app: Any, blocks: Any, path: str, *, auth: Callable[[str, str], bool] | None = None) -> Any:
    """Mount the Blocks on a FastAPI app; `auth(user, password)` puts gradio's login page in front of it."""
    message = "Train Management: sign in with any user name and the server's token as the password"
    if GRADIO_MAJOR < 4:
        # gradio 3.41 reads auth from the Blocks when it creates the app (mount_gradio_app has no auth argument).
        blocks.auth = auth
        blocks.auth_message = message if auth else None
        return gr.mount_gradio_app(app, blocks, path=path)
    return gr.mount_gradio_app(app, blocks, path=path, auth=auth, auth_message=message if auth else None)


# gradio 4.x's page client warns "Too many arguments provided for the endpoint" for every event that sends input
# values (it looks their count up in an API description it never has: gradio issue #9895). Events that run
# without the user (the poll and what it refreshes) therefore send none on 4.x and find their page's values on
# the server by the page's session hash; 3.41 has no such warning, and no session hash in its gr.Request, so there
# the same values come as inputs.
SESSION_KEYED = GRADIO_MAJOR >= 4


def page_inputs(*components: Any) -> list[Any]:
    """The inputs of an event that runs without the user: none on 4.x (see SESSION_KEYED), these on 3.41."""
    return [] if SESSION_KEYED else list(components)


def session_of(request: Any) -> str | None:
    """The page's session hash on gradio 4.x (None on 3.41, or outside an event)."""
    if request is None:
        return None
    try:
        value = getattr(request, "session_hash", None)
    except (AttributeError, KeyError):  # 3.41's Request looks attributes up in its kwargs
        return None
    return str(value) if value else None


def js_only(code: str) -> dict[str, Any]:
    """Event arguments that run `code` in the browser (`_js=` on 3.41, `js=` on 4.x)."""
    return {"_js": code} if GRADIO_MAJOR < 4 else {"js": code}


def offline_theme() -> Any:
    """gradio's default theme with the fonts of the machine instead of Google Fonts (nothing fetched off-host)."""
    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica Neue", "Arial", "sans-serif"],
        font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "Liberation Mono", "monospace"],
    )
