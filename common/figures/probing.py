"""Figures of probing.py: best-layer F1 against k (MoE experts vs dense FFN neurons, ranked vs random neurons,
median and interquartile range over concepts: the figure of "The Expert Strikes Back"), and the per-concept F1 at
two values of k."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
import pandas as pd

from common.plots import PAGE_WIDTH, a4_grid, label, plt

# (model, selection) -> (legend label, colour, line style, marker)
SERIES = {
    ("moe", "ranked"): ("MoE expert neurons, top-k by mean gap", "C0", "-", "o"),
    ("dense", "ranked"): ("dense FFN neurons, top-k by mean gap", "C1", "-", "s"),
    ("moe", "random"): ("MoE expert neurons, k at random (control)", "C0", "--", "o"),
    ("dense", "random"): ("dense FFN neurons, k at random (control)", "C1", "--", "s"),
}


def common_concepts(best: pd.DataFrame) -> list[str]:
    """Concepts with a best-layer F1 for every (model, selection) present, at the smallest k: the set the medians
    are taken over, so that MoE and dense are compared on the same concepts."""
    if best.empty:
        return []
    k0 = best["k"].min()
    first = best[best["k"] == k0]
    series = first.groupby(["model", "selection"]).size().index
    have = first.groupby("concept")[["model", "selection"]].apply(lambda g: set(map(tuple, g.to_numpy())))
    return [c for c in dict.fromkeys(first["concept"]) if set(series) <= have[c]]


def plot_f1_vs_k(best: pd.DataFrame, model_name: str, dense_name: str | None, units: str = "") -> plt.Figure:
    """Best-layer F1 (max over experts, then layers) against k: a line per (model, selection) at the median over
    the common concepts, the band between the 25th and 75th percentiles. `units`: what each maximum runs over,
    for the title (a maximum over more units is higher by chance alone, which the random control shows)."""
    concepts = common_concepts(best)
    fig, axes = a4_grid(1, max_cols=1, panel_height=3.2, width=min(PAGE_WIDTH, 5.6))
    ax = axes[0]
    data = best[best["concept"].isin(concepts)]
    ks = sorted(data["k"].unique())
    for (model, selection), (text, colour, style, marker) in SERIES.items():
        part = data[(data["model"] == model) & (data["selection"] == selection)]
        if part.empty:
            continue
        stats = part.groupby("k")["f1"].quantile([0.25, 0.5, 0.75]).unstack()
        x = stats.index.to_numpy()
        ax.plot(x, stats[0.5], color=colour, linestyle=style, marker=marker, markersize=3.5, linewidth=1.3,
                label=text, markerfacecolor=colour if selection == "ranked" else "white")
        ax.fill_between(x, stats[0.25], stats[0.75], color=colour, alpha=0.18 if selection == "ranked" else 0.07,
                        linewidth=0)
    ax.set_xscale("log", base=2)
    if ks:
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
    ax.set_ylim(0, 1.02)
    ax.grid(axis="y", linewidth=0.4, alpha=0.5)
    against = f" vs {dense_name}" if dense_name else ""
    n = len(concepts)
    title = (f"k-sparse probing: {model_name}{against}\nmedian over {n} concept{'s' if n != 1 else ''}, "
             "band = 25th–75th percentile")
    label(ax, "k (neurons the probe reads; log scale)", "best-layer F1 on held-out tokens",
          title + (f"\nbest of {units}" if units else ""))
    if ax.get_legend_handles_labels()[1]:
        ax.legend(loc="lower right", frameon=False)
    return fig


def plot_concepts(best: pd.DataFrame, ks: Sequence[int], all_concepts: Sequence[str] = ()) -> plt.Figure:
    """Best-layer F1 of every probed concept at each k of `ks` (one panel each): filled markers for the ranked
    probes, open markers for the random-neuron control, MoE and dense side by side. Concepts of `all_concepts`
    that were never probed (too few examples everywhere) are named below the panels."""
    concepts = list(dict.fromkeys(best["concept"]))
    missing = [c for c in all_concepts if c not in set(concepts)]
    note = textwrap.wrap("Not probed anywhere (too few examples): " + ", ".join(missing) + ".", 95) if missing else []
    ks = [k for k in ks if k in set(best["k"])]
    height = max(1.6, 0.5 + 0.16 * len(concepts)) + 0.17 * len(note)  # room for the title's note lines
    fig, axes = a4_grid(max(1, len(ks)), max_cols=2, panel_height=height)
    y = np.arange(len(concepts))
    offsets = {"moe": -0.17, "dense": 0.17}
    for panel, (ax, k) in enumerate(zip(axes, ks, strict=False)):
        at_k = best[best["k"] == k]
        for (model, selection), (text, colour, _, marker) in SERIES.items():
            part = at_k[(at_k["model"] == model) & (at_k["selection"] == selection)].set_index("concept")
            if part.empty:
                continue
            values = part["f1"].reindex(concepts).to_numpy(dtype=float)
            ax.scatter(values, y + offsets[model], s=14, marker=marker, label=text, zorder=3,
                       facecolors=colour if selection == "ranked" else "white", edgecolors=colour, linewidths=0.8)
        ax.set_yticks(y, concepts if panel == 0 else [""] * len(concepts))
        ax.set_ylim(len(concepts) - 0.5, -0.5)
        ax.set_xlim(0, 1.02)
        ax.grid(axis="x", linewidth=0.4, alpha=0.5)
        for row in y[::2]:
            ax.axhspan(row - 0.5, row + 0.5, color="0.95", zorder=0, linewidth=0)
        label(ax, "best-layer F1 on held-out tokens", None, f"k = {k}")
    if not ks:
        axes[0].text(0.5, 0.5, "no concept had enough examples to probe", ha="center", va="center",
                     transform=axes[0].transAxes)
        axes[0].set_axis_off()
    handles, texts = axes[0].get_legend_handles_labels()
    if texts:
        fig.legend(handles, texts, loc="outside lower center", ncols=2, frameon=False)
    fig.suptitle("\n".join(["Best-layer F1 per concept (a missing marker: too few examples to probe there)", *note]))
    return fig
