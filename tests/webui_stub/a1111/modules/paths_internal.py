"""Mirrors modules/paths_internal.py: the WebUI's root, data and models folders.

The real module derives data_path from --data-dir at import; here shared_init.initialize() sets them.
"""

import os

script_path = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
data_path = script_path
models_path = os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
extensions_builtin_dir = os.path.join(script_path, "extensions-builtin")


def configure(data_dir):
    """Point data_path and models_path at `data_dir` (what --data-dir does in the real WebUI)."""
    global data_path, models_path, extensions_dir
    data_path = os.path.abspath(data_dir)
    models_path = os.path.join(data_path, "models")
    extensions_dir = os.path.join(data_path, "extensions")
