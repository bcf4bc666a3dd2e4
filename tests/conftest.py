"""Shared test setup: offline hub, deterministic threads."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Trainers started by tests remember model hashes here, not in the user's cache folder.
os.environ.setdefault(
    "TRAIN_MANAGEMENT_HASH_CACHE", os.path.join(tempfile.mkdtemp(prefix="tm-hashes-"), "sha256.json")
)
