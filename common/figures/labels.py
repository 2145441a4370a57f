"""The figure of label.py: each expert's label with its detection F1 and accuracy (docs/METRICS.md#automatic-labels)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from common.plots import PAGE_WIDTH, label, plt, text_label

LABEL_CHARS = 34  # a label longer than this is cut in the tick (the CSV and JSON hold it whole)


def plot_labels(table: pd.DataFrame, layer: int, control: bool = False) -> plt.Figure:
    """One row per expert, in expert order: bars of detection F1 and dots of accuracy, with 0.5 marked — what a
    scorer answering at random on the balanced own/other windows gets on average for accuracy. Experts without a
    label or without answered windows say so in place of the bar."""
    rows = table.reset_index(drop=True)
    n = len(rows)
    fig, ax = plt.subplots(figsize=(PAGE_WIDTH, max(2.0, 0.6 + 0.22 * n)))
    y = np.arange(n)[::-1]
    f1 = pd.to_numeric(rows["f1"], errors="coerce").to_numpy(dtype=float)
    accuracy = pd.to_numeric(rows["accuracy"], errors="coerce").to_numpy(dtype=float)
    ax.barh(y, np.nan_to_num(f1), color="C0", height=0.7)
    ax.scatter(accuracy, y, color="C1", s=14, zorder=3)
    for yi, score, dot, text in zip(y, f1, accuracy, rows["label"].fillna(""), strict=True):
        if not text:
            ax.text(0.01, yi, "no label", va="center", fontsize=6.5, color="grey")
        elif math.isnan(score):
            ax.text(0.01, yi, "not scored", va="center", fontsize=6.5, color="grey")
        else:
            ax.text(np.nanmax([score, dot]) + 0.02, yi, f"{score:.2f}", va="center", fontsize=6)
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=0.8)
    ticks = [f"{int(e)}: {text_label(str(t), LABEL_CHARS, prose=True)}" if t else f"{int(e)}"
             for e, t in zip(rows["expert"], rows["label"].fillna(""), strict=True)]
    ax.set_yticks(y, ticks, fontsize=6.5)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlim(0, 1.08)
    answered = f1[~np.isnan(f1)]
    mean = f"mean F1 {answered.mean():.2f} over {len(answered)} experts" if len(answered) else "no expert scored"
    title = (f"Automatic expert labels, layer {layer}{' — shuffled-windows control' if control else ''}: {mean}")
    label(ax, "bars: detection F1, dots: accuracy, on held-out windows (fraction); dashed: 0.5 = random answers",
          "expert: label", title)
    return fig
