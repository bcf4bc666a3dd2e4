"""Mirrors launch.py's helpers for an extension's install.py (AUTOMATIC1111 1.10 launch_utils):
is_installed(package), run_pip(command, desc) ("python -m pip {command} --prefer-binary" through the shell,
honouring INDEX_URL, skipped with --skip-install; raises RuntimeError with pip's output when it fails)."""

import importlib.metadata
import importlib.util
import os
import subprocess
import sys

python = sys.executable
index_url = os.environ.get("INDEX_URL", "")
skip_install = "--skip-install" in sys.argv


def is_installed(package):
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        try:
            return importlib.util.find_spec(package) is not None
        except ModuleNotFoundError:
            return False
    return True


def run(command, desc=None, errdesc=None):
    if desc is not None:
        print(desc)
    result = subprocess.run(command, shell=True, capture_output=True, encoding="utf8", errors="ignore")
    if result.returncode != 0:
        raise RuntimeError(
            f"{errdesc or 'Error running command'}.\nCommand: {command}\n"
            f"Error code: {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
        )
    return result.stdout


def run_pip(command, desc=None, live=False):
    if skip_install:
        return None
    index_url_line = f" --index-url {index_url}" if index_url != "" else ""
    return run(
        f'"{python}" -m pip {command} --prefer-binary{index_url_line}',
        desc=f"Installing {desc}",
        errdesc=f"Couldn't install {desc}",
    )
