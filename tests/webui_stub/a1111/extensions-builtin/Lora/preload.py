"""Mirrors extensions-builtin/Lora/preload.py: the built-in Lora extension adds --lora-dir."""

import os

from modules import paths_internal


def preload(parser):
    parser.add_argument(
        "--lora-dir",
        type=str,
        help="Path to directory with Lora networks.",
        default=os.path.join(paths_internal.models_path, "Lora"),
    )
