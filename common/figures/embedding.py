"""Figures of dim_reduc.py: 2-D embeddings of expert outputs coloured by expert and by domain.

Legible with many experts: the qualitative palettes tab20, tab20b and tab20c (60 colours, neighbouring ids far
apart) cycle, and every expert's id is written on its point nearest the median of its points, so colours that
repeat are told apart by the labels. Points are drawn in a seeded random order, so no class is painted over by
the next one. A few far outliers do not squeeze the rest: the view zooms on the bulk and says how many it leaves
out.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import matplotlib.patheffects as path_effects
import numpy as np
from matplotlib.colors import to_rgba
from matplotlib.lines import Line2D

from common.analysis.embedding import label_anchors
from common.plots import PAGE_WIDTH, plt

METHOD_NAMES = {"umap": "UMAP", "pca": "PCA"}
TITLE_CHARS = 96  # a title line at 9 pt that fits the page width
LEGEND_LIMIT = 20  # classes up to which a legend is drawn (beyond it, only the labels on the points)


def _palette_base() -> list[tuple[float, float, float, float]]:
    base = [*plt.get_cmap("tab20").colors, *plt.get_cmap("tab20b").colors, *plt.get_cmap("tab20c").colors]
    # tab20 pairs a dark and a light shade of one hue; tab20b/c hold four shades of five hues each. The first 20
    # are 20 different hues or clearly different shades (tab20's darks = tab10, then tab20b's darkest and third
    # shades, whose hues tab10 lacks); neighbouring ids always differ in hue.
    order = [*base[0:20:2], *base[20:40:4], *base[22:40:4], *base[1:20:2], *base[21:40:4], *base[23:40:4],
             *base[40:60:4], *base[42:60:4], *base[41:60:4], *base[43:60:4]]
    return [to_rgba(c) for c in order]


PALETTE_BASE = _palette_base()


def palette(n: int) -> list[tuple[float, float, float, float]]:
    """n qualitative colours: tab10 up to 10, then tab20 + tab20b + tab20c (60), cycling beyond."""
    if n <= 10:
        return [to_rgba(c) for c in plt.get_cmap("tab10").colors[:n]]
    return [PALETTE_BASE[i % len(PALETTE_BASE)] for i in range(n)]


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


def view_limits(values: np.ndarray, tail: float = 0.005, pad: float = 0.25) -> tuple[float, float] | None:
    """Axis limits around the bulk of `values` when a few far outliers would squeeze it, else None (show all).

    The bulk is the [tail, 1 - tail] quantile range. On each side the view ends at the data's extreme when that
    lies within 2 `pad` of the bulk's width, else `pad` of it beyond the bulk; it only replaces the full range
    when that is more than 1.5 times wider than the padded bulk.
    """
    if len(values) < 20:
        return None
    low, high = np.quantile(values, [tail, 1 - tail])
    span = high - low
    full = values.max() - values.min()
    if span <= 0 or full <= 1.5 * (1 + 2 * pad) * span:
        return None
    # Per side: the data's extreme (plus a small margin) when it lies near the bulk, else the padded bulk.
    margin = 0.03 * span
    lowest, highest = float(values.min()), float(values.max())
    left = lowest - margin if lowest >= low - 2 * pad * span else low - pad * span
    right = highest + margin if highest <= high + 2 * pad * span else high + pad * span
    return float(left), float(right)


def _clip_view(ax: plt.Axes, coords: np.ndarray) -> None:
    """Zoom on the bulk of the points; say how many lie outside the frame."""
    limits = [view_limits(coords[:, 0]), view_limits(coords[:, 1])]
    if limits == [None, None]:
        return
    outside = np.zeros(len(coords), dtype=bool)
    for axis, lim in enumerate(limits):
        if lim is not None:
            (ax.set_xlim if axis == 0 else ax.set_ylim)(*lim)
            outside |= (coords[:, axis] < lim[0]) | (coords[:, axis] > lim[1])
    ax.text(0.99, 0.99, f"{int(outside.sum())} outlying point(s) outside the frame (all are in embedding_coords.csv)",
            transform=ax.transAxes, ha="right", va="top", fontsize=7, color="0.35")


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
    _clip_view(ax, coords)
    if annotate:
        stroke = [path_effects.withStroke(linewidth=2.2, foreground="white")]
        for c, (x, y) in zip(classes, label_anchors(coords, labels, classes), strict=True):
            if np.isfinite(x):
                ax.text(x, y, names[c], fontsize=7 if len(names) > 20 else 8, ha="center", va="center",
                        weight="bold", color=_darker(colours[c]), path_effects=stroke, clip_on=True)
    if annotate and not legend:
        cycle = f"; colours repeat every {len(PALETTE_BASE)}" if len(names) > len(PALETTE_BASE) else ""
        ax.text(0.01, 0.01, f"labels: {legend_title} ids on the point nearest their median{cycle}",
                transform=ax.transAxes, ha="left", va="bottom", fontsize=7, color="0.35")
    if legend:
        present = set(np.unique(labels).tolist())
        handles = [Line2D([], [], linestyle="", marker="o", markersize=5, color=colours[c], label=names[c])
                   for c in classes if c in present]
        ax.legend(handles=handles, title=legend_title, fontsize=7, title_fontsize=8, frameon=False,
                  loc="center left", bbox_to_anchor=(1.0, 0.5), ncols=2 if len(handles) > 12 else 1)
    _axes_labels(ax, method, explained)
    ax.set_title("\n".join([*textwrap.wrap(title, TITLE_CHARS), *textwrap.wrap(subtitle, TITLE_CHARS)]), fontsize=9)
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
