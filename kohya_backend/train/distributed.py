"""Data-parallel training: the processes of one run (torch.distributed: gloo on the CPU, NCCL on CUDA GPUs).

Each process trains its share of every global batch (train_batch_size per process, as kohya); gradients of the
trainable network alone are averaged by DistributedDataParallel, so every process holds the same LoRA, optimizer
and schedule. Rank 0 saves, samples and reports; the others meet it at the next collective. One process is the
same object with every collective a no-op, so the loop reads the same either way.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kohya_backend.errors import TrainingError
from kohya_backend.train.process_env import LAUNCHED_ENV, LOOPBACK, STORE_FD_ENV, ProcessInfo

# Rank 0 alone samples and renders the epoch grid while the others wait at their next collective: minutes.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


class _StepForward(nn.Module):
    """The trainable network as DDP's module. Its forward runs the step's forward pass (text encoders and UNet,
    which call into the network's LoRA modules), so DDP sees the graph whose gradients it must average; the frozen
    model stays outside the module and is never broadcast."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        return run()


def _store(info: ProcessInfo, timeout: datetime.timedelta) -> dist.Store | None:
    """The rendezvous of this project's launcher (rank 0 serves on the loopback socket it was handed), or None
    for another launcher's (torchrun, accelerate launch): env:// then reads MASTER_ADDR and MASTER_PORT."""
    if os.environ.get(LAUNCHED_ENV) != "1":
        return None
    fd = os.environ.get(STORE_FD_ENV) if info.is_main else None
    if info.is_main and fd is None:
        raise TrainingError(
            f"{LAUNCHED_ENV} is set but rank 0 was not given {STORE_FD_ENV}", "start it again"
        )
    return dist.TCPStore(
        LOOPBACK,
        int(os.environ["MASTER_PORT"]),
        info.world_size,
        info.is_main,
        timeout=timeout,
        master_listen_fd=int(fd) if fd is not None else None,
    )


class Processes:
    """The processes of one run, from this process's side (see the module doc)."""

    def __init__(self, info: ProcessInfo, device: torch.device, backend: str | None = None) -> None:
        self.info = info
        self.device = device
        self.backend = backend
        self._ddp: nn.Module | None = None
        self._static = False

    @property
    def world_size(self) -> int:
        """How many processes train."""
        return self.info.world_size

    @property
    def is_main(self) -> bool:
        """Whether this process saves, samples and reports (rank 0)."""
        return self.info.is_main

    @classmethod
    def single(cls, device: torch.device) -> Processes:
        """The one process of a run that trains alone."""
        return cls(ProcessInfo(), device)

    @classmethod
    def start(
        cls, info: ProcessInfo, device: torch.device, *, timeout: datetime.timedelta = COLLECTIVE_TIMEOUT
    ) -> Processes:
        """Join the run's process group: NCCL with one GPU per process (LOCAL_RANK), gloo on the CPU."""
        if not info.distributed:
            return cls(info, device)
        if device.type == "mps":
            raise TrainingError(
                "several training processes need CUDA GPUs (one each) or the CPU; Apple's MPS is one GPU",
                "train with one process on this Mac",
            )
        if device.type == "cuda":
            count = torch.cuda.device_count()
            if info.local_rank >= count:
                raise TrainingError(
                    f"training process {info.rank} needs GPU {info.local_rank}, but this process sees {count}",
                    "ask for at most as many processes as there are GPUs (CUDA_VISIBLE_DEVICES lists them)",
                )
            device = torch.device("cuda", info.local_rank)
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = _store(info, timeout)
        if store is None:
            dist.init_process_group(backend, init_method="env://", timeout=timeout)
        else:
            dist.init_process_group(
                backend, store=store, rank=info.rank, world_size=info.world_size, timeout=timeout
            )
        return cls(info, device, backend)

    def close(self) -> None:
        """Leave the process group (nothing for one process)."""
        self._ddp = None
        if self.info.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the network ------------------------------------------------------------------------------------------
    def wrap(self, network: nn.Module, *, varying_graph: bool) -> None:
        """Average the network's gradients across the processes from now on (DDP broadcasts rank 0's weights).

        The graph is static by default: the same parameters get gradients every step (those that never do, such as
        a text encoder's LoRA above the clip_skip layer, are found in the first step), which also lets gradient
        checkpointing work. `varying_graph`: which parameters get none changes from step to step (LyCORIS'
        module_dropout), so DDP looks for them each step.
        """
        if not self.info.distributed:
            return
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self._static = not varying_graph
        self._ddp = nn.parallel.DistributedDataParallel(
            _StepForward(network),
            device_ids=device_ids,
            forward_sync_buffers=False,  # the network's buffers (alpha) never change: no broadcast each step
            find_unused_parameters=varying_graph,
            static_graph=not varying_graph,
        )

    def forward(self, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run a step's forward pass through DDP (so its backward averages the gradients), or plainly."""
        return run() if self._ddp is None else self._ddp(run)

    @contextlib.contextmanager
    def accumulate(self, *, sync: bool) -> Iterator[None]:
        """Around a micro-step's forward and backward: `sync` False keeps its gradients local (accumulated until
        the step that averages them, as accelerate's accumulate does). A static graph cannot skip its reduction
        (DDP's static_graph and no_sync clash): there every micro-step averages, which sums to the same."""
        if self._ddp is None or sync or self._static:
            yield
            return
        no_sync: Any = self._ddp.no_sync  # DDP's
        with no_sync():
            yield

    # -- collectives ------------------------------------------------------------------------------------------
    def agree(self, loss: torch.Tensor, stop: bool) -> tuple[float, bool]:
        """The mean of every process's loss and whether any process was asked to stop, in one all-reduce (a GPU
        sync, like the loss read it replaces); a NaN anywhere makes the mean NaN, so all processes fail together."""
        if not self.info.distributed:
            return float(loss.detach()), stop
        packed = torch.stack(
            [loss.detach().float().reshape(()), torch.tensor(float(stop), device=loss.device)]
        )
        dist.all_reduce(packed)
        total, stops = packed.tolist()
        return total / self.world_size, stops > 0

    def any(self, flag: bool) -> bool:
        """Whether `flag` is set in any process."""
        if not self.info.distributed:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value)
        return bool(value.item() > 0)

    def broadcast_int(self, value: int) -> int:
        """Rank 0's `value` in every process (a seed drawn at random must be the same everywhere)."""
        if not self.info.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return int(box[0])

    def barrier(self) -> None:
        """Wait until every process got here."""
        if self.info.distributed:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    @contextlib.contextmanager
    def main_first(self, enabled: bool = True) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. writes a disk cache), the others after it (and read what it wrote)."""
        if not self.info.distributed or not enabled:
            yield
            return
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def describe(self) -> str:
        """'2 processes (gloo)' for the log."""
        if not self.info.distributed:
            return "1 process"
        return f"{self.world_size} processes ({self.backend})"
