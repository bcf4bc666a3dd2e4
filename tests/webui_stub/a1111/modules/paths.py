"""Mirrors modules/paths.py, which re-exports the folders of paths_internal (read through attributes here,
because shared_init.initialize() sets them after import)."""

from modules import paths_internal


def __getattr__(name):
    return getattr(paths_internal, name)
