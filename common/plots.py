"""Figure helpers shared by every script: one style, `save_figure(fig, stem)` writing PDF (for papers) and PNG (for a
glance), and the layout and labelling rules every figure follows:

* page width: a figure is at most `PAGE_WIDTH` inches wide (A4 text width; ≤ 1200 px at the saved 150 dpi), and
  several panels wrap into rows (`a4_grid`), never one long row;
* words, not variable names, in titles; every axis labelled with its unit (`label`);
* layers and experts are integers, so their axes only get integer ticks (`integer_axis`);
* heatmaps carry a labelled colour bar (`heatmap`); correlation matrices mask their ±1 diagonal, scale colours
  symmetrically from the off-diagonal values and draw the layer boundaries (`correlation_heatmap`);
* histograms are drawn over the range their data occupy (`occupied_range`), not the whole binning range;
* every expert of an axis gets a tick mark, labelled where the labels fit (`index_ticks`);
* labels written on points never overlap (`place_labels`); class colours stay far apart (`distinct_colours`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # scripts run headless on GPU boxes and in CI

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import to_rgb, to_rgba
from matplotlib.lines import Line2D
from matplotlib.text import Text
from matplotlib.ticker import FixedLocator, MaxNLocator, NullFormatter

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


# ------------------------------------------------------------------------------------------------ index ticks


def index_ticks(axes: plt.Axes | Sequence[plt.Axes], values: Sequence[int], axis: str = "x",
                fontsize: float = 6.5) -> int:
    """A tick mark at every index in `values` (experts) on each of `axes`, each labelled when the labels fit the
    axis' length, else every 2nd, 5th, 10th, … labelled and the others marked by short unlabelled ticks; the axis
    spans the values ± 0.6. Measured on the figure as laid out, so call it last. Returns the largest label step."""
    axes = [axes] if isinstance(axes, plt.Axes) else list(axes)
    values = sorted({int(v) for v in values})
    if not values or not axes:
        return 1
    fig = axes[0].figure
    fig.draw_without_rendering()  # constrained layout: the axes' final size decides how many labels fit
    renderer = fig.canvas.get_renderer()
    probe = Text(0, 0, str(max(values, key=lambda v: len(str(v)))), fontsize=fontsize, figure=fig)
    extent = probe.get_window_extent(renderer)
    needed = 1.4 * (extent.width if axis == "x" else extent.height)  # a label and a gap of 40% of one
    largest = 1
    for ax in axes:
        frame = ax.get_window_extent(renderer)
        pitch = (frame.width if axis == "x" else frame.height) / (values[-1] - values[0] + 1.2)  # px per index
        step = next(s for s in _steps() if s * pitch >= needed or s >= len(values))
        labelled = [v for v in values if v % step == 0] or values[:1]
        target = ax.xaxis if axis == "x" else ax.yaxis
        target.set_major_locator(FixedLocator(labelled))
        target.set_minor_locator(FixedLocator([v for v in values if v not in labelled]))
        target.set_minor_formatter(NullFormatter())
        ax.tick_params(axis=axis, which="major", labelsize=fontsize)
        ax.tick_params(axis=axis, which="minor", length=2)
        (ax.set_xlim if axis == "x" else ax.set_ylim)(values[0] - 0.6, values[-1] + 0.6)
        largest = max(largest, step)
    return largest


def _steps():
    """1, 2, 5, 10, 20, 50, …"""
    scale = 1
    while True:
        yield from (scale, 2 * scale, 5 * scale)
        scale *= 10


# ------------------------------------------------------------------------------------------------ point labels


def place_labels(ax: plt.Axes, anchors: np.ndarray, texts: Sequence[str], colours: Sequence, *,
                 fontsize: float = 8.0, obstacles: Sequence[plt.Artist] = (), gid: str = "point-label",
                 beside: bool = False, marker_px: float = 3.0, **text_kw) -> list[Text]:
    """Write `texts[i]` at `anchors[i]` (data coordinates) so that no two labels overlap: each label takes the free
    spot nearest its anchor (on rings of growing radius), inside the axes and clear of the labels placed before it
    and of `obstacles` (e.g. a note in a corner); a label moved off its anchor gets a thin leader line to it.
    `beside`: the anchors are drawn markers (a scatter), so no label may cover any anchor's ±`marker_px` box (a
    label of a centroid, the default, sits on it). Anchors that are NaN or outside the view get no label. Call it
    once the axes' limits are final: it freezes them, and measures in display pixels after settling the layout."""
    fig = ax.figure
    fig.draw_without_rendering()
    ax.set_xlim(ax.get_xlim())  # leader lines must not widen the view the labels were placed in
    ax.set_ylim(ax.get_ylim())
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    taken = [_box(o.get_window_extent(renderer)) for o in obstacles if o.get_visible()]
    if beside:
        pixels = ax.transData.transform(np.asarray(anchors, dtype=np.float64).reshape(-1, 2))
        taken += [np.array([px - marker_px, py - marker_px, px + marker_px, py + marker_px])
                  for px, py in pixels if np.isfinite(px) and np.isfinite(py)]
    to_data = ax.transData.inverted()
    pad = 2.0  # pixels around each label: its white outline
    written = []
    for (x, y), text, colour in zip(np.asarray(anchors, dtype=np.float64), texts, colours, strict=True):
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        ax_x, ax_y = ax.transData.transform((x, y))
        if not (frame.x0 <= ax_x <= frame.x1 and frame.y0 <= ax_y <= frame.y1):
            continue
        artist = ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, color=colour, gid=gid, **text_kw)
        artist.set_in_layout(False)
        extent = artist.get_window_extent(renderer)
        half_w, half_h = extent.width / 2 + pad, extent.height / 2 + pad
        centres = _ring_candidates(ax_x, ax_y, step=max(half_h, 2.0), reach=np.hypot(frame.width, frame.height))
        boxes = np.column_stack([centres[:, 0] - half_w, centres[:, 1] - half_h,
                                 centres[:, 0] + half_w, centres[:, 1] + half_h])
        free = ((boxes[:, 0] >= frame.x0) & (boxes[:, 1] >= frame.y0)
                & (boxes[:, 2] <= frame.x1) & (boxes[:, 3] <= frame.y1))
        for other in taken:
            free &= ~((boxes[:, 0] < other[2]) & (boxes[:, 2] > other[0])
                      & (boxes[:, 1] < other[3]) & (boxes[:, 3] > other[1]))
        index = int(np.argmax(free)) if free.any() else 0  # no room left anywhere: keep it on its anchor
        centre = centres[index]
        artist.set_position(to_data.transform(centre))
        taken.append(boxes[index])
        offset = centre - (ax_x, ax_y)
        if np.hypot(*offset) > half_h:
            # from the anchor to the label's edge, so that the line does not cross the text
            scale = min(half_w / abs(offset[0]) if offset[0] else np.inf,
                        half_h / abs(offset[1]) if offset[1] else np.inf)
            end = to_data.transform(centre - offset * min(scale, 1.0))
            ax.add_line(Line2D([x, end[0]], [y, end[1]], color=colour, linewidth=0.6, alpha=0.8, zorder=2.5))
        written.append(artist)
    return written


def _box(extent) -> np.ndarray:
    return np.array([extent.x0, extent.y0, extent.x1, extent.y1])


def _ring_candidates(x: float, y: float, step: float, reach: float) -> np.ndarray:
    """Points on rings of radius 0, step, 2·step, … up to `reach` around (x, y), nearest first."""
    points = [np.array([[x, y]])]
    for radius in np.arange(step, reach + step, step):
        count = int(np.clip(2 * np.pi * radius / step, 8, 96))
        angles = np.linspace(0, 2 * np.pi, count, endpoint=False) + np.pi / 2  # above the anchor first
        points.append(np.column_stack([x + radius * np.cos(angles), y + radius * np.sin(angles)]))
    return np.concatenate(points)


# ------------------------------------------------------------------------------------------------ colours


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB colours in [0, 1], shape [..., 3]."""
    rgb = np.asarray(rgb, dtype=np.float64)
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                       [0.0193339, 0.1191920, 0.9503041]])
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def colour_difference(lab1: np.ndarray, lab2: np.ndarray) -> np.ndarray:
    """CIEDE2000 colour difference ΔE00 of CIELAB colours (broadcast over leading axes): about 1 is just
    noticeable side by side, 10 or more reads as a different colour at a glance."""
    L1, a1, b1 = np.moveaxis(np.asarray(lab1, dtype=np.float64), -1, 0)
    L2, a2, b2 = np.moveaxis(np.asarray(lab2, dtype=np.float64), -1, 0)
    c_mean = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    g = 0.5 * (1 - np.sqrt(c_mean**7 / (c_mean**7 + 25.0**7)))
    a1, a2 = (1 + g) * a1, (1 + g) * a2
    c1, c2 = np.hypot(a1, b1), np.hypot(a2, b2)
    h1, h2 = np.degrees(np.arctan2(b1, a1)) % 360, np.degrees(np.arctan2(b2, a2)) % 360
    chromatic = c1 * c2 != 0
    dh = h2 - h1
    dh = np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh))
    dh = np.where(chromatic, dh, 0.0)
    d_hue = 2 * np.sqrt(c1 * c2) * np.sin(np.radians(dh / 2))
    l_mean, c_mean = (L1 + L2) / 2, (c1 + c2) / 2
    h_sum = h1 + h2
    h_mean = np.where(np.abs(h1 - h2) > 180, np.where(h_sum < 360, h_sum + 360, h_sum - 360), h_sum) / 2
    h_mean = np.where(chromatic, h_mean, h_sum)
    t = (1 - 0.17 * np.cos(np.radians(h_mean - 30)) + 0.24 * np.cos(np.radians(2 * h_mean))
         + 0.32 * np.cos(np.radians(3 * h_mean + 6)) - 0.20 * np.cos(np.radians(4 * h_mean - 63)))
    rotation = -np.sin(np.radians(60 * np.exp(-(((h_mean - 275) / 25) ** 2)))) * 2 * np.sqrt(
        c_mean**7 / (c_mean**7 + 25.0**7))
    s_l = 1 + 0.015 * (l_mean - 50) ** 2 / np.sqrt(20 + (l_mean - 50) ** 2)
    s_c = 1 + 0.045 * c_mean
    s_h = 1 + 0.015 * c_mean * t
    dl, dc, dh_term = (L2 - L1) / s_l, (c2 - c1) / s_c, d_hue / s_h
    return np.sqrt(dl**2 + dc**2 + dh_term**2 + rotation * dc * dh_term)


@functools.cache
def _distinct_sequence(n: int) -> tuple[tuple[float, float, float, float], ...]:
    """tab10, then greedily the sRGB colour farthest (ΔE00) from all chosen so far, among colours of lightness
    25–85 (visible on white, not black)."""
    chosen = [to_rgb(c) for c in plt.get_cmap("tab10").colors]
    levels = np.linspace(0.0, 1.0, 18)
    candidates = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    lab = srgb_to_lab(candidates)
    keep = (lab[:, 0] >= 25) & (lab[:, 0] <= 85)
    candidates, lab = candidates[keep], lab[keep]
    nearest = colour_difference(lab[:, None], srgb_to_lab(np.array(chosen))[None]).min(axis=1)
    while len(chosen) < min(n, len(candidates)):
        pick = int(np.argmax(nearest))
        chosen.append(tuple(candidates[pick]))
        nearest = np.minimum(nearest, colour_difference(lab, lab[pick]))
    return tuple(to_rgba(c) for c in chosen)


def distinct_colours(n: int) -> list[tuple[float, float, float, float]]:
    """n qualitative colours as far apart as possible: tab10 up to 10 (so the first ten never change), then each
    added colour the farthest (CIEDE2000) from those before it. Any two of 64 differ by ΔE00 > 12 (tab10's own
    closest pair: 16)."""
    sequence = _distinct_sequence(max(n, 64))
    return [sequence[i % len(sequence)] for i in range(n)]
