"""Router and expert weights, no data needed: router-row similarity, router subspaces across layers, singular
spectra and effective rank, expert weight similarity and router-expert alignment.

    uv run weights.py                                          # shipped demo model
    uv run weights.py --model allenai/OLMoE-1B-7B-0924 --layers 0 7 15
    uv run weights.py --model mistralai/Mixtral-8x7B-v0.1 --routers-only

Definitions: docs/METRICS.md#router-and-expert-weights; exact formulas in
common/analysis/weights.py. Router rows r_c are the rows of the router's [C, H] weight (its bias is not used);
the effective rank is #{k : σ_k² / Σσ² > 0.01} of the uncentred singular values; the cross-layer alignment is
mean_k cos θ_k over the principal angles between two routers' row spaces; the router-expert alignment of expert e
compares ‖W_gate,e r̂_e‖ and the share of r_e in the row spaces of W_gate,e and W_up,e with --num_random random unit
directions (seeded by --seed) and with the other experts' router rows.

Outputs: router_summary.csv (per layer and all stacked: rank, effective rank, within-layer cosines),
router_cosine.csv + npy [layer, expert_a, expert_b], router_spectra.csv + router_singular_values.npy
[layer, component] + stacked_singular_values.npy [component], cross_layer.csv + npy [metric (mean_cosine,
mean_abs_cosine, best_match_abs_cosine, alignment), layer_a, layer_b], principal_angles.csv,
expert_weight_cosine.csv + npy [layer, matrix (gate, up, down), expert_a, expert_b], expert_weight_summary.csv,
router_expert_alignment.csv + npy [layer, expert, metric (gate_norm, up_norm, gate_rowspace_share,
up_rowspace_share), stat (value, control_mean, control_std, control_z, control_percentile, other_rows_mean,
expected)]; figures router_cosine, cross_layer, router_spectra, expert_weight_cosine_{gate,up,down},
router_expert_alignment. Layer axes follow the order of --layers; NaN pads layers with fewer rows or experts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from common import cli
from common.cli import at_least, base_parser, run_main

SCRIPT = "weights"


def build_parser():
    parser = base_parser(__doc__.split("\n\n")[0], data=False)
    parser.add_argument("--num_random", type=at_least(2), default=1000,
                        help="random unit directions of the router-expert alignment control")
    parser.add_argument("--routers-only", dest="routers_only", action="store_true",
                        help="skip the expert weights (expert similarity and router-expert alignment)")
    return parser


def run(args: argparse.Namespace) -> None:
    config = cli.config(args, SCRIPT)
    from common.analysis import weights
    from common.cli import pipeline

    experts = not args.routers_only

    def preflight(skeleton, layers, domains) -> None:  # router and expert layouts, before any weight is read
        weights.validate(layers, skeleton.hidden_size, experts=experts)

    s = pipeline.setup(config, preflight)
    from common.figures.weights import save_weight_figures  # once the input is known to be good

    routers = weights.validate(s.layers, s.moe.hidden_size, experts=experts)
    with pipeline.start_run(s) as out:
        res = weights.analyze(s.layers, s.moe.hidden_size, s.moe.device, experts=experts,
                              num_random=args.num_random, seed=args.seed, progress=args.progress, routers=routers)
        out.record(weights={
            "layers": res.layers,
            "router_parameters": {str(r.layer): r.name for r in routers},
            "router_bias": {str(r.layer): r.bias is not None for r in routers},
            "variance_threshold": weights.VARIANCE_THRESHOLD,
            "num_random": args.num_random if experts else None,
            "cross_layer_metrics": list(weights.CROSS_LAYER_METRICS),
            "expert_matrices": list(weights.MATRICES),
            "alignment_metrics": list(weights.ALIGNMENT_METRICS),
            "alignment_stats": list(weights.ALIGNMENT_STATS),
        })
        for name, table in res.tables.items():
            out.save_table(table, name)
        for name, array in res.arrays.items():
            out.save_array(array, name)
        if args.figures:
            save_weight_figures(out, res, [m.num_experts for m in s.layers])


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
