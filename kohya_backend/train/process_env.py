"""Where this process stands in a data-parallel run, as its launcher told it through the environment (RANK,
WORLD_SIZE, LOCAL_RANK: this project's launcher, torchrun and accelerate launch all set them), and the variables the
project's launcher adds. Torch-free: the launcher and the command line read it before torch is imported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from kohya_backend.errors import TrainManagementError

LOOPBACK = "127.0.0.1"
# Set by the launcher on rank 0 only: the file descriptor of the listening loopback socket its TCPStore serves on.
STORE_FD_ENV = "TRAIN_MANAGEMENT_STORE_FD"
# Set by the launcher on every rank where it can hand rank 0 its socket (POSIX): the workers rendezvous on it.
# Without it (Windows, torchrun, accelerate launch) they use env:// and rank 0's store binds MASTER_PORT itself.
LAUNCHED_ENV = "TRAIN_MANAGEMENT_LAUNCHED"


@dataclass(frozen=True)
class ProcessInfo:
    """This process's place in a data-parallel run: rank, number of processes, and its index on this machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that saves, samples and reports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether other processes train with this one."""
        return self.world_size > 1


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    text = environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise TrainManagementError(
            f"{name}={text!r} is not a whole number",
            "start several training processes with `train --num-processes N` or `accelerate launch "
            "--num_processes N -m kohya_backend train ...`, which set it",
        ) from None


def process_info(environ: Mapping[str, str] | None = None) -> ProcessInfo:
    """RANK, WORLD_SIZE and LOCAL_RANK as a launcher (this one, torchrun, accelerate launch) sets them; one
    process (rank 0 of 1) when they are unset."""
    env = os.environ if environ is None else environ
    world = _env_int(env, "WORLD_SIZE", 1)
    rank = _env_int(env, "RANK", 0)
    local = _env_int(env, "LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or not 0 <= local < world:
        raise TrainManagementError(
            f"RANK={rank}, LOCAL_RANK={local}, WORLD_SIZE={world} do not describe a process of a run",
            "RANK and LOCAL_RANK go from 0 to WORLD_SIZE - 1; let the launcher set them",
        )
    return ProcessInfo(rank, world, local)
