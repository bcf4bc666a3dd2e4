"""Values of one open page kept on the server (gradio 4.x): the selected job, the dataset tasks' tickets, what the
page shows. Events that run without the user then need no inputs (see compat.SESSION_KEYED). No gradio here."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

MAX_PAGES = 256  # open pages remembered; the oldest is forgotten first


class PageSessions:
    """A small LRU map: page session hash -> {name: value}."""

    def __init__(self, max_pages: int = MAX_PAGES) -> None:
        self.max_pages = max_pages
        self._pages: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def value(self, session: str | None, name: str, given: Any = None) -> Any:
        """The page's value of `name` (None when unset); without a session (gradio 3.41) the value the event
        gave as an input."""
        if session is None:
            return given
        with self._lock:
            page = self._pages.get(session)
            if page is not None:
                self._pages.move_to_end(session)
            return None if page is None else page.get(name)

    def put(self, session: str | None, **values: Any) -> None:
        """Remember values of a page (nothing without a session: 3.41 keeps them in the page's State)."""
        if session is None:
            return
        with self._lock:
            page = self._pages.pop(session, None) or {}
            page.update(values)
            self._pages[session] = page
            while len(self._pages) > self.max_pages:
                self._pages.popitem(last=False)
