"""Figures of weights.py: router-row cosine, expert weight cosine, cross-layer router similarity, singular spectra
and effective rank, router-expert alignment."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from common.analysis.weights import (
    ALIGNMENT_METRICS,
    CROSS_LAYER_METRICS,
    MATRICES,
    VARIANCE_THRESHOLD,
    WeightResults,
)
from common.plots import PAGE_WIDTH, a4_grid, grid, plt

if TYPE_CHECKING:  # the run folder is one floor up; figures only write into it
    from common.run import Run

ALIGNMENT_TITLES = {
    "gate_norm": "gate response ‖W_gate,e r̂_e‖",
    "up_norm": "up response ‖W_up,e r̂_e‖",
    "gate_rowspace_share": "share of ‖r_e‖² in rowspace(W_gate,e)",
    "up_rowspace_share": "share of ‖r_e‖² in rowspace(W_up,e)",
}
CROSS_TITLES = {
    "mean_abs_cosine": "mean |cos| of router rows",
    "best_match_abs_cosine": "best-match |cos| of router rows",
    "alignment": "row-space alignment mean cos θ_k",
}


def _ticks(ax, n: int) -> None:
    """Every index as a tick when there are few, else about 8 integer ticks."""
    for target in (ax.xaxis, ax.yaxis):
        if n <= 10:
            target.set_ticks(range(n))
        else:
            target.set_major_locator(MaxNLocator(nbins=5, integer=True))
        target.set_tick_params(labelsize=7)


def _cmap(name: str):
    """A colour map whose NaN cells (a hidden diagonal) are light grey, not the colour of 0."""
    return plt.get_cmap(name).with_extremes(bad="0.8")


def _offdiagonal_limit(matrices: np.ndarray) -> float:
    """The largest |value| off the diagonal of [..., n, n] matrices (the colour range of a symmetric map)."""
    n = matrices.shape[-1]
    off = np.abs(matrices[..., ~np.eye(n, dtype=bool)])
    finite = off[np.isfinite(off)]
    return float(finite.max()) if finite.size and finite.max() > 0 else 1.0


def plot_cosine_panels(matrices: np.ndarray, layers: Sequence[int], title: str, label: str,
                       num_experts: int | None = None, random_abs: float | None = None) -> plt.Figure:
    """One E × E heatmap per layer, diagonal (= 1) hidden, one symmetric colour scale for all panels."""
    fig, axes = grid(len(layers), ncols=4, panel_size=(2.7, 2.5))
    limit = _offdiagonal_limit(matrices)
    image = None
    for ax, layer, matrix in zip(axes, layers, matrices, strict=True):
        n = int(np.isfinite(matrix).any(axis=1).sum()) or matrix.shape[0]
        shown = np.where(np.eye(matrix.shape[0], dtype=bool), np.nan, matrix)[:n, :n]
        image = ax.imshow(shown, cmap=_cmap("RdBu_r"), vmin=-limit, vmax=limit, interpolation="nearest")
        if num_experts is not None and n > num_experts:  # zero-compute choices (LongCat) after the routed experts
            ax.axhline(num_experts - 0.5, color="black", linewidth=0.6)
            ax.axvline(num_experts - 0.5, color="black", linewidth=0.6)
        ax.set_title(f"layer {layer}")
        _ticks(ax, n)
        ax.set_xlabel("expert")
        ax.set_ylabel("expert")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label=label)
    note = f"; random directions: E|cos| = {random_abs:.3g}" if random_abs is not None else ""
    fig.suptitle(f"{title} (diagonal = 1, grey{note})")
    return fig


def plot_cross_layer(matrices: np.ndarray, cross: pd.DataFrame, layers: Sequence[int]) -> plt.Figure:
    """Layer × layer maps of router-row |cos|, best-match |cos| and principal-angle alignment, with their controls."""
    fig, axes = a4_grid(len(CROSS_TITLES), max_cols=2, panel_height=3.0)
    n = len(layers)
    random_cos = float(cross.abs_cosine_random.iloc[0])
    off = cross[cross.layer_a != cross.layer_b]
    control = (f"random subspaces: {off.alignment_random_mean.mean():.2f} ± {off.alignment_random_std.mean():.2f}"
               if len(off) else "one layer: no pair")
    notes = {"mean_abs_cosine": f"random directions: {random_cos:.3f}; diagonal: pairs a ≠ b",
             "best_match_abs_cosine": "mean over rows of the most similar row",
             "alignment": f"{control}; diagonal = 1, grey"}
    for ax, (metric, title) in zip(axes, CROSS_TITLES.items(), strict=True):
        matrix = matrices[CROSS_LAYER_METRICS.index(metric)].copy()
        if metric == "alignment":
            np.fill_diagonal(matrix, np.nan)  # a row space is aligned with itself: 1 by construction
        finite = matrix[np.isfinite(matrix)]
        top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        image = ax.imshow(matrix, cmap=_cmap("viridis"), vmin=0, vmax=top, interpolation="nearest")
        fig.colorbar(image, ax=ax, shrink=0.75)
        if n <= 12:
            for i in range(n):
                for j in range(n):
                    if np.isfinite(matrix[i, j]):
                        ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6,
                                color="white" if matrix[i, j] < 0.6 * top else "black")
        ticks = range(n) if n <= 24 else range(0, n, max(1, n // 12))
        ax.set_xticks(list(ticks), [str(layers[t]) for t in ticks], fontsize=7)
        ax.set_yticks(list(ticks), [str(layers[t]) for t in ticks], fontsize=7)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("decoder layer")
        ax.set_title(f"{title}\n({notes[metric]})", fontsize=8)
    fig.suptitle("Cross-layer router similarity")
    return fig


def plot_spectra(spectra: pd.DataFrame, summary: pd.DataFrame, layers: Sequence[int]) -> plt.Figure:
    """Variance share σ_k²/Σσ² per component (each layer and all stacked) and the effective rank per layer."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 3.4), layout="constrained")
    colours = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(layers))))
    for colour, layer in zip(colours, layers, strict=True):
        d = spectra[(spectra.scope == "layer") & (spectra.layer == layer)]
        left.plot(d.component, d.variance_share, color=colour, marker="o", markersize=2, linewidth=1,
                  label=f"layer {layer}" if len(layers) <= 12 else None)
    stacked = spectra[spectra.scope == "stacked"]
    left.plot(stacked.component, stacked.variance_share, color="black", linewidth=1.6, label="all layers stacked")
    left.axhline(VARIANCE_THRESHOLD, color="C3", linestyle="--", linewidth=1, label=f"{VARIANCE_THRESHOLD:.0%} threshold")
    left.set_yscale("log")
    left.set_xscale("log" if stacked.component.max() > 64 else "linear")
    left.set_xlabel("component k")
    left.set_ylabel("variance share σ_k² / Σσ²")
    left.set_title("Router singular spectra")
    left.legend(fontsize=6, frameon=False, ncol=2 if len(layers) > 6 else 1)

    per_layer = summary[summary.scope == "layer"].set_index("layer").loc[list(layers)]
    x = np.arange(len(layers))
    right.bar(x, per_layer.rows, color="0.85", width=0.75, label="router rows C")
    right.bar(x, per_layer.effective_rank, color="C0", width=0.5, label="effective rank")
    all_rows = summary[summary.scope == "stacked"].iloc[0]
    right.set_xticks(x, [str(layer) for layer in layers], fontsize=7 if len(layers) <= 24 else 5,
                     rotation=0 if len(layers) <= 24 else 90)
    right.set_xlabel("decoder layer")
    right.set_ylabel("components")
    right.yaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_title(f"Effective rank (σ_k²/Σσ² > {VARIANCE_THRESHOLD:g})\nall layers stacked: "
                    f"{int(all_rows.effective_rank)} of {int(all_rows.rows)} rows", fontsize=8)
    right.set_ylim(0, float(per_layer.rows.max()) * 1.25)  # headroom for the legend above the bars
    right.legend(fontsize=7, frameon=False, loc="upper center", ncol=2)
    return fig


def _left_out(table: pd.DataFrame) -> dict[str, str]:
    """The alignment metrics with nothing to show, and why: ungated experts have no W_gate (every value NaN); a W of
    full column rank (I ≥ H) has all of ℝ^H as its row space, so the share is 1 for every direction and the
    z-score against random directions is undefined (every control_z NaN)."""
    why = {}
    for metric in ALIGNMENT_METRICS:
        rows = table[table.metric == metric]
        if rows["value"].isna().all():
            why[metric] = "ungated experts (no W_gate)"
        elif rows.control_z.isna().all():
            why[metric] = ("W has full column rank (I ≥ H): its row space is all of ℝ^H,\nso the share is 1 for "
                           "every direction, random ones included")
    return why


def _caption(left_out: dict[str, str]) -> str:
    """'not shown: <what>: <why>' per reason, the two row-space shares of one reason named together."""
    by_reason: dict[str, list[str]] = {}
    for metric, why in left_out.items():
        by_reason.setdefault(why, []).append(metric)
    lines = []
    for why, metrics in by_reason.items():
        if all(m.endswith("_rowspace_share") for m in metrics) and len(metrics) == 2:
            what = "the share of ‖r_e‖² in rowspace(W_gate,e) and rowspace(W_up,e)"
        else:
            what = " and ".join(ALIGNMENT_TITLES[m] for m in metrics)
        lines.append(f"not shown: {what}:\n{why}")
    return "\n".join(lines)


def plot_alignment(table: pd.DataFrame, layers: Sequence[int]) -> plt.Figure:
    """Per metric: each expert's z-score against random unit directions, per layer; × = the other experts' rows.
    Metrics with nothing to show (see `_left_out`) get no panel; the caption names them and says why."""
    left_out = _left_out(table)
    shown = [m for m in ALIGNMENT_METRICS if m not in left_out]
    fig, axes = grid(max(1, len(shown)), ncols=2, panel_size=(4.2, 2.6))
    x = np.arange(len(layers))
    for ax, metric in zip(axes, shown, strict=False):
        rows = table[table.metric == metric]
        ax.set_title(ALIGNMENT_TITLES[metric], fontsize=8)
        ax.set_xticks(x, [str(layer) for layer in layers], fontsize=7 if len(layers) <= 24 else 5)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("z vs random directions")
        ax.axhspan(-2, 2, color="0.9", zorder=0, label="|z| ≤ 2")
        ax.axhline(0, color="0.5", linewidth=0.8, zorder=1)
        for i, layer in enumerate(layers):
            d = rows[rows.layer == layer]
            jitter = np.linspace(-0.3, 0.3, len(d)) if len(d) > 1 else np.zeros(len(d))
            ax.scatter(i + jitter, d.control_z, s=7, color="C0", zorder=3, label="own router row" if i == 0 else None)
            other_z = ((d.other_rows_mean - d.control_mean) / d.control_std).mean()
            ax.scatter(i, other_z, marker="x", s=30, color="C3", zorder=4,
                       label="mean over the other experts' router rows" if i == 0 else None)
    if not shown:  # nothing informative at all: one empty panel carries the caption
        axes[0].set_axis_off()
    handles, labels = [], []
    for ax in axes:
        for handle, text in zip(*ax.get_legend_handles_labels(), strict=True):
            if text not in labels:
                handles.append(handle)
                labels.append(text)
    if handles:
        fig.legend(handles, labels, fontsize=7, frameon=False, loc="outside lower center", ncol=len(labels))
    caption = f"\n{_caption(left_out)}" if left_out else ""
    fig.suptitle("Router-expert alignment: expert e's own router row r_e\nagainst random unit directions "
                 f"(dot = one expert){caption}", fontsize=9)
    return fig


def save_weight_figures(out: Run, res: WeightResults, num_experts: Sequence[int]) -> None:
    """Every figure of weights.py."""
    layers = res.layers
    summary = res.tables["router_summary"]
    out.save_figure(plot_cosine_panels(res.arrays["router_cosine"], layers, "Router-row cosine per layer",
                                       "cos(r_a, r_b)", num_experts=min(num_experts),
                                       random_abs=float(summary.abs_cosine_random.dropna().iloc[0])), "router_cosine")
    out.save_figure(plot_cross_layer(res.arrays["cross_layer"], res.tables["cross_layer"], layers), "cross_layer")
    out.save_figure(plot_spectra(res.tables["router_spectra"], res.tables["router_summary"], layers), "router_spectra")
    if "expert_weight_cosine" in res.arrays:
        cosine = res.arrays["expert_weight_cosine"]
        for mi, matrix in enumerate(MATRICES):
            if np.isnan(cosine[:, mi]).all():
                continue  # ungated experts: no gate matrix
            summary = res.tables["expert_weight_summary"]
            random_abs = float(summary[summary.matrix == matrix].abs_cosine_random.iloc[0])
            out.save_figure(plot_cosine_panels(cosine[:, mi], layers, f"Expert weight cosine: flattened W_{matrix}",
                                               f"cos(vec W_{matrix},a, vec W_{matrix},b)", random_abs=random_abs),
                            f"expert_weight_cosine_{matrix}")
        out.save_figure(plot_alignment(res.tables["router_expert_alignment"], layers), "router_expert_alignment")
