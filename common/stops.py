"""Stops asked for from outside (Ctrl-C, SIGTERM from `timeout`, Slurm or a container stop, SIGHUP, SIGUSR1 or
SIGUSR2 from Slurm's `--signal` warning, submitit's pre-emption signal), told apart from failures.

While a checkpointed stream runs (`deferred()`), a stop waits for the end of the batch in progress, whose state is
then saved (`common.run.checkpoint`); a second Ctrl-C stops at once.

A stop raises `KeyboardInterrupt` where the program happens to be. When that moment is inside an import, some
libraries turn the interrupt into another error on its way out (a RecursionError from transformers' lazy modules
was seen); `requested()` says that a stop was asked for, so the run folder and the command line treat whatever
error follows as the stop it is: folders removed (kept when they hold a checkpoint), one line, exit 128 + the
signal's number.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2")  # USR1/USR2: Slurm's warning (submitit: USR2)
_received: list[int] = []  # the signals received while `handled()` is active, in order
_deferring: list[bool] = [False]  # inside `deferred()`: the first stop waits for the end of the batch
_resume_hint: list[str] = []  # set by a run that kept a checkpoint: how to continue it, for the stop's one line


def requested() -> int | None:
    """The first stop signal received while `handled()` was active (its number), or None."""
    return _received[0] if _received else None


def _record_and_interrupt(signum: int, frame: object) -> None:
    _received.append(signum)
    if _deferring[0]:
        if len(_received) == 1:  # the batch in progress finishes and its state is saved
            if signum == signal.SIGINT and sys.stderr.isatty():  # someone at a terminal: say that it was heard
                print("stopping after this batch, once its checkpoint is written (send the signal again to stop now)",
                      file=sys.stderr)
            return
        if signum == signal.SIGINT and len(_received) > 1:  # Ctrl-C twice: now, losing the batch in progress
            raise KeyboardInterrupt
        return  # a scheduler's second signal (Slurm signals every process of a step): the stop is under way
    if len(_received) == 1:  # one interrupt: a second signal during the clean-up must not cut the clean-up short
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """While active (a checkpointed stream between two batches' ends), a stop signal is recorded and takes effect at
    the next batch's end (`requested()` is checked there), so that the state saved is that of whole batches."""
    previous, _deferring[0] = _deferring[0], True
    try:
        yield
    finally:
        _deferring[0] = previous


def set_resume_hint(text: str | None) -> None:
    _resume_hint[:] = [text] if text else []


def resume_hint() -> str | None:
    return _resume_hint[0] if _resume_hint else None


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """While active, SIGINT, SIGTERM, SIGHUP and SIGUSR1 record themselves and raise KeyboardInterrupt in the main
    thread (Python's default for the last three is to die at once, leaving a half-written staging folder behind); the
    previous handlers come back afterwards."""
    _received.clear()
    _resume_hint.clear()
    if threading.current_thread() is not threading.main_thread():  # signal handlers can only be set there
        yield
        return
    wanted = [getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name)]
    previous = {signum: signal.signal(signum, _record_and_interrupt) for signum in wanted}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
