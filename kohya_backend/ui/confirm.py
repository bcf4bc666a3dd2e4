"""The tab's confirmations: a hidden row that a destructive or overwriting action shows instead of acting, with
the question, a confirm button and "Keep". What the action would do is held in the row's State when it is asked,
so confirming acts on that (the job, image or dataset named in the question), never on whatever is selected by
then."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from kohya_backend.ui.origin_guard import read_only


@dataclass
class ConfirmRow:
    """The components of one confirmation."""

    row: Any
    text: Any
    yes: Any
    no: Any
    pending: Any  # gr.State: what confirming does (None: nothing asked)

    @property
    def outputs(self) -> list[Any]:
        """(row, question, pending): what ask() and dismissed() fill."""
        return [self.row, self.text, self.pending]


def confirm_row(elem_id: str, yes_label: str) -> ConfirmRow:
    """Build a hidden confirmation row (inside the current layout block)."""
    pending = gr.State(None)
    with gr.Row(visible=False, elem_id=elem_id, elem_classes=["train-management-confirm"]) as row:
        text = gr.Markdown(elem_id=f"{elem_id}_text")
        yes = gr.Button(yes_label, variant="stop", elem_id=f"{elem_id}_yes", scale=0, min_width=120)
        no = gr.Button("Keep", elem_id=f"{elem_id}_no", scale=0, min_width=80)
    return ConfirmRow(row, text, yes, no, pending)


def ask(question: str, pending: Any) -> tuple[Any, str, Any]:
    """Show the row with `question`; confirming will act on `pending`."""
    return gr.update(visible=True), question, pending


@read_only
def dismissed() -> tuple[Any, str, None]:
    """Hide the row and forget what was asked."""
    return gr.update(visible=False), "", None


def wire_keep(confirm: ConfirmRow) -> None:
    """ "Keep" hides the row and forgets what was asked (no server state is touched)."""
    confirm.no.click(dismissed, None, confirm.outputs, show_progress="hidden")
