"""prune.py's figure: perplexity against the fraction of experts removed, one line per criterion."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.ticker import FormatStrFormatter, NullFormatter

from common.plots import grid, plt

COLOURS = {"frequency": "C0", "weight": "C1", "saliency": "C2", "importance": "C3", "redundancy": "C4",
           "merge": "C5", "random": "0.35"}
# criteria that remove experts in the same order draw the same line: wider lines below narrower ones keep each visible
STYLES = {"frequency": (3.2, "o"), "weight": (1.8, "s"), "saliency": (1.0, "^"), "random": (1.2, "o")}


def plot_prune_perplexity(table: pd.DataFrame, domains: Sequence[str], scope: str, how: str) -> plt.Figure:
    """A panel per domain (and pooled): perplexity (log scale) against the fraction removed; random as mean ± sd."""
    fig, axes = grid(len(domains), ncols=3, panel_size=(3.4, 2.7))
    for ax, domain in zip(axes, domains, strict=True):
        d = table[table.domain == domain]
        for criterion in dict.fromkeys(d.criterion):
            # over random draws: the mean and sd of the NLL (log-perplexity), shown as exp(mean ± sd)
            c = d[d.criterion == criterion].groupby("fraction")["nll"]
            mean_nll, sd_nll = c.mean(), c.std().fillna(0.0)
            mean = np.exp(mean_nll)
            x = 100 * mean.index.to_numpy()
            colour = COLOURS.get(criterion)
            draws = d[d.criterion == criterion].draw.nunique()
            label = f"random ({draws} draws: exp(mean ± sd of the NLL))" if criterion == "random" else criterion
            width, marker = STYLES.get(criterion, (1.2, "o"))
            ax.plot(x, mean.to_numpy(), marker=marker, ms=3, lw=width, color=colour, label=label,
                    linestyle="--" if criterion == "random" else "-")
            if criterion == "random":
                ax.fill_between(x, np.exp(mean_nll - sd_nll).to_numpy(), np.exp(mean_nll + sd_nll).to_numpy(),
                                color=colour, alpha=0.2, lw=0)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.4g"))
        low, high = ax.get_ylim()
        # within a decade the minor ticks are the only labels; across decades they would crowd the axis
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.4g") if high / low < 10 else NullFormatter())
        ax.tick_params(axis="y", which="both", labelsize=7)
        ax.set_title("all domains pooled" if domain == "all" else domain, fontsize=9)
        ax.set_xlabel("experts removed per layer (%)" if scope == "layer" else "experts removed over all layers (%)")
        ax.set_ylabel("perplexity (log scale)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), fontsize=7, frameon=False)
    how_text = "the router picks among the experts left" if how == "drop" else "removed experts' outputs zeroed"
    fig.suptitle(f"Perplexity as experts are removed, least important first ({how_text})", fontsize=9)
    return fig


SCORE_LABELS = {"frequency": "selection frequency", "weight": "mean routing weight", "saliency": "REAP saliency"}


def plot_prune_scores(scores: pd.DataFrame) -> plt.Figure:
    """What the criteria read: per criterion, each layer's experts sorted by the score (one line per layer), so a
    layer whose few experts stand out shows a steep head."""
    criteria = [c for c in SCORE_LABELS if c in scores.columns]
    fig, axes = grid(len(criteria), ncols=3, panel_size=(3.4, 2.6))
    routed = scores[scores.expert.astype(str) != "shared"]
    for ax, criterion in zip(axes, criteria, strict=True):
        for layer, rows in routed.groupby("layer"):
            values = np.sort(rows[criterion].to_numpy(dtype=float))[::-1]
            ax.plot(np.arange(1, len(values) + 1), values, lw=1, label=f"layer {layer}")
        ax.set_title(SCORE_LABELS[criterion], fontsize=9)
        ax.set_xlabel("expert rank in its layer (1 = highest)", fontsize=8)
        ax.set_ylabel(criterion, fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    if len(labels) <= 12:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6), fontsize=7, frameon=False)
    fig.suptitle("Pruning criteria: each layer's experts sorted by score (the lowest go first)", fontsize=9)
    return fig
