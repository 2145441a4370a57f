"""Figures of dim_reduc.py: 2-D embeddings of expert outputs coloured by expert and by domain.

Legible with many experts: the colours are tab10 and then, one by one, the colour farthest (CIEDE2000) from all
before it, so any two of 64 experts differ at a glance; every expert's id is written near its point nearest the
median of its points, on a free spot (labels never overlap; a moved label has a leader line to its point).
Points are drawn in a seeded random order, so no class is painted over by the next one. A few far outliers do not
squeeze the rest: the frame is then the 0.5th–99.5th percentile of the axis, and a note says so and counts the
points outside it.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import matplotlib.patheffects as path_effects
import numpy as np
from matplotlib.lines import Line2D

from common.analysis.embedding import label_anchors
from common.plots import PAGE_WIDTH, distinct_colours, place_labels, plt

METHOD_NAMES = {"umap": "UMAP", "pca": "PCA"}
TITLE_CHARS = 96  # a title line at 9 pt that fits the page width
LEGEND_LIMIT = 20  # classes up to which a legend is drawn (beyond it, only the labels on the points)
FRAME_QUANTILES = (0.005, 0.995)  # the frame of an axis whose few far points would squeeze the rest
FRAME_WIDER = 1.5  # ... when the data's full range is more than this many times the quantiles' range


def palette(n: int) -> list[tuple[float, float, float, float]]:
    """n qualitative colours as far apart as possible (tab10 up to 10; see `common.plots.distinct_colours`)."""
    return distinct_colours(n)


def _darker(colour: tuple[float, float, float, float], factor: float = 0.7) -> tuple[float, float, float, float]:
    """The same hue, darker: label text stays readable for the light shades of the palette."""
    r, g, b, a = colour
    return (r * factor, g * factor, b * factor, a)


def _axes_labels(ax: plt.Axes, method: str, explained: Sequence[float] | None) -> None:
    if method == "pca" and explained is not None:
        ax.set_xlabel(f"PC1 ({100 * explained[0]:.1f}% of variance)")
        ax.set_ylabel(f"PC2 ({100 * explained[1]:.1f}% of variance)")
    else:
        ax.set_xlabel(f"{METHOD_NAMES.get(method, method)} 1")
        ax.set_ylabel(f"{METHOD_NAMES.get(method, method)} 2")
        ax.set_xticks([])
        ax.set_yticks([])  # UMAP coordinates have no units


def _marker_size(n: int) -> float:
    return float(np.clip(8000 / max(n, 1), 2.0, 16))


def frame_limits(values: np.ndarray, quantiles: tuple[float, float] = FRAME_QUANTILES,
                 wider: float = FRAME_WIDER) -> tuple[float, float] | None:
    """The frame of one axis: exactly the `quantiles` of `values` when the data's full range is more than `wider`
    times the range between them (a few far points would squeeze the rest), else None (every point shown)."""
    if len(values) < 20:
        return None
    low, high = (float(q) for q in np.quantile(values, quantiles))
    if high <= low or float(values.max() - values.min()) <= wider * (high - low):
        return None
    return low, high


def _axis_names(method: str) -> tuple[str, str]:
    return ("PC1", "PC2") if method == "pca" else (f"{METHOD_NAMES.get(method, method)} 1",
                                                    f"{METHOD_NAMES.get(method, method)} 2")


def _frame(ax: plt.Axes, coords: np.ndarray, method: str) -> plt.Text | None:
    """Frame an axis by its quantiles when a few far points would squeeze the rest; the note says which
    percentiles and counts the points outside. Returns the note (None when every point is shown)."""
    limits = [frame_limits(coords[:, 0]), frame_limits(coords[:, 1])]
    if limits == [None, None]:
        return None
    outside = np.zeros(len(coords), dtype=bool)
    for axis, lim in enumerate(limits):
        if lim is not None:
            (ax.set_xlim if axis == 0 else ax.set_ylim)(*lim)
            outside |= (coords[:, axis] < lim[0]) | (coords[:, axis] > lim[1])
    framed = " and ".join(name for name, lim in zip(_axis_names(method), limits, strict=True) if lim is not None)
    low, high = (f"{100 * q:g}" for q in FRAME_QUANTILES)
    return ax.text(0.99, 0.99, f"frame: {low}th–{high}th percentile of {framed}\n{int(outside.sum())} of "
                   f"{len(coords)} points lie outside it (all are in embedding_coords.csv)",
                   transform=ax.transAxes, ha="right", va="top", fontsize=7, color="0.35",
                   bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1.0})


def plot_embedding(
    coords: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    *,
    title: str,
    subtitle: str,
    method: str,
    legend_title: str,
    explained: Sequence[float] | None = None,
    annotate: bool = True,
    seed: int = 0,
) -> plt.Figure:
    """A scatter of `coords` [n, 2] coloured by `labels` (indices into `names`); each name written on its class's point nearest the class median."""
    classes = list(range(len(names)))
    colours = palette(len(names))
    legend = len(names) <= LEGEND_LIMIT
    fig, ax = plt.subplots(figsize=(PAGE_WIDTH if legend else 6.4, 5.6), layout="constrained")
    order = np.random.default_rng(seed).permutation(len(labels))
    point_colours = np.array(colours)[labels[order]] if len(labels) else np.zeros((0, 4))
    ax.scatter(coords[order, 0], coords[order, 1], c=point_colours, s=_marker_size(len(labels)), linewidths=0,
               alpha=0.7, rasterized=True)
    notes = [_frame(ax, coords, method)]
    if annotate and not legend:
        cycle = "; colours repeat" if len(names) > len(set(colours)) else ""
        notes.append(ax.text(0.01, 0.01, f"labels: {legend_title} ids near the point nearest their median{cycle}",
                             transform=ax.transAxes, ha="left", va="bottom", fontsize=7, color="0.35"))
    if legend:
        present = set(np.unique(labels).tolist())
        handles = [Line2D([], [], linestyle="", marker="o", markersize=5, color=colours[c], label=names[c])
                   for c in classes if c in present]
        ax.legend(handles=handles, title=legend_title, fontsize=7, title_fontsize=8, frameon=False,
                  loc="center left", bbox_to_anchor=(1.0, 0.5), ncols=2 if len(handles) > 12 else 1)
    _axes_labels(ax, method, explained)
    ax.set_title("\n".join([*textwrap.wrap(title, TITLE_CHARS), *textwrap.wrap(subtitle, TITLE_CHARS)]), fontsize=9)
    if annotate:  # last: the labels are placed in the final layout, clear of each other and of the notes
        stroke = [path_effects.withStroke(linewidth=2.2, foreground="white")]
        place_labels(ax, label_anchors(coords, labels, classes), names, [_darker(c) for c in colours],
                     fontsize=7 if len(names) > 20 else 8, obstacles=[n for n in notes if n is not None],
                     gid="class-label", weight="bold", path_effects=stroke, clip_on=True)
    return fig


def separation_text(rows: Sequence[dict], label: str, space: str) -> str:
    """'10-NN accuracy of the expert: 0.93 in 2-D, 0.97 in the original space (permuted 0.07; majority 0.08)'."""
    by = {(r["space"], r["label"]): r for r in rows}
    emb, orig = by.get((space, label)), by.get(("original", label))
    if emb is None or orig is None:
        return ""
    return (f"{emb['k']}-NN accuracy of the {label}: {emb['accuracy']:.2f} in 2-D (permuted labels "
            f"{emb['accuracy_permuted']:.2f}), {orig['accuracy']:.2f} in the original space (permuted "
            f"{orig['accuracy_permuted']:.2f}); majority class {emb['majority_baseline']:.2f}")


def plot_layer(
    coords: np.ndarray,
    experts: np.ndarray,
    domains: np.ndarray,
    *,
    layer: int,
    method: str,
    num_experts: int,
    domain_names: Sequence[str],
    weighted: bool,
    separation: Sequence[dict],
    explained: Sequence[float] | None = None,
    seed: int = 0,
) -> dict[str, plt.Figure]:
    """{'expert': figure coloured by expert, 'domain': figure coloured by domain} for one layer and method."""
    what = "w_e · E_e(x)" if weighted else "E_e(x)"
    head = (f"{METHOD_NAMES.get(method, method)} of expert outputs {what}, layer {layer}: "
            f"{len(experts)} (token, routed expert) points")
    return {
        "expert": plot_embedding(
            coords, experts, [str(e) for e in range(num_experts)], title=f"{head}, coloured by expert",
            subtitle=separation_text(separation, "expert", method), method=method, legend_title="expert",
            explained=explained, seed=seed,
        ),
        "domain": plot_embedding(
            coords, domains, list(domain_names), title=f"{head}, coloured by domain",
            subtitle=separation_text(separation, "domain", method), method=method, legend_title="domain",
            explained=explained, annotate=False, seed=seed,
        ),
    }
