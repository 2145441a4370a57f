"""Figures of the routing-decisiveness and router-distribution scripts (router_decisive.py, router_stats.py)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from common.analysis import ALL_DOMAINS
from common.plots import grid, plt

DISTRIBUTION_TITLES = {
    "logit": "router logits z",
    "softmax": "softmax p (all experts)",
    "topk_renormalized": "renormalised top-k p̃",
    "weight": "weights w used by the experts",
}


def plot_distributions(hist: pd.DataFrame, layer: int) -> plt.Figure:
    """Four panels for one layer, all domains pooled; ranked quantities get one line per rank."""
    fig, axes = grid(len(DISTRIBUTION_TITLES), ncols=4, panel_size=(3.2, 2.5))
    rows = hist[(hist.layer == layer) & (hist.domain == ALL_DOMAINS)]
    for ax, (quantity, title) in zip(axes, DISTRIBUTION_TITLES.items(), strict=True):
        q = rows[rows.quantity == quantity]
        for j, (rank, part) in enumerate(q.groupby("rank", sort=True)):
            total = part["count"].sum()
            if total == 0:
                continue
            width = (part["right"] - part["left"]).to_numpy()
            density = part["count"].to_numpy() / (total * width)
            label = None if rank == "all" else f"rank {rank}"
            ax.step(part["left"], density, where="post", color=f"C{j}", linewidth=1, label=label)
        if quantity == "softmax":
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_ylabel("density")
        if q["rank"].nunique() > 1:
            ax.legend(fontsize=7, frameon=False)
    fig.suptitle(f"Router output distributions, layer {layer}")
    return fig




def plot_violins(counts: np.ndarray, edges: np.ndarray, layers: Sequence[int], domains: Sequence[str]) -> plt.Figure:
    """One violin per layer, drawn from the streamed histogram of H/ln E (all domains pooled)."""
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(layers) + 2), 3.2))
    centres = 0.5 * (edges[:-1] + edges[1:])
    overall = counts[:, -1, :]
    for i, layer_counts in enumerate(overall):
        density = layer_counts / max(layer_counts.max(), 1)
        ax.fill_betweenx(centres, i - 0.4 * density, i + 0.4 * density, color="C0", alpha=0.6, linewidth=0)
        total = layer_counts.sum()
        if total:
            median = np.interp(0.5, np.cumsum(layer_counts) / total, edges[1:])
            ax.plot([i - 0.3, i + 0.3], [median, median], color="black", linewidth=1)
    ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("router entropy H / ln E")
    ax.set_ylim(0, 1)
    ax.set_title(f"Router entropy per layer ({len(domains)} domains pooled; line = median)")
    return fig


def plot_by_layer(summary: pd.DataFrame, domains: Sequence[str]) -> plt.Figure:
    metrics = ["entropy_normalized", "topk_entropy_normalized", "top1_prob", "top1_top2_margin", "topk_mass"]
    fig, axes = grid(len(metrics), ncols=len(metrics), panel_size=(3.0, 2.6))
    for ax, metric in zip(axes, metrics, strict=True):
        rows = summary[summary.metric == metric]
        for j, domain in enumerate([*domains, ALL_DOMAINS]):
            d = rows[rows.domain == domain].sort_values("layer")
            style = {"color": "black", "linewidth": 2} if domain == ALL_DOMAINS else {"color": f"C{j % 10}", "linewidth": 1}
            ax.plot(d.layer, d["mean"], marker="o", markersize=3, label=domain, **style)
        ax.set_title(metric.replace("_", " "))
        ax.set_xlabel("decoder layer")
        ax.set_ylim(0, 1.02)
    axes[-1].legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("Router decisiveness: mean per layer and domain")
    return fig
