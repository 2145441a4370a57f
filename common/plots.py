"""Figure helpers shared by every script: one style, `save_figure(fig, stem)` writing PDF (for papers) and PNG (for a
glance), and the layout and labelling rules every figure follows:

* page width: a figure is at most `PAGE_WIDTH` inches wide (A4 text width; ≤ 1200 px at the saved 150 dpi), and
  several panels wrap into rows (`a4_grid`), never one long row;
* words, not variable names, in titles; every axis labelled with its unit (`label`);
* layers and experts are integers, so their axes only get integer ticks (`integer_axis`);
* heatmaps carry a labelled colour bar (`heatmap`); correlation matrices mask their ±1 diagonal, scale colours
  symmetrically from the off-diagonal values and draw the layer boundaries (`correlation_heatmap`);
* histograms are drawn over the range their data occupy (`occupied_range`), not the whole binning range.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # scripts run headless on GPU boxes and in CI

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FixedLocator, MaxNLocator

from common.atomic import atomic_write

plt.rcParams.update(
    {
        "figure.dpi": 110,
        "savefig.dpi": 150,
        "savefig.bbox": "tight",
        "axes.spines.top": False,
        "axes.spines.right": False,
        "font.size": 8,
        "axes.titlesize": 9,
        "axes.labelsize": 8,
        "xtick.labelsize": 7,
        "ytick.labelsize": 7,
        "legend.fontsize": 7,
        "figure.titlesize": 10,
        "pdf.fonttype": 42,  # editable text in Illustrator/Inkscape
        # Fixed metadata so two runs with the same inputs give identical PDFs.
        "svg.hashsalt": "moescope",
    }
)

PAGE_WIDTH = 7.2  # inches: A4 text width; 1080 px at 150 dpi (the tight bounding box may add a little)
SAVE_DPI = 150
MAX_PNG_WIDTH = 1200  # px at SAVE_DPI: what tests/test_figures.py checks for every figure


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


# ------------------------------------------------------------------------------------------------ layout


def a4_grid(n_panels: int, max_cols: int = 3, panel_height: float = 2.2, width: float = PAGE_WIDTH,
            spare: int = 0, **subplot_kw) -> tuple[plt.Figure, list[plt.Axes]]:
    """A figure at most `width` (page width) wide with `n_panels` axes wrapped into rows of at most `max_cols`.

    `spare` asks for that many extra cells (e.g. one for a legend, see `legend_panel`); they are returned hidden,
    after the panels, and only add a row when the last row has no room. Unused cells are hidden.
    """
    cells = n_panels + spare
    ncols = max(1, min(max_cols, cells))
    nrows = max(1, -(-cells // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(min(width, PAGE_WIDTH), panel_height * nrows), squeeze=False,
                             layout="constrained", **subplot_kw)
    flat = list(axes.flat)
    for ax in flat[n_panels:]:
        ax.set_visible(False)
    return fig, flat[:cells]


def grid(n_panels: int, ncols: int = 4, panel_size: tuple[float, float] = (3.2, 2.4)) -> tuple[plt.Figure, list[plt.Axes]]:
    """`a4_grid` in the older call form: rows of at most `ncols` panels, never wider than the page."""
    shown = max(1, min(ncols, n_panels))
    return a4_grid(n_panels, max_cols=ncols, panel_height=panel_size[1], width=min(PAGE_WIDTH, panel_size[0] * shown))


def legend_panel(fig: plt.Figure, axes: Sequence[plt.Axes], slot: plt.Axes | None = None, **kwargs) -> None:
    """One legend for all panels (handles of the first panel that has labels, de-duplicated): inside the spare
    `slot` cell when given, else below the panels."""
    handles, labels = {}, []
    for ax in axes:
        for handle, text in zip(*ax.get_legend_handles_labels(), strict=True):
            if text not in handles:
                handles[text] = handle
                labels.append(text)
    if not labels:
        return
    if slot is not None:
        slot.set_visible(True)
        slot.axis("off")
        slot.legend([handles[t] for t in labels], labels, loc="center", frameon=False, **kwargs)
    else:
        ncols = min(len(labels), 6)
        fig.legend([handles[t] for t in labels], labels, loc="outside lower center", ncols=ncols, frameon=False,
                   **kwargs)


# ------------------------------------------------------------------------------------------------ axes


def label(ax: plt.Axes, x: str | None = None, y: str | None = None, title: str | None = None) -> plt.Axes:
    """Axis labels (with units) and a title in words; None leaves one unchanged."""
    if x is not None:
        ax.set_xlabel(x)
    if y is not None:
        ax.set_ylabel(y)
    if title is not None:
        ax.set_title(title)
    return ax


def integer_axis(ax: plt.Axes, axis: str = "x", values: Sequence[int] | None = None, max_ticks: int = 12,
                 pad: float | None = 0.6) -> None:
    """Integer ticks only (layers, experts, counts): at exactly `values` when there are few of them, else at
    integers chosen by matplotlib (never 2.5). With `values`, the axis spans them ± `pad` (None: unchanged), so
    no tick names a layer or expert that does not exist."""
    target = ax.xaxis if axis == "x" else ax.yaxis
    values = sorted({int(v) for v in values}) if values is not None else None
    if values and len(values) <= max_ticks:
        target.set_major_locator(FixedLocator(values))
    else:
        target.set_major_locator(MaxNLocator(nbins=max(2, min(max_ticks, 10)), integer=True, min_n_ticks=1))
    if values and pad is not None:
        limits = (values[0] - pad, values[-1] + pad) if len(values) > 1 else (values[0] - 1, values[0] + 1)
        (ax.set_xlim if axis == "x" else ax.set_ylim)(*(limits if axis == "x" or not ax.yaxis_inverted()
                                                         else limits[::-1]))


@functools.cache
def _has_glyph(char: str) -> bool:
    from matplotlib.font_manager import FontProperties, findfont, get_font

    font = get_font(findfont(FontProperties(family=plt.rcParams["font.family"])))
    return font.get_char_index(ord(char)) != 0


def text_label(text: str, limit: int = 18, quoted: bool = True, prose: bool = False) -> str:
    """A token or other raw string as a readable, safe tick label: its Python repr (spaces, newlines and control
    characters visible; without the quotes unless `quoted`), characters the font lacks as \\u escapes, shortened to
    `limit` characters, with `$` escaped so matplotlib does not read math. `prose`: free text (an LLM's label), shown
    as written with runs of whitespace as one space, instead of a repr."""
    shown = " ".join(text.split()) if prose else repr(text) if quoted else repr(text)[1:-1]
    shown = "".join(c if c.isascii() or _has_glyph(c) else ascii(c)[1:-1] for c in shown)
    if len(shown) > limit:
        shown = shown[: limit - 1] + "…"
    return shown.replace("$", r"\$")


def occupied_range(counts: np.ndarray, edges: np.ndarray, pad: float = 0.03) -> tuple[float, float]:
    """The x range of a histogram's non-empty bins (any leading axes pooled), padded by `pad` of its width."""
    counts = np.asarray(counts).reshape(-1, len(edges) - 1).sum(0)
    filled = np.nonzero(counts)[0]
    if not len(filled):
        return float(edges[0]), float(edges[-1])
    lo, hi = float(edges[filled[0]]), float(edges[filled[-1] + 1])
    margin = pad * (hi - lo)
    return lo - margin, hi + margin


def bar_values(ax: plt.Axes, bars, fmt: str = "{:.2g}", fontsize: float = 6.5, **kwargs) -> None:
    """Write each bar's value at its end."""
    ax.bar_label(bars, labels=[fmt.format(v) for v in bars.datavalues], fontsize=fontsize, padding=1.5, **kwargs)


# ------------------------------------------------------------------------------------------------ heatmaps


def heatmap(ax: plt.Axes, matrix: np.ndarray, *, cbar_label: str, cmap: str = "viridis", vmin: float | None = None,
            vmax: float | None = None, norm=None, xlabel: str | None = None, ylabel: str | None = None,
            title: str | None = None, xticklabels: Sequence[str] | None = None,
            yticklabels: Sequence[str] | None = None, mask_diagonal: bool = False, annotate: str | None = None,
            cbar: bool = True, aspect: str = "auto", max_ticks: int = 16):
    """`matrix` as an image with a labelled colour bar. Rows/columns are integer indices (experts) unless tick
    labels are given; NaN cells (and the diagonal with `mask_diagonal`) are drawn light grey. `annotate`: a format
    such as "{:.0f}" to write every value into its cell (small matrices only)."""
    matrix = np.array(matrix, dtype=np.float64)
    if mask_diagonal and matrix.shape[0] == matrix.shape[1]:
        np.fill_diagonal(matrix, np.nan)
    colours = plt.get_cmap(cmap).with_extremes(bad="#dddddd")
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=colours, vmin=None if norm else vmin,
                      vmax=None if norm else vmax, norm=norm, aspect=aspect, interpolation="nearest")
    if xticklabels is not None:
        ax.set_xticks(range(len(xticklabels)), list(xticklabels), rotation=45 if len(xticklabels) > 4 else 0,
                      ha="right" if len(xticklabels) > 4 else "center")
    else:
        integer_axis(ax, "x", range(matrix.shape[1]), max_ticks=max_ticks, pad=0.5)
    if yticklabels is not None:
        ax.set_yticks(range(len(yticklabels)), list(yticklabels))
    else:
        integer_axis(ax, "y", range(matrix.shape[0]), max_ticks=max_ticks, pad=0.5)
    ax.spines[:].set_visible(False)
    label(ax, xlabel, ylabel, title)
    if annotate:
        for (i, j), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                red, green, blue, _ = image.cmap(image.norm(value))
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                ax.text(j, i, annotate.format(value), ha="center", va="center", fontsize=6.5,
                        color="white" if dark else "black")
    if cbar:
        ax.figure.colorbar(image, ax=ax, label=cbar_label, shrink=0.9)
    return image


def symmetric_limit(values: np.ndarray, percentile: float = 99.0) -> float:
    """The colour limit of a diverging scale: the `percentile` of |values| (finite ones), never 0."""
    finite = np.abs(values[np.isfinite(values)])
    limit = float(np.percentile(finite, percentile)) if finite.size else 1.0
    return limit if limit > 0 else 1.0


def correlation_heatmap(ax: plt.Axes, matrix: np.ndarray, block: int, labels: Sequence[int | str], *,
                        vmax: float | None = None, cbar_label: str = "Pearson r", title: str | None = None,
                        cbar: bool = True):
    """A correlation matrix over (group × `block`) coordinates, e.g. (layer × expert): the ±1 diagonal masked, a
    symmetric colour scale from the off-diagonal values (`vmax`: their 99th percentile of |r| unless given),
    lines at the group boundaries and one tick per group. Returns (image, vmax)."""
    matrix = np.array(matrix, dtype=np.float64)
    np.fill_diagonal(matrix, np.nan)
    if vmax is None:
        vmax = symmetric_limit(matrix)
    image = heatmap(ax, matrix, cbar_label=cbar_label, cmap="RdBu_r", vmin=-vmax, vmax=vmax, title=title,
                    cbar=cbar, aspect="equal")
    n = len(labels)
    for boundary in range(1, n):
        for draw in (ax.axhline, ax.axvline):
            draw(boundary * block - 0.5, color="black", linewidth=0.6)
    centres = [g * block + (block - 1) / 2 for g in range(n)]
    step = max(1, -(-n // 12))  # at most about 12 labelled groups
    ax.set_xticks(centres[::step], [str(x) for x in labels][::step])
    ax.set_yticks(centres[::step], [str(x) for x in labels][::step])
    ax.tick_params(length=0)
    return image, vmax
