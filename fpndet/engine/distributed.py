"""torch.distributed set-up for runs launched by ``torchrun`` (one process per GPU, or several
CPU processes with the gloo backend)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import FpnDetError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str, *, timeout_s: float = 600.0) -> DistInfo:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT). Without it, a single-process :class:`DistInfo`. NCCL on CUDA, gloo otherwise.

    ``timeout_s``: how long a collective waits for the other processes before failing (a process
    that died or hangs is then reported by the others, see :func:`peer_failure`)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def _collective_device() -> torch.device:
    """Where small collective tensors must live: the current GPU for NCCL (which has no CPU
    tensors), the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average scalar logs over processes (one collective)."""
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return {k: float(v) / info.world_size for k, v in zip(keys, tensor.tolist())}


def all_ranks_true(flag: bool, info: DistInfo) -> bool:
    """True when ``flag`` is True on every process (one collective; every process must call it)."""
    if not info.enabled:
        return flag
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return bool(tensor.item())


def gather_objects(obj, info: DistInfo) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process (picklable objects; every process
    must call it)."""
    if not info.enabled:
        return [obj]
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


_PEER_FAILURE_MARKERS = ("Connection closed", "Connection reset", "connection reset", "Broken pipe", "timed out",
                         "Timed out", "timeout", "peer", "Socket Timeout", "NCCL communicator was aborted")


def peer_failure(error: BaseException, info: DistInfo, *, step: int, timeout_s: float, checkpoint) -> FpnDetError | None:
    """The error to report when a collective failed because another process died or stopped
    answering within ``timeout_s``; None when ``error`` is something else (or not distributed)."""
    if not info.enabled or not isinstance(error, RuntimeError):
        return None
    text = str(error)
    if not (isinstance(error, dist.DistError) or any(marker in text for marker in _PEER_FAILURE_MARKERS)):
        return None
    return PeerLost(f"rank {info.rank}: another training process stopped or did not answer within {timeout_s:g} s "
                    f"(train.ddp_timeout_s) at step {step}; {checkpoint} holds the last good state: fix the cause "
                    f"and rerun with --resume ({text.splitlines()[0] if text else type(error).__name__})")


class PeerLost(FpnDetError):
    """Another process of a distributed run died or hung; the message says which step and where
    the last checkpoint is."""
