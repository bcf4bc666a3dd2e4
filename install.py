"""Train Management's installer hook, run by the WebUI in a subprocess at every start (unless --skip-install).

It installs only what is missing: a few light packages into the WebUI's venv (never changing one the WebUI has),
and the trainer's packages into the trainer's own environment (.venv-trainer/). The logic and its reasons are in
kohya_backend/host/install.py; this file's folder is on sys.path because Python runs it as a script.
"""

from kohya_backend.host.install import main

if __name__ == "__main__":
    raise SystemExit(main())
