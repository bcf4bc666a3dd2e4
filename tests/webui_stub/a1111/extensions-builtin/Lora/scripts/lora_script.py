"""Mirrors extensions-builtin/Lora/scripts/lora_script.py as far as the adapter cares: it imports `networks`."""

import networks  # noqa: F401
