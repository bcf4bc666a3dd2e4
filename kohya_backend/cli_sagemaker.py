"""`python -m kohya_backend sagemaker train` (the container's entrypoint on SageMaker's /opt/ml contract) and
`sagemaker instance-types` (the GPU types jobs may train on).

Kept apart from cli.py so each stays small; cli.py adds these parsers with add_sagemaker_parsers().
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kohya_backend.jobs.sagemaker_protocol import DEFAULT_ROOT


def _cmd_train(args: argparse.Namespace) -> int:
    from kohya_backend.jobs.sagemaker_container import run_container

    return run_container(Path(args.root))


def _cmd_instance_types(args: argparse.Namespace) -> int:
    from kohya_backend.jobs.sagemaker_catalog import choices

    entries = [choice.entry() for choice in choices()]
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    for entry in entries:
        print(f"{entry['name']:<34} {entry['label']}")
    return 0


def add_sagemaker_parsers(sub: Any) -> None:
    """Add `sagemaker train` and `sagemaker instance-types` to the top-level subparsers."""
    sagemaker = sub.add_parser(
        "sagemaker", help="train inside a SageMaker training job (the container's side)"
    )
    commands = sagemaker.add_subparsers(dest="sagemaker_command", required=True)
    train = commands.add_parser(
        "train",
        help="train from SageMaker's /opt/ml tree: channels model, dataset and config (config.toml), "
        "hyperparameters as strings; the LoRA goes to /opt/ml/model",
    )
    train.add_argument(
        "--root",
        default=str(DEFAULT_ROOT),
        help=f"the /opt/ml tree (default {DEFAULT_ROOT}; move it for tests)",
    )
    train.set_defaults(func=_cmd_train)
    types = commands.add_parser("instance-types", help="list the SageMaker GPU instance types jobs may use")
    types.add_argument("--json", action="store_true", help="machine-readable output")
    types.set_defaults(func=_cmd_instance_types)
