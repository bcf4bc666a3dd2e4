"""Mirrors modules/script_loading.py: every scripts/*.py and preload.py is executed as a fresh module object
named after its file (e.g. 'train_management.py'), never registered in sys.modules."""

import importlib.util
import os
import traceback

reported = []


def load_module(path):
    module_spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def preload_extensions(extension_dirs, parser):
    """preload(parser) of each extension folder's preload.py, without touching sys.path (as in the WebUI)."""
    for folder in extension_dirs:
        preload_script = os.path.join(folder, "preload.py")
        if not os.path.isfile(preload_script):
            continue
        try:
            module = load_module(preload_script)
            if hasattr(module, "preload"):
                module.preload(parser)
        except Exception:
            reported.append(traceback.format_exc())
            print(f"Error running preload() for {preload_script}\n{reported[-1]}")
