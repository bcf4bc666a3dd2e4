"""Mirrors modules/script_callbacks.py (the callbacks the adapter registers, with the WebUI's signatures).

- on_ui_tabs(callback): callback() -> list of (gr.Blocks, title, elem_id)
- on_ui_settings(callback): callback() -> None; adds options with shared.opts.add_option
- on_app_started(callback): callback(demo: gr.Blocks | None, app: FastAPI); demo is None with --nowebui
A failing callback is reported and skipped, as in the WebUI; here the report is also kept in `reported`.
"""

import inspect
import os
import traceback
from collections import namedtuple

ScriptCallback = namedtuple("ScriptCallback", ["script", "callback"])
callback_map = {"callbacks_app_started": [], "callbacks_ui_tabs": [], "callbacks_ui_settings": []}
reported = []


def report_exception(callback, job):
    text = f"Error executing callback {job} for {callback.script}\n{traceback.format_exc()}"
    reported.append(text)
    print(text)


def clear_callbacks():
    for callback_list in callback_map.values():
        callback_list.clear()


def add_callback(callbacks, fun, *, name=None):
    stack = [x for x in inspect.stack() if x.filename != __file__]
    filename = stack[0].filename if stack else "unknown file"
    callbacks.append(ScriptCallback(filename, fun))


def on_app_started(callback, *, name=None):
    add_callback(callback_map["callbacks_app_started"], callback, name=name)


def on_ui_tabs(callback, *, name=None):
    add_callback(callback_map["callbacks_ui_tabs"], callback, name=name)


def on_ui_settings(callback, *, name=None):
    add_callback(callback_map["callbacks_ui_settings"], callback, name=name)


def app_started_callback(demo, app):
    for c in callback_map["callbacks_app_started"]:
        try:
            c.callback(demo, app)
        except Exception:
            report_exception(c, "app_started_callback")


def ui_tabs_callback():
    res = []
    for c in callback_map["callbacks_ui_tabs"]:
        try:
            res += c.callback() or []
        except Exception:
            report_exception(c, "ui_tabs_callback")
    return res


def ui_settings_callback():
    for c in callback_map["callbacks_ui_settings"]:
        try:
            c.callback()
        except Exception:
            report_exception(c, "ui_settings_callback")


def registered_scripts():
    """The base names of the files that registered callbacks (for tests)."""
    return sorted({os.path.basename(c.script) for cs in callback_map.values() for c in cs})
