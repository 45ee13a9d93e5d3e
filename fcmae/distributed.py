"""Process-group setup for torchrun (env://) and Slurm jobs launched by submitit."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _export_submitit_env() -> None:
    """Under a submitit Slurm job with several tasks, set RANK/WORLD_SIZE/MASTER_* for env://."""
    if "RANK" in os.environ or "SLURM_JOB_ID" not in os.environ:
        return
    try:
        import submitit
        submitit.JobEnvironment()  # raises outside a submitit job
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    except Exception:
        return


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched with several processes; pick the device."""
    _export_submitit_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local_rank, dev)


def all_reduce_max(flag: bool, info: DistInfo) -> bool:
    """True on every rank if it is True on any rank (for agreeing on a stop)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> float:
    """Mean of a scalar tensor over ranks (call on every rank)."""
    return float(all_reduce_sum(value.float(), info)) / info.world_size


def all_gather_objects(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Elementwise sum of a tensor over ranks (call on every rank); returns a new tensor."""
    out = values.detach().clone()
    if info.enabled:
        dist.all_reduce(out)
    return out
