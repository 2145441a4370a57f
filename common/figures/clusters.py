"""Figures of cluster.py: per layer the specialization score of every expert (input vs output tokens, one panel per
k), the scores across layers, and the sizes of the unembedding clusters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.ticker import LogFormatter
from tqdm import tqdm

from common.plots import a4_grid, integer_axis, label, legend_panel, plt

if TYPE_CHECKING:  # the run folder is one floor up; figures only write into it
    from common.run import Run

SIDE_STYLE = {"input": ("C0", "input tokens (routed to the expert)"),
              "output": ("C1", "output tokens (logit lens of its weighted output)")}


def _zero_line(ax: plt.Axes) -> None:
    """The score of a random sample of the layer's tokens."""
    ax.axhline(0.0, color="grey", linewidth=0.6, linestyle="--")


def plot_layer_scores(table: pd.DataFrame, layer: int, ks: Sequence[int]) -> plt.Figure:
    """One panel per k: each expert's score (JSD − random-sample baseline, bits) for input and output tokens."""
    rows = table[table.layer == layer]
    fig, axes = a4_grid(len(ks), max_cols=2, panel_height=2.0)
    for ax, k in zip(axes, ks, strict=True):
        d = rows[rows.k == k].sort_values("expert")
        for offset, side in ((-0.2, "input"), (0.2, "output")):
            colour, name = SIDE_STYLE[side]
            ax.bar(d.expert + offset, d[f"score_{side}"], width=0.4, color=colour, label=name)
        _zero_line(ax)
        integer_axis(ax, "x", d.expert)
        empty = d[d.tokens == 0].expert
        for e in empty:  # an expert without tokens has no score: say so instead of drawing nothing
            ax.text(e, 0, "×", ha="center", va="bottom", fontsize=8, color="black")
        label(ax, "expert", "score (bits)", f"k = {k} clusters" + (" (×: expert got no tokens)" if len(empty) else ""))
    legend_panel(fig, axes)
    fig.suptitle(f"Token-cluster specialization of each expert, layer {layer}\n"
                 "JSD of its tokens' cluster mix from the layer's, minus that of a random sample of as many tokens "
                 "(0 = random)")
    return fig


def plot_scores_by_layer(table: pd.DataFrame, layers: Sequence[int], ks: Sequence[int]) -> plt.Figure:
    """One panel per k: mean and largest expert score of each layer, input vs output."""
    fig, axes = a4_grid(len(ks), max_cols=2, panel_height=2.0)
    x = np.arange(len(layers))
    for ax, k in zip(axes, ks, strict=True):
        d = table[table.k == k]
        for side in ("input", "output"):
            colour, _ = SIDE_STYLE[side]
            grouped = d.groupby("layer")[f"score_{side}"]
            mean, top = grouped.mean().reindex(layers), grouped.max().reindex(layers)
            ax.plot(x, mean.to_numpy(), marker="o", markersize=3, color=colour, label=f"{side} tokens: mean")
            ax.plot(x, top.to_numpy(), marker="^", markersize=3, linestyle=":", color=colour,
                    label=f"{side} tokens: highest expert")
        _zero_line(ax)
        step = max(1, -(-len(layers) // 16))
        ax.set_xticks(x[::step], [str(layer) for layer in layers][::step])
        ax.set_xlim(-0.5, len(layers) - 0.5)
        label(ax, "decoder layer", "score (bits)", f"k = {k} clusters")
    legend_panel(fig, axes)
    fig.suptitle("Token-cluster specialization across layers: mean over a layer's experts and its highest expert\n"
                 "(score = JSD from the layer's cluster mix minus the random-sample baseline; output = logit lens)")
    return fig


def plot_cluster_sizes(sizes: pd.DataFrame, ks: Sequence[int]) -> plt.Figure:
    """Cluster sizes sorted from largest, one line per k (log-log), with the even split V / k dotted."""
    fig, ax = plt.subplots(figsize=(4.6, 3.0), layout="constrained")
    for j, k in enumerate(ks):
        values = np.sort(sizes[sizes.k == k]["size"].to_numpy())[::-1]
        colour = f"C{j % 10}"
        ax.plot(np.arange(1, len(values) + 1), np.maximum(values, 0.8), color=colour, marker="." if k <= 100 else None,
                markersize=3, label=f"k = {k}")
        ax.axhline(values.sum() / k, color=colour, linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers (1, 10, 100; 20, 30 … inside a decade), not 6×10¹
        axis.set_major_formatter(LogFormatter())
        axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.5)))
    label(ax, "cluster rank (1 = largest)", "token ids in the cluster",
          "Sizes of the unembedding clusters\n(dotted: equal sizes, vocabulary / k; empty clusters drawn at 0.8)")
    ax.legend(frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


def save_cluster_figures(out: Run, table: pd.DataFrame, sizes: pd.DataFrame, layers: Sequence[int],
                         ks: Sequence[int], progress: bool = False) -> None:
    for layer in tqdm(layers, desc="figures", unit="layer", disable=not progress, leave=False):
        out.save_figure(plot_layer_scores(table, layer, ks), f"cluster_scores_layer{layer}")
    out.save_figure(plot_scores_by_layer(table, list(layers), ks), "cluster_scores_by_layer")
    out.save_figure(plot_cluster_sizes(sizes, ks), "cluster_sizes")
