"""Figures of router_metrics.py: selection frequency, domain specialization, co-activation, transitions,
indicator correlation and router saturation."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from common.analysis import ALL_DOMAINS
from common.analysis.specialization import transition_probabilities
from common.moe import MoELayer
from common.plots import grid, plt
from common.runs import Run


def plot_frequency(freq: pd.DataFrame, layer: int, domains: Sequence[str]) -> plt.Figure:
    """Per-expert top-k selection frequency with the uniform line k/E, one panel per domain (MoE Lens Fig. 1 form)."""
    names = [*domains, ALL_DOMAINS]
    fig, axes = grid(len(names), ncols=3, panel_size=(3.6, 2.3))
    rows = freq[freq.layer == layer]
    for ax, domain in zip(axes, names, strict=True):
        d = rows[rows.domain == domain]
        ax.bar(d.expert, 100 * d.freq_topk, color="C0" if domain != ALL_DOMAINS else "black", width=0.8)
        ax.axhline(100 * d.uniform_topk.iloc[0], color="C3", linestyle="--", linewidth=1, label="uniform k/E")
        ax.set_title(domain)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("expert")
        ax.set_ylabel("% of tokens")
    axes[0].legend(fontsize=7, frameon=False)
    fig.suptitle(f"Expert selection frequency (top-k), layer {layer}")
    return fig


def plot_domain_heatmap(freq: pd.DataFrame, layer: int, domains: Sequence[str]) -> plt.Figure:
    """Domain × expert share of each domain's tokens routed to each expert (OLMoE Fig. 22 form)."""
    rows = freq[(freq.layer == layer) & (freq.domain != ALL_DOMAINS)]
    matrix = rows.pivot(index="domain", columns="expert", values="freq_topk").loc[list(domains)]
    fig, ax = plt.subplots(figsize=(max(4, 0.3 * matrix.shape[1] + 2), 0.35 * len(domains) + 1.5))
    image = ax.imshow(100 * matrix.to_numpy(), aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(domains)), domains)
    ax.set_xticks(range(matrix.shape[1]), matrix.columns, fontsize=6)
    ax.set_xlabel("expert")
    fig.colorbar(image, ax=ax, label="% of domain tokens (top-k)")
    ax.set_title(f"Domain specialization, layer {layer} (uniform = {100 * rows.uniform_topk.iloc[0]:.1f}%)")
    return fig


def plot_matrix(matrix: np.ndarray, title: str, xlabel: str, ylabel: str, label: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(4.6, 3.9))
    image = ax.imshow(matrix, cmap="magma", aspect="auto")
    fig.colorbar(image, ax=ax, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return fig


def plot_saturation(table: pd.DataFrame) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5, 3))
    for layer, part in table.groupby("layer"):
        ax.plot(part.position, 100 * part.topk_overlap, marker="o", label=f"layer {layer}")
    ax.set_xticks(sorted(table.position.unique()), table.drop_duplicates("position").revision, rotation=30, fontsize=7)
    ax.set_ylabel("% top-k shared with final")
    ax.set_ylim(0, 101)
    ax.legend(fontsize=7, frameon=False)
    ax.set_title("Router saturation")
    return fig


def save_specialization_figures(
    out: Run, freq: pd.DataFrame, counts: dict[str, np.ndarray], layers: Sequence[MoELayer], domains: Sequence[str]
) -> None:
    """Every figure of router_metrics.py, from its tables and count arrays."""
    correlation, shuffled = counts["correlation"], counts["correlation_shuffled"]
    for li, moe_layer in enumerate(layers):
        out.save_figure(plot_frequency(freq, moe_layer.layer, domains), f"frequency_layer{moe_layer.layer}")
        out.save_figure(plot_domain_heatmap(freq, moe_layer.layer, domains), f"domain_heatmap_layer{moe_layer.layer}")
        selected = counts["topk"][li].sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            conditional = counts["coactivation"][li] / selected.reshape(-1, 1)
        out.save_figure(plot_matrix(conditional, f"Co-activation P(j | i), layer {moe_layer.layer}", "expert j", "expert i",
                                    "P(j in top-k | i in top-k)"), f"coactivation_layer{moe_layer.layer}")
    if "transitions" in counts:
        for pair, (a, b) in enumerate(itertools.pairwise(layers)):
            probs = transition_probabilities(counts["transitions"][pair], counts["topk"][pair].sum(0))
            out.save_figure(plot_matrix(probs, f"Routing transitions, layer {a.layer} → {b.layer}", f"expert at layer {b.layer}",
                                        f"expert at layer {a.layer}", "P(e' | e)"), f"transitions_{a.layer}_{b.layer}")
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, (matrix, title) in zip(axes, ((correlation, "top-k indicators"), (shuffled, "tokens shuffled per layer")), strict=True):
        image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_title(f"Pearson correlation, {title}")
        ax.set_xlabel("layer × expert")
    fig.colorbar(image, ax=axes, shrink=0.8)
    out.save_figure(fig, "indicator_correlation")
