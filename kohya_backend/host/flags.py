"""The extension's command-line flags: added to the WebUI's parser by preload.py, re-read by install.py.

install.py runs in a subprocess that never sees the WebUI's parsed arguments; launch.py adds the words of
COMMANDLINE_ARGS to its own command line, so install.py reads the flags from there (and from its own argv).
"""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Mapping, Sequence

PYTHON_ENV = "TRAIN_MANAGEMENT_PYTHON"
COMMANDLINE_ENV = "COMMANDLINE_ARGS"


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add --train-home, --train-worker (repeatable), --train-worker-token-file, --train-allowed-hosts and
    --train-python."""
    parser.add_argument(
        "--train-home",
        type=str,
        default=None,
        metavar="DIR",
        help="Train Management: home folder for datasets, jobs and the job database (overrides the setting)",
    )
    parser.add_argument(
        "--train-worker",
        action="append",
        default=None,
        metavar="URL",
        help="Train Management: URL of a remote GPU worker (python -m kohya_backend worker); repeat for several",
    )
    parser.add_argument(
        "--train-worker-token-file",
        type=str,
        default=None,
        metavar="FILE",
        help="Train Management: file holding the bearer token of the remote workers",
    )
    parser.add_argument(
        "--train-allowed-hosts",
        action="append",
        default=None,
        metavar="NAMES",
        help="Train Management: more host names its REST API answers to (comma-separated, e.g. a reverse proxy's; "
        "'*' for any); loopback names and, with --listen, this machine's names and addresses always count",
    )
    parser.add_argument(
        "--train-python",
        type=str,
        default=None,
        metavar="PATH",
        help=f"Train Management: Python interpreter that runs the trainer (default: the extension's own "
        f"environment set up by install.py; also {PYTHON_ENV})",
    )


def launch_argv(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> list[str]:
    """The WebUI's command line as launch.py builds it: `argv` plus the words of COMMANDLINE_ARGS."""
    env = os.environ if environ is None else environ
    return [*argv, *shlex.split(env.get(COMMANDLINE_ENV, ""))]


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
    """Only this extension's flags out of a full WebUI command line (every other word is ignored)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_flags(parser)
    flags, _unknown = parser.parse_known_args(list(argv))
    return flags
