"""Mirrors Forge's backend/memory_management.py: unload_all_models() moves every loaded model off the GPU,
soft_empty_cache() returns the freed memory to the driver. Calls are recorded in `calls`."""

calls = []


def unload_all_models():
    calls.append("unload_all_models")


def soft_empty_cache(force=False):
    calls.append("soft_empty_cache")
