"""Mirrors webui.py: start (initialize, load scripts, create the UI, launch, app_started), "Reload UI", stop.

    ui = WebUI(argv, extension_dirs, data_dir); ui.start(); ... ui.reload(); ... ui.stop()

With --nowebui the app is a plain FastAPI app served by uvicorn and app_started gets demo=None, as in the real
api_only(). Servers bind 127.0.0.1 on a free port; `url` is the root URL.
"""

import os
import socket
import threading
import time

from modules import script_callbacks, scripts, shared, shared_init, ui

BUILTIN_LORA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "extensions-builtin", "Lora")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _setup_cors(app):
    """initialize_util.configure_cors_middleware: the WebUI's CORS, outermost, then the stack is rebuilt."""
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware

    options = {"allow_methods": ["*"], "allow_headers": ["*"], "allow_credentials": True}
    if shared.cmd_opts.cors_allow_origins:
        options["allow_origins"] = shared.cmd_opts.cors_allow_origins.split(",")
    if shared.cmd_opts.cors_allow_origins_regex:
        options["allow_origin_regex"] = shared.cmd_opts.cors_allow_origins_regex
    app.user_middleware.insert(0, Middleware(CORSMiddleware, **options))
    app.middleware_stack = None  # built again, from the list, on the next request


class WebUI:
    def __init__(self, argv, extension_dirs, data_dir, *, builtin_lora=True):
        self.argv = list(argv)
        self.extension_dirs = ([BUILTIN_LORA] if builtin_lora else []) + [str(d) for d in extension_dirs]
        self.data_dir = str(data_dir)
        self.demo = None
        self.app = None
        self.url = None
        self._server = None

    def start(self):
        shared_init.initialize(self.argv, self.extension_dirs, self.data_dir)
        scripts.load_scripts(self.extension_dirs)
        self._launch()
        return self

    def reload(self):
        """What "Reload UI" does: close the server, execute the scripts again, new UI and app, app_started."""
        self._close()
        scripts.load_scripts(self.extension_dirs)
        self._launch()
        return self

    def stop(self):
        self._close()

    def _launch(self):
        port = free_port()
        if shared.cmd_opts.nowebui:
            self._serve_api_only(port)
            script_callbacks.app_started_callback(None, self.app)
            return
        shared.demo = self.demo = ui.create_ui()
        ui.reload_javascript(self.extension_dirs)
        self.demo.queue()
        self.app, _local_url, _share = self.demo.launch(
            prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True
        )
        self.url = f"http://127.0.0.1:{port}"
        # As webui.py: gradio's own CORSMiddleware (every origin on 3.41) goes, the WebUI's CORS for the origins
        # of --cors-allow-origins(-regex) comes (initialize_util.setup_middleware). gradio 4's
        # CustomCORSMiddleware has another class name and stays, as in Forge.
        self.app.user_middleware = [x for x in self.app.user_middleware if x.cls.__name__ != "CORSMiddleware"]
        _setup_cors(self.app)
        script_callbacks.app_started_callback(self.demo, self.app)

    def _serve_api_only(self, port):
        import uvicorn
        from fastapi import FastAPI

        self.app = FastAPI()
        config = uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning")
        self._server = uvicorn.Server(config)
        threading.Thread(target=self._server.run, daemon=True).start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port}"

    def _close(self):
        if self.demo is not None:
            server = getattr(self.demo, "server", None)
            if server is not None:
                server.force_exit = True  # do not wait for browsers' open queue connections
            self.demo.close()
            self.demo = None
        if self._server is not None:
            self._server.should_exit = True
            self._server = None
