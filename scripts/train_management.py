"""Train Management's WebUI adapter (AUTOMATIC1111 1.10 and Forge): the tab, its settings and its REST API.

Thin by design: it looks up the WebUI's objects (folders, checkpoint and Lora folders, interrogator, queue lock,
model unloading, Lora list refresh) and hands them to kohya_backend.host, where the logic lives and is tested
without a WebUI. The WebUI executes this file again on every "Reload UI"; kohya_backend.host.runtime keeps the
services, and the one scheduler thread, for the life of the process. Nothing heavy is imported at load time.
On a WebUI reachable from the network it follows the WebUI's disable_extension_access rule
(kohya_backend/host/exposure.py): no REST API without credentials, no worker changes in the tab without a login.
"""

import importlib.util
import logging
import os
import sys
from pathlib import Path

from modules import script_callbacks

# Imported now, while the WebUI has this extension's folder on sys.path (only during loading): the callbacks
# below run later and find kohya_backend's submodules through the already imported package.
import kohya_backend  # noqa: F401

log = logging.getLogger("train_management")

TITLE = "Train Management"


def _cmd(name):
    """A WebUI command-line option (None when this WebUI or its extensions do not define it)."""
    from modules import shared

    return getattr(shared.cmd_opts, name, None)


def _settings():
    from modules import shared

    from kohya_backend.host.settings import HostSettings

    return HostSettings.from_values(getattr(shared.opts, "data", None) or {})


def _is_forge():
    return importlib.util.find_spec("modules_forge") is not None


def _queue_lock():
    """The WebUI's lock around GPU work (generation, interrogation)."""
    try:
        from modules.call_queue import queue_lock
    except ImportError:
        return None
    return queue_lock


def _unload_model():
    """Free the GPU memory of the WebUI's model; its next generation loads it again."""
    if _is_forge():
        from backend import memory_management

        memory_management.unload_all_models()
        memory_management.soft_empty_cache()
    else:
        from modules import sd_models

        sd_models.unload_model_weights()


def _folders():
    """(home, checkpoint folders, Lora folder) from the flags, the settings and the WebUI's paths."""
    from modules import paths, sd_models

    from kohya_backend.host.settings import home_folder, lora_folder

    settings = _settings()
    data_path = Path(getattr(paths, "data_path", None) or paths.script_path)
    home = home_folder(_cmd("train_home"), settings.home, data_path)
    # The WebUI lists --ckpt-dir and models/Stable-diffusion (modelloader.load_models(model_path, command_path)).
    checkpoints = tuple(Path(p) for p in (_cmd("ckpt_dir"), sd_models.model_path) if p)
    lora_root = Path(_cmd("lora_dir") or os.path.join(paths.models_path, "Lora"))
    return home, checkpoints, lora_folder(lora_root, settings.lora_subfolder)


def _trainer_python():
    from kohya_backend.host.trainer_env import trainer_python

    return trainer_python(_cmd("train_python"))


def _service():
    """The process's TrainingService for the current flags and settings (built once, see HostRuntime)."""
    from kohya_backend.host import hooks
    from kohya_backend.host.runtime import RUNTIME, HostConfig, detected_gpus

    home, checkpoints, lora = _folders()
    settings = _settings()
    python, _problem = _trainer_python()
    config = HostConfig(
        home=home,
        models_dirs=checkpoints,
        lora_dir=lora,
        python=tuple(python) if python else None,
        gpus=detected_gpus(),
        per_device=settings.concurrency,
        keep_epochs=settings.keep_epochs,
        stall_after_s=settings.stall_minutes * 60.0,
        s3_prefix=settings.s3_prefix,
        sagemaker_role_arn=settings.sagemaker_role_arn,
        sagemaker_image_uri=settings.sagemaker_image_uri,
    )
    hint = hooks.trainer_hint(bool(_cmd("skip_install")))
    before_start = hooks.chain(
        hooks.use_trainer(_trainer_python, RUNTIME.set_python, hint),
        hooks.unload_before_start(lambda: _settings().unload_model, _unload_model, _queue_lock()),
    )
    return RUNTIME.ensure(
        config,
        on_delivered=hooks.refresh_loras(lambda: sys.modules.get("networks")),
        before_local_start=before_start,
        local_problem=hooks.trainer_problem(_trainer_python, hint),
    )


def _access_disabled():
    """AUTOMATIC1111's rule: reachable from the network without --enable-insecure-extension-access."""
    from modules import shared

    from kohya_backend.host.exposure import extension_access_disabled

    return extension_access_disabled(shared.cmd_opts)


def on_ui_tabs():
    from modules import shared

    from kohya_backend.host import hooks
    from kohya_backend.host.exposure import webui_policy, workers_refusal
    from kohya_backend.host.runtime import RUNTIME
    from kohya_backend.ui.hooks import UiHooks
    from kohya_backend.ui.tab import ELEM_ID, create_tab

    service = _service()
    interrogate = hooks.interrogate_hook(getattr(shared, "interrogator", None), _queue_lock())
    login = bool(_cmd("gradio_auth") or _cmd("gradio_auth_path"))
    locked = workers_refusal(_access_disabled(), login, service.home.root)
    origins, _problems = webui_policy(shared.cmd_opts)  # the problems are printed once, by on_app_started
    hooks = UiHooks(interrogate=interrogate, workers_locked=locked, send_to_txt2img=True, origins=origins)
    blocks = create_tab(service, RUNTIME.datasets, hooks)
    return [(blocks, TITLE, ELEM_ID)]


def _apply_settings():
    """Settings that apply at once (jobs at once, keep epochs) go to the running scheduler."""
    from kohya_backend.host.runtime import RUNTIME

    if RUNTIME.service is not None:
        _service()


def on_ui_settings():
    import gradio as gr
    from modules import shared

    from kohya_backend.host.settings import SECTION_CATEGORY, SECTION_ID, SECTION_LABEL, SETTINGS

    widgets = {"text": gr.Textbox, "checkbox": gr.Checkbox, "slider": gr.Slider}
    section = (SECTION_ID, SECTION_LABEL, SECTION_CATEGORY)
    for spec in SETTINGS:
        option = shared.OptionInfo(
            spec.default,
            spec.label,
            widgets[spec.kind],
            dict(spec.component_args) or None,
            onchange=None if spec.reload else _apply_settings,
        )
        if spec.info:
            option = option.info(spec.info)
        if spec.reload:
            option = option.needs_reload_ui()
        shared.opts.add_option(spec.key, shared.options_section(section, {spec.key: option})[spec.key])


def on_app_started(demo, app):
    from modules import shared

    from kohya_backend.host.auth import webui_credentials
    from kohya_backend.host.exposure import api_refusal, webui_policy
    from kohya_backend.host.mount import mount_api
    from kohya_backend.host.runtime import RUNTIME
    from kohya_backend.host.workers import register_flag_workers
    from kohya_backend.service.api import API_PREFIX

    service = _service()
    users = webui_credentials(_cmd("api_auth"), _cmd("gradio_auth"), _cmd("gradio_auth_path"))
    closed = api_refusal(_access_disabled(), bool(users), API_PREFIX)
    policy, problems = webui_policy(shared.cmd_opts)  # also the tab's (on_ui_tabs)
    for problem in problems:
        print(problem, file=sys.stderr)
    if closed:
        print(closed, file=sys.stderr)
    else:
        mount_api(app, service, users, policy)
    if RUNTIME.start():
        problem = service.local_problem() if service.local_problem else None
        if problem:
            print(f"Train Management: local training is unavailable: {problem}", file=sys.stderr)
    for problem in register_flag_workers(
        service.home.root, _cmd("train_worker"), _cmd("train_worker_token_file")
    ):
        print(problem, file=sys.stderr)


script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_app_started(on_app_started)
