"""The out-of-memory back-off halves the batch until it fits, and re-raises other errors or at the minimum."""

from __future__ import annotations

import pytest
import torch

from common.oom import is_out_of_memory, with_oom_backoff


def _fits_up_to(limit: int, calls: list[int]):
    def step(size: int) -> str:
        calls.append(size)
        if size > limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {size} GiB")
        return f"ran {size}"

    return step


def test_halves_until_it_fits():
    calls: list[int] = []
    messages: list[str] = []
    assert with_oom_backoff(_fits_up_to(20, calls), 128, say=messages.append) == (16, "ran 16")
    assert calls == [128, 64, 32, 16] and len(messages) == 3 and "batch size 128" in messages[0]


def test_gives_up_at_the_minimum_and_never_hides_other_errors():
    with pytest.raises(torch.cuda.OutOfMemoryError):
        with_oom_backoff(_fits_up_to(0, []), 8, minimum=2, say=lambda _: None)

    def broken(size: int):
        raise ValueError("not memory")

    with pytest.raises(ValueError):
        with_oom_backoff(broken, 8)
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory")) and not is_out_of_memory(RuntimeError("other"))
