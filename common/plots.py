"""Figure helpers: a consistent style and `save_figure(fig, stem)` writing PDF (for papers) and PNG (for a glance)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # scripts run headless on GPU boxes and in CI

import matplotlib.pyplot as plt

plt.rcParams.update(
    {
        "figure.dpi": 110,
        "savefig.dpi": 150,
        "savefig.bbox": "tight",
        "axes.spines.top": False,
        "axes.spines.right": False,
        "font.size": 9,
        "axes.titlesize": 10,
        "pdf.fonttype": 42,  # editable text in Illustrator/Inkscape
        # Fixed metadata so two runs with the same inputs give identical PDFs.
        "svg.hashsalt": "moescope",
    }
)


def save_figure(fig: plt.Figure, stem: str | Path) -> list[Path]:
    """Write `<stem>.pdf` and `<stem>.png` atomically, then close the figure."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for ext in ("pdf", "png"):
        target = stem.with_suffix(f".{ext}")
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".{ext}", dir=target.parent)
        os.close(fd)
        try:
            metadata = {"CreationDate": None} if ext == "pdf" else {"Software": None}
            fig.savefig(tmp, format=ext, metadata=metadata)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        written.append(target)
    plt.close(fig)
    return written


def grid(n_panels: int, ncols: int = 4, panel_size: tuple[float, float] = (3.2, 2.4)) -> tuple[plt.Figure, list[plt.Axes]]:
    """A figure with `n_panels` axes in rows of `ncols`; unused axes are hidden."""
    ncols = max(1, min(ncols, n_panels))
    nrows = -(-n_panels // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size[0] * ncols, panel_size[1] * nrows), squeeze=False,
                             layout="constrained")
    flat = list(axes.flat)
    for ax in flat[n_panels:]:
        ax.set_visible(False)
    return fig, flat[:n_panels]
