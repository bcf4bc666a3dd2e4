"""Mirrors modules/sd_models.py: the checkpoint folder, the checkpoint list and unloading the model.

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
        root = os.path.abspath(shared.cmd_opts.ckpt_dir or model_path)
        self.name = os.path.relpath(os.path.abspath(filename), root).replace(os.sep, "/")
        self.model_name = os.path.splitext(self.name.replace("/", "_"))[0]
        self.title = self.name
        self.is_safetensors = filename.lower().endswith(".safetensors")


def list_models():
    checkpoints_list.clear()
    root = shared.cmd_opts.ckpt_dir or model_path
    for folder, _dirs, files in os.walk(root):
        for name in sorted(files):
            if name.lower().endswith((".ckpt", ".safetensors")):
                info = CheckpointInfo(os.path.join(folder, name))
                checkpoints_list[info.title] = info


def unload_model_weights(sd_model=None, info=None):
    if importlib.util.find_spec("modules_forge") is not None:
        return None  # Forge's own function does nothing
    unloaded.append(shared.sd_model)
    shared.sd_model = None
    return sd_model
