"""The tab's thumbnails (dataset images, job samples): one decoder, and a cache that decodes a file again only when
its size or modification time changed. No gradio here."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from kohya_backend.data.images import BadImageError, open_image, to_rgb, upright_image

DEFAULT_MAX_ENTRIES = 160


def thumbnail(path: Path, size: int) -> Any:
    """The image upright (EXIF) and RGB, at most `size` px on its long side; BadImageError when unreadable, as
    the dataset scan judges it (data/images.py opens and decodes it).

    JPEGs are decoded at a reduced scale (Pillow's draft), so a large photo costs a fraction of a full decode.
    """
    with open_image(path) as image:
        image.draft("RGB", (size, size))
        upright = upright_image(image, path)
    if upright.mode.startswith("I") or upright.mode == "F":
        upright = to_rgb(upright)
    upright.thumbnail((size, size))
    return to_rgb(upright)


class ThumbnailCache:
    """Thumbnails of `size` px kept by path with the file's (size, mtime_ns), least recently used dropped first."""

    def __init__(self, size: int, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.size = size
        self.max_entries = max_entries
        self._items: OrderedDict[str, tuple[tuple[int, int], Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path) -> Any:
        """The thumbnail of `path`, decoded only when the file is new or changed; None when it cannot be read (yet)."""
        try:
            stat = Path(path).stat()
        except OSError:
            return None
        key, stamp = str(path), (stat.st_size, stat.st_mtime_ns)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None and hit[0] == stamp:
                self._items.move_to_end(key)
                return hit[1]
        try:
            image = thumbnail(Path(path), self.size)
        except BadImageError:
            return None  # not kept: a file still being written is read again next time
        with self._lock:
            self._items[key] = (stamp, image)
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)
        return image
