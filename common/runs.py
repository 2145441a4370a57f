"""One folder per run: `results/<script>/<model-slug>/<data-slug>/<run-id>/` with run.json, data, then figures.

A run is written into a hidden staging folder and renamed into place only when it finishes, so a failed or
refused run never leaves a half-written results folder: bad input removes the staging folder; a crash keeps it
as `<run-id>.failed/` (with the error in run.json) so hours of work are not lost silently.
Every file is written atomically (`common.atomic`: temporary file + rename). Earlier runs are never overwritten.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common import distributed
from common.atomic import atomic_write
from common.config import RunSpec
from common.errors import InputError

PACKAGES = ("torch", "transformers", "accelerate", "datasets", "tokenizers", "numpy", "pandas", "matplotlib", "scikit-learn")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def slug(text: str, limit: int = 60) -> str:
    """A folder name: unsafe characters become '-', long names keep their start and a short hash of the whole."""
    name = re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "unnamed"
    if len(name) > limit:
        name = f"{name[: limit - 9]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return name


def model_slug(model: str) -> str:
    """A folder name for a model id, path or `random:` spec."""
    name = model.rstrip("/")
    if os.sep in name and Path(name).expanduser().exists():
        name = Path(name).name
    return slug(name)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT, capture_output=True, text=True,
            timeout=5,
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class Run:
    """A run folder. Use as a context manager: it is published on success and cleaned up on failure."""

    def __init__(self, spec: RunSpec, model: str, data: str = "no-data") -> None:
        script = spec.script
        self.script, self.args = script, spec.argument_dict
        self.started = time.time()
        # Under torchrun only rank 0 publishes; the others write into a scratch folder that is deleted.
        self.scratch = distributed.rank() != 0
        root = Path(tempfile.mkdtemp(prefix="moescope-rank")) if self.scratch else Path(spec.out)
        # Folders this run creates, deepest first, so a refused or interrupted run removes exactly those.
        parent = root / script / model_slug(model) / slug(data)
        self._created = [p for p in (parent, parent.parent, parent.parent.parent, root) if not p.exists()]
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_id, n = stamp, 1
        while (parent / run_id).exists() or (parent / f".{run_id}.partial").exists():
            n += 1
            run_id = f"{stamp}-{n}"
        self.run_id = run_id
        self.final_dir = parent / run_id
        self.dir = parent / f".{run_id}.partial"
        self.dir.mkdir(parents=True)
        self.info: dict[str, Any] = {
            "script": script,
            "run_id": run_id,
            "arguments": _jsonable(self.args),
            "model": model,
            "seed": spec.seed,
            "world_size": distributed.world_size(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "started": dt.datetime.now().isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "packages": package_versions(),
            "platform": platform.platform(),
        }
        self._write_info()

    # -- context management
    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        elif issubclass(exc_type, (InputError, KeyboardInterrupt, SystemExit)):
            shutil.rmtree(self.dir, ignore_errors=True)
            self._remove_empty_parents()
        else:
            self.info["error"] = f"{exc_type.__name__}: {exc}"
            self._write_info()
            failed = self.final_dir.with_name(f"{self.run_id}.failed")
            os.replace(self.dir, failed)
            print(f"run failed; what was written is kept in {failed}", file=sys.stderr)

    def _remove_empty_parents(self) -> None:
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:  # not empty: another run lives there
                break

    # -- metadata
    def record(self, **items: Any) -> None:
        """Add facts to run.json (model description, token counts, warnings...)."""
        self.info.update(_jsonable(items))
        self._write_info()

    def _write_info(self) -> None:
        text = json.dumps(self.info, indent=2, sort_keys=False) + "\n"
        atomic_write(self.dir / "run.json", lambda p: p.write_text(text))

    def finish(self) -> Path:
        if self.scratch:
            shutil.rmtree(self.dir.parents[3], ignore_errors=True)
            return self.dir
        self.info["wall_time_s"] = round(time.time() - self.started, 3)
        self.info["finished"] = dt.datetime.now().isoformat(timespec="seconds")
        self._write_info()
        os.replace(self.dir, self.final_dir)
        self.dir = self.final_dir
        print(f"results: {self.final_dir}", file=sys.stderr)
        return self.final_dir

    # -- outputs
    def save_table(self, table: pd.DataFrame, name: str) -> Path:
        return atomic_write(self.dir / f"{name}.csv", lambda p: table.to_csv(p, index=False))

    def save_array(self, array: np.ndarray, name: str) -> Path:
        def write(p: Path) -> None:
            with open(p, "wb") as f:
                np.save(f, array)

        return atomic_write(self.dir / f"{name}.npy", write)

    def save_json(self, obj: Any, name: str) -> Path:
        text = json.dumps(_jsonable(obj), indent=2) + "\n"
        return atomic_write(self.dir / f"{name}.json", lambda p: p.write_text(text))

    def save_figure(self, fig, name: str) -> list[Path]:
        from common.plots import plt, save_figure

        if self.scratch:  # torchrun: only rank 0 publishes, so the others skip the rendering
            plt.close(fig)
            return []

        return save_figure(fig, self.dir / "figures" / name)
