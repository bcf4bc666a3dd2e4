"""The one way the tab refreshes a dropdown: its new choices, the current value kept while it is still one."""

from __future__ import annotations

from typing import Any

import gradio as gr


def dropdown(choices: list[str], current: str | None) -> Any:
    """A gr.update with `choices`, keeping `current` when it is among them, else the first choice (or none)."""
    return gr.update(
        choices=choices, value=current if current in choices else (choices[0] if choices else None)
    )
