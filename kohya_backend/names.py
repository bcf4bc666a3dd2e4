"""File and folder names that every system the extension runs on can hold; Windows is the strictest.

A name Windows refuses (reserved device names such as CON or LPT1, with or without an extension; a trailing dot or
space, which Windows silently drops; any of <>:"/\\|? * or a control character) is refused everywhere, with the
reason, before anything is written: a dataset or LoRA made on Linux keeps working when copied to a Windows WebUI.
"""

from __future__ import annotations

import re

# Device names Windows reserves in every folder (also followed by an extension: "aux.png" is the AUX device).
WINDOWS_RESERVED = frozenset(
    [
        "con", "prn", "aux", "nul", "conin$", "conout$",
        *(f"com{i}" for i in [*range(1, 10), "¹", "²", "³"]),
        *(f"lpt{i}" for i in [*range(1, 10), "¹", "²", "³"]),
    ]
)  # fmt: skip
FORBIDDEN = re.compile(r'[<>:"/\\|?*\x00-\x1f]')


def windows_name_problem(name: str) -> str | None:
    """Why `name` cannot be one file or folder name on Windows (a phrase to follow the name), or None."""
    if not name or name in (".", ".."):
        return "is empty, '.' or '..'"
    bad = sorted(set(FORBIDDEN.findall(name)))
    if bad:
        shown = " ".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in bad)
        return f"contains characters file names may not hold ({shown})"
    if name[-1] in ". ":
        return "ends with a dot or a space, which Windows drops from file names"
    stem = name.split(".")[0].rstrip(" ").lower()
    if stem in WINDOWS_RESERVED:
        return f"is {stem.upper()}, a device name Windows reserves (also with an extension)"
    return None
