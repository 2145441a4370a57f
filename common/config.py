"""Typed, frozen run configuration: what `common.cli` makes of the command line, once.

Nothing in `common/` reads an argparse `Namespace`; it receives these specs. They import nothing heavy, so a
script can parse and validate its flags before torch or transformers is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MODELS = {"demo": PROJECT_ROOT / "data" / "demo-moe", "demo-dense": PROJECT_ROOT / "data" / "demo-dense"}
# Training checkpoints shipped beside a model, reachable as its --revision stepN; "main" is the shipped model itself
# (data/demo-moe/TRAINING.md says which training run each comes from).
SHIPPED_CHECKPOINTS = {"demo": PROJECT_ROOT / "data" / "demo-moe-checkpoints"}
RANDOM_PREFIX = "random:"
# --dtype names (the torch names and their short forms) -> the torch name
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}
DTYPES = ("auto", *DTYPE_NAMES)


def shipped_revisions(name: str) -> dict[str, Path]:
    """The revisions of shipped model `name` by name (stepN in training order, then 'main'), with their folders."""
    folder = SHIPPED_CHECKPOINTS.get(name)
    found = sorted(((int(p.name[4:]), p) for p in folder.glob("step*") if p.name[4:].isdigit()
                    and (p / "config.json").is_file()), key=lambda item: item[0]) if folder and folder.is_dir() else []
    revisions = {f"step{step}": path for step, path in found}
    revisions["main"] = SHIPPED_MODELS[name]
    return revisions


def default_model() -> str:
    """The shipped demo model when present, else a tiny random OLMoE (both offline)."""
    return "demo" if (SHIPPED_MODELS["demo"] / "config.json").is_file() else "random:olmoe"


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load and how (`--model --revision --dtype --device --device_map --max_memory --offload_folder
    --trust_remote_code`)."""

    model: str
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    # With device_map: the most each device may hold, e.g. (("0", "20GiB"), ("cpu", "64GiB")); the rest is
    # offloaded to `offload_folder` (accelerate's disk offload).
    max_memory: tuple[tuple[str, str], ...] = ()
    offload_folder: str | None = None
    trust_remote_code: bool = False
    seed: int = 0  # initialises `random:<arch>` models


@dataclass(frozen=True)
class DataSpec:
    """Which text, how much of it, and how it is cut into batches."""

    sources: tuple[str, ...] = ("demo",)  # presets or [name=]SOURCE items of --data
    domains: tuple[str, ...] | None = None  # keep only these domains of the preset
    num_domains: int | None = None  # keep the first N domains of the preset
    num_tokens: int = 10_000  # counted tokens per domain
    seq_len: int | None = None  # window length; None = min(512, the model's context)
    batch_size: int = 16
    keep_special: bool = False
    pack: bool = False
    seed: int = 0  # document order


@dataclass(frozen=True)
class RunSpec:
    """Where results go and how the run reports itself."""

    script: str
    out: Path = Path("results")
    seed: int = 0
    progress: bool = True
    arguments: tuple[tuple[str, Any], ...] = field(default=())  # every flag as given, for run.json
    command: tuple[str, ...] | None = None  # the command line (None: this process's own sys.argv)
    wandb: str | None = None  # Weights & Biases project to log the finished run to (optional)
    figures: bool = True  # False (--no-figures): the data files only
    # Checkpoints (scripts that stream data): minutes between saves of the streaming state (0: after every batch);
    # None: this script does not checkpoint
    checkpoint_every: float | None = None
    resume: Path | None = None  # --resume: the stopped run to continue (else a matching one is found, unless `fresh`)
    fresh: bool = False  # --no-resume: start afresh even when a stopped run of the same command exists

    @property
    def argument_dict(self) -> dict[str, Any]:
        return dict(self.arguments)


@dataclass(frozen=True)
class Config:
    """Everything a script's shared steps need: the model, the layers asked for, the data and the run."""

    model: ModelSpec
    run: RunSpec
    data: DataSpec | None = None
    layers: tuple[str, ...] | None = None  # --layers as given: indices, negatives, or 'all'; None = every MoE layer
