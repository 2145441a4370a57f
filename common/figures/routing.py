"""Figures of the routing-decisiveness and router-distribution scripts (router_decisive.py, router_stats.py)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from common.analysis import ALL_DOMAINS
from common.plots import PAGE_WIDTH, a4_grid, integer_axis, label, legend_panel, occupied_range, plt

# quantity -> (panel title, x-axis label); every panel's y axis is a probability density.
DISTRIBUTION_TITLES = {
    "logit": ("Raw router logits (all experts)", "router logit z (the model's scale)"),
    "softmax": ("Router probabilities (all experts)", "softmax probability p"),
    "topk_renormalized": ("Chosen experts' probabilities, renormalised", "top-k probability p̃ = p / Σ_top-k p"),
    "weight": ("Weights the chosen experts receive", "routing weight w (the model's scale)"),
}
# Quantities whose histogram range grows with the data: drawn over the occupied bins only.
_UNBOUNDED = ("logit", "weight")


def plot_distributions(hist: pd.DataFrame, layer: int) -> plt.Figure:
    """Four panels (2 × 2) for one layer, all domains pooled; ranked quantities get one line per rank."""
    fig, axes = a4_grid(len(DISTRIBUTION_TITLES), max_cols=2, panel_height=2.3)
    rows = hist[(hist.layer == layer) & (hist.domain == ALL_DOMAINS)]
    for ax, (quantity, (title, xlabel)) in zip(axes, DISTRIBUTION_TITLES.items(), strict=True):
        q = rows[rows.quantity == quantity]
        for j, (rank, part) in enumerate(q.groupby("rank", sort=True)):
            total = part["count"].sum()
            if total == 0:
                continue
            width = (part["right"] - part["left"]).to_numpy()
            density = part["count"].to_numpy() / (total * width)
            edges = np.append(part["left"].to_numpy(), part["right"].to_numpy()[-1])
            # Only the occupied bins, with no closing edges down to zero: where a rank's values end inside the
            # range (rank 2 of p̃ ends at 0.5, where rank 1 begins) a drop to the axis reads as a spike.
            filled = np.nonzero(density)[0]
            first, last = filled[0], filled[-1] + 1
            ax.stairs(density[first:last], edges[first : last + 1], baseline=None, linewidth=1,
                      color="black" if rank == "all" else f"C{j}", label=None if rank == "all" else f"rank {rank}")
        if len(q):  # the range the data occupy (probabilities: within 0 … 1), not the whole binning range
            low, high = occupied_range(q["count"].to_numpy(), np.append(q["left"].unique(), q["right"].max()))
            ax.set_xlim(*((low, high) if quantity in _UNBOUNDED else (max(low, 0.0), min(high, 1.0))))
        if quantity == "softmax":
            ax.set_yscale("log")
        else:  # densities from zero (the lines have no baseline that would pull the axis down to it)
            ax.set_ylim(bottom=0)
        label(ax, xlabel, "density (log scale)" if quantity == "softmax" else "probability density", title)
    if rows["rank"].nunique() > 1:
        legend_panel(fig, axes, title="rank (1 = largest)")
    fig.suptitle(f"Router output distributions, layer {layer} (all domains pooled)")
    return fig


def plot_violins(counts: np.ndarray, edges: np.ndarray, layers: Sequence[int], domains: Sequence[str]) -> plt.Figure:
    """One violin per layer, drawn from the streamed histogram of H/ln E (all domains pooled)."""
    fig, ax = plt.subplots(figsize=(min(PAGE_WIDTH, max(3.6, 0.45 * len(layers) + 1.8)), 2.8), layout="constrained")
    centres = 0.5 * (edges[:-1] + edges[1:])
    overall = counts[:, -1, :]
    for i, layer_counts in enumerate(overall):
        density = layer_counts / max(layer_counts.max(), 1)
        ax.fill_betweenx(centres, i - 0.4 * density, i + 0.4 * density, color="C0", alpha=0.6, linewidth=0)
        total = layer_counts.sum()
        if total:
            median = np.interp(0.5, np.cumsum(layer_counts) / total, edges[1:])
            ax.plot([i - 0.3, i + 0.3], [median, median], color="black", linewidth=1)
    step = max(1, -(-len(layers) // 16))
    ax.set_xticks(range(0, len(layers), step), [str(layer) for layer in layers][::step])
    ax.set_xlim(-0.6, len(layers) - 0.4)
    low, high = occupied_range(overall, edges, pad=0.08)
    zoomed = high - low < 0.4  # e.g. a near-uniform router: every token close to 1
    ax.set_ylim(*((max(low, 0.0), min(high, 1.0)) if zoomed else (0.0, 1.0)))
    label(ax, "decoder layer", "router entropy H / ln E (fraction of max)",
          f"Router entropy per layer\n({len(domains)} domains pooled; line = median"
          f"{'; y axis zoomed to the data' if zoomed else ''})")
    return fig


# metric -> (panel title, y-axis label)
DECISIVENESS_PANELS = {
    "entropy_normalized": ("Entropy over all experts", "H / ln E (fraction of max)"),
    "topk_entropy_normalized": ("Entropy among the chosen experts", "H(p̃) / ln k (fraction of max)"),
    "top1_prob": ("Probability of the top expert", "p of the top expert"),
    "top1_top2_margin": ("Margin between the top two", "p(1) − p(2) (probability)"),
    "topk_mass": ("Probability mass of the top k", "Σ p over the top k"),
}


def plot_by_layer(summary: pd.DataFrame, domains: Sequence[str]) -> plt.Figure:
    """Mean of each normalised decisiveness metric per layer, one line per domain (black: all pooled); 2 × 3 panels,
    the sixth holding the legend."""
    fig, axes = a4_grid(len(DECISIVENESS_PANELS), max_cols=3, panel_height=2.1, spare=1)
    panels, slot = axes[:-1], axes[-1]
    layers = sorted(summary.layer.unique())
    for ax, (metric, (title, ylabel)) in zip(panels, DECISIVENESS_PANELS.items(), strict=True):
        rows = summary[summary.metric == metric]
        for j, domain in enumerate([*domains, ALL_DOMAINS]):
            d = rows[rows.domain == domain].sort_values("layer")
            pooled = domain == ALL_DOMAINS
            # the pooled line underneath, wide and pale, so that domains that coincide with it stay visible
            style = ({"color": "black", "alpha": 0.35, "linewidth": 3.5, "zorder": 1} if pooled
                     else {"color": f"C{j % 10}", "linewidth": 1, "zorder": 2})
            ax.plot(d.layer, d["mean"], marker="o", markersize=3, label="all domains" if pooled else domain, **style)
        ax.set_ylim(0, 1.02)
        if len(layers) == 1:
            ax.set_xlim(layers[0] - 1, layers[0] + 1)
        integer_axis(ax, "x", layers)
        label(ax, "decoder layer", ylabel, title)
    legend_panel(fig, panels, slot, ncols=1 + len(domains) // 12)
    fig.suptitle("Router decisiveness: mean per layer and domain")
    return fig
