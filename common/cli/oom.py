"""Out-of-memory back-off: run a step with a batch size, and on a CUDA out-of-memory error halve it and retry.

On a GPU box the largest batch that fits depends on the model, the sequence length and what else is resident; a
benchmark or sweep should find it, not crash on it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def is_out_of_memory(err: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(err, oom)) or (isinstance(err, RuntimeError) and "out of memory" in str(err))


def with_oom_backoff(step: Callable[[int], T], batch_size: int, *, minimum: int = 1, say: Callable[[str], None] | None = None) -> tuple[int, T]:
    """(the batch size that worked, step's result): `step(batch_size)`, halving the size after each OOM error."""
    say = say or (lambda text: print(text, file=sys.stderr))
    size = batch_size
    while True:
        try:
            return size, step(size)
        except Exception as err:
            if not is_out_of_memory(err) or size <= minimum:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            say(f"out of memory at batch size {size}; retrying with {max(minimum, size // 2)}")
            size = max(minimum, size // 2)
