"""Train Management's command-line flags, added to the WebUI's parser before it parses (preload(parser)).

The WebUI loads this file without putting the extension's folder on sys.path, so it is put there just long
enough to import the flag definitions (kohya_backend/host/flags.py, shared with install.py).
"""

import os
import sys


def preload(parser):
    """Add --train-home, --train-worker, --train-worker-token-file and --train-python."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    try:
        from kohya_backend.host.flags import add_flags
    finally:
        sys.path.remove(here)
    add_flags(parser)
