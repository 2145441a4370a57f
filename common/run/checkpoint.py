"""Checkpoints of a run's streaming state, so that a stopped, killed or crashed run resumes to the identical result.

A checkpoint lives in the run's staging folder (`.<run-id>.partial/checkpoint/`): `fingerprint.json` (the script,
its flags that decide the numbers, the code version) and `state.pt`, which holds

- the script's state objects as they were after a whole batch (accumulators, the sample so far, its RNGs), pickled
  by value with their tensors saved by torch (views stay views; CUDA tensors come back on their device); objects of
  the live process (the model's modules, the tokenizer, the MoE views: `live`) are saved as references and resolved
  against the resuming process's own, so a checkpoint never holds the model;
- the data stream's position per stream (batches consumed) and the global RNG states (torch, CUDA, numpy, random).

Resuming rebuilds the same model and data stream from the same command, replays the stream up to the saved
position without a forward (the documents are read and tokenised again: the stream is a pure function of the
command), puts the saved objects back in place of the new ones, restores the RNGs and goes on: the finished run is
byte-identical to an uninterrupted one. Writes are atomic, so a SIGKILL during a save leaves the previous
checkpoint whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import pickle
import random
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import stops
from common.atomic import atomic_write
from common.config import PROJECT_ROOT
from common.errors import InputError

FOLDER = "checkpoint"
STATE = "state.pt"
FINGERPRINT = "fingerprint.json"
LOCK = ".lock"
FORMAT = 1
# Flags that change how a run reports or where it goes, never its numbers: a run may resume under other values.
PRESENTATION_FLAGS = frozenset({"resume", "fresh", "checkpoint_every", "progress", "figures", "wandb", "config", "out",
                                "cache_dir"})
# Fault injection for the tests of this module: after this many batches of a stream, the process kills itself with
# SIGKILL before saving (the batch's work is lost, as in a real kill mid-batch) or sends itself the named signal
# while the batch is being processed ("3:SIGTERM").
FAULT_ENV = "MOESCOPE_FAULT_AT_BATCH"


def code_version() -> str | None:
    """The git commit of the code, with a hash of the uncommitted changes to tracked files when there are any."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        diff = subprocess.run(["git", "diff", "HEAD", "--", ".", ":(exclude)tests"], cwd=PROJECT_ROOT,
                              capture_output=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+{hashlib.sha1(diff).hexdigest()[:12]}" if diff else head


def fingerprint(script: str, arguments: Mapping[str, Any], world_size: int = 1) -> dict[str, Any]:
    """What must be equal for a checkpoint to be resumed: the script, the flags that decide its numbers, the code,
    and the number of processes (each torchrun rank reads its own share of the stream)."""
    kept = {k: v for k, v in arguments.items() if k not in PRESENTATION_FLAGS}
    return json.loads(json.dumps({"format": FORMAT, "script": script, "arguments": kept, "code": code_version(),
                                  "world_size": world_size}, default=str))


def difference(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """In words, why `saved` (a checkpoint's fingerprint) is not `current`'s; None when they are equal."""
    if saved == current:
        return None
    if saved.get("script") != current.get("script"):
        return f"it is a checkpoint of {saved.get('script')}.py, not {current.get('script')}.py"
    if saved.get("world_size", 1) != current.get("world_size", 1):
        return (f"it was written by {saved.get('world_size', 1)} process(es), this run has "
                f"{current.get('world_size', 1)}")
    if saved.get("code") != current.get("code"):
        return f"it was written by another code version ({saved.get('code')}; this is {current.get('code')})"
    old, new = saved.get("arguments", {}), current.get("arguments", {})
    flags = [f"--{k} {new.get(k)!r} (checkpoint: {old.get(k)!r})" for k in sorted(set(old) | set(new))
             if old.get(k) != new.get(k)]
    return "it is a checkpoint of another command: " + "; ".join(flags[:4]) if flags else "its format differs"


def state_file(rank: int = 0, world_size: int = 1) -> str:
    """The state file of a process: one per torchrun rank."""
    return STATE if world_size == 1 else f"state.rank{rank}.pt"


def has_checkpoint(folder: Path) -> bool:
    return any((folder / FOLDER).glob("state*.pt")) and (folder / FOLDER / FINGERPRINT).is_file()


def read_fingerprint(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / FOLDER / FINGERPRINT).read_text())
    except (OSError, ValueError):
        return None


def run_id_of(folder: Path) -> str | None:
    """The run id of a staging folder (`.<id>.partial`) or a failed run's folder (`<id>.failed`)."""
    name = folder.name
    if name.startswith(".") and name.endswith(".partial"):
        return name[1:-len(".partial")]
    if name.endswith(".failed"):
        return name[:-len(".failed")]
    return None


class FolderLock:
    """An exclusive lock on a run folder while a process works in it (released by the kernel when the process dies,
    SIGKILL included), so that two runs never write into one folder."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK
        self._file = open(self.path, "a")  # noqa: SIM115 (held for the run's life)
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.close()
            raise

    def release(self, *, remove: bool = False) -> None:
        if self._file.closed:
            return
        if remove:
            with contextlib.suppress(OSError):
                self.path.unlink()
        self._file.close()


def is_locked(folder: Path) -> bool:
    path = folder / LOCK
    if not path.exists():
        return False
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def find_resumable(parent: Path, wanted: dict[str, Any]) -> Path | None:
    """The newest stopped run folder under `parent` (staging or failed) whose checkpoint is of `wanted`'s command and
    which no live process holds."""
    if not parent.is_dir():
        return None
    found = [folder for folder in parent.iterdir()
             if folder.is_dir() and run_id_of(folder) and has_checkpoint(folder)
             and read_fingerprint(folder) == wanted and not is_locked(folder)]
    return max(found, key=lambda f: (f / FOLDER / FINGERPRINT).stat().st_mtime, default=None)


def check_resume_folder(folder: Path, wanted: dict[str, Any]) -> Path:
    """`--resume FOLDER`, checked: a stopped run's folder holding a checkpoint of this command, not in use."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise InputError(f"--resume {folder}: no such folder")
    if run_id_of(folder) is None:
        if (folder / "run.json").is_file():
            raise InputError(f"--resume {folder}: this run finished; there is nothing to resume")
        raise InputError(f"--resume {folder}: not a stopped run's folder (.<run-id>.partial or <run-id>.failed)")
    if not has_checkpoint(folder):
        raise InputError(f"--resume {folder}: the run was stopped before its first checkpoint; start it afresh")
    why = difference(read_fingerprint(folder) or {}, wanted)
    if why is not None:
        raise InputError(f"--resume {folder}: refused, {why}")
    if is_locked(folder):
        raise InputError(f"--resume {folder}: another process is running in it")
    return folder


# ------------------------------------------------------------------------------------------------ saving state


class _Pickler(pickle.Pickler):
    """Tensors go to a side list (saved by torch), live objects become references by key."""

    def __init__(self, file: io.BytesIO, live: Mapping[int, str]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.live, self.tensors = live, []

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            self.tensors.append(obj)
            return ("tensor", len(self.tensors) - 1)
        key = self.live.get(id(obj))
        if key is not None:
            return ("live", key)
        if isinstance(obj, torch.nn.Module):
            raise TypeError(f"checkpoint: a {type(obj).__name__} module that is not part of the live model is in the "
                            "state; register it as live")
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, tensors: list[torch.Tensor], live: Mapping[str, Any]) -> None:
        super().__init__(file)
        self.tensors, self.live = tensors, live

    def persistent_load(self, pid: Any) -> Any:
        kind, key = pid
        if kind == "tensor":
            return self.tensors[key]
        if key not in self.live:
            raise InputError(f"the checkpoint refers to {key}, which this run does not have")
        return self.live[key]


def live_registry(objects: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """key -> live object: each named object, and every submodule of a named module under `<name>.<module path>`."""
    registry: dict[str, Any] = {}
    for name, obj in objects:
        if obj is None:
            continue
        registry.setdefault(name, obj)
        if isinstance(obj, torch.nn.Module):
            for path, module in obj.named_modules(remove_duplicate=False):
                registry.setdefault(f"{name}.{path}" if path else name, module)
    return registry


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _restore_into(live: Any, saved: Any) -> None:
    """Make the live object equal the saved one, in place, so that every reference the script holds stays valid."""
    if isinstance(live, list):
        live[:] = saved
    elif isinstance(live, dict):
        live.clear()
        live.update(saved)
    elif hasattr(live, "__dict__"):
        live.__dict__.clear()
        live.__dict__.update(saved.__dict__)
    else:
        raise TypeError(f"checkpoint: cannot restore a {type(live).__name__} in place")


class Checkpointer:
    """The checkpoint of one run folder: saves the named state objects after whole batches, at most every
    `interval_s` seconds (0: after every batch), and puts them back when the run resumes."""

    def __init__(self, folder: Path, wanted: dict[str, Any], interval_s: float, *, resuming: bool, rank: int = 0,
                 world_size: int = 1) -> None:
        self.dir = folder / FOLDER
        self.file = self.dir / state_file(rank, world_size)
        self.wanted, self.interval_s = wanted, interval_s
        self.saved: dict[str, Any] | None = self._load_raw() if resuming else None
        self.positions: dict[str, int] = dict(self.saved["positions"]) if self.saved else {}
        self.saved_positions = dict(self.positions)  # as on disk
        self.saves = 0
        self.batches_done = 0  # of the stream being read now: for the stop message
        self._last = time.monotonic()
        fault = os.environ.get(FAULT_ENV, "")
        at, _, signal_name = fault.partition(":")
        self._fault = (int(at), signal_name or "SIGKILL") if at else None

    @property
    def exists(self) -> bool:
        return self.file.is_file()

    def _load_raw(self) -> dict[str, Any]:
        return torch.load(self.file, weights_only=False)

    def save(self, objects: Mapping[str, Any], live: Mapping[int, str]) -> None:
        buffer = io.BytesIO()
        pickler = _Pickler(buffer, live)
        pickler.dump(dict(objects))
        payload = {"format": FORMAT, "objects": buffer.getvalue(), "tensors": pickler.tensors,
                   "positions": dict(self.positions), "rng": rng_states()}
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / FINGERPRINT).is_file():
            text = json.dumps(self.wanted, indent=2) + "\n"
            atomic_write(self.dir / FINGERPRINT, lambda p: p.write_text(text))
        atomic_write(self.file, lambda p: torch.save(payload, p))
        self.saved_positions = dict(self.positions)
        self.saves += 1
        self._last = time.monotonic()

    def stream(self, batches: Iterable[Any], name: str, objects: Mapping[str, Any],
               live: Mapping[str, Any]) -> Iterator[Any]:
        """`batches`, from the saved position of stream `name` on, with `objects` restored first when resuming;
        saves after whole batches; a stop signal received while a batch is processed takes effect after it, once
        its state is saved."""
        by_id = {id(obj): key for key, obj in live.items()}
        done = self.positions.get(name, 0)
        rng = None
        if self.saved is not None and name in self.saved["positions"]:
            saved_objects = _Unpickler(io.BytesIO(self.saved["objects"]), self.saved["tensors"], live).load()
            for key, obj in objects.items():
                if key not in saved_objects:
                    raise InputError(f"the checkpoint holds no state named {key!r}; start afresh with --no-resume")
                _restore_into(obj, saved_objects[key])
            rng = self.saved["rng"]
        iterator = iter(batches)
        for replayed in range(done):  # the stream is a pure function of the command: read it again, no forward
            try:
                next(iterator)
            except StopIteration:
                raise InputError(f"the data gave {replayed} batches where the checkpoint had read {done}: it changed "
                                 "since; start afresh with --no-resume") from None
        if rng is not None:
            set_rng_states(rng)
        self.batches_done = done
        with stops.deferred():
            for batch in iterator:
                self._inject_fault(done, when="during")
                yield batch
                done += 1
                self.positions[name] = self.batches_done = done
                self._inject_fault(done, when="after")
                if stops.requested() is not None:
                    self.save(objects, by_id)
                    raise KeyboardInterrupt
                if time.monotonic() - self._last >= self.interval_s:
                    self.save(objects, by_id)
        self.positions[name] = done
        self.save(objects, by_id)  # the stream is read: a stop in the work after it loses no forward

    def _inject_fault(self, done: int, *, when: str) -> None:
        if self._fault is None or done + (1 if when == "during" else 0) != self._fault[0]:
            return
        import signal

        signum = getattr(signal, self._fault[1])
        if (signum == signal.SIGKILL) == (when == "after"):
            os.kill(os.getpid(), signum)
