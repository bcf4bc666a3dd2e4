"""Mirrors extensions-builtin/Lora/networks.py: the Lora list the cards show, rebuilt by list_available_networks()
from --lora-dir (imported by scripts/lora_script.py, so it sits in sys.modules as 'networks')."""

import os

from modules import shared

available_networks = {}
refreshes = []


def list_available_networks():
    available_networks.clear()
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
    for folder, _dirs, files in os.walk(shared.cmd_opts.lora_dir):
        for name in files:
            if name.lower().endswith((".pt", ".ckpt", ".safetensors")):
                available_networks[os.path.splitext(name)[0]] = os.path.join(folder, name)
    refreshes.append(sorted(available_networks))


list_available_networks()
