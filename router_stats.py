"""What do router outputs look like? Distributions of logits, softmax, renormalised top-k and the real weights.

    uv run router_stats.py                              # shipped demo model, offline demo domains
    uv run router_stats.py --model allenai/OLMoE-1B-7B-0924 --layers 1 --num_tokens 100000

Per MoE layer (SPEC "Distributions"): (a) raw router logits z over all experts, (b) softmax p over all experts,
(c) the renormalised top-k probabilities p̃_i = p_i / Σ_{j∈K} p_j and (d) the weights w the experts really receive
(whatever the scoring rule: softmax, sigmoid, scaled, renormalised or not), (c) and (d) per rank 1..k (rank 1 =
largest). Streamed per (layer, domain[, rank]) into fixed-bin histograms; logits and weights get their range from
the first batch (values outside are clamped into the edge bins and counted in `below`/`above`).

Outputs: distribution_summary.csv (count, mean, std, min, max, quantiles), distribution_histograms.csv (tidy),
<quantity>_hist.npy [layer, domain (+all last), (rank,) bin] with <quantity>_edges.npy, and a figure per layer.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import pandas as pd

from common import cli, pipeline
from common.analysis import ALL_DOMAINS
from common.analysis.routing import DistributionStats
from common.cli import base_parser, run_main
from common.plots import grid, plt

SCRIPT = "router_stats"
TITLES = {
    "logit": "router logits z",
    "softmax": "softmax p (all experts)",
    "topk_renormalized": "renormalised top-k p̃",
    "weight": "weights w used by the experts",
}


def build_parser():
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--bins", type=int, default=200, help="histogram bins per quantity")
    return parser


def plot_layer(hist: pd.DataFrame, layer: int) -> plt.Figure:
    """Four panels for one layer, all domains pooled; ranked quantities get one line per rank."""
    fig, axes = grid(len(TITLES), ncols=4, panel_size=(3.2, 2.5))
    rows = hist[(hist.layer == layer) & (hist.domain == ALL_DOMAINS)]
    for ax, (quantity, title) in zip(axes, TITLES.items(), strict=True):
        q = rows[rows.quantity == quantity]
        for j, (rank, part) in enumerate(q.groupby("rank", sort=True)):
            total = part["count"].sum()
            if total == 0:
                continue
            width = (part["right"] - part["left"]).to_numpy()
            density = part["count"].to_numpy() / (total * width)
            label = None if rank == "all" else f"rank {rank}"
            ax.step(part["left"], density, where="post", color=f"C{j}", linewidth=1, label=label)
        if quantity == "softmax":
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_ylabel("density")
        if q["rank"].nunique() > 1:
            ax.legend(fontsize=7, frameon=False)
    fig.suptitle(f"Router output distributions, layer {layer}")
    return fig


def run(args: argparse.Namespace) -> None:
    s = pipeline.setup(cli.config(args, SCRIPT))
    stream = pipeline.batches(s)
    with pipeline.start_run(s) as out:
        acc = DistributionStats(s.layers, [d.name for d in s.domains], s.moe.device, bins=args.bins)
        pipeline.accumulate_routing(acc, s, stream)
        out.record(tokens=stream.report.to_dict())

        out.save_table(acc.summary(), "distribution_summary")
        hist = acc.histograms()
        out.save_table(hist, "distribution_histograms")
        for name in TITLES:
            counts, edges = acc.histogram_array(name)
            out.save_array(counts, f"{name}_hist")
            out.save_array(edges, f"{name}_edges")
        for moe_layer in s.layers:
            out.save_figure(plot_layer(hist, moe_layer.layer), f"distributions_layer{moe_layer.layer}")


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
