"""Callbacks of the "Remote GPU workers" panel: add and remove workers and show their states.

They call the functions behind the /workers API (kohya_backend/service/workers_api.py), so the tab, the API and
the `workers` CLI share one registry and its rules. Tokens go in and never come out: the token field is emptied
after every press and the table has no token column. A host that is reachable from the network without a login
passes `locked` (why), and then adding and removing are refused with that explanation.
"""

from __future__ import annotations

from typing import Any

from kohya_backend.errors import TrainManagementError
from kohya_backend.service.training import TrainingService
from kohya_backend.service.workers_api import add_worker, remote_runner, remove_worker
from kohya_backend.ui.choices import dropdown
from kohya_backend.ui.origin_guard import read_only
from kohya_backend.ui.present import WORKER_HEADERS, error_markdown, worker_row, worker_state_text


def added_markdown(entry: dict[str, Any]) -> str:
    """What adding a worker did, what is wrong first: only a worker that answered is "✅ Added"; one that is
    offline, refuses the token or speaks another API is added with what to do in this panel."""
    name, url, state = entry["name"], entry["url"], entry["state"]
    use = f"Choose **worker {name}** (or *any free worker*) as the Training Instance Type."
    if state in ("online", "busy"):
        return f"✅ Added worker **{name}** (`{url}`): {worker_state_text(entry)}, {entry['gpu']}. {use}"
    why = f" ({entry['error']})" if entry.get("error") else ""
    if state == "unauthorized":
        return (
            f"⚠️ **Worker {name} refused the token**{why}. It is registered, but no job can start there: paste "
            f"the token from the worker's token file above and press **Add worker** again (same URL)."
        )
    if state == "offline":
        return (
            f"⚠️ **Worker {name} does not answer** at `{url}`{why}. It is registered and jobs sent to it wait "
            "until it does: check that the worker runs and that this URL reaches it (firewall, https proxy, SSH "
            "tunnel); its state in the table changes when it answers."
        )
    return f"⚠️ **Worker {name} cannot be used yet**: {worker_state_text(entry)}. It is registered. {use}"


class WorkersActions:
    """The workers panel's callbacks, bound to one TrainingService (its RemoteRunner holds the registry)."""

    def __init__(self, service: TrainingService, locked: str | None = None) -> None:
        self.service = service
        self.locked = locked

    def listing(self) -> list[dict[str, Any]]:
        """Every registered worker with its last known state (no tokens); [] when this host has no runner."""
        try:
            return remote_runner(self.service).workers()
        except TrainManagementError:
            return []

    @read_only
    def refresh(self, current: str | None = None) -> tuple[Any, Any]:
        """(state table, worker choices for Remove)."""
        import pandas as pd

        workers = self.listing()
        table = pd.DataFrame([worker_row(w) for w in workers], columns=WORKER_HEADERS)
        return table, dropdown([w["name"] for w in workers], current)

    def add(self, url: str, token: str, name: str) -> tuple[str, str]:
        """Register a worker (or give a known one a new URL or token); (message, emptied token field)."""
        if self.locked:
            return f"❌ {self.locked}", ""
        if not (url or "").strip():
            return "Enter the URL the worker printed (e.g. `http://gpu-box:7870`) and its token.", ""
        try:
            entry = add_worker(self.service, url, token or "", (name or "").strip() or None)
        except TrainManagementError as exc:
            return "❌ **The worker was not added.**\n\n" + error_markdown(exc), ""
        text = added_markdown(entry)
        if entry.get("warning"):  # the registry's own warning (e.g. a token sent over plain http)
            text += f"\n\n⚠️ {entry['warning']}"
        return text, ""

    def remove(self, name: str | None) -> str:
        """Forget a worker (refused while it runs jobs of this host)."""
        if self.locked:
            return f"❌ {self.locked}"
        if not name:
            return "Choose the worker to remove."
        try:
            remove_worker(self.service, name)
        except TrainManagementError as exc:
            return "❌ **The worker was not removed.**\n\n" + error_markdown(exc)
        return f"Removed worker **{name}**: it is no longer a Training Instance Type."
