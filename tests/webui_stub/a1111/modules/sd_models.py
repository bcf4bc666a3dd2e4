"""Mirrors modules/sd_models.py: the checkpoint folders, the checkpoint list and unloading the model.

list_models() lists --ckpt-dir (when it exists) and then models/Stable-diffusion, each file once, as
modelloader.load_models(model_path=model_path, command_path=cmd_opts.ckpt_dir) does in AUTOMATIC1111 1.10 and
Forge; CheckpointInfo.name is the path relative to the folder the file lies in (--ckpt-dir checked first).
AUTOMATIC1111 1.10's unload_model_weights() moves the model to the CPU and forgets it (recorded in `unloaded`);
Forge's is a no-op (`pass`), its models are unloaded through backend.memory_management instead.
"""

import importlib.util
import os

from modules import paths_internal, shared

model_dir = "Stable-diffusion"
model_path = None
checkpoints_list = {}
unloaded = []


def configure():
    global model_path
    model_path = os.path.abspath(os.path.join(paths_internal.models_path, model_dir))
    os.makedirs(model_path, exist_ok=True)


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        abspath = os.path.abspath(filename)
        ckpt_dir = shared.cmd_opts.ckpt_dir
        abs_ckpt_dir = os.path.abspath(ckpt_dir) if ckpt_dir is not None else None
        if abs_ckpt_dir and abspath.startswith(abs_ckpt_dir):
            name = abspath.replace(abs_ckpt_dir, "")
        elif abspath.startswith(model_path):
            name = abspath.replace(model_path, "")
        else:
            name = os.path.basename(filename)
        self.name = name.lstrip("\\/").replace(os.sep, "/")
        self.model_name = os.path.splitext(self.name.replace("/", "_"))[0]
        self.title = self.name
        self.is_safetensors = filename.lower().endswith(".safetensors")


def _load_models(command_path):
    """modelloader.load_models: the command-line folder first (when it exists), then model_path; files once."""
    places = []
    if command_path is not None and command_path != model_path and os.path.exists(command_path):
        places.append(command_path)
    places.append(model_path)
    output = []
    for place in places:
        for folder, _dirs, files in os.walk(place):
            for name in sorted(files):
                full_path = os.path.abspath(os.path.join(folder, name))
                if name.lower().endswith((".ckpt", ".safetensors")) and full_path not in output:
                    output.append(full_path)
    return output


def list_models():
    checkpoints_list.clear()
    for filename in _load_models(shared.cmd_opts.ckpt_dir):
        info = CheckpointInfo(filename)
        checkpoints_list[info.title] = info


def unload_model_weights(sd_model=None, info=None):
    if importlib.util.find_spec("modules_forge") is not None:
        return None  # Forge's own function does nothing
    unloaded.append(shared.sd_model)
    shared.sd_model = None
    return sd_model
