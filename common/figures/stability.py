"""stability.py's figures: how often routing changes per comparison and layer, and how consistently token ids route
across contexts (docs/METRICS.md#routing-stability)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.ticker import FuncFormatter, NullFormatter

from common.plots import a4_grid, integer_axis, label, legend_panel, place_labels, plt, text_label

MARKERS = {"dtype": "o", "router": "s", "batch": "^", "padding": "D"}
SAME, BASE = "C0", "0.45"
MIN_BIN_TOKENS = 10
GAP_LABEL = r"reference gap $z_{(k)} - z_{(k+1)}$ (logit units, log scale)"


def comparison_label(row) -> str:
    """'dtype: float32 → bfloat16', 'batch: batched → alone', …"""
    return f"{row.comparison}: {row.reference} → {row.variant}"


def plot_by_layer(summary: pd.DataFrame) -> plt.Figure:
    """Three panels against the layer, a line per comparison (all domains pooled): the share of tokens whose top-k set
    changed and whose top-1 expert changed (linear, %), and the mean |Δw| (log scale; exact zeros drawn hollow on a
    dotted line at the bottom, labelled 0)."""
    pooled = summary[summary.domain == "all"].copy()
    pooled["label"] = [comparison_label(row) for row in pooled.itertuples()]
    order = {kind: i for i, kind in enumerate(MARKERS)}
    pooled["order"] = [order.get(kind, len(order)) for kind in pooled.comparison]
    pooled = pooled.sort_values(["order", "label", "layer"], kind="stable")
    panels = [("topk_changed_fraction", "top-k set changed", "tokens (%)"),
              ("top1_changed_fraction", "top-1 expert changed", "tokens (%)"),
              ("mean_abs_dw", "mean |Δw| per token", r"mean $\sum_e\,|w_e - w'_e|$ (weight units)")]
    fig, axes = a4_grid(len(panels), max_cols=3, panel_height=2.6)
    layers = sorted(pooled.layer.unique())
    for ax, (column, title, unit) in zip(axes, panels, strict=True):
        log = column == "mean_abs_dw"
        values = pooled[column].to_numpy(dtype=float) * (1.0 if log else 100.0)
        positive = values[np.isfinite(values) & (values > 0)]
        floor = (positive.min() / 4 if positive.size else 1e-6) if log else 0.0
        for i, (name, rows) in enumerate(pooled.groupby("label", sort=False)):
            y = rows[column].to_numpy(dtype=float) * (1.0 if log else 100.0)
            marker = MARKERS.get(rows.comparison.iloc[0], "o")
            ax.plot(rows.layer, np.where(y > 0, y, np.nan), marker=marker, ms=4, lw=1.2, color=f"C{i}", label=name)
            zero = y == 0
            ax.scatter(rows.layer[zero], np.full(zero.sum(), floor), marker=marker, s=22, facecolors="none",
                       edgecolors=f"C{i}", zorder=3, linewidths=1.0)
        if log:
            ax.set_yscale("log")
            ax.set_ylim(floor / 1.8, positive.max() * 2 if positive.size else 1.0)
            ax.axhline(floor, color="0.75", lw=0.6, ls=":", zorder=0)
            ax.text(-0.015, floor, "0", transform=ax.get_yaxis_transform(), ha="right", va="center", fontsize=7)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p, low=floor: _short(v) if v > 2.5 * low else ""))
            ax.yaxis.set_minor_formatter(NullFormatter())
        else:
            ax.set_ylim(bottom=-0.04 * max(positive.max() if positive.size else 1.0, 1e-3))
        label(ax, "layer", unit, title)
        integer_axis(ax, "x", layers)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4 if len(labels) == 4 else 3),
               fontsize=7, frameon=False)
    fig.suptitle("Routing stability: the same tokens in the reference and the variant run\n"
                 "(all domains pooled; hollow markers = exactly 0)", fontsize=9)
    return fig


def _short(value: float, _position=None) -> str:
    return f"{value:.2g}" if 1e-3 <= value < 1e4 else f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e")


def plot_consistency(consistency: pd.DataFrame, tokens: pd.DataFrame) -> plt.Figure:
    """Left: by layer, the mean weighted Jaccard of a token id's routes in different windows (same id) and of
    different ids of its frequency (baseline), ± s.e.m. over ids. Right: their distributions over token ids."""
    fig, (left, right) = a4_grid(2, max_cols=2, panel_height=2.8)
    layers = consistency.layer.to_numpy()
    rows = tokens[np.isfinite(tokens.difference)]
    for column, colour, name in (("consistency", SAME, "same token id, different windows"),
                                 ("baseline", BASE, "different ids of the same frequency (baseline)")):
        grouped = rows.groupby("layer")[column]
        mean, sem = grouped.mean().reindex(layers), (grouped.std(ddof=1) / np.sqrt(grouped.count())).reindex(layers)
        left.errorbar(layers, mean, yerr=sem.fillna(0), marker="o", ms=4, lw=1.2, capsize=2, color=colour, label=name)
    label(left, "layer", "mean weighted Jaccard of routes (0 … 1)", "Route consistency by layer (± s.e.m. over ids)")
    integer_axis(left, "x", layers)
    width = 0.38
    for offset, column, colour in ((-width / 2, "consistency", SAME), (width / 2, "baseline", BASE)):
        data = [rows.loc[rows.layer == layer, column].to_numpy() for layer in layers]
        parts = right.violinplot([d if d.size else [np.nan] for d in data], positions=np.arange(len(layers)) + offset,
                                 widths=width, showmedians=True, showextrema=False)
        for body in parts["bodies"]:
            body.set_facecolor(colour)
            body.set_alpha(0.55)
        parts["cmedians"].set_color(colour)
    right.set_xticks(np.arange(len(layers)), [str(layer) for layer in layers])
    label(right, "layer", "weighted Jaccard per token id (0 … 1)", "Distribution over token ids (line = median)")
    ids = int(consistency.ids.max()) if len(consistency) else 0
    legend_panel(fig, [left], fontsize=7)
    fig.suptitle(f"Does the same token id route the same way in different contexts? ({ids} token ids)", fontsize=9)
    return fig


def plot_consistency_tokens(tokens: pd.DataFrame, max_panels: int = 4, named: int = 3) -> plt.Figure:
    """Per layer (up to `max_panels`, spread over depth): each token id's consistency against its count (log scale),
    the baseline's mean per frequency bin as a line, the `named` most and least consistent ids written out (of those
    seen at least the median count: a rare id's mean rests on few pairs)."""
    layers = sorted(tokens.layer.unique())
    if len(layers) > max_panels:
        layers = [layers[round(i * (len(layers) - 1) / (max_panels - 1))] for i in range(max_panels)]
    fig, axes = a4_grid(len(layers), max_cols=2, panel_height=2.8)
    for ax, layer in zip(axes, layers, strict=True):
        rows = tokens[(tokens.layer == layer) & np.isfinite(tokens.consistency)]
        ax.scatter(rows["count"], rows.consistency, s=6, color=SAME, alpha=0.45, lw=0, label="token id (same id, "
                   "different windows)")
        bins = rows[np.isfinite(rows.baseline)].groupby("frequency_bin")
        ax.plot(bins["count"].median(), bins.baseline.mean(), color=BASE, marker="_", ms=10, lw=1.2,
                label="baseline: different ids of that frequency (bin mean)")
        ax.set_xscale("log")
        ax.set_ylim(-0.03, 1.03)
        label(ax, "occurrences of the token id (log scale)", "weighted Jaccard (0 … 1)", f"layer {layer}")
        frequent = rows[rows["count"] >= rows["count"].median()]  # rare ids' means rest on few pairs
        extremes = pd.concat([frequent.nlargest(named, "consistency"), frequent.nsmallest(named, "consistency")])
        place_labels(ax, extremes[["count", "consistency"]].to_numpy(dtype=float),
                     [text_label(str(t), limit=12) for t in extremes.token], ["0.15"] * len(extremes), fontsize=6.5,
                     beside=True)
    legend_panel(fig, axes[:1], fontsize=7)
    fig.suptitle("Route consistency per token id against its frequency\n(named: the most and least consistent of the "
                 "ids seen at least the median count)", fontsize=9)
    return fig


def _bin_centres(rows: pd.DataFrame) -> np.ndarray:
    left = np.maximum(rows.left.to_numpy(dtype=float), 10**-6.5)
    right = rows.right.to_numpy(dtype=float)
    return np.where(np.isfinite(right), np.sqrt(left * np.where(np.isfinite(right), right, 1.0)), left * 10**0.25)


def plot_margin(margin: pd.DataFrame) -> plt.Figure:
    """Which tokens change experts: by the reference's gap between its k-th and (k+1)-th router logits (log10 bins,
    all layers pooled), the share of tokens whose top-k set changed (left) and how many tokens and changes each bin
    holds (right), a line per comparison."""
    fig, (left, right) = a4_grid(2, max_cols=2, panel_height=2.8)
    margin = margin.copy()
    margin["label"] = [comparison_label(row) for row in margin.itertuples()]
    order = {kind: i for i, kind in enumerate(MARKERS)}
    margin["order"] = [order.get(kind, len(order)) for kind in margin.comparison]
    margin = margin.sort_values(["order", "label", "bin"], kind="stable")
    shown_tokens = set()
    for i, (name, rows) in enumerate(margin.groupby("label", sort=False)):
        pooled = rows.groupby("bin").agg(left=("left", "first"), right=("right", "first"), tokens=("tokens", "sum"),
                                         changed=("topk_changed", "sum"))
        x = _bin_centres(pooled)
        filled = pooled.tokens.to_numpy() > 0
        enough = pooled.tokens.to_numpy() >= MIN_BIN_TOKENS
        share = np.where(filled, 100 * pooled.changed / np.maximum(pooled.tokens, 1), np.nan)
        marker = MARKERS.get(rows.comparison.iloc[0], "o")
        left.plot(x[enough], share[enough], marker=marker, ms=3.5, lw=1.2, color=f"C{i}", label=name)
        reference = (rows.comparison.iloc[0], rows.reference.iloc[0])
        if reference not in shown_tokens:  # the tokens per bin of each distinct reference run, once
            shown_tokens.add(reference)
            right.step(x, np.where(filled, pooled.tokens, np.nan), where="mid", color="0.55", lw=1.0,
                       label="tokens per bin (each reference run)" if len(shown_tokens) == 1 else None)
        changed = pooled.changed.to_numpy(dtype=float)
        right.plot(x[changed > 0], changed[changed > 0], marker=marker, ms=3.5, lw=1.0, color=f"C{i}")
    for ax in (left, right):
        ax.set_xscale("log")
    left.set_ylim(-3, 103)
    label(left, GAP_LABEL, "tokens whose top-k set changed (%)",
          f"Changed share (bins of ≥ {MIN_BIN_TOKENS} tokens)")
    right.set_yscale("log")
    label(right, GAP_LABEL, "tokens (count, log scale)",
          "Tokens per bin (grey) and changed tokens")
    handles, labels = left.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    fig.legend(handles + more[0], labels + more[1], loc="outside lower center", ncols=3, fontsize=7, frameon=False)
    fig.suptitle("Which tokens change experts: by the reference's gap between its k-th and (k+1)-th router logits\n"
                 "(all layers pooled; the first bin holds every gap below $10^{-5.5}$, zero included)", fontsize=9)
    return fig
