"""Figures of interv.py: a prompt's next-token probabilities against the edit's value (prompt mode), and the
expert × domain importance matrix with its scatter against selection frequency (dataset mode)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.colors import SymLogNorm
from matplotlib.ticker import MaxNLocator

from common.plots import PAGE_WIDTH, grid, place_labels, plt

MODE_LABELS = {
    "scale": "scale factor a (w_e → a·w_e)",
    "set": "weight v (w_e → v)",
    "force": "forced weight",
    "logit": "logit shift d (z_e → z_e + d)",
}
IDENTITY_VALUE = {"scale": 1.0, "logit": 0.0}  # the value at which the edit changes nothing
INERT_WHEN_NOT_ROUTED = ("scale", "set")  # modes that edit w_e, which is 0 where the expert is not routed
NOTE_COLOUR = "firebrick"


def not_routed_note(sweep: pd.DataFrame, mode: str) -> str | None:
    """The sentence a prompt's figure carries when a scale / set edit cannot act: the expert was routed at none of
    the targets in the unedited forward (`selected_before` = targets with w_e ≠ 0 there is 0), so there is no w_e
    to edit and every value gives the unedited output. None when the edit can act."""
    if mode not in INERT_WHEN_NOT_ROUTED or sweep.empty or (sweep["selected_before"] > 0).any():
        return None
    expert, targets = int(sweep["expert"].iloc[0]), int(sweep["n_targets"].iloc[0])
    where = "the target" if targets == 1 else f"any of the {targets} targets"
    return (f"Expert {expert} was not routed at {where}\n(w_e = 0 there before the edit), so\n"
            f"--mode {mode} cannot act: the output\nstays as it was before the edit.\n"
            "Use --mode force (or logit)\nto route the token to the expert.")


def _note_box(ax: plt.Axes, note: str, at: tuple[float, float] = (0.5, 0.5), ha: str = "center",
              va: str = "center") -> None:
    """`note` in a framed box at `at` (axes fraction)."""
    ax.text(*at, note, transform=ax.transAxes, ha=ha, va=va, fontsize=7, color=NOTE_COLOUR,
            bbox={"boxstyle": "round,pad=0.5", "facecolor": "white", "edgecolor": NOTE_COLOUR, "linewidth": 0.8})


def token_label(text: str) -> str:
    """A token as a reader can see it: quotes show leading spaces, escapes show newlines and tabs."""
    return repr(text)


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else "…" + text[-(limit - 1):]


def _value_axis(ax, values: Sequence[float]) -> None:
    """Log x when the positive values span at least a decade (symlog when 0 or negatives are among them)."""
    values = np.asarray(values, dtype=float)
    positive = values[values > 0]
    if len(positive) < 2 or positive.max() / positive.min() < 10:
        return
    if (values <= 0).any():
        ax.set_xscale("symlog", linthresh=float(positive.min()), linscale=0.5)
    else:
        ax.set_xscale("log")
    ax.set_xticks(values, [f"{v:g}" for v in values])
    ax.minorticks_off()


def plot_sweep(probs: pd.DataFrame, sweep: pd.DataFrame, *, mode: str, title: str) -> plt.Figure:
    """Left: probability of the tracked next tokens against the edit's value (dotted: before the edit).
    Right: KL(before‖after) against the value. One prompt: `probs` holds its token_probs rows, `sweep` its sweep rows."""
    fig, (ax, ax_kl) = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 3.6), width_ratios=(1.5, 1), layout="constrained")
    values = sorted(sweep["value"].unique())
    identity = IDENTITY_VALUE.get(mode)
    for j, (token_id, part) in enumerate(probs.groupby("token_id", sort=False)):
        part = part.sort_values("value")
        color = f"C{j % 10}"
        ax.plot(part["value"], part["prob_after"], marker="o", markersize=4, color=color,
                label=f"{token_label(part['token'].iloc[0])} (id {token_id})")
        ax.axhline(part["prob_before"].iloc[0], color=color, linestyle=":", linewidth=1)
    for axis in (ax, ax_kl):
        _value_axis(axis, values)
        if identity is not None and min(values) <= identity <= max(values):
            axis.axvline(identity, color="grey", linewidth=0.8, linestyle="--")
        axis.set_xlabel(MODE_LABELS.get(mode, "value"))
    ax.set_ylabel("next-token probability")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0), title="next token", title_fontsize=7)
    note = "dotted: before the edit" + ("\ndashed: the value that changes nothing" if identity is not None else "")
    ax.set_title(note, fontsize=7, color="dimgrey")
    kl = sweep.sort_values("value")
    ax_kl.plot(kl["value"], kl["kl_nats"], marker="o", markersize=4, color="black")
    ax_kl.set_ylabel("KL(before ‖ after), nats")
    largest = float(kl["kl_nats"].max())
    if largest > 0:
        ax_kl.set_ylim(bottom=0, top=1.15 * largest)
    else:  # all exactly 0: a unit axis, not one scaled to a rounding error that reads as a real change
        ax_kl.set_ylim(-0.05, 1)
        ax_kl.text(0.5, 0.1, "KL = 0 at every value", transform=ax_kl.transAxes, ha="center", fontsize=7,
                   bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    subtitle = "change of the whole distribution"
    if mode in ("force", "logit"):  # these change the selection: say where the expert ends up picked
        for row in kl.itertuples():
            ax_kl.annotate(f"{row.selected_after}/{row.n_targets}", (row.value, row.kl_nats), fontsize=6,
                           color="dimgrey", xytext=(0, 4), textcoords="offset points", ha="center")
        subtitle += "\nlabels: targets where the expert is picked"
    elif mode in INERT_WHEN_NOT_ROUTED:  # these edit w_e: they act only where the expert was routed
        first = kl.iloc[0]
        subtitle += f"\nexpert routed at {first.selected_before}/{first.n_targets} targets before the edit"
    ax_kl.set_title(subtitle, fontsize=7, color="dimgrey")
    inert = not_routed_note(sweep, mode)
    if inert is not None:
        _note_box(ax_kl, inert)
    fig.suptitle(title, fontsize=10)
    return fig


def plot_before_after(probs: pd.DataFrame, *, value_label: str, kl: float, title: str,
                      note: str | None = None) -> plt.Figure:
    """One value: paired bars of the tracked next tokens' probability before and after the edit; `note` (see
    `not_routed_note`) is boxed over the bars."""
    probs = probs.iloc[::-1]
    y = np.arange(len(probs))
    height = 0.38 * len(probs) + 1.4
    fig, ax = plt.subplots(figsize=(6.4, max(height, 2.6) if note else height), layout="constrained")
    if note:  # beside the bars, under the legend: the bars stay visible
        _note_box(ax, note, at=(1.04, 0.0), ha="left", va="bottom")
    ax.barh(y + 0.2, probs["prob_before"], height=0.4, color="grey", label="before")
    ax.barh(y - 0.2, probs["prob_after"], height=0.4, color="C3", label=f"after ({value_label})")
    ax.set_yticks(y, [f"{token_label(t)} (id {i})" for t, i in zip(probs["token"], probs["token_id"], strict=True)])
    ax.set_xlabel("next-token probability")
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"{title}\nKL(before ‖ after) = {kl:.4g} nats", fontsize=9)
    return fig


def plot_kl_by_value(sweep: pd.DataFrame, *, mode: str, title: str) -> plt.Figure:
    """Several prompts: KL(before‖after) against the value, one thin line per prompt and the mean in black."""
    fig, ax = plt.subplots(figsize=(5.2, 3.4), layout="constrained")
    values = sorted(sweep["value"].unique())
    for j, (_, part) in enumerate(sweep.groupby("prompt")):
        part = part.sort_values("value")
        ax.plot(part["value"], part["kl_nats"], color="C0", alpha=0.35, linewidth=0.8, label="one prompt" if j == 0 else None)
    mean = sweep.groupby("value")["kl_nats"].mean()
    ax.plot(mean.index, mean.to_numpy(), color="black", marker="o", markersize=4, label=f"mean of {sweep.prompt.nunique()} prompts")
    _value_axis(ax, values)
    identity = IDENTITY_VALUE.get(mode)
    if identity is not None and min(values) <= identity <= max(values):
        ax.axvline(identity, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel(MODE_LABELS.get(mode, "value"))
    ax.set_ylabel("KL(before ‖ after), nats")
    if float(sweep["kl_nats"].max()) > 0:
        ax.set_ylim(bottom=0)
    else:  # all exactly 0: a unit axis, not one scaled to a rounding error
        ax.set_ylim(-0.05, 1)
    ax.legend(fontsize=7, frameon=False)
    inert = [int(p) for p, part in sweep.groupby("prompt") if not_routed_note(part, mode)]
    if inert:
        shown = ", ".join(map(str, inert[:8])) + (", …" if len(inert) > 8 else "")
        title += (f"\nthe expert is not routed at any target of {len(inert)} of {sweep.prompt.nunique()} prompts "
                  f"({shown}):\n--mode {mode} cannot act there (KL 0; --mode force routes to it)")
    ax.set_title(title, fontsize=9)
    return fig


# ------------------------------------------------------------------------------------------------ dataset mode


def plot_importance_heatmap(delta: np.ndarray, frequency_all: np.ndarray, experts: Sequence[int],
                            domains: Sequence[str], layer: int, top: int = 3) -> plt.Figure:
    """ΔNLL [expert, domain] on a diverging scale centred at 0; a box marks each domain's costliest ablation and
    dots its `top` most-selected experts (`frequency_all` [E, D] covers every expert of the layer)."""
    X, D = delta.shape
    fig, ax = plt.subplots(figsize=(max(5.6, 0.75 * D + 2.6), max(3.0, 0.26 * X + 1.6)), layout="constrained")
    finite = delta[np.isfinite(delta)]
    span = float(np.abs(finite).max()) if finite.size else 1.0
    span = span if span > 0 else 1.0
    # Symmetric log colours: one domain with a large effect must not wash out the others (linear below span/100).
    norm = SymLogNorm(linthresh=span / 100, linscale=0.5, vmin=-span, vmax=span, base=10)
    image = ax.imshow(delta, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
    position = {e: x for x, e in enumerate(experts)}
    for d in range(D):
        if np.isfinite(delta[:, d]).any():
            x = int(np.nanargmax(delta[:, d]))
            ax.add_patch(plt.Rectangle((d - 0.5, x - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.6))
        for e in np.argsort(-frequency_all[:, d], kind="stable")[:top]:
            if int(e) in position:
                ax.plot(d, position[int(e)], marker="o", markersize=3.5, color="black", markeredgecolor="white",
                        markeredgewidth=0.6, linestyle="none")
    if X * D <= 400:
        decimals = max(2, 1 - int(np.floor(np.log10(span))))  # two significant digits of the largest effect
        for x in range(X):
            for d in range(D):
                if np.isfinite(delta[x, d]):
                    strong = abs(delta[x, d]) > 0.1 * span
                    value = delta[x, d]
                    text = "0" if value == 0 else "≈0" if abs(value) < 0.5 * 10**-decimals else f"{value:.{decimals}f}"
                    ax.text(d + 0.18, x, text, ha="left", va="center", fontsize=5.5, color="white" if strong else "black")
    ax.set_xticks(range(D), domains, rotation=30 if D > 4 else 0, ha="right" if D > 4 else "center")
    ax.set_yticks(range(X), [str(e) for e in experts], fontsize=6 if X > 24 else 8)
    ax.set_ylabel("ablated expert")
    ax.set_xlabel("domain")
    bar = fig.colorbar(image, ax=ax, label="ΔNLL when ablated (nats / token, symlog)", shrink=0.8)
    ticks = [-span, -span / 10, 0.0, span / 10, span]
    bar.set_ticks(ticks, labels=[f"{t:.2g}" for t in ticks])
    bar.minorticks_off()
    ax.set_title(f"Expert importance, layer {layer}\nbox: largest loss increase per domain; "
                 f"dot: the domain's {top} most-selected experts", fontsize=9)
    return fig


def plot_importance_scatter(table: pd.DataFrame, domains: Sequence[str], layer: int, uniform: float,
                            summary: pd.DataFrame, top: int = 3) -> plt.Figure:
    """Per domain: ΔNLL of each ablation against the expert's selection frequency on that domain."""
    fig, axes = grid(len(domains), ncols=3, panel_size=(3.4, 2.7))
    rho = summary.set_index("domain")["spearman_delta_vs_freq"]
    labels: list[tuple[plt.Axes, list[tuple[float, float, str]]]] = []
    for ax, domain in zip(axes, domains, strict=True):
        d = table[table.domain == domain]
        topmost = d.freq_rank <= top
        ax.scatter(100 * d.freq_topk[~topmost], d.delta_nll[~topmost], s=14, color="C0", label="other experts")
        ax.scatter(100 * d.freq_topk[topmost], d.delta_nll[topmost], s=20, color="C3", label=f"the domain's {top} most selected")
        labelled = d[topmost | (d.delta_rank <= 5)].sort_values(["delta_rank", "freq_rank"])  # the notable only
        labels.append((ax, [(100 * row.freq_topk, row.delta_nll, str(row.expert)) for row in labelled.itertuples()]))
        ax.axvline(100 * uniform, color="grey", linestyle="--", linewidth=0.8)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_title(f"{domain} (Spearman ρ = {rho.get(domain, float('nan')):.2f})", fontsize=9)
        ax.set_xlabel("selected for % of tokens (top-k)")
        ax.set_ylabel("ΔNLL when ablated (nats)")
        ax.xaxis.set_major_locator(MaxNLocator(5))
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=2, fontsize=7, frameon=False)
    fig.suptitle(f"Causal importance vs selection frequency, layer {layer}\n(dashed: uniform k/E; labels: expert ids "
                 f"of the {top} most selected and of the 5 costliest ablations)", fontsize=9)
    fig.draw_without_rendering()  # the final layout: the labels are placed in its coordinates
    for ax, points in labels:
        place_labels(ax, np.array([(x, y) for x, y, _ in points]).reshape(-1, 2), [text for _, _, text in points],
                     ["0.15"] * len(points), fontsize=6, beside=True)
    return fig


AUDIT_LABELS = {"frequency": "selection frequency", "mean_weight": "mean routing weight", "saliency": "REAP saliency",
                "output_norm": "mean output norm", "jsd_specialization": "JSD specialization (bits)",
                "token_coverage": "token coverage"}
AUDIT_SHORT = {"frequency": "frequency", "mean_weight": "weight", "saliency": "saliency", "output_norm": "norm",
               "jsd_specialization": "JSD", "token_coverage": "coverage"}


def plot_audit(values: dict, rows: Sequence[dict], layer: int) -> plt.Figure:
    """The causal audit of one layer: each observational metric against ΔNLL (one dot per expert, Spearman ρ in the
    title), then the ρ and τ of every metric with their bootstrap intervals."""
    metrics = [row["metric"] for row in rows]
    fig, axes = grid(len(metrics) + 1, ncols=4, panel_size=(3.0, 2.5))
    delta = np.asarray(values["delta_nll"])
    for ax, row in zip(axes, rows, strict=False):
        ax.scatter(values[row["metric"]], delta, s=12, color="C0")
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_title(f"{AUDIT_LABELS.get(row['metric'], row['metric'])}\nρ = {row['spearman']:.2f}, "
                     f"top-10 overlap {row['top10_overlap']}", fontsize=8)
        ax.set_xlabel(AUDIT_LABELS.get(row["metric"], row["metric"]), fontsize=8)
        ax.set_ylabel("ΔNLL when ablated (nats)", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(4))
    bars = axes[len(metrics)]
    y = np.arange(len(metrics))
    for offset, name, colour in ((-0.18, "spearman", "C0"), (0.18, "kendall", "C1")):
        centre = np.array([row[name] for row in rows], dtype=float)
        low = np.array([row[f"{name}_low"] for row in rows], dtype=float)
        high = np.array([row[f"{name}_high"] for row in rows], dtype=float)
        bars.barh(y + offset, np.nan_to_num(centre), height=0.34, color=colour,
                  label="Spearman ρ with ΔNLL" if name == "spearman" else "Kendall τ with ΔNLL (95% bootstrap intervals)")
        # the interval drawn as it is (a percentile interval need not contain the point estimate)
        shown = np.isfinite(low) & np.isfinite(high)
        bars.errorbar((low[shown] + high[shown]) / 2, (y + offset)[shown], xerr=(high[shown] - low[shown]) / 2,
                      fmt="none", ecolor="black", elinewidth=1, capsize=2)
    bars.axvline(0, color="grey", linewidth=0.6)
    bars.set_yticks(y, [AUDIT_SHORT.get(m, m) for m in metrics], fontsize=7)
    bars.invert_yaxis()
    bars.set_xlim(-1, 1)
    bars.set_xlabel("rank correlation with ΔNLL", fontsize=8)
    handles, names = bars.get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=2, fontsize=7, frameon=False)
    fig.suptitle(f"Causal audit, layer {layer}: does what is observed predict what ablation costs?", fontsize=9)
    return fig
