"""The run folder: where a script's results go, how each file is described, and how it is published.

`folder.py` gives `Run` (staging folder, run.json, tables, npy, JSON, figures, README.md, publication on
success); `outputs.py` is the registry that describes every file a script may write, assembled from the families'
declarations in `common/figures/outputs/`; each run's README.md is generated from it. Writing is atomic
(`common.atomic`). Names are imported on first use, so `from common.run import outputs` (report.py) stays light.

Public surface:
"""

from __future__ import annotations

import importlib

PUBLIC = {
    "Run": "one run's folder: save_table / save_npy / save_json / save_figure, then publish on success",
    "PROJECT_ROOT": "the repository root (docs/METRICS.md is found from here)",
    "metrics_link": "the relative link from a run folder to docs/METRICS.md",
    "whole_number_columns": "a table with the registry's whole-number columns written as integers",
}

__all__ = list(PUBLIC)


def __getattr__(name: str):
    if name not in PUBLIC:
        raise AttributeError(f"module 'common.run' has no attribute {name!r}")
    value = getattr(importlib.import_module("common.run.folder"), name)
    globals()[name] = value
    return value
