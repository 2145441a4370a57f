"""Where do tokens go? Selection frequency, domain specialization, token overlap and token-id specialization,
co-activation, cross-layer routing, load balance and router saturation across checkpoints.

    uv run router_metrics.py                                          # shipped demo model, offline domains
    uv run router_metrics.py --model allenai/OLMoE-1B-7B-0924 --data pile --num_domains 22 \\
        --layers 1 7 15 --num_experts 64 --topk 8 --num_tokens 10000
    uv run router_metrics.py --model allenai/OLMoE-1B-7B-0924 --revisions step5000-tokens20B main

Definitions: docs/METRICS.md, #selection-frequency through #router-saturation. Everything is streamed (counts on the model's device; token-id tables are vocab ×
experts per layer), so memory does not grow with --num_tokens.

Outputs: frequency.csv (per layer/domain/expert: counts and f_e top-k and top-1 with uniform baselines; per
domain this is the domain specialization N_{D,e}/N_D), expert_specialization.csv (JSD of each expert's domain mix
vs the overall mix), coverage50.csv (fewest experts covering 50% of a domain), token_overlap.csv + npy,
token_specialization.csv (current / next / predicted token), coactivation.csv + npy, transitions.csv + npy,
indicator_correlation npy (+ shuffled control) and summary CSV, load_balance.csv, saturation.csv (with
--revisions); figures for each.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from common import cli
from common.cli import at_least, base_parser, positive_float, run_main
from common.config import RANDOM_PREFIX, SHIPPED_MODELS, ModelSpec
from common.errors import InputError

if TYPE_CHECKING:
    import numpy as np

    from common.cli.pipeline import Setup
    from common.model import MoEModel
    from common.run import Run

SCRIPT = "router_metrics"


def build_parser():
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--num_experts", type=at_least(1), default=None, help="expected routed experts per layer (checked)")
    parser.add_argument("--topk", type=at_least(1), default=None, help="expected experts per token (checked)")
    parser.add_argument("--min_count", type=at_least(1), default=1, help="token ids seen fewer times are left out of overlap and id specialization")
    parser.add_argument("--olmoe-compat", dest="olmoe_compat", action="store_true",
                        help="co-activation over rank-adjacent pairs only, as the OLMoE analysis script counted")
    parser.add_argument("--no-token-tables", dest="token_tables", action="store_false",
                        help="skip the vocab × experts tables (token overlap and id specialization)")
    parser.add_argument("--stats_memory", type=positive_float, default=4.0, metavar="GIB",
                        help="memory budget of the statistics on the model's device, in GiB; token tables that do not "
                        "fit go to the host (the plan is printed in run.json)")
    parser.add_argument("--host_stats_memory", type=positive_float, default=None, metavar="GIB",
                        help="host memory budget of token tables moved off the device, in GiB (default: half the RAM)")
    parser.add_argument("--revisions", nargs="+", default=None, metavar="REV",
                        help="router saturation: checkpoints (hub revisions of --model, the shipped demo's stepN / main, or checkpoint folders) "
                        "compared with the last one on identical tokens; a single one is compared with --model")
    return parser


def check_expectations(args: argparse.Namespace, moe: MoEModel, layers) -> None:
    for moe_layer in layers:
        if args.num_experts is not None and moe_layer.num_experts != args.num_experts:
            raise InputError(f"--num_experts {args.num_experts}: layer {moe_layer.layer} has {moe_layer.num_experts} experts")
        if args.topk is not None and moe_layer.top_k != args.topk:
            raise InputError(f"--topk {args.topk}: layer {moe_layer.layer} routes to {moe_layer.top_k} experts")


def revision_specs(args: argparse.Namespace, base: ModelSpec) -> list[ModelSpec]:
    """One ModelSpec per --revisions item (a folder if it exists, else a hub revision of --model); the last is final."""
    specs = []
    for item in args.revisions:
        path = Path(item).expanduser()
        if path.exists() or item.startswith((".", "/", "~")) or item.count("/") > 1:
            if not path.is_dir():
                raise InputError(f"--revisions {item}: no such checkpoint folder")
            specs.append(ModelSpec(**{**base.__dict__, "model": str(path), "revision": None}))
        elif base.model in SHIPPED_MODELS:  # a shipped checkpoint by name (stepN, main): refused later if unknown
            specs.append(ModelSpec(**{**base.__dict__, "revision": item}))
        elif base.model.startswith(RANDOM_PREFIX) or Path(base.model).expanduser().exists():
            raise InputError(f"--revisions {item}: no such checkpoint folder (and --model {base.model} is not a hub id "
                             "whose revision it could be)")
        else:
            specs.append(ModelSpec(**{**base.__dict__, "revision": item}))
    if len(specs) == 1:
        specs.append(base)
    return specs


# ---------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> None:
    config = cli.config(args, SCRIPT)  # the flags and data specs, checked before torch is imported
    from common.analysis.memory import plan_routing_counts
    from common.cli import pipeline
    from common.model import inspect_moe, resolve_device

    specs = revision_specs(args, config.model) if args.revisions else []
    for item, spec in zip(args.revisions or [], specs, strict=False):  # refused before any work
        try:
            inspect_moe(spec)
        except InputError as err:
            raise InputError(f"--revisions {item}: {str(err).split(': ', 1)[-1]}") from None
    plans = []

    def preflight(skeleton, layers, domains) -> None:  # from the config alone: refused before any weight is read
        check_expectations(args, skeleton, layers)
        plans.append(plan_routing_counts(layers, [d.name for d in domains], skeleton.vocab_size,
                                         resolve_device(config.model.device), token_tables=args.token_tables,
                                         device_budget_gib=args.stats_memory, host_budget_gib=args.host_stats_memory))

    s = pipeline.setup(config, preflight)
    # imported once the input is known to be good: a refused run does not pay for them
    from common.analysis.saturation import saturation
    from common.analysis.specialization import RoutingCounts
    from common.figures.specialization import plot_saturation

    plan = plans[0]
    domains = [d.name for d in s.domains]
    stream = pipeline.batches(s)
    with pipeline.start_run(s) as out:
        out.record(stats_memory=plan.to_dict())
        counts_acc = RoutingCounts(s.layers, domains, s.moe.vocab_size, s.moe.device, olmoe_compat=args.olmoe_compat,
                                   token_tables=args.token_tables, seed=args.seed, table_device=plan.table_device)
        # routing counts are sums over rows: a batch that does not fit is forwarded in parts
        batches = pipeline.resumable(out, s, stream, counts=counts_acc)
        for records, batch, logits in pipeline.captured_batches(s.moe, batches, s.layers, ("logits", "topk"),
                                                                split_on_oom=True):
            counts_acc.update(records, batch, predicted=logits.argmax(-1))
        counts_acc.all_reduce()
        out.record(tokens=stream.report.to_dict())
        counts = counts_acc.arrays()
        write_outputs(out, counts, s, args)
        if specs:
            table = saturation(specs, [m.layer for m in s.layers], lambda: pipeline.batches(s))
            out.save_table(table, "saturation")
            out.save_figure(plot_saturation(table), "saturation")


def write_outputs(out: Run, counts: dict[str, np.ndarray], s: Setup, args: argparse.Namespace) -> None:
    import numpy as np
    import pandas as pd

    from common.analysis.specialization import (
        TOKEN_TABLES,
        coactivation_table,
        coverage,
        expert_specialization,
        load_balance,
        selection_frequency,
        token_overlap,
        token_specialization,
        transition_probabilities,
    )
    from common.figures.specialization import (
        plot_token_overlap,
        plot_token_specialization,
        save_specialization_figures,
    )

    layers, domains = s.layers, [d.name for d in s.domains]
    layer_ids = [m.layer for m in layers]
    freq = selection_frequency(counts, layers, domains)
    out.save_table(freq, "frequency")
    out.save_array(counts["topk"], "counts_topk")
    out.save_array(counts["top1"], "counts_top1")
    out.save_table(expert_specialization(counts, layers, domains), "expert_specialization")
    out.save_table(coverage(counts, layers, domains), "coverage50")
    out.save_table(load_balance(counts, layers), "load_balance")

    coact_tables = []
    for li, moe_layer in enumerate(layers):
        selected = counts["topk"][li].sum(0)
        coact_tables.append(coactivation_table(counts["coactivation"][li], selected, counts["tokens"].sum(), moe_layer.layer))
    out.save_table(pd.concat(coact_tables, ignore_index=True), "coactivation")
    out.save_array(counts["coactivation"], "coactivation_counts")

    if "transitions" in counts:
        transition_rows, probabilities = [], []
        for pair, (a, b) in enumerate(itertools.pairwise(layers)):
            probs = transition_probabilities(counts["transitions"][pair], counts["topk"][pair].sum(0))
            probabilities.append(probs)
            i, j = np.meshgrid(np.arange(probs.shape[0]), np.arange(probs.shape[1]), indexing="ij")
            transition_rows.append(pd.DataFrame({"layer_from": a.layer, "layer_to": b.layer, "expert_from": i.ravel(),
                                                 "expert_to": j.ravel(), "count": counts["transitions"][pair].ravel(),
                                                 "probability": probs.ravel()}))
        out.save_table(pd.concat(transition_rows, ignore_index=True), "transitions")
        out.save_array(np.stack(probabilities), "transition_probabilities")

    correlation, shuffled = counts["correlation"], counts["correlation_shuffled"]
    out.save_array(correlation, "indicator_correlation")
    out.save_array(shuffled, "indicator_correlation_shuffled")
    C = correlation.shape[0] // len(layers)
    summary = []
    for a, la in enumerate(layer_ids):
        for b, lb in enumerate(layer_ids):
            block = np.s_[a * C : (a + 1) * C, b * C : (b + 1) * C]
            off_diagonal = ~np.eye(C, dtype=bool) if a == b else np.ones((C, C), dtype=bool)
            summary.append({"layer_a": la, "layer_b": lb,
                            "mean_abs_pearson": np.nanmean(np.abs(correlation[block][off_diagonal])),
                            "mean_abs_pearson_shuffled": np.nanmean(np.abs(shuffled[block][off_diagonal]))})
    out.save_table(pd.DataFrame(summary), "indicator_correlation_summary")

    if args.token_tables:
        overlap_rows, spec_rows, jaccards = [], [], []
        for li, moe_layer in enumerate(layers):
            jaccard, weighted = token_overlap(counts["token_current"][li][:, : moe_layer.num_choices], args.min_count)
            jaccards.append(np.stack([jaccard, weighted]))
            out.save_figure(plot_token_overlap(jaccard, weighted, moe_layer.layer), f"token_overlap_layer{moe_layer.layer}")
            i, j = np.meshgrid(np.arange(jaccard.shape[0]), np.arange(jaccard.shape[0]), indexing="ij")
            keep = (i != j).ravel()
            overlap_rows.append(pd.DataFrame({"layer": moe_layer.layer, "expert_i": i.ravel()[keep], "expert_j": j.ravel()[keep],
                                              "jaccard": jaccard.ravel()[keep], "weighted_overlap": weighted.ravel()[keep]}))
            for table in TOKEN_TABLES:
                spec = token_specialization(counts[f"token_{table}"][li], counts[f"occurrences_{table}"], moe_layer.top_k, args.min_count)
                spec_rows.append({"layer": moe_layer.layer, "token": table, **spec})
        out.save_table(pd.concat(overlap_rows, ignore_index=True), "token_overlap")
        out.save_array(np.stack(jaccards), "token_overlap")  # [layer, (jaccard, weighted), E, E]
        out.save_table(pd.DataFrame(spec_rows), "token_specialization")
        out.save_figure(plot_token_specialization(pd.DataFrame(spec_rows)), "token_specialization")

    save_specialization_figures(out, freq, counts, layers, domains)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
