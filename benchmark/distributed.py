"""torch.distributed in one place: joining torchrun's process group, rank and world size,
barriers, broadcasts, and the gradient-carrying gather of the contrastive loss.

Launch one cell on N processes with ``bench run --nproc N`` or
``torchrun --nproc_per_node N -m poisonbench cell CONFIG_JSON ...`` (a config resolved with
``world_size=N``: the processes are part of the cell, and ``runner.prepare`` refuses a config of
another number). torchrun sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; backend nccl on CUDA (one GPU per process,
``cuda:LOCAL_RANK``), gloo on CPU. Without torchrun (or before ``init``) every helper is the
identity or a no-op, so a single process runs exactly the code it ran before DDP existed.
"""
from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.distributed as dist


def launched_world_size() -> int:
    """WORLD_SIZE from torchrun's environment; 1 when this process was not started by torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """True when torchrun started this process as one of several (WORLD_SIZE > 1)."""
    return launched_world_size() > 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the default group (1 without one)."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """True on rank 0, the process that holds the cell's lock, writes files and evaluates."""
    return rank() == 0


def local_device(device: torch.device, name: str) -> torch.device:
    """The device of this process: ``device`` itself, except that under torchrun a CUDA device
    becomes ``cuda:LOCAL_RANK`` (one GPU per process).

    Raises ValueError when a GPU index was given under torchrun (``name`` is the user's spelling,
    for the message), or when this node has fewer GPUs than processes.
    """
    if device.type != "cuda" or not launched():
        return device
    if device.index is not None:
        raise ValueError(f"--device {name}: with several processes each one uses cuda:LOCAL_RANK; "
                         "give --device cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES")
    local, n = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local >= n:
        raise ValueError(f"process {local} of this node has no GPU: only {n} GPU(s) are visible; "
                         f"run at most {n} processes per node (--nproc / --nproc_per_node)")
    return torch.device("cuda", local)


def init(device: torch.device) -> None:
    """Join the process group of torchrun's workers (environment ``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``): backend nccl when ``device`` is CUDA (which becomes this
    process's current device), gloo on CPU. No-op when not launched by torchrun with
    WORLD_SIZE > 1, or when a group already exists (e.g. made by a test)."""
    if not launched() or is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")


def shutdown() -> None:
    """Leave the process group, if any (before the process exits)."""
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (no-op in one process)."""
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (any picklable value), returned on every rank; ``obj`` itself in
    one process. The other ranks' argument is ignored."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank ``src``'s (same shape and dtype on every rank; on
    the process's CUDA device under nccl) and return it; the identity in one process."""
    if world_size() > 1:
        dist.broadcast(tensor, src=src)
    return tensor


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Overwrite ``tensor`` in place with its sum over the ranks (same shape and dtype on every
    rank) and return it; the identity in one process. E.g. each rank fills its share of a
    zero-initialised tensor, and every rank ends with the whole."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_with_grad(image_emb: torch.Tensor, text_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The embeddings of the global batch, ranks in order, with gradients flowing back to every
    rank's own rows: float [B, D] per rank -> float [B * world, D] (the same values on every rank).

    This is open_clip's ``ClipLoss`` with ``gather_with_grad=True, local_loss=False``
    (``open_clip.loss.gather_features``): every rank computes the loss of the whole global batch
    (Radford et al. 2021, Fig. 3), the backward of the all-gather sums each rank's gradient of that
    loss with respect to its rows, i.e. ``world x`` the gradient of the common loss, and
    DistributedDataParallel's average of the parameter gradients over ranks divides by ``world``
    again: every rank ends with the single-process gradient of the concatenated batch.
    The identity in one process.
    """
    if world_size() == 1:
        return image_emb, text_emb
    from open_clip.loss import gather_features

    with warnings.catch_warnings():  # open_clip's gather uses torch.distributed.nn.all_gather, deprecated in torch 2.x
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated")
        return gather_features(image_emb, text_emb, local_loss=False, gather_with_grad=True,
                               rank=rank(), world_size=world_size())
