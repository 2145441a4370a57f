"""Measuring the suite itself (benchmarks and tests): peak memory of a script run in its own process, and the aten
ops a block of code dispatches (on a GPU each is about one kernel launch)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_mib(script: str, argv: Sequence[str]) -> tuple[float, float]:
    """(peak resident memory in MiB, wall seconds) of `python <script> argv` in a fresh process, from the kernel."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, str(ROOT / script), *argv], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{script} failed: {child.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024, elapsed  # Linux reports KiB


def peak_rss_ratio(script: str, argv_for: Callable[[int, str], Sequence[str]], small: int, large: int,
                   goal: float = 1.10) -> float:
    """Peak RSS of `script` at --num_tokens `large` over that at `small`, each in a fresh process writing under one
    temporary folder (`argv_for(tokens, out)` gives the flags); prints both runs and the ratio against `goal`."""
    results = {}
    with tempfile.TemporaryDirectory() as out:
        for tokens in (small, large):
            results[tokens] = peak_rss_mib(script, argv_for(tokens, out))
            print(f"--num_tokens {tokens:>8}: peak RSS {results[tokens][0]:8.1f} MiB, {results[tokens][1]:6.1f} s",
                  flush=True)
    ratio = results[large][0] / results[small][0]
    print(f"ratio large/small: {ratio:.3f}  (goal ≤ {goal:.2f}: {'PASS' if ratio <= goal else 'FAIL'})")
    return ratio


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> int:
    with OpCounter() as counter:
        fn()
    return counter.count
