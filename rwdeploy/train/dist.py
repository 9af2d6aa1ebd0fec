"""Distributed training context: one process per device under `torchrun`, or a single process.

`torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK; with WORLD_SIZE > 1 the process group uses
NCCL on CUDA and gloo on CPU. Everything that must be identical on every rank (alphas, masks,
ADMM variables) is computed on every rank and then broadcast from rank 0, so ranks cannot
drift apart through floating-point or tie-breaking differences.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from rwdeploy.errors import OptionError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # whether this context initialised the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite `tensors` on every rank with rank 0's values (in place)."""
        if not self.distributed:
            return
        for t in tensors:
            if t.dtype == torch.bool:
                tmp = t.to(self.device, torch.uint8)
                torch_dist.broadcast(tmp, 0)
                t.copy_(tmp.to(t.device).bool())
            else:
                tmp = t.to(self.device)
                torch_dist.broadcast(tmp, 0)
                if tmp is not t:
                    t.copy_(tmp.to(t.device))

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.distributed:
            torch_dist.barrier()

    def close(self) -> None:
        if self.owns_group and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError(f"--device {name}: CUDA is not available on this machine", hint="use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise OptionError(f"--device {name}: not a device", hint="use auto, cpu or cuda[:N]") from None


def init_distributed(device: str = "auto") -> DistContext:
    """A context from torchrun's environment (or an already initialised process group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch_dist.is_available() and torch_dist.is_initialized():
        rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        owns = False
    elif world > 1:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        dev = resolve_device(device)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(local)
        torch_dist.init_process_group(backend=backend)
        owns = True
    else:
        return DistContext(device=resolve_device(device))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
    return DistContext(rank, world, local, dev, owns)
