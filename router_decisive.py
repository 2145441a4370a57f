"""How decisive is the router? Entropy, top-1 probability, margins and top-k mass per layer and domain.

    uv run router_decisive.py                          # shipped demo model, offline demo domains
    uv run router_decisive.py --model allenai/OLMoE-1B-7B-0924 --data olmoe --layers 1 7 15 --num_tokens 100000

Per token and MoE layer (docs/METRICS.md#entropy-and-decisiveness): H(p) = -Σ p ln p over all router choices (max ln E),
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

from common import cli
from common.cli import at_least, base_parser, run_main

SCRIPT = "router_decisive"


def build_parser():
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--bins", type=at_least(1), default=200, help="histogram bins per quantity")
    return parser


def run(args: argparse.Namespace) -> None:
    config = cli.config(args, SCRIPT)  # the flags and data specs, checked before torch is imported
    from common.cli import pipeline

    s = pipeline.setup(config)
    # imported once the input is known to be good: a refused run does not pay for them
    from common.analysis.routing import DecisivenessStats
    from common.figures.routing import plot_by_layer, plot_violins

    stream = pipeline.batches(s)
    with pipeline.start_run(s) as out:
        acc = DecisivenessStats(s.layers, [d.name for d in s.domains], s.moe.device, bins=args.bins)
        pipeline.accumulate_routing(acc, s, pipeline.resumable(out, s, stream, acc=acc))
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
