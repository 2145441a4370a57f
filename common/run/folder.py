"""One folder per run: `results/<script>/<model-slug>/<data-slug>/<run-id>/` with run.json, data, then figures.

A run is written into a hidden staging folder and renamed into place only when it finishes, so a failed or
refused run never leaves a half-written results folder: bad input removes the staging folder; a crash keeps it
as `<run-id>.failed/` (with the error in run.json) so hours of work are not lost silently.
Every file is written atomically (`common.atomic`: temporary file + rename). Earlier runs are never overwritten.

A finished run also gets a README.md describing every file it holds (description, docs/METRICS.md link, CSV
columns, npy axes), generated from the registry in `common.run.outputs`; files or columns the registry does not
describe are listed there as undocumented and reported on stderr. CSV columns the registry marks as whole
numbers are written as integers (`10000`, never `10000.0`); other floats keep pandas' shortest round-trip form.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from common import distributed, stops
from common.atomic import atomic_write
from common.config import PROJECT_ROOT, RunSpec
from common.errors import InputError
from common.run import outputs

PACKAGES = ("torch", "transformers", "accelerate", "datasets", "tokenizers", "numpy", "pandas", "matplotlib", "scikit-learn")


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


_EXACT_INT = 2**53  # float64 holds every whole number up to here exactly


def whole_number_columns(table: pd.DataFrame, columns: frozenset[str] | set[str]) -> pd.DataFrame:
    """`table` with each of `columns` that holds only whole numbers (or NaN) as an integer column: int64, or
    pandas' nullable Int64 where NaN occurs (written as an empty field, like a float NaN). Columns with a
    fraction, an infinity, a non-numeric or an integer dtype are left as they are; the input is not modified."""
    cast: dict[str, str] = {}
    for column in columns:
        if column not in table.columns or not pd.api.types.is_float_dtype(table[column].dtype):
            continue
        values = table[column].to_numpy(dtype=np.float64)
        missing = np.isnan(values)
        present = values[~missing]
        if np.isfinite(present).all() and (np.abs(present) <= _EXACT_INT).all() and (present == np.round(present)).all():
            cast[column] = "Int64" if missing.any() else "int64"
    return table.astype(cast) if cast else table


def _markdown_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


class Run:
    """A run folder. Use as a context manager: it is published on success and cleaned up on failure."""

    def __init__(self, spec: RunSpec, model: str, data: str = "no-data") -> None:
        script = spec.script
        self.script, self.args = script, spec.argument_dict
        self.wandb_project = spec.wandb
        self.draw = spec.figures
        self.started = time.time()
        # Under torchrun only rank 0 publishes; the others write into a scratch folder that is deleted.
        self.scratch = distributed.rank() != 0
        root = Path(tempfile.mkdtemp(prefix="moescope-rank")) if self.scratch else Path(spec.out)
        # Folders this run creates, deepest first, so a refused or interrupted run removes exactly those.
        parent = root / script / model_slug(model) / slug(data)
        self._created = []
        self.checkpointer = None
        self._lock = None
        self._fingerprint = None
        try:
            adopted = self._resumable(spec, Path(spec.out) / script / model_slug(model) / slug(data))
            self._make_folder(parent, root, adopted)
            shared = {"folder": str(self.dir), "resuming": adopted is not None} if not self.scratch else None
        except Exception as err:
            if self._fingerprint is not None and distributed.world_size() > 1 and not self.scratch:
                distributed.broadcast({"refused": f"{err}"})  # the other ranks wait for rank 0's folder
            raise
        if self._fingerprint is not None:
            from common.run.checkpoint import Checkpointer, FolderLock

            if distributed.world_size() > 1:  # every rank checkpoints into rank 0's staging folder (a shared path)
                decision = distributed.broadcast(shared if not self.scratch else None)
                if "refused" in decision:
                    raise InputError(decision["refused"])
                folder, resuming = Path(decision["folder"]), decision["resuming"]
            else:
                folder, resuming = self.dir, adopted is not None
            if not self.scratch:
                try:
                    self._lock = FolderLock(self.dir)
                except OSError:
                    raise InputError(f"{self.dir}: another process is running in this folder") from None
            self.checkpointer = Checkpointer(folder, self._fingerprint, 60 * float(spec.checkpoint_every or 0),
                                             resuming=resuming, rank=distributed.rank(),
                                             world_size=distributed.world_size())
        previous = _read_json(self.dir / "run.json") if adopted is not None and not self.scratch else {}
        self.info: dict[str, Any] = {
            "script": script,
            "run_id": self.run_id,
            "arguments": _jsonable(self.args),
            "model": model,
            "seed": spec.seed,
            "world_size": distributed.world_size(),
            "torch_threads": torch.get_num_threads(),  # what --threads gave, or torch's default: explains wall times
            "command": shlex.join(spec.command or [Path(sys.argv[0]).name, *sys.argv[1:]]),
            "started": previous.get("started") or dt.datetime.now().isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "packages": package_versions(),
            "platform": platform.platform(),
        }
        if self.checkpointer is not None and self.checkpointer.saved is not None and not self.scratch:
            batches = self.checkpointer.positions
            self.info["resumed"] = [*previous.get("resumed", []),
                                    {"at": dt.datetime.now().isoformat(timespec="seconds"), "batches_done": dict(batches)}]
            print(f"resuming the stopped run in {self.dir} from its checkpoint ({_positions(batches)})",
                  file=sys.stderr)
        self._write_info()

    def _make_folder(self, parent: Path, root: Path, adopted: Path | None) -> None:
        if adopted is not None:  # a stopped run of this command: continue in its folder
            from common.run.checkpoint import run_id_of

            run_id = run_id_of(adopted)
            self.dir = adopted.with_name(f".{run_id}.partial")
            if adopted != self.dir:  # a crashed run's <id>.failed folder becomes a staging folder again
                os.replace(adopted, self.dir)
            self.run_id, self.final_dir = run_id, self.dir.with_name(run_id)
            return
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

    def _resumable(self, spec: RunSpec, parent: Path) -> Path | None:
        """The stopped run this one continues (--resume, else the newest of the same command unless --no-resume),
        chosen by rank 0 (the others learn it from rank 0); sets the fingerprint checkpoints are written with (None:
        this run does not checkpoint)."""
        self._fingerprint = None
        if spec.checkpoint_every is None:
            return None
        from common.run import checkpoint

        self._fingerprint = checkpoint.fingerprint(spec.script, spec.argument_dict, distributed.world_size())
        if self.scratch:
            return None
        if spec.resume is not None:
            return checkpoint.check_resume_folder(spec.resume, self._fingerprint)
        return None if spec.fresh else checkpoint.find_resumable(parent, self._fingerprint)

    def resumable(self, batches, /, *, name: str = "data", live=(), **objects):
        """`batches` as this run reads them with checkpoints: `objects` (the state that batches update: accumulators,
        samples, their RNGs) are saved after whole batches and put back on resume, with the stream's position; `live`
        ((key, object) pairs: the model, its tokenizer) are the objects that state may refer to, saved by reference.
        Without checkpoints (torchrun, a script that does not stream): `batches` unchanged."""
        if self.checkpointer is None:
            return batches
        from common.run.checkpoint import live_registry

        return self.checkpointer.stream(batches, name, objects, live_registry(live))

    # -- context management
    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        elif ((issubclass(exc_type, KeyboardInterrupt) or stops.requested() is not None)
              and self.checkpointer is not None and self.checkpointer.exists):
            # stopped with work saved: the folder stays, for the same command (or --resume) to continue (refused
            # input is removed below: the same command would be refused again)
            done = self.checkpointer.saved_positions
            folder = self.checkpointer.dir.parent
            stops.set_resume_hint(f"checkpoint ({_positions(done)}) kept in {folder}: run the same command again to "
                                  f"continue (or add --resume {folder})")
            self._release()
            if self.scratch:  # this rank's own scratch folder; its checkpoint is in rank 0's
                shutil.rmtree(self.dir.parents[3], ignore_errors=True)
        elif issubclass(exc_type, (InputError, KeyboardInterrupt, SystemExit)) or stops.requested() is not None:
            self._release()
            shutil.rmtree(self.dir, ignore_errors=True)
            self._remove_empty_parents()
        else:
            self._release()
            self.info["error"] = f"{exc_type.__name__}: {exc}"
            self._write_info()
            failed = self.final_dir.with_name(f"{self.run_id}.failed")
            os.replace(self.dir, failed)
            print(f"run failed; what was written is kept in {failed}", file=sys.stderr)

    def _release(self, *, remove: bool = False) -> None:
        if self._lock is not None:
            self._lock.release(remove=remove)

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
        if self.checkpointer is not None:  # finished: its state is in the results now
            shutil.rmtree(self.checkpointer.dir, ignore_errors=True)
            self._release(remove=True)
        self.info["wall_time_s"] = round(time.time() - self.started, 3)
        self.info["finished"] = dt.datetime.now().isoformat(timespec="seconds")
        self._write_info()
        self.write_readme()
        os.replace(self.dir, self.final_dir)
        self.dir = self.final_dir
        print(f"results: {self.final_dir}", file=sys.stderr)
        if self.wandb_project:
            log_to_wandb(self.final_dir, self.info, self.wandb_project)
        return self.final_dir

    # -- README
    def write_readme(self) -> Path:
        """README.md of the run folder, from the files it holds now and the registry of `common.run.outputs`."""
        try:
            text, undocumented = readme_text(self.dir, self.info, metrics_link(self.final_dir))
        except Exception as err:  # a README bug must not cost the run its results
            text, undocumented = f"# {self.script} run {self.run_id}\n\nREADME generation failed: {err!r}\n", []
            print(f"{self.script}: warning: README.md generation failed: {err!r}", file=sys.stderr)
        if undocumented:
            message = (f"{len(undocumented)} output(s) not described in common/run/outputs.py (listed in README.md; "
                       "each family declares its files in common/figures/outputs/): "
                       f"{', '.join(undocumented)}")
            if os.environ.get("MOESCOPE_STRICT_OUTPUTS"):  # the test suite: every output of every script is described
                raise RuntimeError(message)
            print(f"{self.script}: warning: {message}", file=sys.stderr)
        return atomic_write(self.dir / "README.md", lambda p: p.write_text(text, encoding="utf-8"))

    # -- outputs
    def save_table(self, table: pd.DataFrame, name: str) -> Path:
        """`<name>.csv` without index; whole-number columns of the registry as integers, other floats lossless."""
        table = whole_number_columns(table, outputs.integer_columns(f"{name}.csv"))
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

        # torchrun: only rank 0 publishes, so the others skip the rendering; --no-figures: nobody renders
        if self.scratch or not self.draw:
            plt.close(fig)
            return []

        return save_figure(fig, self.dir / "figures" / name)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _positions(done: dict[str, int]) -> str:
    if not done:
        return "no batch done"
    return ", ".join(f"{n} batch{'es' if n != 1 else ''}" + (f" of {name}" if name != "data" else "")
                     for name, n in done.items()) + " done"


# ------------------------------------------------------------------------------------------------ README


def metrics_link(run_dir: Path) -> str:
    """Where docs/METRICS.md is seen from a run folder: a relative path inside the repository, else absolute."""
    target = outputs.METRICS_DOC
    try:
        run_dir.resolve().relative_to(PROJECT_ROOT)
    except ValueError:
        return target.as_posix()
    return Path(os.path.relpath(target, run_dir.resolve())).as_posix()


def _csv_header(path: Path) -> list[str]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return next(csv.reader(f), [])


def _npy_shape(path: Path) -> str:
    try:
        array = np.load(path, mmap_mode="r")
        return f"shape {tuple(array.shape)}, {array.dtype}"
    except (ValueError, OSError) as err:
        return f"unreadable: {err}"


def _json_keys(path: Path) -> list[str]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return []
    return list(value) if isinstance(value, dict) else []


def _files_list(names: list[str]) -> str:
    return ", ".join(f"`{n}`" for n in names)


def readme_text(folder: Path, info: dict[str, Any], metrics: str) -> tuple[str, list[str]]:
    """The README.md of a run folder and the list of its undocumented files, columns and keys.

    `metrics` is the path of docs/METRICS.md as seen from the folder (links are `<metrics>#<anchor>`).
    """
    files = sorted({p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} | {"README.md"})
    groups: dict[int, list[str]] = {}
    unknown_files: list[str] = []
    for name in files:
        entry = outputs.lookup(name)
        if entry is None:
            unknown_files.append(name)
        else:
            groups.setdefault(outputs.REGISTRY.index(entry), []).append(name)

    script = info.get("script", "?")
    lines = [f"# {script} run {info.get('run_id', folder.name)}", "",
             "Written by moescope when the run finished: every file of this folder, what it holds and where its "
             "metric is defined (`docs/METRICS.md` of the moescope repository). Conventions shared by all files "
             f"(counted tokens, the `all` domain, layer order, units): [docs/METRICS.md#conventions]({metrics}#conventions).",
             ""]
    tokens = (info.get("tokens") or {}).get("domains") or {}
    data = ", ".join(f"{name} ({d.get('counted', '?')} tokens)" for name, d in tokens.items()) or "—"
    model = info.get("model", "?")
    revision = (info.get("arguments") or {}).get("revision")
    facts = [("script", f"`{script}.py`"), ("model", f"`{model}`" + (f" at revision `{revision}`" if revision else "")),
             ("data", data), ("seed", info.get("seed")), ("started", info.get("started")),
             ("finished", f"{info.get('finished')} (wall time {info.get('wall_time_s')} s)"),
             ("git commit", f"`{info.get('git_commit')}`"), ("full record", "`run.json`")]
    lines += ["| | |", "|---|---|", *(f"| {k} | {_markdown_cell(v)} |" for k, v in facts), ""]
    command = str(info.get("command") or "")
    lines += ["## Command", ""]
    if Path(command.split(" ", 1)[0]).stem == script:
        lines += ["```", f"uv run {command}", "```", ""]
    else:
        arguments = info.get("arguments") or {}
        lines += [f"Called in-process as `{script}.main(argv)` (host command: `{command}`), with these flags "
                  "(run.json → `arguments`):", "", "```",
                  *(f"{key} = {json.dumps(value)}" for key, value in arguments.items()), "```", ""]

    undocumented: list[str] = list(unknown_files)
    lines += ["## Files", ""]
    for index in sorted(groups):
        entry, names = outputs.REGISTRY[index], groups[index]
        single = len(names) == 1 and names[0] == entry.pattern
        lines += [f"### `{entry.pattern}`", ""]
        text = entry.description[0].upper() + entry.description[1:] + "."
        if entry.link:
            text += f" Definition: [{entry.link}]({metrics}#{entry.anchor})."
        lines += [text, ""]
        if not single:
            lines += [f"Files: {_files_list(names)}.", ""]
        if names[0].endswith(".csv"):
            columns: list[str] = []
            for name in names:
                columns += [c for c in _csv_header(folder / name) if c not in columns]
            rows = []
            for column in columns:
                meaning = entry.column(column)
                if meaning is None:
                    undocumented.append(f"{names[0]}: column {column}")
                    meaning = "**undocumented** (add it to its family's module in common/figures/outputs/)"
                rows.append(f"| `{column}` | {_markdown_cell(meaning)} |")
            lines += ["| column | meaning |", "|---|---|", *rows, ""]
        elif names[0].endswith(".npy"):
            shapes = sorted({_npy_shape(folder / name) for name in names})
            lines += [f"Axes: `{entry.axes}`; values: {entry.dtype}; here {'; '.join(shapes)}.", ""]
        elif names[0].endswith(".json") and entry.keys:
            keys: list[str] = []
            for name in names:
                keys += [k for k in _json_keys(folder / name) if k not in keys]
            rows = []
            for key in keys:
                meaning = entry.keys.get(key)
                if meaning is None:
                    undocumented.append(f"{names[0]}: key {key}")
                    meaning = "**undocumented** (add it to its family's module in common/figures/outputs/)"
                rows.append(f"| `{key}` | {_markdown_cell(meaning)} |")
            lines += ["| key | meaning |", "|---|---|", *rows, ""]
    if undocumented:
        lines += ["## Undocumented", "",
                  "These outputs are not described in the registry `common/run/outputs.py`. That is a bug: add them to "
                  "their family's module in `common/figures/outputs/`.", "",
                  *(f"- `{item}`" for item in undocumented), ""]
    return "\n".join(lines), undocumented


def log_to_wandb(folder: Path, info: dict[str, Any], project: str) -> None:
    """`--wandb PROJECT`: the run's metadata, its tables (first 10,000 rows each) and figures, as one W&B run.

    Optional and after the results are safely on disk: a logging failure is a warning, never a lost run.
    """
    try:
        import wandb

        (folder.parent / ".wandb").mkdir(exist_ok=True)
        run = wandb.init(project=project, name=f"{info['script']}/{info['run_id']}", config=info.get("arguments", {}),
                         dir=str(folder.parent / ".wandb"), job_type=str(info["script"]))  # keeps the run folder as documented
        run.summary.update({k: info.get(k) for k in ("model", "git_commit", "wall_time_s", "world_size")})
        payload: dict[str, Any] = {}
        for csv in sorted(folder.glob("*.csv")):
            payload[f"table/{csv.stem}"] = wandb.Table(dataframe=pd.read_csv(csv, nrows=10_000))
        for png in sorted((folder / "figures").glob("*.png")):
            payload[f"figure/{png.stem}"] = wandb.Image(str(png))
        run.log(payload)
        run.finish()
    except Exception as err:  # optional logging must not fail a finished run
        print(f"{info.get('script')}: warning: logging to Weights & Biases failed: {err!r}", file=sys.stderr)
