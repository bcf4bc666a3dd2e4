"""Mirrors modules/ui.py create_ui() and ui_gradio_extensions.reload_javascript() for what extensions see.

create_ui: settings callbacks first (ui_settings.UiSettings.register_settings), then each on_ui_tabs Blocks is
rendered in its own gr.TabItem(title, id=elem_id, elem_id=f"tab_{elem_id}"), plus the prompt boxes
(`#txt2img_prompt`, `#img2img_prompt`) and the hidden Lora refresh buttons of txt2img/img2img
(`#txt2img_lora_extra_refresh_internal`; clicks are counted in `lora_refreshes`).
reload_javascript: the page's <head> gets script.js then every extension's javascript/*.js, and its <body> every
extension's style.css, by wrapping gradio's TemplateResponse as the WebUI does (inlined here instead of served
through /file=).
"""

import os

import gradio as gr

from modules import paths_internal, script_callbacks

lora_refreshes = []
_original_template_response = None


def create_ui():
    script_callbacks.ui_settings_callback()
    interfaces = script_callbacks.ui_tabs_callback()
    with gr.Blocks(analytics_enabled=False, title="Stable Diffusion") as demo, gr.Tabs(elem_id="tabs"):
        for tab in ("txt2img", "img2img"):
            with gr.TabItem(tab, id=tab, elem_id=f"tab_{tab}"):
                gr.Textbox(label="Prompt", lines=3, elem_id=f"{tab}_prompt")
                button = gr.Button("refresh", visible=False, elem_id=f"{tab}_lora_extra_refresh_internal")
                button.click(fn=lambda tab=tab: lora_refreshes.append(tab), inputs=[], outputs=[])
        for interface, label, ifid in interfaces:
            with gr.TabItem(label, id=ifid, elem_id=f"tab_{ifid}"):
                interface.render()
    return demo


def _scripts_and_styles(extension_dirs):
    head = [f"<script>{_read(os.path.join(paths_internal.script_path, 'javascript', 'script.js'))}</script>"]
    body = []
    for folder in extension_dirs:
        js_dir = os.path.join(folder, "javascript")
        if os.path.isdir(js_dir):
            for name in sorted(os.listdir(js_dir)):
                if name.endswith(".js"):
                    head.append(f"<script>{_read(os.path.join(js_dir, name))}</script>")
        css = os.path.join(folder, "style.css")
        if os.path.isfile(css):
            body.append(f"<style>{_read(css)}</style>")
    return "".join(head), "".join(body)


def _read(path):
    with open(path, encoding="utf8") as file:
        return file.read()


def reload_javascript(extension_dirs):
    global _original_template_response
    head, body = _scripts_and_styles(extension_dirs)
    if _original_template_response is None:
        _original_template_response = gr.routes.templates.TemplateResponse

    def template_response(*args, **kwargs):
        res = _original_template_response(*args, **kwargs)
        res.body = res.body.replace(b"</head>", f"{head}</head>".encode())
        res.body = res.body.replace(b"</body>", f"{body}</body>".encode())
        res.init_headers()
        return res

    gr.routes.templates.TemplateResponse = template_response
