"""Figures of logit_lens.py: the lens grid of a prompt (MoE Lens Figure 2), normalised log-perplexity against the
experts kept (Figure 3 left) and the hidden-state cosine of the restricted and the full run per layer (Figure 3 right)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.colors import Normalize
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from common.analysis import ALL_DOMAINS
from common.analysis.lens import LensGrid, display_token
from common.plots import PAGE_WIDTH, a4_grid, integer_axis, label, legend_panel, plt

_LABEL_WIDTH = 1.5  # inches beside the cells: layer ticks, axis label, colour bar
_CHAR_WIDTH = 0.062  # inches per monospace character at the cells' font size (about 7 pt)
# Two short lines: in one line the label is taller than the panel and runs up into the titles above it.
COSINE_LABEL = "cosine similarity\n(mean over tokens)"


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _domain_style(j: int, domain: str) -> dict:
    return {"color": "black", "linewidth": 2} if domain == ALL_DOMAINS else {"color": f"C{j % 10}", "linewidth": 1}


def plot_lens_grid(lens: LensGrid, tokenizer, model_name: str) -> plt.Figure:
    """Rows = layers (first at the top), columns = decoded vectors; each cell the top-1 token, coloured by its
    probability, with the expert its column adds (lower left, e<id>) and that expert's weight (upper right)."""
    columns = [c for c in lens.columns if c.in_figure]
    layers = lens.layers
    cell_width = min(1.05, (PAGE_WIDTH - _LABEL_WIDTH) / len(columns))
    row_height = 0.42 if len(layers) <= 24 else 0.3
    font = 7.0 if cell_width > 0.7 else 6.0
    chars = max(4, int(cell_width / (_CHAR_WIDTH * font / 7.0)) - 1)
    fig, ax = plt.subplots(figsize=(cell_width * len(columns) + _LABEL_WIDTH, row_height * len(layers) + 1.8),
                           layout="constrained")
    probs = np.zeros((len(layers), len(columns)))
    for i, layer in enumerate(layers):
        for j, column in enumerate(columns):
            cell = lens.cell(layer, column.key)
            probs[i, j] = cell.probs[0]
            ink = "white" if cell.probs[0] > 0.55 else "black"
            ax.text(j, i, _short(display_token(tokenizer, cell.token_ids[0]), chars), ha="center", va="center",
                    fontsize=font, color=ink, family="monospace")
            if cell.expert is not None:
                ax.text(j - 0.46, i + 0.44, f"e{cell.expert}", ha="left", va="bottom", fontsize=font - 1.5, color=ink)
                ax.text(j + 0.46, i - 0.44, f"{cell.weight:.2f}", ha="right", va="top", fontsize=font - 1.5, color=ink)
    image = ax.imshow(probs, cmap="Blues", norm=Normalize(0.0, 1.0), aspect="auto")
    ax.set_xticks(range(len(columns)), [c.label for c in columns], rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_ylabel("decoder layer")
    ax.tick_params(length=0)
    ax.spines[:].set_visible(False)
    ax.set_xticks(np.arange(len(columns) + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(len(layers) + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    shrink = 0.8 if len(layers) <= 12 else max(0.25, 4.0 / (row_height * len(layers)))  # a bar of about 4 inches
    fig.colorbar(image, ax=ax, label="probability of the top-1 token", shrink=shrink, aspect=20, fraction=0.04)
    context = tokenizer.decode(lens.input_ids[: lens.position + 1], skip_special_tokens=True).replace("\n", "\\n")
    context = context if len(context) <= 60 else "…" + context[-59:]
    last = display_token(tokenizer, lens.input_ids[lens.position])
    ax.set_title(f"Logit lens, {model_name}: the next token after '{last}' (position {lens.position} of "
                 f"{len(lens.input_ids)})\n“{context}”", fontsize=8.5)
    shown = [display_token(tokenizer, cell.token_ids[0]) for cell in lens.cells]
    ids = "; #<id>: a token with no text of its own" if any(re.fullmatch(r"#\d+", t) for t in shown) else ""
    fig.supxlabel(f"cell: top-1 token (␣ = space{ids})\nlower left e<id>: the expert the column adds; upper right: "
                  "its routing weight", fontsize=7)
    return fig


def plot_perplexity(table: pd.DataFrame, domains: Sequence[str], k: int) -> plt.Figure:
    """Left: log PPL(k′) / log PPL(k) against k′ per domain; right: perplexity itself."""
    fig, axes = a4_grid(2, max_cols=2, panel_height=2.6)
    left, right = axes
    for j, domain in enumerate([*domains, ALL_DOMAINS]):
        d = table[table.domain == domain].sort_values("k_prime")
        left.plot(d.k_prime, d.normalized_log_ppl, marker="o", markersize=3, label=domain, **_domain_style(j, domain))
        right.plot(d.k_prime, d.ppl, marker="o", markersize=3, label=domain, **_domain_style(j, domain))
    renormalized = bool(table.renormalize.iloc[0]) if len(table) else False
    for ax in axes:
        integer_axis(ax, "x", table.k_prime.unique(), pad=0.3)
    left.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    left.ticklabel_format(axis="y", useOffset=False)
    label(left, "experts kept per token k′", f"log PPL(k′) / log PPL({k})", "normalised log-perplexity")
    right.set_yscale("log")
    right.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    right.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    right.yaxis.set_minor_formatter(NullFormatter())
    label(right, "experts kept per token k′", "perplexity (log scale)", "perplexity")
    legend_panel(fig, axes)
    fig.suptitle(f"Top-k restriction at every MoE layer (k = {k}; kept weights "
                 f"{'renormalised' if renormalized else 'not renormalised'}; shared experts kept)")
    return fig


def plot_cosine(table: pd.DataFrame, domains: Sequence[str], k: int) -> plt.Figure:
    """Cosine between the residual after each decoder layer in the top-1 run and in the full run: mean per domain,
    all domains pooled with its 5–95% band; a second panel compares every k′ (pooled) where k > 2."""
    k_primes = sorted(table.k_prime.unique())
    fig, axes = a4_grid(2 if len(k_primes) > 1 else 1, max_cols=2, panel_height=2.8,
                        width=PAGE_WIDTH if len(k_primes) > 1 else 4.8)
    first = table[table.k_prime == k_primes[0]]
    ax = axes[0]
    pooled = first[first.domain == ALL_DOMAINS].sort_values("layer")
    ax.fill_between(pooled.layer, pooled["q0.05"], pooled["q0.95"], color="grey", alpha=0.25, linewidth=0,
                    label="all domains: 5–95% of tokens")
    for j, domain in enumerate([*domains, ALL_DOMAINS]):
        d = first[first.domain == domain].sort_values("layer")
        ax.plot(d.layer, d["mean"], marker="o", markersize=3, label=domain, **_domain_style(j, domain))
    dense = pooled[~pooled.restricted.astype(bool)]
    if len(dense):
        ax.plot(dense.layer, dense["mean"], linestyle="none", marker="s", markersize=6, markerfacecolor="none",
                color="grey", label="layer not restricted")
    label(ax, "decoder layer (residual after it)", COSINE_LABEL,
          f"top-{k_primes[0]} run vs full run (k = {k})")
    if len(k_primes) > 1:
        cmap = plt.get_cmap("viridis")
        for j, k_prime in enumerate(k_primes):
            d = table[(table.k_prime == k_prime) & (table.domain == ALL_DOMAINS)].sort_values("layer")
            axes[1].plot(d.layer, d["mean"], marker="o", markersize=3, color=cmap(j / len(k_primes)),
                         label=f"k′ = {k_prime}, all domains")
        label(axes[1], "decoder layer (residual after it)", COSINE_LABEL,
              "every k′ vs full run, all domains")
    for axis in axes:
        integer_axis(axis, "x", table.layer.unique())
    legend_panel(fig, axes)
    fig.suptitle("Hidden-state cosine of the top-k′ run and the full run, at every counted token")
    return fig
