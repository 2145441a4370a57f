"""How decisive is the router? Entropy, top-1 probability, margins and top-k mass per layer and domain.

    uv run router_decisive.py                          # shipped demo model, offline demo domains
    uv run router_decisive.py --model allenai/OLMoE-1B-7B-0924 --data olmoe --layers 1 7 15 --num_tokens 100000

Per token and MoE layer (SPEC "Entropy / decisiveness"): H(p) = -Σ p ln p over all router choices (max ln E),
H/ln E, the entropy of the renormalised top-k probabilities (max ln k), the top-1 probability, the top-1 - top-2
margin and the probability mass inside the top-k. Streamed per (layer, domain): count, mean, std, min, max,
quantiles (from 200-bin histograms: error below one bin width) and the histograms themselves.

Outputs: entropy_summary.csv (tidy, one row per metric/layer/domain; domain 'all' pools them),
entropy_histograms.csv, entropy_normalized_hist.npy [layer, domain (+all last), bin] with _edges.npy, and figures
entropy_violin (H/ln E per layer) and decisiveness_by_layer (means per layer and domain).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np
import pandas as pd

from common import cli, pipeline
from common.analysis import ALL_DOMAINS
from common.analysis.routing import DecisivenessStats
from common.cli import base_parser, run_main
from common.plots import grid, plt

SCRIPT = "router_decisive"


def build_parser():
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--bins", type=int, default=200, help="histogram bins per quantity")
    return parser


def plot_violins(counts: np.ndarray, edges: np.ndarray, layers: Sequence[int], domains: Sequence[str]) -> plt.Figure:
    """One violin per layer, drawn from the streamed histogram of H/ln E (all domains pooled)."""
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(layers) + 2), 3.2))
    centres = 0.5 * (edges[:-1] + edges[1:])
    overall = counts[:, -1, :]
    for i, layer_counts in enumerate(overall):
        density = layer_counts / max(layer_counts.max(), 1)
        ax.fill_betweenx(centres, i - 0.4 * density, i + 0.4 * density, color="C0", alpha=0.6, linewidth=0)
        total = layer_counts.sum()
        if total:
            median = np.interp(0.5, np.cumsum(layer_counts) / total, edges[1:])
            ax.plot([i - 0.3, i + 0.3], [median, median], color="black", linewidth=1)
    ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("router entropy H / ln E")
    ax.set_ylim(0, 1)
    ax.set_title(f"Router entropy per layer ({len(domains)} domains pooled; line = median)")
    return fig


def plot_by_layer(summary: pd.DataFrame, domains: Sequence[str]) -> plt.Figure:
    metrics = ["entropy_normalized", "topk_entropy_normalized", "top1_prob", "top1_top2_margin", "topk_mass"]
    fig, axes = grid(len(metrics), ncols=len(metrics), panel_size=(3.0, 2.6))
    for ax, metric in zip(axes, metrics, strict=True):
        rows = summary[summary.metric == metric]
        for j, domain in enumerate([*domains, ALL_DOMAINS]):
            d = rows[rows.domain == domain].sort_values("layer")
            style = {"color": "black", "linewidth": 2} if domain == ALL_DOMAINS else {"color": f"C{j % 10}", "linewidth": 1}
            ax.plot(d.layer, d["mean"], marker="o", markersize=3, label=domain, **style)
        ax.set_title(metric.replace("_", " "))
        ax.set_xlabel("decoder layer")
        ax.set_ylim(0, 1.02)
    axes[-1].legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("Router decisiveness: mean per layer and domain")
    return fig


def run(args: argparse.Namespace) -> None:
    s = pipeline.setup(cli.config(args, SCRIPT))
    stream = pipeline.batches(s)
    with pipeline.start_run(s) as out:
        acc = DecisivenessStats(s.layers, [d.name for d in s.domains], s.moe.device, bins=args.bins)
        pipeline.accumulate_routing(acc, s, stream)
        out.record(tokens=stream.report.to_dict())

        summary = acc.summary()
        out.save_table(summary, "entropy_summary")
        out.save_table(acc.histograms(), "entropy_histograms")
        counts, edges = acc.histogram_array("entropy_normalized")
        out.save_array(counts, "entropy_normalized_hist")
        out.save_array(edges, "entropy_normalized_hist_edges")

        layers = [m.layer for m in s.layers]
        domains = [d.name for d in s.domains]
        out.save_figure(plot_violins(counts, edges, layers, domains), "entropy_violin")
        out.save_figure(plot_by_layer(summary, domains), "decisiveness_by_layer")


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
