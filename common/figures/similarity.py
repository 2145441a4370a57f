"""Figures of sim.py: a clustered heatmap of one layer's expert-by-expert similarity matrix, with its dendrogram."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.patches import Rectangle
from mpl_toolkits.axes_grid1 import make_axes_locatable

from common.analysis.similarity import METHOD_LABELS, SHARED
from common.plots import PAGE_WIDTH, a4_grid, heatmap, integer_axis, label, legend_panel, plt


def _colour_range(matrix: np.ndarray, method: str) -> tuple[float, float, str]:
    """(vmin, vmax, colormap) spanning the off-diagonal values, so that the structure between different experts is
    visible; cosine gets a diverging map centred on 0 (its sign matters), the CKAs a sequential one over their
    off-diagonal range."""
    k = matrix.shape[0]
    off = matrix[~np.eye(k, dtype=bool)]
    off = off[np.isfinite(off)]
    if method == "cosine":
        bound = float(np.abs(off).max()) if off.size else 1.0
        bound = bound if bound > 0 else 1.0
        return -bound, bound, "RdBu_r"
    low = float(off.min()) if off.size else 0.0
    high = float(off.max()) if off.size else 1.0
    return low, high if high > low else low + 1.0, "viridis"


def plot_similarity(matrix: np.ndarray, labels: Sequence[str], order: Sequence[int], tree: np.ndarray | None, *,
                    layer: int, method: str, note: str) -> plt.Figure:
    """Heatmap of `matrix` [k, k] with rows and columns in clustering `order`, the dendrogram on top.

    The diagonal (self-similarity, 1) is hatched so that it does not pass for a very similar pair, and the
    colour scale spans the off-diagonal values; NaN cells (pairs with too few shared tokens, undefined estimates)
    are grey. The dendrogram's height axis is 1 − similarity, starting just below its lowest merge.
    """
    from scipy.cluster.hierarchy import dendrogram

    k = matrix.shape[0]
    side = min(PAGE_WIDTH - 1.4, max(3.0, 0.3 * k))
    fig, ax = plt.subplots(figsize=(side + 1.4, side + 1.5))
    ordered = matrix[np.ix_(order, order)]
    vmin, vmax, cmap = _colour_range(matrix, method)
    names = [str(labels[i]) for i in order]
    image = heatmap(ax, ordered, cbar_label=METHOD_LABELS[method], cmap=cmap, vmin=vmin, vmax=vmax,
                    xticklabels=names, yticklabels=names, mask_diagonal=True, cbar=False, aspect="equal",
                    xlabel="expert (clustered order)", ylabel="expert (clustered order)")
    for i in range(k):  # hatched, so that no colour map reads it as a value (white is 0 on the cosine scale)
        ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, facecolor="white", edgecolor="0.55", hatch="////",
                               linewidth=0))
    font = 7 if k <= 24 else max(4.0, 7 - (k - 24) / 14)
    ax.set_xticks(range(k), names, rotation=0 if k <= 16 else 90, ha="center")
    ax.tick_params(length=0, labelsize=font)
    for tick in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
        if tick.get_text() == SHARED:  # the shared experts' row stands out among the numbered experts
            tick.set_fontweight("bold")

    divider = make_axes_locatable(ax)
    bar_ax = divider.append_axes("right", size=0.15, pad=0.08)
    fig.colorbar(image, cax=bar_ax, label=METHOD_LABELS[method])
    title_ax = ax
    if tree is not None:
        top = divider.append_axes("top", size=0.7, pad=0.05)
        dendrogram(tree, ax=top, no_labels=True, link_color_func=lambda _: "0.35")
        top.set_xlim(0, 10 * k)  # scipy places leaf i at 10·i + 5
        heights = tree[:, 2]
        span = max(float(heights.max() - heights.min()), 1e-3)
        top.set_ylim(max(0.0, float(heights.min()) - 0.25 * span), float(heights.max()) + 0.05 * span)
        top.set_xticks([])
        top.spines[["top", "right", "bottom"]].set_visible(False)
        top.tick_params(axis="y", labelsize=6)
        top.set_ylabel("1 − similarity", fontsize=6)
        title_ax = top
    off = ordered[~np.eye(k, dtype=bool)]
    nan_cells = int((~np.isfinite(off)).sum())
    grey = f"; grey = undefined ({nan_cells} cells)" if nan_cells else ""
    title_ax.set_title(f"Layer {layer}: {METHOD_LABELS[method]} between expert outputs\n{note}\n"
                       f"clustered (average linkage); diagonal (self) hatched{grey}", fontsize=8)
    return fig


def plot_similarity_by_layer(summary: pd.DataFrame) -> plt.Figure:
    """similarity_summary.csv as a figure: per method, the mean off-diagonal similarity of the routed experts per
    layer (± one standard deviation), with the most and least similar pair's value, and the shared row's mean
    similarity to them where the model has shared experts."""
    methods = list(dict.fromkeys(summary["method"]))
    fig, axes = a4_grid(len(methods), max_cols=2, panel_height=2.6)
    for ax, method in zip(axes, methods, strict=True):
        rows = summary[summary["method"] == method].sort_values("layer")
        layers = rows["layer"].to_numpy()
        mean, std = rows["mean_offdiag"].to_numpy(float), rows["std_offdiag"].to_numpy(float)
        ax.fill_between(layers, mean - std, mean + std, color="C0", alpha=0.2, linewidth=0, label="mean ± std")
        ax.plot(layers, mean, color="C0", marker="o", markersize=3, label="mean over expert pairs")
        ax.plot(layers, rows["most_similar_value"].to_numpy(float), color="C3", linestyle="--", marker="^",
                markersize=3, linewidth=1, label="most similar pair")
        ax.plot(layers, rows["least_similar_value"].to_numpy(float), color="C2", linestyle="--", marker="v",
                markersize=3, linewidth=1, label="least similar pair")
        shared = pd.to_numeric(rows["mean_vs_shared"], errors="coerce").to_numpy(float)
        if np.isfinite(shared).any():
            ax.plot(layers, shared, color="C4", marker="s", markersize=3, linewidth=1, label="shared vs routed (mean)")
        integer_axis(ax, "x", layers.tolist())
        label(ax, "decoder layer", f"{METHOD_LABELS.get(method, method)} (dimensionless)",
              f"{METHOD_LABELS.get(method, method)} between routed experts' outputs")
    legend_panel(fig, axes)
    fig.suptitle(f"Expert output similarity by layer ({int(summary['tokens'].iloc[0])} tokens)")
    return fig
