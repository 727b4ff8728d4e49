"""Where training runs: the device, and the process group of a distributed (torchrun) run."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA device is available")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> Distributed:
    """This process's place in a torchrun group (``WORLD_SIZE`` > 1), or a group of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    import torch.distributed as dist

    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Distributed(rank=dist.get_rank(), world=dist.get_world_size())


def training_device(device_name: str, dist_info: Distributed) -> torch.device:
    """The device of this process: its own GPU in a distributed CUDA run, else ``device_name``'s."""
    if dist_info.world > 1 and device_name != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return select_device(device_name)


def all_reduce_sum(values: np.ndarray, dist_info: Distributed, device: torch.device) -> np.ndarray:
    """Sum ``values`` over the processes of the group (unchanged in a group of one)."""
    if dist_info.world == 1:
        return values
    import torch.distributed as dist

    tensor = torch.as_tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.cpu().numpy()
