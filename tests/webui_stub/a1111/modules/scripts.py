"""Mirrors modules/scripts.py load_scripts(): the loading rules of scripts/*.py.

Callbacks are cleared first; then, built-in extensions before the others and files sorted by name, each file is
executed with its extension's folder prepended to sys.path for the time of its execution only. An exception is
reported ("Error loading script") and the next file is loaded.
"""

import os
import sys
import traceback

from modules import script_callbacks, script_loading

loaded = []
reported = []


def list_scripts(extension_dirs):
    found = []
    for folder in extension_dirs:
        basedir = os.path.join(folder, "scripts")
        if os.path.isdir(basedir):
            for filename in sorted(os.listdir(basedir)):
                path = os.path.join(basedir, filename)
                if os.path.splitext(path)[1].lower() == ".py" and os.path.isfile(path):
                    found.append((folder, path))
    return found


def load_scripts(extension_dirs):
    script_callbacks.clear_callbacks()
    loaded.clear()
    syspath = sys.path
    for basedir, path in list_scripts(extension_dirs):
        try:
            sys.path = [basedir, *sys.path]
            loaded.append(script_loading.load_module(path))
        except Exception:
            reported.append(traceback.format_exc())
            print(f"Error loading script: {os.path.basename(path)}\n{reported[-1]}", file=sys.stderr)
        finally:
            sys.path = syspath
