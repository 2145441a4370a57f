"""What do router outputs look like? Distributions of logits, softmax, renormalised top-k and the real weights.

    uv run router_stats.py                              # shipped demo model, offline demo domains
    uv run router_stats.py --model allenai/OLMoE-1B-7B-0924 --layers 1 --num_tokens 100000

Per MoE layer (docs/METRICS.md#router-output-distributions): (a) raw router logits z over all experts, (b) softmax p over all experts,
(c) the renormalised top-k probabilities p̃_i = p_i / Σ_{j∈K} p_j and (d) the weights w the experts really receive
(whatever the scoring rule: softmax, sigmoid, scaled, renormalised or not), (c) and (d) per rank 1..k (rank 1 =
largest). Streamed per (layer, domain[, rank]) into histograms: probabilities on their fixed [0, 1] bins, logits and
weights on a range that grows with the data by merging whole bins (exact, and identical under torchrun).

Outputs: distribution_summary.csv (count, mean, std, min, max, quantiles), distribution_histograms.csv (tidy),
<quantity>_hist.npy [layer, domain (+all last), (rank,) bin] with <quantity>_edges.npy, and a figure per layer.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from common import cli
from common.cli import at_least, base_parser, run_main

SCRIPT = "router_stats"


def build_parser():
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--bins", type=at_least(1), default=200, help="histogram bins per quantity")
    return parser


def run(args: argparse.Namespace) -> None:
    config = cli.config(args, SCRIPT)  # the flags and data specs, checked before torch is imported
    from common.cli import pipeline

    s = pipeline.setup(config)
    # imported once the input is known to be good: a refused run does not pay for them
    from common.analysis.routing import DistributionStats
    from common.figures.routing import DISTRIBUTION_TITLES, plot_distributions

    stream = pipeline.batches(s)
    with pipeline.start_run(s) as out:
        acc = DistributionStats(s.layers, [d.name for d in s.domains], s.moe.device, bins=args.bins)
        pipeline.accumulate_routing(acc, s, pipeline.resumable(out, s, stream, acc=acc))
        out.record(tokens=stream.report.to_dict())

        out.save_table(acc.summary(), "distribution_summary")
        hist = acc.histograms()
        out.save_table(hist, "distribution_histograms")
        for name in DISTRIBUTION_TITLES:
            counts, edges = acc.histogram_array(name)
            out.save_array(counts, f"{name}_hist")
            out.save_array(edges, f"{name}_edges")
        for moe_layer in s.layers:
            out.save_figure(plot_distributions(hist, moe_layer.layer), f"distributions_layer{moe_layer.layer}")


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
