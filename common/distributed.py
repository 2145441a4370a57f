"""Several processes (`torchrun --nproc_per_node N script.py ...`): each takes every N-th batch, and the streamed
accumulators are summed with `all_reduce`, which gives the numbers of a single process. Only rank 0 publishes
results. Without torchrun everything here is a no-op.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env() -> None:
    """Join the process group torchrun describes in the environment (once)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_cuda_device() -> torch.device:
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def broadcast(value: float, src: int = 0) -> float:
    """Rank `src`'s `value` on every rank (every rank must call it; returns `value` without torchrun)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _collective_ready(t: torch.Tensor) -> torch.Tensor:
    """`t` where the backend can reach it: NCCL needs CUDA tensors, so CPU tensors take a round trip."""
    return t.cuda() if t.device.type == "cpu" and dist.get_backend() == "nccl" else t.contiguous()


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over all ranks in place (no-op without torchrun); returns `t`."""
    if dist.is_initialized():
        tmp = _collective_ready(t)
        dist.all_reduce(tmp, op=dist.ReduceOp.SUM)
        if tmp is not t:
            t.copy_(tmp)
    return t


def all_gather(t: torch.Tensor) -> torch.Tensor:
    """[world_size, *t.shape]: `t` of every rank in rank order (`t[None]` without torchrun)."""
    if not dist.is_initialized():
        return t.unsqueeze(0)
    tmp = _collective_ready(t)
    parts = [torch.empty_like(tmp) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tmp)
    return torch.stack(parts).to(t.device)


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` concatenated along dim 0 in rank order; ranks may hold different numbers of rows."""
    if not dist.is_initialized():
        return t
    sizes = all_gather(torch.tensor([t.shape[0]], device=t.device)).view(-1).tolist()
    padded = t.new_zeros((max(sizes), *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = all_gather(padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])
