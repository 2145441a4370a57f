"""Figure helpers: a consistent style and `save_figure(fig, stem)` writing PDF (for papers) and PNG (for a glance)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # scripts run headless on GPU boxes and in CI

import matplotlib.pyplot as plt

from common.atomic import atomic_write

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
    written = []
    for ext in ("pdf", "png"):
        metadata = {"CreationDate": None} if ext == "pdf" else {"Software": None}
        target = atomic_write(
            stem.with_suffix(f".{ext}"),
            lambda tmp, ext=ext, metadata=metadata: fig.savefig(tmp, format=ext, metadata=metadata),
            suffix=f".{ext}",
        )
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
