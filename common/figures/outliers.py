"""outliers.py's figures: each expert's peak per layer (log scale, super experts marked), the residual stream's
massive activations per layer, the attention-sink mass and residual peak before and after removing the super
experts, and the perplexity per domain under each removal."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from common.plots import PAGE_WIDTH, integer_axis, plt, text_label

SUPER = "C3"
CONDITIONS = {"none": ("unedited model", "0.55", "-"), "super": ("super experts removed", SUPER, "-"),
              "random": ("as many random experts removed", "C0", "--")}
WIDTHS = {"none": 3.6, "super": 1.4, "random": 1.4}  # the unedited line widest, so lines it coincides with stay seen


def plot_expert_peaks(peaks: pd.DataFrame, named: pd.DataFrame, multiple: float, rule_on: str) -> plt.Figure:
    """Two panels (down-projection input, expert output): per layer, one dot per routed expert at its peak |value|
    over all domains (log scale), the rule's threshold (multiple × the layer median) as a tick, super experts red."""
    table = peaks[peaks.domain == "all"]
    layers = sorted(table.layer.unique())
    stacked = len(layers) > 8  # many layers: the two panels one above the other, each the page's width
    fig, axes = plt.subplots(2 if stacked else 1, 1 if stacked else 2, layout="constrained",
                             figsize=(PAGE_WIDTH, 5.8 if stacked else 3.4))
    super_set = {(int(r.layer), int(r.expert)) for r in named.itertuples()} if len(named) else set()
    rng = np.random.default_rng(0)
    for ax, which, title in ((axes[0], "input", "down-projection input (neurons)"), (axes[1], "output", "expert output")):
        column = f"{which}_peak"
        for x, layer in enumerate(layers):
            rows = table[table.layer == layer]
            values = rows[column].to_numpy(dtype=float)
            is_super = np.array([(layer, int(e)) in super_set for e in rows.expert])
            jitter = rng.uniform(-0.18, 0.18, size=len(values))
            ax.scatter(x + jitter[~is_super], values[~is_super], s=9, color="0.45", alpha=0.7, lw=0)
            ax.scatter(x + jitter[is_super], values[is_super], s=30, color=SUPER, marker="*", zorder=3)
            for jx, value, e in zip(jitter[is_super], values[is_super], rows.expert[is_super], strict=True):
                ax.annotate(str(e), (x + jx, value), xytext=(3, 2), textcoords="offset points", fontsize=6, color=SUPER)
            if which == rule_on and np.isfinite(values).any():
                threshold = multiple * np.nanmedian(values)
                ax.hlines(threshold, x - 0.35, x + 0.35, color=SUPER, lw=0.9, linestyles=":")
        ax.set_yscale("log")
        integer_axis(ax, "x", list(range(len(layers))))
        ax.set_xticks(range(len(layers)), [str(v) for v in layers], fontsize=7 if len(layers) <= 24 else 5)
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("peak |value| over routed tokens (log)")
        ax.set_title(title + (" — the rule reads this" if which == rule_on else ""), fontsize=8.5)
    axes[0].scatter([], [], s=9, color="0.45", label="expert")
    axes[0].scatter([], [], s=30, color=SUPER, marker="*", label="super expert (number = expert)")
    axes[0].plot([], [], color=SUPER, lw=0.9, ls=":", label=f"{multiple:g} × the layer's median peak")
    fig.legend(loc="outside lower center", ncols=3, fontsize=7, frameon=False)
    by_hand = len(named) and (named.named_by == "--remove").all()
    count = f"{len(super_set)} expert{'' if len(super_set) == 1 else 's'}"
    fig.suptitle(f"Peak activation per expert and layer ({count} named by --remove)" if by_hand else
                 f"Peak activation per expert and layer ({count} above the threshold: super)", fontsize=9)
    return fig


def plot_massive_activations(massive: pd.DataFrame) -> plt.Figure:
    """Per decoder layer, the residual stream's top-1, -2 and -3 |h| and its median (log scale), over all domains;
    the top-1's dimension and token written above it."""
    table = massive[massive.domain == "all"]
    layers = sorted(table.layer.unique())
    fig, ax = plt.subplots(figsize=(PAGE_WIDTH, 3.4), layout="constrained")
    for rank, marker in ((1, "o"), (2, "s"), (3, "^")):
        rows = table[table["rank"] == rank].set_index("layer").reindex(layers)
        ax.plot(layers, rows.value, marker=marker, ms=4, lw=1.2, label=f"top-{rank} |h|")
    medians = table[table["rank"] == 1].set_index("layer").reindex(layers)
    ax.plot(layers, medians.median_abs, color="0.4", lw=1.2, ls="--", marker=".", label="median |h|")
    for layer, row in medians.iterrows():
        if np.isfinite(row.value):
            ax.annotate(f"d{int(row.dim)} {text_label(str(row.token), 8)}", (layer, row.value), xytext=(0, 4),
                        textcoords="offset points", ha="center", fontsize=5.5, rotation=60)
    ax.set_yscale("log")
    integer_axis(ax, "x", layers)
    ax.set_xlabel("decoder layer (residual stream after it)")
    ax.set_ylabel("|h| (log scale)")
    ax.margins(y=0.25)
    ax.legend(fontsize=7, frameon=False, loc="upper left")
    ax.set_title("Massive activations in the residual stream (all domains)\nlabels: dimension and token of the top-1",
                 fontsize=8.5)
    return fig


def _condition_lines(ax: plt.Axes, table: pd.DataFrame, column: str) -> None:
    for condition in ("none", "super", "random"):
        rows = table[table.condition == condition]
        if rows.empty:
            continue
        label, colour, style = CONDITIONS[condition]
        by_layer = rows.groupby("layer")[column]
        mean = by_layer.mean()
        if condition == "random":
            low, high = by_layer.min(), by_layer.max()
            ax.fill_between(mean.index, low, high, color=colour, alpha=0.2, lw=0)
            label += f" ({rows.draw.nunique()} draws: mean, min-max band)"
        ax.plot(mean.index, mean.to_numpy(), color=colour, ls=style, marker="o", ms=3, lw=WIDTHS[condition],
                label=label, alpha=0.8 if condition == "none" else 1.0)


def plot_sink_mass(sink: pd.DataFrame) -> plt.Figure:
    """Per decoder layer (all domains): the attention mass on the first token and the residual stream's peak |h|,
    for the unedited model, with the super experts removed, and with as many random experts removed."""
    table = sink[sink.domain == "all"]
    layers = sorted(table.layer.unique())
    stacked = len(layers) > 12
    fig, axes = plt.subplots(2 if stacked else 1, 1 if stacked else 2, layout="constrained",
                             figsize=(PAGE_WIDTH, 5.6 if stacked else 3.3))
    if table.sink_mass.notna().any():
        _condition_lines(axes[0], table, "sink_mass")
        uniform = table[table.condition == "none"].set_index("layer").uniform_mass.reindex(layers)
        axes[0].plot(layers, uniform.to_numpy(), color="0.3", lw=1, ls=":", label="uniform attention (no sink)")
        top = float(np.nanmax(table[["sink_mass", "uniform_mass"]].to_numpy()))
        axes[0].set_ylim(0, min(1.02, 1.25 * top + 0.01))  # a fraction, zoomed to what the model shows
    else:
        axes[0].text(0.5, 0.5, "attention weights not available\nfor this architecture", ha="center", va="center",
                     transform=axes[0].transAxes, fontsize=8)
    axes[0].set_ylabel("attention on the first token (fraction)")
    axes[0].set_title("Attention sink: mean attention mass on position 0", fontsize=8.5)
    _condition_lines(axes[1], table, "residual_peak")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("max |h| of the residual stream (log)")
    axes[1].set_title("Residual-stream peak after each layer", fontsize=8.5)
    for ax in axes:
        integer_axis(ax, "x", layers)
        ax.set_xlabel("decoder layer")
    handles, labels = axes[0].get_legend_handles_labels() if table.sink_mass.notna().any() else \
        axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=7, frameon=False)
    return fig


def plot_outlier_perplexity(perplexity: pd.DataFrame, domains: Sequence[str]) -> plt.Figure:
    """Per domain (and pooled): perplexity of the unedited model, with the super experts removed, and with as many
    random experts removed (mean and the draws as dots), log scale."""
    fig, ax = plt.subplots(figsize=(PAGE_WIDTH, 3.3), layout="constrained")
    conditions = [c for c in ("none", "super", "random") if c in set(perplexity.condition)]
    width = 0.8 / len(conditions)
    x = np.arange(len(domains))
    for j, condition in enumerate(conditions):
        label, colour, _ = CONDITIONS[condition]
        rows = perplexity[perplexity.condition == condition]
        nll = rows.groupby("domain")["nll"].mean().reindex(domains)
        offset = x + (j - (len(conditions) - 1) / 2) * width
        ax.bar(offset, np.exp(nll.to_numpy()), width * 0.92, color=colour, label=label, alpha=0.85)
        if condition == "random":
            for _, draw in rows.groupby("draw"):
                ax.scatter(offset, draw.set_index("domain").reindex(domains).ppl, s=8, color="black", zorder=3)
    ax.set_yscale("log")
    ax.set_xticks(x, ["all pooled" if d == "all" else text_label(d, 14, quoted=False) for d in domains],
                  fontsize=8 if len(domains) <= 7 else 6, rotation=0 if len(domains) <= 7 else 30)
    ax.set_ylabel("perplexity (log scale)")
    ax.legend(fontsize=7, frameon=False, loc="upper left", ncols=len(conditions))
    ax.margins(y=0.2)
    ax.set_title("Perplexity: super experts removed vs as many random experts (dots: random draws)", fontsize=8.5)
    return fig
