"""The output registry: every file a script writes, described once (what it holds, the anchor of its definition in
docs/METRICS.md, its CSV columns, npy axes or JSON keys; see `Output`). `REGISTRY` is the run-metadata entries below
followed by the entries each family declares in `common/figures/outputs/`, script by script in `SCRIPT_ORDER`;
`lookup` returns the first entry whose pattern matches a file. `Run.finish` turns it into the README.md of every run
folder, listing a file or CSV column no entry describes as undocumented (the tests fail on it). A new script adds
its files to its family's module there, not here.
"""

from __future__ import annotations

import re
from pathlib import Path

from common.figures.outputs import (
    causal,
    comparison,
    contrast,
    outliers,
    probing,
    representations,
    routing,
    stability,
)
from common.figures.outputs.entry import METRICS_PATH, Output

__all__ = ["METRICS_DOC", "METRICS_PATH", "REGISTRY", "Output", "github_anchor", "integer_columns", "lookup",
           "metric_anchors"]

METRICS_DOC = Path(__file__).resolve().parents[2] / "docs" / "METRICS.md"

# Written by every script.
RUN_METADATA: tuple[Output, ...] = (
    Output("run.json", "the run's record: every flag, model id and revision, MoE layers found, package versions, "
           "git commit, seed, tokens counted per domain, wall time", "run-folder"),
    Output("README.md", "this file: what each file of the run folder holds", "run-folder"),
)

FAMILIES = (routing, representations, causal, probing, comparison, outliers, stability, contrast)
# The order of the scripts' entries in REGISTRY (each keeps its family's order; a script not named here goes last).
SCRIPT_ORDER = ("router_decisive", "router_stats", "router_metrics", "profiles", "weights", "logit_lens", "interv",
                "sim", "dim_reduc", "cluster", "label", "probing", "prune", "outliers", "stability", "contrast")


def _position(entry: Output) -> int:
    script = entry.scripts[0] if entry.scripts else ""
    return SCRIPT_ORDER.index(script) if script in SCRIPT_ORDER else len(SCRIPT_ORDER)


REGISTRY: tuple[Output, ...] = RUN_METADATA + tuple(
    sorted((entry for family in FAMILIES for entry in family.OUTPUTS), key=_position))  # a stable sort


def lookup(relative: str | Path) -> Output | None:
    """The entry describing a file (path relative to the run folder, '/'-separated), or None."""
    name = Path(relative).as_posix()
    return next((entry for entry in REGISTRY if entry.matches(name)), None)


def integer_columns(filename: str) -> frozenset[str]:
    """Columns of a CSV file (by its name in the run folder) that hold whole numbers."""
    entry = lookup(filename)
    return entry.integers if entry is not None else frozenset()


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def metric_anchors(text: str | None = None) -> set[str]:
    """Every heading anchor of docs/METRICS.md (or of `text`)."""
    text = METRICS_DOC.read_text(encoding="utf-8") if text is None else text
    anchors: set[str] = set()
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        match = None if in_code else re.match(r"#{1,6}\s+(.*)", line)
        if match:
            anchor = github_anchor(match.group(1))
            base, n = anchor, 0
            while anchor in anchors:  # GitHub numbers repeated headings
                n += 1
                anchor = f"{base}-{n}"
            anchors.add(anchor)
    return anchors
