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
