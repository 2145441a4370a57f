"""contrast.py's figures: the layer × expert map of Δ = p_A − p_B, the volcano plot (Δ against −log10 q), the steered
experts with their intervals, and the steering check's scores by condition against the random controls."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from common.plots import PAGE_WIDTH, a4_grid, heatmap, label, place_labels, plt, symmetric_limit

A_COLOUR, B_COLOUR, OTHER = "#c0392b", "#2166ac", "0.6"
CONDITIONS = ("none", "A off", "B on", "A off + B on")
RANDOM = {"A off": "random off", "B on": "random on", "A off + B on": "random off + on"}


def _sets(names: Sequence[str]) -> str:
    return f"A = {names[0]}, B = {names[1]}"


def plot_contrast_delta(table: pd.DataFrame, names: Sequence[str]) -> plt.Figure:
    """Δ per layer (rows) and expert (columns), diverging colours; candidates dotted, steered experts boxed."""
    layers = sorted(table.layer.unique())
    width = int(table.expert.max()) + 1
    matrix = np.full((len(layers), width), np.nan)
    row_of = {layer: i for i, layer in enumerate(layers)}
    for r in table.itertuples():
        matrix[row_of[r.layer], int(r.expert)] = r.delta
    height = min(9.0, 1.6 + 0.32 * len(layers))
    fig, ax = plt.subplots(figsize=(PAGE_WIDTH, height), layout="constrained")
    limit = symmetric_limit(matrix, 100)
    heatmap(ax, matrix, cbar_label="Δ = p_A − p_B (share of tokens)", cmap="RdBu_r", vmin=-limit, vmax=limit,
            xlabel="expert", ylabel="decoder layer", yticklabels=[str(layer) for layer in layers], max_ticks=32)
    for side, marker in (("A", "o"), ("B", "o")):
        hits = table[table.candidate == side]
        ax.scatter(hits.expert, [row_of[x] for x in hits.layer], s=6, marker=marker, color="black", lw=0,
                   label="candidate (q ≤ α, bootstrap agrees)" if side == "A" else None)
    steered = table[table.steered != ""]
    ax.scatter(steered.expert, [row_of[x] for x in steered.layer], s=70, marker="s", facecolors="none",
               edgecolors="black", lw=1.1, label="steered (top A and B experts)")
    if len(steered) or (table.candidate != "").any():
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18 if len(layers) < 8 else -0.08), ncols=2,
                  frameon=False, fontsize=7)
    ax.set_title(f"Which experts fire more for A (red) or B (blue)?  {_sets(names)}", fontsize=9)
    return fig


def plot_volcano(table: pd.DataFrame, names: Sequence[str], alpha: float) -> plt.Figure:
    """Δ against −log10 q (BH), one point per layer × expert; candidates coloured by side, steered ones labelled.
    q below 1e-300 (float underflow included) is drawn at 300 as a triangle."""
    fig, ax = plt.subplots(figsize=(PAGE_WIDTH * 0.8, 4.2), layout="constrained")
    ceiling = 300.0
    y = np.minimum(-np.log10(np.maximum(table.q_value.to_numpy(dtype=float), 1e-320)), ceiling)
    capped = y >= ceiling
    colours = np.where(table.candidate == "A", A_COLOUR, np.where(table.candidate == "B", B_COLOUR, OTHER))
    for side, colour, text in (("A", A_COLOUR, f"A-expert candidate ({names[0]})"),
                               ("B", B_COLOUR, f"B-expert candidate ({names[1]})"), ("", OTHER, "not a candidate")):
        mask = (table.candidate == side).to_numpy()
        ax.scatter(table.delta[mask & ~capped], y[mask & ~capped], s=10 if side else 6, color=colour, lw=0,
                   label=f"{text}: {mask.sum()}")
        ax.scatter(table.delta[mask & capped], y[mask & capped], s=16, marker="^", color=colour, lw=0)
    if capped.any():
        ax.scatter([], [], s=16, marker="^", color="0.3", lw=0, label=f"q < 1e-300 ({capped.sum()}; drawn at 300)")
    ax.axhline(-np.log10(alpha), color="0.3", ls="--", lw=0.8, label=f"q = α = {alpha:g}")
    ax.axvline(0, color="0.3", lw=0.5)
    label(ax, "Δ = p_A − p_B (share of tokens)", "−log10 q (Benjamini–Hochberg)",
          f"Volcano plot of the {len(table)} layer × expert tests  ({_sets(names)})")
    fig.legend(loc="outside lower center", ncols=3, frameon=False, fontsize=7)
    limit = max(float(np.abs(table.delta).max()), 1e-3) * 1.12
    ax.set_xlim(-limit, limit)
    ax.set_ylim(0, max(float(y.max()), -np.log10(alpha)) * 1.1 + 0.1)
    steered = table[table.steered != ""]
    if len(steered):
        index = steered.index.to_numpy()
        anchors = np.column_stack([table.delta.to_numpy()[index], y[index]])
        place_labels(ax, anchors, [f"L{r.layer} E{r.expert}" for r in steered.itertuples()],
                     list(colours[index]), fontsize=6.5, beside=True)
    return fig


def plot_contrast_top(top: pd.DataFrame, names: Sequence[str]) -> plt.Figure:
    """Each steered expert's Δ with Newcombe's 95% interval (tokens independent) and the document bootstrap's."""
    rows = top.reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(PAGE_WIDTH * 0.75, 1.3 + 0.28 * len(rows)), layout="constrained")
    y = np.arange(len(rows))[::-1]
    colours = [A_COLOUR if s == "A" else B_COLOUR for s in rows.side]
    ax.barh(y, rows.delta, color=colours, alpha=0.35, height=0.6)
    ax.errorbar(rows.delta, y + 0.12, xerr=[rows.delta - rows.ci_low, rows.ci_high - rows.delta], fmt="none",
                ecolor="black", elinewidth=1, capsize=2, label="Newcombe 95% (tokens independent)")
    if rows.boot_low.notna().any():
        ax.errorbar(rows.delta, y - 0.12, xerr=[rows.delta - rows.boot_low, rows.boot_high - rows.delta], fmt="none",
                    ecolor="0.45", elinewidth=1, capsize=2, label="document bootstrap 95%")
    ax.set_yticks(y, [f"{s} #{r}: layer {layer}, expert {e}" for s, r, layer, e in
                      zip(rows.side, rows["rank"], rows.layer, rows.expert, strict=True)])
    ax.axvline(0, color="0.3", lw=0.6)
    label(ax, "Δ = p_A − p_B (share of tokens)", None,
          f"Steered experts: A-experts (switched off) and B-experts (switched on)\n{_sets(names)}")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.12), ncols=2, frameon=False, fontsize=7)
    return fig


def plot_contrast_steering(steering: pd.DataFrame, names: Sequence[str]) -> plt.Figure:
    """Four panels over the conditions: B-token share and mean P(B | text) of the continuations (the references'
    levels as lines), ΔNLL and KL on held-out A and B text; each steered condition (left) beside its random control
    (right: draws as dots, mean ± sd as a bar)."""
    panels = (("b_token_share", "share of tokens favouring B", "B-token share of the continuations"),
              ("p_b_mean", "mean P(B | continuation)", "Classifier posterior of B"),
              ("delta_nll", "ΔNLL vs none (nats / token)", "Next-token NLL change on held-out text"),
              ("kl", "KL(none ‖ condition) (nats)", "Next-token distribution shift"))
    fig, axes = a4_grid(len(panels), max_cols=2, panel_height=2.5, spare=0)
    shown = [c for c in CONDITIONS if (steering.condition == c).any()]
    x = np.arange(len(shown))
    for ax, (column, ylabel, title) in zip(axes, panels, strict=True):
        two_sets = column in ("delta_nll", "kl")
        series = ([(f"{column}_a", A_COLOUR, f"held-out A ({names[0]})", -0.1),
                   (f"{column}_b", B_COLOUR, f"held-out B ({names[1]})", 0.1)]
                  if two_sets else [(column, "black", "", 0.0)])
        for name, colour, text, shift in series:
            values = [float(steering[steering.condition == c][name].iloc[0]) for c in shown]
            ax.scatter(x + shift - 0.12, values, color=colour, s=28, zorder=3,
                       label=f"{text}: steered experts" if text else "steered experts (none: unsteered)")
            for c_index, condition in enumerate(shown):
                control = steering[steering.condition == RANDOM.get(condition, "")]
                if control.empty:
                    continue
                draws = control[name].to_numpy(dtype=float)
                ax.scatter(np.full(len(draws), c_index + shift + 0.16), draws, color=colour, s=9, alpha=0.45, lw=0,
                           label=f"{text}: random experts (draws, mean ± sd)" if text else
                           "random experts (draws, mean ± sd)")
                sd = draws.std(ddof=1) if len(draws) > 1 else 0.0
                ax.errorbar(c_index + shift + 0.16, draws.mean(), yerr=sd, fmt="_", color=colour, ms=10, capsize=2,
                            alpha=0.8)
        if not two_sets:
            for ref, colour, ls in (("reference A", A_COLOUR, ":"), ("reference B", B_COLOUR, "--")):
                level = steering[steering.condition == ref][column]
                if len(level):
                    text = names[0] if ref.endswith("A") else names[1]
                    ax.axhline(float(level.iloc[0]), color=colour, ls=ls, lw=1,
                               label=f"true continuations of {ref[-1]} ({text})")
            ax.set_ylim(-0.03, 1.03)
        else:
            ax.axhline(0, color="0.3", lw=0.5)
        ax.set_xticks(x, shown, fontsize=7)
        ax.set_xlim(-0.5, len(shown) - 0.5)
        label(ax, None, ylabel, title)
    handles: dict[str, object] = {}
    for ax in axes:
        for handle, text in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(text, handle)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=2, frameon=False, fontsize=7)
    fig.suptitle(f"SteerMoE check on A-prompted continuations ({_sets(names)}): A-experts off, B-experts on;\n"
                 "each condition's steered experts (left) beside as many random experts (right)", fontsize=9)
    return fig
