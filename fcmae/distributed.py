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


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without the host waiting: to a GPU through pinned memory with a
    non-blocking copy (a copy from pageable memory waits for the stream's queued work)."""
    if device.type != "cuda":
        return t.to(device)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)


def requeue_port(port: int, restarts: int) -> int:
    """The rendezvous port of a job's ``restarts``-th requeued attempt. submitit derives the port
    from the job id alone, so a requeued job would bind the port its previous attempt's processes
    may still hold while they tear down (an immediate 'address already in use'); every task of an
    attempt sees the same restart count and moves alike. Stays in submitit's range [20000, 60000]."""
    return 20000 + (port - 20000 + 7919 * restarts) % 40001


def _export_submitit_env() -> None:
    """Under a submitit Slurm job, set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* for env:// from
    the job's tasks. A job with several tasks that cannot set them up fails here, loudly:
    carrying on would run N independent single-process trainings into one run directory."""
    if "RANK" in os.environ or "SLURM_JOB_ID" not in os.environ:
        return
    try:
        import submitit
        submitit.JobEnvironment()  # raises outside a submitit job (sbatch/srun by hand, torchrun)
    except Exception:
        return
    try:
        env = submitit.helpers.TorchDistributedEnvironment()
        if "MASTER_PORT" not in os.environ:
            env.master_port = requeue_port(env.master_port, int(os.environ.get("SLURM_RESTART_COUNT") or 0))
        # overwrite: a MASTER_PORT the user exported is the port already (submitit reads it); MASTER_ADDR is the job's
        env.export(set_cuda_visible_devices=False, overwrite=True)
    except Exception as exc:
        ntasks = os.environ.get("SLURM_NTASKS", "?")
        raise RuntimeError(
            f"Slurm job {os.environ['SLURM_JOB_ID']} ({ntasks} tasks): could not set up the distributed "
            f"environment from submitit ({type(exc).__name__}: {exc}); refusing to run the tasks as "
            "independent single-process trainings") from exc


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched with several processes; pick the device."""
    _export_submitit_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # Every task of a submitit job joins one group; anything else is N trainings in one directory.
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1")) if "SUBMITIT_EXECUTOR" in os.environ else 1
    if slurm_tasks > 1 and world != slurm_tasks:
        raise RuntimeError(f"this submitit job has {slurm_tasks} tasks but WORLD_SIZE={world}; every task must "
                           "join one process group (check launcher.tasks_per_node / launcher.nodes)")
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
    return bool(all_reduce_max_tensor(torch.tensor([1.0 if flag else 0.0], device=info.device), info).item())


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


def all_reduce_max_tensor(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Elementwise max of a tensor over ranks (call on every rank); returns a new tensor."""
    out = values.detach().clone()
    if info.enabled:
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def broadcast_object(obj, info: DistInfo, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (picklable; call on every rank)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
