"""Remote GPU workers named on the WebUI's command line (--train-worker URL ... --train-worker-token-file FILE)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kohya_backend.errors import TrainManagementError


def register_flag_workers(home_root: Path, urls: Sequence[str] | None, token_file: str | None) -> list[str]:
    """Register each --train-worker URL in the home's worker registry (idempotent); messages for the refused ones
    and warnings (a token over plain http to another machine).

    They then appear as Training Instance Types next to this machine, like workers added in the tab or the CLI.
    """
    from kohya_backend.jobs.registry import ensure_worker

    problems = []
    for url in urls or []:
        try:
            entry = ensure_worker(Path(home_root), url, token_file=Path(token_file) if token_file else None)
        except TrainManagementError as exc:
            problems.append(f"Train Management: --train-worker {url} was not added: {exc}")
            continue
        if entry.get("warning"):
            problems.append(f"Train Management: --train-worker {url}: {entry['warning']}")
    return problems
