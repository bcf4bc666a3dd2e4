"""The pool of registered workers: a background thread asks each for its info, so choosing one never waits.

Each worker is `online` (answering, a slot free), `busy` (answering, every slot taken), `offline` (not answering),
`unauthorized` (the token is refused), `incompatible` (another API version) or `unknown` (not asked yet). The scheduler's tick reads only this cache.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kohya_backend.families import FAMILIES
from kohya_backend.jobs.allocation import gpus_of
from kohya_backend.jobs.registry import WorkerEntry, WorkerRegistry
from kohya_backend.jobs.worker_client import WorkerAuthError, WorkerClient, WorkerError
from kohya_backend.jobs.worker_protocol import WORKER_API_VERSION

log = logging.getLogger(__name__)

DEFAULT_REFRESH_S = 5.0
INFO_TIMEOUT_S = 5.0
# Rough VRAM a LoRA run needs (512 px SD 1.5, 1024 px SDXL with the usual memory savers); a job may ask for more.
MIN_VRAM_GB = {name: family.min_vram_gb for name, family in FAMILIES.items()}


@dataclass
class WorkerState:
    """What the pool last learned about one worker."""

    name: str
    state: str = "unknown"
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    checked_at: float | None = None

    def free_slots(self, own_active: int) -> int:
        """Slots left, counting the worker's own report and the jobs this host sent it (whichever is more)."""
        slots = int(self.info.get("slots") or 1)
        used = int(self.info.get("active_jobs") or 0) + int(self.info.get("queued_jobs") or 0)
        return slots - max(used, own_active)

    def vram_gb(self) -> float | None:
        """The largest GPU memory on the worker in GiB, or None when unknown (no GPU, or not reported)."""
        sizes = [g.get("vram_bytes") for g in self.info.get("gpus") or [] if isinstance(g, dict)]
        known = [s for s in sizes if isinstance(s, (int, float)) and s > 0]
        return max(known) / 2**30 if known else None

    def gpu_count(self) -> int:
        """How many GPUs the worker reported (0: none, it trains on its CPU; or it has not answered yet)."""
        return sum(1 for g in self.info.get("gpus") or [] if isinstance(g, dict))

    def has_gpus_for(self, gpus: int) -> bool:
        """Whether a job asking for `gpus` GPUs fits this worker: it has that many, or has none and runs that many
        processes on its CPU (as this machine would)."""
        count = self.gpu_count()
        return count == 0 or count >= gpus

    def can_take(self, fm_type: str, params: Mapping[str, Any], own_active: int) -> bool:
        """True when the worker answers, has a free slot, enough GPUs for the job, and enough VRAM (or does not
        say)."""
        if self.state not in ("online", "busy") or self.free_slots(own_active) <= 0:
            return False
        if not self.has_gpus_for(gpus_of(params)):
            return False
        vram = self.vram_gb()
        return vram is None or vram >= required_vram_gb(fm_type, params)

    def has_cuda(self) -> bool | None:
        """Whether the worker reported a GPU (None: it has not answered yet)."""
        if not self.info:
            return None
        return any(isinstance(g, dict) for g in self.info.get("gpus") or [])

    def gpu_label(self) -> str:
        """'NVIDIA A100 80GB (80 GB)' or 'CPU' or '?' (not asked yet)."""
        gpus = [g for g in self.info.get("gpus") or [] if isinstance(g, dict)]
        if not gpus:
            return "CPU" if self.info else "?"
        names = []
        for gpu in gpus:
            vram = gpu.get("vram_bytes")
            names.append(f"{gpu.get('name')} ({round(vram / 2**30)} GB)" if vram else str(gpu.get("name")))
        return ", ".join(names)

    def public(self) -> dict[str, Any]:
        """JSON-ready state for listings (no secrets)."""
        return {
            "name": self.name,
            "state": self.state,
            "gpu": self.gpu_label(),
            "vram_gb": self.vram_gb(),
            "free_disk_gb": (self.info["free_disk_bytes"] / 2**30)
            if self.info.get("free_disk_bytes")
            else None,
            "slots": self.info.get("slots"),
            "active_jobs": self.info.get("active_jobs"),
            "queued_jobs": self.info.get("queued_jobs"),
            "error": self.error,
            "checked_at": self.checked_at,
        }


def required_vram_gb(fm_type: str, params: Mapping[str, Any]) -> float:
    """VRAM a job needs: params['min_vram_gb'] when given, else a family's rough minimum."""
    asked = params.get("min_vram_gb")
    if isinstance(asked, (int, float)) and not isinstance(asked, bool) and asked > 0:
        return float(asked)
    return MIN_VRAM_GB.get(fm_type, 0.0)


def check_worker(entry: WorkerEntry, timeout_s: float = INFO_TIMEOUT_S) -> WorkerState:
    """Ask one worker for its info now, over a connection of its own (`workers add` and `workers list`)."""
    with WorkerClient(entry.url, entry.token, read_timeout_s=timeout_s) as client:
        return ask_worker(entry.name, client)


def ask_worker(name: str, client: WorkerClient) -> WorkerState:
    """The state of worker `name` from its answer to GET /info through `client`."""
    state = WorkerState(name, checked_at=time.time())
    try:
        state.info = client.info()
    except WorkerAuthError as exc:
        state.state, state.error = "unauthorized", exc.message
        return state
    except WorkerError as exc:
        state.state, state.error = "offline", exc.message
        return state
    if str(state.info.get("api", "")).split(".")[0] != WORKER_API_VERSION.split(".")[0]:
        state.state = "incompatible"
        state.error = (
            f"worker API {state.info.get('api')!r}, this host speaks {WORKER_API_VERSION}; update both"
        )
        return state
    state.state = "busy" if state.free_slots(0) <= 0 else "online"
    return state


class WorkerPool:
    """Cached states of the registered workers, refreshed every `refresh_s` by a daemon thread started on first use."""

    def __init__(self, registry: WorkerRegistry, *, refresh_s: float = DEFAULT_REFRESH_S) -> None:
        self.registry = registry
        self.refresh_s = refresh_s
        self._states: dict[str, tuple[tuple[str, str], WorkerState]] = {}  # name -> ((url, token), state)
        # One client (connection pool) per worker, kept across rounds: behind a TLS proxy, no handshake per round.
        self._clients: dict[str, tuple[tuple[str, str], WorkerClient]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Runs in the monitor thread after each round (e.g. deleting copies of deleted jobs on workers that answer).
        self.after_refresh: Callable[[dict[str, WorkerState]], None] | None = None

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="train-management-workers", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
                if self.after_refresh is not None:
                    self.after_refresh(self.states())
            except Exception:  # the monitor must outlive a bad registry read; the next round tries again
                log.exception("refreshing the worker states failed")
            self._wake.wait(self.refresh_s)
            self._wake.clear()

    def refresh(self) -> None:
        """Ask every registered worker for its info (one at a time, each with a short timeout)."""
        entries = self.registry.entries()
        self._drop_clients({e.name for e in entries})
        fresh = {e.name: ((e.url, e.token), ask_worker(e.name, self.client(e))) for e in entries}
        with self._lock:
            self._states = fresh

    def client(self, entry: WorkerEntry) -> WorkerClient:
        """The pool's client of `entry` (made on first use, replaced when the worker's URL or token changes)."""
        key = (entry.url, entry.token)
        with self._lock:
            kept = self._clients.get(entry.name)
            if kept is not None and kept[0] == key:
                return kept[1]
            client = WorkerClient(entry.url, entry.token, read_timeout_s=INFO_TIMEOUT_S)
            self._clients[entry.name] = (key, client)
        if kept is not None:
            kept[1].close()
        return client

    def _drop_clients(self, keep: set[str] | None = None) -> None:
        """Close the clients of workers no longer registered (all of them when `keep` is None)."""
        with self._lock:
            dropped = [name for name in self._clients if keep is None or name not in keep]
            closing = [self._clients.pop(name)[1] for name in dropped]
        for client in closing:
            client.close()

    def check_now(self, name: str) -> WorkerState:
        """Ask registered worker `name` now and keep the answer as its state (a worker just added, say)."""
        entry = self.registry.require(name)
        state = ask_worker(entry.name, self.client(entry))
        with self._lock:
            self._states = {**self._states, entry.name: ((entry.url, entry.token), state)}
        return state

    def refresh_soon(self) -> None:
        """Wake the monitor (a worker was added, or a job wants one)."""
        self._ensure_thread()
        self._wake.set()

    def states(self) -> dict[str, WorkerState]:
        """The last known state of every registered worker (`unknown` until asked at its current URL and token)."""
        entries = self.registry.entries()
        if entries:
            self._ensure_thread()
        with self._lock:
            known = dict(self._states)
        out = {}
        for e in entries:
            asked, state = known.get(e.name) or (None, None)
            out[e.name] = state if state is not None and asked == (e.url, e.token) else WorkerState(e.name)
        return out

    def close(self) -> None:
        """Stop the monitor thread and close the workers' clients (made again if the pool is used again)."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(INFO_TIMEOUT_S * 2)
        self._drop_clients()
