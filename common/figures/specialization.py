"""Figures of router_metrics.py, one (or one per layer) for every table it writes: selection frequency, domain
specialization (shares and JSD), 50%-coverage, load balance, token overlap, token-id specialization, co-activation,
transitions, indicator correlation and router saturation."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap

from common.analysis import ALL_DOMAINS
from common.analysis.specialization import (
    coverage,
    expert_specialization,
    load_balance,
    transition_probabilities,
)
from common.model import MoELayer
from common.plots import (
    PAGE_WIDTH,
    a4_grid,
    bar_values,
    correlation_heatmap,
    heatmap,
    index_ticks,
    integer_axis,
    label,
    legend_panel,
    plt,
    symmetric_limit,
)

if TYPE_CHECKING:  # the run folder is one floor up; figures only write into it
    from common.run import Run


def _domain_title(domain: str) -> str:
    return "all domains" if domain == ALL_DOMAINS else domain


def _layer_positions(ax: plt.Axes, layers: Sequence[int]) -> np.ndarray:
    """Layers as evenly spaced categories (selected layers need not be consecutive); returns their x positions."""
    x = np.arange(len(layers))
    step = max(1, -(-len(layers) // 16))
    ax.set_xticks(x[::step], [str(layer) for layer in layers][::step])
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set_xlabel("decoder layer")
    return x


# ------------------------------------------------------------------------------------ frequency, domains


def plot_frequency(freq: pd.DataFrame, layer: int, domains: Sequence[str]) -> plt.Figure:
    """Per-expert top-k selection frequency with the uniform line k/E, one panel per domain (MoE Lens Fig. 1 form)."""
    names = [*domains, ALL_DOMAINS]
    rows = freq[freq.layer == layer]
    experts = sorted(rows.expert.unique())
    fig, axes = a4_grid(len(names), max_cols=_expert_columns(len(experts)), panel_height=1.8, sharey=True)
    for ax, domain in zip(axes, names, strict=True):
        d = rows[rows.domain == domain]
        ax.bar(d.expert, 100 * d.freq_topk, color="C0" if domain != ALL_DOMAINS else "black", width=0.8)
        ax.axhline(100 * d.uniform_topk.iloc[0], color="C3", linestyle="--", linewidth=1, label="uniform routing (k / E)")
        ax.yaxis.set_tick_params(labelleft=True)
        label(ax, "expert", "% of the domain's tokens", _domain_title(domain))
    legend_panel(fig, axes)
    fig.suptitle(f"Expert selection frequency (top-k), layer {layer}")
    index_ticks(axes, experts)  # last: how many expert ids fit is measured on the laid-out panels
    return fig


def _expert_columns(num_experts: int) -> int:
    """Panels per row of a per-expert bar chart: two when that lets every one of 13–32 experts be named."""
    return 2 if 12 < num_experts <= 32 else 3


def plot_domain_heatmap(freq: pd.DataFrame, layer: int, domains: Sequence[str]) -> plt.Figure:
    """Domain × expert share of each domain's tokens routed to each expert (OLMoE Fig. 22 form)."""
    rows = freq[(freq.layer == layer) & (freq.domain != ALL_DOMAINS)]
    matrix = rows.pivot(index="domain", columns="expert", values="freq_topk").loc[list(domains)]
    width = min(PAGE_WIDTH, max(3.8, 0.22 * matrix.shape[1] + 2.4))
    fig, ax = plt.subplots(figsize=(width, 0.28 * len(domains) + 1.4), layout="constrained")
    heatmap(ax, 100 * matrix.to_numpy(), cbar_label="% of the domain's tokens", yticklabels=list(domains),
            xlabel="expert", title=f"Share of each domain's tokens routed to each expert, layer {layer}\n"
            f"(top-k; uniform routing gives k / E = {100 * rows.uniform_topk.iloc[0]:.1f}%)")
    return fig


def plot_expert_specialization(table: pd.DataFrame, domains: Sequence[str]) -> plt.Figure:
    """Per layer, each expert's JSD (bits) between its domain mix and the overall mix, coloured by its top domain."""
    layers = sorted(table.layer.unique())
    experts = sorted(table.expert.unique())
    fig, axes = a4_grid(len(layers), max_cols=_expert_columns(len(experts)), panel_height=1.8, sharey=True)
    colours = {domain: f"C{j % 10}" for j, domain in enumerate(domains)}
    for ax, layer in zip(axes, layers, strict=True):
        d = table[table.layer == layer]
        for domain, part in d.groupby("top_domain", sort=False):
            if domain:
                ax.bar(part.expert, part.jsd_bits, color=colours.get(domain, "grey"), width=0.8, label=domain)
        ax.yaxis.set_tick_params(labelleft=True)
        label(ax, "expert", "JSD (bits)", f"layer {layer}")
    top = float(np.nanmax(table.jsd_bits)) if table.jsd_bits.notna().any() else 1.0
    axes[0].set_ylim(0, max(top * 1.1, 0.05))
    handles = {}
    for ax in axes:
        for h, text in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(text, h)
    order = [d for d in domains if d in handles]
    fig.legend([handles[d] for d in order], order, loc="outside lower center", ncols=min(len(order), 6),
               frameon=False, title="colour: the expert's most frequent domain")
    fig.suptitle("Domain specialization of each expert: Jensen–Shannon divergence of its domain mix\n"
                 "from the data's (0 bits = mixes domains like the data, 1 bit = disjoint domains)")
    index_ticks(axes, experts)  # last: how many expert ids fit is measured on the laid-out panels
    return fig


def plot_coverage(table: pd.DataFrame, layers: Sequence[MoELayer], domains: Sequence[str]) -> plt.Figure:
    """Experts needed to handle 50% of each domain's assignments per layer, coloured against uniform routing."""
    layer_ids = [m.layer for m in layers]
    names = [*domains, ALL_DOMAINS]
    share = float(table.share.iloc[0]) if len(table) else 0.5
    needed = table.pivot(index="domain", columns="layer", values="experts_needed").loc[names, layer_ids]
    fraction = table.pivot(index="domain", columns="layer", values="fraction_of_experts").loc[names, layer_ids]
    width = min(PAGE_WIDTH, max(3.8, 0.5 * len(layer_ids) + 2.6))
    fig, ax = plt.subplots(figsize=(width, 0.26 * len(names) + 1.5), layout="constrained")
    # What uniform routing needs, as a fraction: ceil(share · E) / E (the share itself when layers differ in E).
    uniform_fractions = {float(np.ceil(share * m.num_choices - 1e-12) / m.num_choices) for m in layers}
    centre = uniform_fractions.pop() if len(uniform_fractions) == 1 else share
    colours, low, high = _centred_scale(fraction.to_numpy(), centre)
    image = heatmap(ax, fraction.to_numpy(), cmap=colours, vmin=low, vmax=high,
                    cbar_label=f"fraction of the layer's experts\n(white = uniform routing, {centre:g})",
                    xticklabels=[str(x) for x in layer_ids], yticklabels=[_domain_title(n) for n in names],
                    xlabel="decoder layer", cbar=True)
    for (i, j), value in np.ndenumerate(needed.to_numpy()):
        red, green, blue, _ = image.cmap(image.norm(fraction.to_numpy()[i, j]))
        dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
        ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=6.5, color="white" if dark else "black")
    ax.tick_params(axis="x", labelrotation=0)
    uniform = sorted({int(np.ceil(share * m.num_choices - 1e-12)) for m in layers})
    experts = sorted({m.num_choices for m in layers})
    baseline = (f"{uniform[0]} of {experts[0]}" if len(uniform) == 1 and len(experts) == 1
                else f"{share:g} of the experts")
    ax.set_title(f"Experts needed to handle {100 * share:g}% of a domain's assignments\n"
                 f"(number in each cell; uniform routing needs {baseline}; blue = fewer: specialised)")
    return fig


def _centred_scale(values: np.ndarray, centre: float) -> tuple[ListedColormap, float, float]:
    """A diverging colour scale over the data's range only (and the centre): RdBu_r, linear, white at `centre`,
    its darkest shade at the value farthest from the centre; the side no value reaches is left out, so the colour
    bar spans min(data, centre) … max(data, centre). Returns (colour map, vmin, vmax)."""
    finite = values[np.isfinite(values)]
    low = min(float(finite.min()), centre) if finite.size else centre
    high = max(float(finite.max()), centre) if finite.size else centre
    reach = max(centre - low, high - centre)
    if reach <= 0:  # every value is the uniform one: a symmetric bar around it
        reach = 0.25 * max(centre, 1e-3)
        low, high = centre - reach, centre + reach
    start, stop = (low - (centre - reach)) / (2 * reach), (high - (centre - reach)) / (2 * reach)
    return ListedColormap(plt.get_cmap("RdBu_r")(np.linspace(start, stop, 256))), low, high


def plot_load_balance(table: pd.DataFrame) -> plt.Figure:
    """Per layer: CV and max/mean of the selection frequencies, dead experts, and the switch auxiliary loss."""
    layers = list(table.layer)
    fig, axes = a4_grid(4, max_cols=2, panel_height=2.0)
    panels = [
        ("cv", "Spread of selection frequencies", "CV of f_e (std / mean)", None, "{:.2f}"),
        ("max_over_mean", "Busiest expert vs the mean", "max f_e / mean f_e (ratio)", 1.0, "{:.2f}"),
        ("dead_experts", "Experts never chosen", "dead experts (count)", None, "{:.0f}"),
        ("aux_loss", "Switch auxiliary loss E · Σ f_e P̄_e", "aux loss (uniform routing = k)", None, "{:.2f}"),
    ]
    for ax, (column, title, ylabel, reference, fmt) in zip(axes, panels, strict=True):
        x = _layer_positions(ax, layers)
        bars = ax.bar(x, table[column], color="C0", width=0.6)
        bar_values(ax, bars, fmt)
        if reference is not None:
            ax.axhline(reference, color="C3", linestyle="--", linewidth=1, label="perfect balance")
        if column == "aux_loss":
            for xi, k in zip(x, table.top_k, strict=True):
                ax.plot([xi - 0.4, xi + 0.4], [k, k], color="C3", linestyle="--", linewidth=1, label="perfect balance")
        if column == "dead_experts":
            ax.set_ylim(0, max(float(table[column].max()), 1.0) * 1.25)
            integer_axis(ax, "y")
        else:
            ax.set_ylim(0, max(float(table[column].max()), reference or 0, 1e-9) * 1.2)
        label(ax, None, ylabel, title)
    legend_panel(fig, axes)
    experts = sorted(table.experts.unique())
    fig.suptitle(f"Load balance per layer (all domains pooled; {'/'.join(map(str, experts))} experts, "
                 f"f_e = share of tokens choosing expert e)")
    return fig


# ------------------------------------------------------------------------------------ token tables


def plot_token_overlap(jaccard: np.ndarray, weighted: np.ndarray, layer: int) -> plt.Figure:
    """Expert × expert overlap of the token ids they receive: Jaccard of the id sets and the count-weighted overlap."""
    fig, axes = a4_grid(2, max_cols=2, panel_height=3.0)
    for ax, (matrix, title, cbar) in zip(axes, (
        (jaccard, "Token-id sets (Jaccard)", "ids both receive / ids either receives"),
        (weighted, "Token counts (weighted overlap)", "Σ_t min(count_i, count_j) / Σ_t max(…)"),
    ), strict=True):
        off = np.array(matrix, dtype=np.float64)
        np.fill_diagonal(off, np.nan)
        finite = off[np.isfinite(off)]
        vmin = float(np.percentile(finite, 1)) if finite.size else 0.0
        vmax = float(np.percentile(finite, 99)) if finite.size else 1.0
        heatmap(ax, off, cbar_label=cbar, vmin=vmin, vmax=max(vmax, vmin + 1e-6), xlabel="expert j",
                ylabel="expert i", title=title, aspect="equal", max_ticks=9)
    fig.suptitle(f"Token overlap between experts, layer {layer} (diagonal masked; colour range: 1st–99th percentile)")
    return fig


TOKEN_TABLE_NAMES = {"current": "routed token", "next": "next token", "predicted": "predicted token"}


def plot_token_specialization(table: pd.DataFrame) -> plt.Figure:
    """Token-id specialization per layer: for the routed, next and predicted token, the mean share of an id's
    occurrences that go to its most-used expert; unweighted and weighted by occurrences, against k / E."""
    layers = sorted(table.layer.unique())
    fig, axes = a4_grid(2, max_cols=2, panel_height=2.4, sharey=True)
    kinds = [k for k in TOKEN_TABLE_NAMES if k in set(table.token)]
    width = 0.8 / max(len(kinds), 1)
    for ax, (column, title) in zip(axes, (("unweighted", "Each token id counts once"),
                                          ("weighted", "Ids weighted by their occurrences")), strict=True):
        x = _layer_positions(ax, layers)
        for j, kind in enumerate(kinds):
            d = table[table.token == kind].set_index("layer").loc[layers]
            bars = ax.bar(x + (j - (len(kinds) - 1) / 2) * width, 100 * d[column], width=width * 0.95,
                          color=f"C{j}", label=TOKEN_TABLE_NAMES[kind])
            if len(layers) * len(kinds) <= 12:
                bar_values(ax, bars, "{:.0f}")
        uniform = table.drop_duplicates("layer").set_index("layer").loc[layers, "uniform"]
        for xi, u in zip(x, uniform, strict=True):
            ax.plot([xi - 0.45, xi + 0.45], [100 * u, 100 * u], color="black", linestyle="--", linewidth=1,
                    label="uniform routing (k / E)")
        ax.set_ylim(0, 109)
        label(ax, None, "% at the id's most-used expert" if column == "unweighted" else None, title)
    legend_panel(fig, axes)
    fig.suptitle("Token-id specialization: how consistently one id goes to the same expert")
    return fig


# ------------------------------------------------------------------------------------ expert × expert


def plot_matrix(matrix: np.ndarray, title: str, xlabel: str, ylabel: str, colour_label: str,
                mask_diagonal: bool = False) -> plt.Figure:
    """An expert × expert heatmap (co-activation, transitions) with integer expert ticks and a labelled colour bar."""
    fig, ax = plt.subplots(figsize=(4.4, 3.7), layout="constrained")
    heatmap(ax, matrix, cbar_label=colour_label, cmap="magma", xlabel=xlabel, ylabel=ylabel, title=title,
            mask_diagonal=mask_diagonal, aspect="equal")
    return fig


def plot_indicator_correlation(correlation: np.ndarray, shuffled: np.ndarray, layers: Sequence[int]) -> plt.Figure:
    """The Pearson correlation of all (layer, expert) top-k indicators beside its token-shuffled control, on one
    symmetric colour scale set by the real matrix's off-diagonal values."""
    block = correlation.shape[0] // max(len(layers), 1)
    off = np.array(correlation, dtype=np.float64)
    np.fill_diagonal(off, np.nan)
    vmax = symmetric_limit(off)
    fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 3.9), layout="constrained")
    for ax, (matrix, title) in zip(axes, ((correlation, "Top-k indicators"),
                                          (shuffled, "Control: tokens shuffled within each layer")), strict=True):
        image, _ = correlation_heatmap(ax, matrix, block, layers, vmax=vmax, title=title, cbar=False)
        label(ax, "layer (its experts in order)", "layer (its experts in order)")
    fig.colorbar(image, ax=axes, label=f"Pearson r (colour limit ±{vmax:.2g}: 99th pct of |r|)", shrink=0.8)
    fig.suptitle("Correlation of expert choices across (layer, expert); diagonal masked, lines = layer boundaries")
    return fig


# ------------------------------------------------------------------------------------ saturation


def plot_saturation(table: pd.DataFrame) -> plt.Figure:
    """Agreement of each checkpoint's routing with the final one: top-k overlap and top-1 agreement per layer.
    Up to three checkpoints: grouped bars per layer with values; more: one line per layer over the checkpoints."""
    revisions = table.drop_duplicates("position").sort_values("position")
    layers = sorted(table.layer.unique())
    final = str(table.final.iloc[0]) if len(table) else ""
    fig, axes = a4_grid(2, max_cols=2, panel_height=2.5, sharey=True)
    for ax, (column, title) in zip(axes, (("topk_overlap", "Chosen experts shared (top-k overlap)"),
                                          ("top1_agreement", "Same top expert (top-1 agreement)")), strict=True):
        if len(revisions) <= 3:
            x = _layer_positions(ax, layers)
            width = 0.8 / len(revisions)
            for j, (position, revision) in enumerate(zip(revisions.position, revisions.revision, strict=True)):
                d = table[table.position == position].set_index("layer").loc[layers]
                bars = ax.bar(x + (j - (len(revisions) - 1) / 2) * width, 100 * d[column], width=width * 0.95,
                              color=f"C{j}", label=_short(revision))
                bar_values(ax, bars, "{:.0f}")
        else:
            for j, layer in enumerate(layers):
                d = table[table.layer == layer].sort_values("position")
                ax.plot(d.position, 100 * d[column], marker="o", markersize=3, color=f"C{j % 10}",
                        label=f"layer {layer}")
            ax.set_xticks(revisions.position, [_short(r) for r in revisions.revision], rotation=30, ha="right")
            ax.set_xlabel("checkpoint")
        ax.yaxis.set_tick_params(labelleft=True)
        ax.set_ylim(0, 110)
        label(ax, None, "% of tokens" if column == "top1_agreement" else "% of the top k", title)
    legend_panel(fig, axes, title="checkpoint" if len(revisions) <= 3 else None)
    fig.suptitle(f"Router saturation: agreement with the final checkpoint {_short(final)} on identical tokens")
    return fig


def _short(name: str, limit: int = 28) -> str:
    """A checkpoint name short enough for a legend: folders by their last part."""
    name = str(name).rstrip("/").rsplit("/", 1)[-1] if "/" in str(name) and len(str(name)) > limit else str(name)
    return name if len(name) <= limit else name[: limit - 1] + "…"


# ------------------------------------------------------------------------------------ all of router_metrics.py


def save_specialization_figures(
    out: Run, freq: pd.DataFrame, counts: dict[str, np.ndarray], layers: Sequence[MoELayer], domains: Sequence[str]
) -> None:
    """The figures of router_metrics.py drawn from its counts: frequency, domain heatmap, co-activation (per
    layer), transitions (per layer pair), indicator correlation, and the per-layer tables (JSD specialization,
    50%-coverage, load balance; recomputed from the counts by the same functions that wrote them)."""
    correlation, shuffled = counts["correlation"], counts["correlation_shuffled"]
    for li, moe_layer in enumerate(layers):
        out.save_figure(plot_frequency(freq, moe_layer.layer, domains), f"frequency_layer{moe_layer.layer}")
        out.save_figure(plot_domain_heatmap(freq, moe_layer.layer, domains), f"domain_heatmap_layer{moe_layer.layer}")
        selected = counts["topk"][li].sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            conditional = counts["coactivation"][li] / selected.reshape(-1, 1)
        out.save_figure(plot_matrix(conditional, f"Co-activation, layer {moe_layer.layer}", "expert j", "expert i",
                                    "P(j chosen | i chosen)", mask_diagonal=True), f"coactivation_layer{moe_layer.layer}")
    if "transitions" in counts:
        for pair, (a, b) in enumerate(itertools.pairwise(layers)):
            probs = transition_probabilities(counts["transitions"][pair], counts["topk"][pair].sum(0))
            out.save_figure(plot_matrix(probs, f"Routing from layer {a.layer} to layer {b.layer}",
                                        f"expert chosen at layer {b.layer}", f"expert chosen at layer {a.layer}",
                                        "P(e' at next layer | e)"), f"transitions_{a.layer}_{b.layer}")
    out.save_figure(plot_indicator_correlation(correlation, shuffled, [m.layer for m in layers]), "indicator_correlation")
    out.save_figure(plot_expert_specialization(expert_specialization(counts, layers, domains), domains),
                    "expert_specialization")
    out.save_figure(plot_coverage(coverage(counts, layers, domains), layers, domains), "coverage50")
    out.save_figure(plot_load_balance(load_balance(counts, layers)), "load_balance")
