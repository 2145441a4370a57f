"""Figures of compare.py: a per-layer metric of several runs overlaid on relative depth and on absolute layer, and
the probing gap against routing sparsity k/E with its rank correlation and least-squares line (the headline
figure of "The Expert Strikes Back"). Every figure names its models in a legend; colours and markers are assigned
per model in the order the runs were given, so one model looks the same in every figure."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from common.plots import PAGE_WIDTH, a4_grid, label, plt

MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h", "p")
BASELINE_TITLES = {"dense": "expert neurons − dense FFN neurons", "random": "expert neurons − random expert neurons"}


def model_styles(labels: Sequence[str]) -> dict[str, tuple]:
    """label -> (colour, marker): tab10 then tab20's light shades, 12 markers, so 12 models stay apart."""
    palette = list(plt.get_cmap("tab10").colors) + list(plt.get_cmap("tab20").colors[1::2])
    return {name: (palette[i % len(palette)], MARKERS[i % len(MARKERS)]) for i, name in enumerate(labels)}


def _legend_below(fig: plt.Figure, ax: plt.Axes, count: int) -> None:
    handles, texts = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, texts, loc="outside lower center", ncols=min(count, 3), frameon=False)


def plot_metric_by_depth(table: pd.DataFrame, metric: str, description: str, labels: Sequence[str]) -> plt.Figure:
    """One metric of every run, all domains pooled: against relative depth (left) and absolute layer (right)."""
    styles = model_styles(labels)
    rows = table[(table["metric"] == metric) & (table["domain"] == "all")]
    fig, axes = a4_grid(2, max_cols=2, panel_height=2.8 + 0.12 * len(labels))
    for name in labels:
        part = rows[rows["label"] == name].sort_values("layer")
        colour, marker = styles[name]
        for ax, x in zip(axes, ("relative_depth", "layer"), strict=True):
            ax.plot(part[x], part["value"], color=colour, marker=marker, markersize=4, linewidth=1.2, label=name)
    axes[1].sharey(axes[0])  # one value axis: the right panel needs no label of its own
    label(axes[0], "relative depth  layer / (layers − 1)", textwrap.fill(description, 36), "by relative depth")
    label(axes[1], "decoder layer", None, "by layer")
    axes[0].set_xlim(-0.05, 1.05)
    layers = sorted(rows["layer"].unique())
    if len(layers) <= 16:  # a tick per layer compared (one layer: an axis of fractions otherwise)
        axes[1].set_xticks(layers)
        axes[1].set_xlim(layers[0] - 0.6, layers[-1] + 0.6)
    else:
        axes[1].xaxis.get_major_locator().set_params(integer=True)
    for ax in axes:
        ax.grid(linewidth=0.4, alpha=0.5)
    _legend_below(fig, axes[0], len(labels))
    fig.suptitle(textwrap.fill(f"{description}: {len(labels)} models, all domains pooled", 90))
    return fig


def plot_gap_vs_sparsity(points: pd.DataFrame, fits: pd.DataFrame, labels: Sequence[str]) -> plt.Figure:
    """Median probing gap over concepts against k/E (log axis), one panel per baseline: marker = model, colour =
    probe k, dashed = least-squares line on log10(k/E), with Spearman's ρ and p per probe k in the colour legend."""
    styles = model_styles(labels)
    baselines = [b for b in BASELINE_TITLES if b in set(points["baseline"])]
    probe_ks = sorted(points["probe_k"].unique())
    cmap = plt.get_cmap("viridis")
    colours = {k: cmap(i / max(len(probe_ks) - 1, 1) * 0.9) for i, k in enumerate(probe_ks)}
    fig, axes = a4_grid(len(baselines), max_cols=2, panel_height=4.4, width=PAGE_WIDTH)
    for ax, baseline in zip(axes, baselines, strict=True):
        part = points[points["baseline"] == baseline]
        for probe_k in probe_ks:
            series = part[part["probe_k"] == probe_k]
            for _, row in series.iterrows():
                ax.scatter(row["sparsity"], row["median_gap"], color=colours[probe_k],
                           marker=styles[row["label"]][1], s=26, edgecolors="black", linewidths=0.3, zorder=3)
            fit = fits[(fits["baseline"] == baseline) & (fits["probe_k"] == probe_k)]
            text = f"k = {probe_k}"
            if not fit.empty and np.isfinite(fit["slope"].iloc[0]):
                xs = np.geomspace(series["sparsity"].min(), series["sparsity"].max(), 20)
                ax.plot(xs, fit["intercept"].iloc[0] + fit["slope"].iloc[0] * np.log10(xs), color=colours[probe_k],
                        linestyle="--", linewidth=1)
            if not fit.empty and np.isfinite(fit["spearman_rho"].iloc[0]):
                text += f": ρ = {fit['spearman_rho'].iloc[0]:.2f}, p = {fit['p_value'].iloc[0]:.2g}"
            ax.plot([], [], color=colours[probe_k], marker="o", linestyle="--", label=text)
        ax.axhline(0, color="grey", linewidth=0.6)
        ax.set_xscale("log")
        # 1-2-5 ticks as plain numbers: a range under a decade otherwise labels every minor tick in 10^x notation
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        label(ax, "routing sparsity k / E (log)", "best-layer F1 gap\n(median over concepts)", BASELINE_TITLES[baseline])
        ax.grid(linewidth=0.4, alpha=0.5)
        # below the panel, so that the points (whose place is the result) are never hidden behind it
        ax.legend(title="neurons probed (probe k): Spearman ρ, p", fontsize=6, title_fontsize=6, loc="upper center",
                  bbox_to_anchor=(0.5, -0.3), frameon=False)
    model_handles = [plt.Line2D([], [], color="grey", marker=styles[name][1], linestyle="", label=name)
                     for name in labels]
    fig.legend(handles=model_handles, loc="outside lower center", ncols=min(len(labels), 3), frameon=False)
    fig.suptitle("Probing gap against routing sparsity (one marker per model)")
    return fig


def _pooled(rows: pd.DataFrame) -> pd.DataFrame:
    """The 'all domains' rows where the table has them, else the mean over domains (per everything else)."""
    pooled = rows[rows["domain"] == "all"]
    if not pooled.empty:
        return pooled
    keys = [c for c in rows.columns if c not in ("domain", "value", "ppl", "normalized_log_ppl")]
    return rows.groupby(keys, dropna=False, sort=False)[[c for c in ("value", "ppl", "normalized_log_ppl")
                                                         if c in rows]].mean().reset_index()


def plot_metric_over_training(table: pd.DataFrame, metric: str, description: str, labels: Sequence[str],
                              model: str) -> plt.Figure:
    """One metric of a model's checkpoints (runs in training order): one line per decoder layer, colour by depth."""
    rows = _pooled(table[table["metric"] == metric])
    layers = sorted(rows["layer"].unique())
    cmap = plt.get_cmap("viridis")
    fig, axes = a4_grid(1, max_cols=1, panel_height=3.4)
    ax = axes[0]
    positions = {name: i for i, name in enumerate(labels)}
    for j, layer in enumerate(layers):
        part = rows[rows["layer"] == layer].assign(x=lambda d: d["label"].map(positions)).sort_values("x")
        ax.plot(part["x"], part["value"], color=cmap(j / max(len(layers) - 1, 1) * 0.9), marker="o", markersize=4,
                linewidth=1.2, label=f"layer {layer}")
    ticks = [name.split("@", 1)[-1] if "@" in name else name for name in labels]
    ax.set_xticks(range(len(labels)), ticks, rotation=30 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center")
    label(ax, "checkpoint (training order)", textwrap.fill(description, 40), None)
    ax.grid(linewidth=0.4, alpha=0.5)
    ax.legend(fontsize=7, ncols=min(len(layers), 4), loc="best", frameon=False)
    fig.suptitle(textwrap.fill(f"{description} over {model}'s {len(labels)} checkpoints, all domains pooled", 80))
    return fig


def plot_perplexity_vs_k(table: pd.DataFrame, labels: Sequence[str]) -> plt.Figure:
    """MoE Lens Figure 3 (left) across models: normalised log-perplexity against k′ (left) and against k′ / k (right),
    all domains pooled, one line per model."""
    styles = model_styles(labels)
    rows = _pooled(table)
    fig, axes = a4_grid(2, max_cols=2, panel_height=2.8 + 0.12 * len(labels))
    for name in labels:
        part = rows[rows["label"] == name].sort_values("k_prime")
        colour, marker = styles[name]
        for ax, x in zip(axes, ("k_prime", "k_fraction"), strict=True):
            ax.plot(part[x], part["normalized_log_ppl"], color=colour, marker=marker, markersize=4, linewidth=1.2,
                    label=name)
    axes[1].sharey(axes[0])
    label(axes[0], "experts kept per token k′", "log PPL(k′) / log PPL(k)", "by k′")
    label(axes[1], "k′ / k", None, "by the share of k kept")
    axes[0].xaxis.get_major_locator().set_params(integer=True)
    for ax in axes:
        ax.axhline(1, color="grey", linewidth=0.6)
        ax.grid(linewidth=0.4, alpha=0.5)
    _legend_below(fig, axes[0], len(labels))
    fig.suptitle(f"Perplexity keeping only the top-k′ experts: {len(labels)} models, all domains pooled")
    return fig
