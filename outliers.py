"""Super experts: the routed experts whose down projections produce the model's massive activations, and what
removing them does.

    uv run outliers.py                                                   # demo model and domains, every MoE layer
    uv run outliers.py --model Qwen/Qwen3-30B-A3B --data moe-lens --num_tokens 2000 --multiple 10

One pass over the data streams, per MoE layer, routed expert and domain, the largest |activation| entering the
expert's down projection (its neurons act(gate·x)·(up·x)) and the largest |output| of the expert E_e(x), over the
tokens routed to it, with the token, position and neuron or dimension where each occurs (running maxima, no stored
activations); and per decoder layer the residual stream's massive activations (its top-3 |h| with their dimensions,
against the median |h|: Sun et al.'s measure). Super experts (arXiv 2507.23279) are named by a documented rule: an
expert whose peak output (`--rule_on input`: peak down-projection input) over all domains exceeds `--multiple` × the
median peak of its layer's experts (or the experts given with `--remove`). Consequences, on the same tokens: the
next-token perplexity per domain, the attention mass on the first token (the attention sink) and the residual peak
per layer, with the named experts removed (`--how zero`: their outputs become 0; `drop`: the router chooses among the
rest, as prune.py does), next to removing as many random other experts in the same layers (`--draws` seeded draws).
Definitions: docs/METRICS.md#super-experts.

Outputs: expert_peaks.csv / .npy, super_experts.csv, massive_activations.csv, outlier_perplexity.csv, sink_mass.csv;
figures expert_peaks (peak per expert per layer, log scale, super experts marked), massive_activations,
sink_mass (sink mass and residual peak per layer, before and after), outlier_perplexity.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from common import cli
from common.cli import at_least, base_parser, positive_float, run_main
from common.errors import InputError

SCRIPT = "outliers"
CONTEXT = 4  # tokens shown either side of a peak


def _layer_expert(text: str) -> tuple[int, int]:
    try:
        layer, expert = text.split(":")
        return int(layer), int(expert)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not LAYER:EXPERT (e.g. 3:17)") from None


def build_parser():
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.set_defaults(num_tokens=2000)
    group = parser.add_argument_group("super experts")
    group.add_argument("--multiple", type=positive_float, default=3.0,
                       help="an expert is super when its peak exceeds this multiple of the median peak of its layer's "
                       "experts")
    group.add_argument("--rule_on", choices=("output", "input"), default="output",
                       help="which peak the rule reads: the expert's output (the down projection's output, as the "
                       "paper profiles) or the down projection's input")
    group.add_argument("--remove", nargs="+", type=_layer_expert, default=None, metavar="LAYER:EXPERT",
                       help="remove these experts instead of the ones the rule names (e.g. a paper's list)")
    group.add_argument("--how", choices=("zero", "drop"), default="zero",
                       help="zero: routing unchanged, the removed experts' outputs are 0 (the paper's pruning); drop: "
                       "the router chooses among the other experts")
    group.add_argument("--draws", type=at_least(1), default=3,
                       help="seeded draws of as many random other experts, per layer, for the control")
    return parser


def run(args: argparse.Namespace) -> None:
    config = cli.config(args, SCRIPT)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("outliers.py runs in one process (its running maxima and consequence passes are not gathered across torchrun ranks; a model too large for one GPU runs with --device_map auto)")
    from common.cli import pipeline

    def preflight(skeleton, layers, domains) -> None:
        by_layer = {m.layer: m for m in layers}
        for layer, expert in args.remove or ():
            try:
                index = skeleton.resolve_layer(layer)
            except InputError as err:
                raise InputError(f"--remove {layer}:{expert}: {err}") from None
            if index not in by_layer:
                raise InputError(f"--remove {layer}:{expert}: layer {layer} is not one of the measured MoE layers "
                                 f"({', '.join(str(m.layer) for m in layers)})")
            if not 0 <= expert < by_layer[index].num_experts:
                raise InputError(f"--remove {layer}:{expert}: layer {index} has experts 0..{by_layer[index].num_experts - 1}")

    s = pipeline.setup(config, preflight)
    import numpy as np
    import pandas as pd
    from tqdm import tqdm

    from common.analysis import outliers
    from common.analysis.pruning import nll_table
    from common.figures.outliers import (
        plot_expert_peaks,
        plot_massive_activations,
        plot_outlier_perplexity,
        plot_sink_mass,
    )

    domains = [d.name for d in s.domains]
    slots = [*domains, "all"]
    num_layers = len(s.moe.decoder_layers())
    stream = pipeline.batches(s)
    with pipeline.start_run(s) as out:
        experts = outliers.ExpertPeaks(s.layers, len(domains), s.moe.device)
        residual = outliers.ResidualPeaks(num_layers, len(domains), s.moe.device)
        batches: list = []
        resumable = pipeline.resumable(out, s, stream, experts=experts, residual=residual, batches=batches)
        for records, batch, _ in pipeline.captured_batches(s.moe, resumable, s.layers, ("topk", "input", "residual")):
            experts.update(records, batch, len(batches))
            residual.update(records, batch, len(batches))
            batches.append(batch.to("cpu"))  # kept: the consequences read the same tokens, the peaks their context
        out.record(tokens=stream.report.to_dict())
        if not batches:
            raise InputError("the data gave no batch to measure")
        if not experts.routed.any():
            raise InputError("no token was routed to any expert of the measured layers (nothing to measure)")

        tokenizer = s.moe.tokenizer

        def where(peak) -> dict:
            if peak is None:
                return {"token_id": None, "token": None, "position": None}
            token_id = int(batches[peak.batch].input_ids[peak.row, peak.position])
            return {"token_id": token_id, "token": tokenizer.decode([token_id]), "position": peak.position}

        def context(peak) -> str:
            ids = batches[peak.batch].input_ids[peak.row]
            real = batches[peak.batch].attention_mask[peak.row].bool()
            lo, hi = max(0, peak.position - CONTEXT), peak.position + CONTEXT + 1
            before = tokenizer.decode(ids[lo:peak.position][real[lo:peak.position]].tolist())
            after = tokenizer.decode(ids[peak.position + 1:hi][real[peak.position + 1:hi]].tolist())
            return f"{before}[[{tokenizer.decode([int(ids[peak.position])])}]]{after}"

        rows = []
        cube = np.full((len(s.layers), max(m.num_experts for m in s.layers), len(slots), 2), np.nan)
        for i, layer in enumerate(s.layers):
            for e in range(layer.num_experts):
                for d, name in enumerate(slots):
                    peak_in, peak_out = experts.inputs[i].peak(e, d), experts.outputs[i].peak(e, d)
                    row = {"layer": layer.layer, "expert": e, "domain": name,
                           "routed_tokens": int(experts.routed[i, e, d])}
                    for prefix, peak, unit in (("input", peak_in, "neuron"), ("output", peak_out, "dim")):
                        row[f"{prefix}_peak"] = peak.value if peak else np.nan
                        row[f"{prefix}_{unit}"] = peak.index if peak else None
                        row.update({f"{prefix}_{k}": v for k, v in where(peak).items()})
                    cube[i, e, d] = [row["input_peak"], row["output_peak"]]
                    rows.append(row)
        out.save_table(pd.DataFrame(rows), "expert_peaks")
        out.save_array(cube, "expert_peaks")

        rule_slot = len(domains)  # the rule reads the peaks over all domains
        peaks = experts.peaks(args.rule_on, rule_slot)
        position = {m.layer: i for i, m in enumerate(s.layers)}
        chosen = [(position[s.moe.resolve_layer(layer)], expert) for layer, expert in args.remove or ()]
        named = outliers.super_experts(peaks, args.multiple, chosen if args.remove else None)
        table = experts.inputs if args.rule_on == "input" else experts.outputs
        by_domain = [experts.peaks(args.rule_on, d) for d in range(len(domains))]
        super_rows = []
        for i, e, value, median in named:
            peak = table[i].peak(e, rule_slot)
            seen = [d for d in range(len(domains)) if np.isfinite(by_domain[d][i][e])]
            above = [d for d in seen if by_domain[d][i][e] > args.multiple * np.nanmedian(by_domain[d][i])]
            super_rows.append({"layer": s.layers[i].layer, "expert": e, "rule_on": args.rule_on, "peak": value,
                               "layer_median": median, "ratio": value / median if median else np.nan,
                               "named_by": "--remove" if args.remove else f"peak > {args.multiple:g} x median",
                               "routed_tokens": int(experts.routed[i, e, rule_slot]),
                               "domains_above": len(above), "domains_seen": len(seen),
                               **where(peak), "context": context(peak) if peak else ""})
        out.save_table(pd.DataFrame(super_rows, columns=["layer", "expert", "rule_on", "peak", "layer_median", "ratio",
                                                         "named_by", "routed_tokens", "domains_above", "domains_seen",
                                                         "token_id", "token", "position", "context"]), "super_experts")

        massive = []
        for layer in range(num_layers):
            for d, name in enumerate(slots):
                median = residual.median(layer, d)
                mean = float(residual.abs_sum[layer, d] / residual.entries[layer, d].clamp_min(1))
                for rank, peak in enumerate(residual.peaks(layer, d), start=1):
                    massive.append({"layer": layer, "domain": name, "rank": rank, "value": peak.value, "dim": peak.index,
                                    **where(peak), "median_abs": median, "mean_abs": mean,
                                    "ratio_to_median": peak.value / median if median else np.nan})
        out.save_table(pd.DataFrame(massive), "massive_activations")

        removed = [tuple(sorted(e for j, e, _, _ in named if j == i)) for i in range(len(s.layers))]
        conditions = [("none", 0, [()] * len(s.layers))]
        if any(removed):
            conditions.append(("super", 0, removed))
            rng = np.random.default_rng([args.seed, 22])
            for draw in range(args.draws):
                drawn = []
                for layer, gone in zip(s.layers, removed, strict=True):
                    others = [e for e in range(layer.num_experts) if e not in gone]
                    drawn.append(tuple(sorted(rng.choice(others, size=len(gone), replace=False).tolist())))
                conditions.append(("random", draw, drawn))
        else:
            warnings.warn(f"no expert's peak {args.rule_on} exceeds {args.multiple:g} x its layer's median: nothing "
                          "removed (a lower --multiple, or --remove LAYER:EXPERT, names experts)", stacklevel=1)
        perplexity_rows, sink_rows = [], []
        for condition, draw, gone in tqdm(conditions, desc="forwards with experts removed", unit="condition",
                                          disable=not args.progress):
            result = outliers.consequences(s.moe, batches, gone, s.layers, len(domains), args.how)
            mean, predictions = nll_table(result.nll_sum, result.count)
            count = sum(len(g) for g in gone)
            for d, name in enumerate(slots):
                perplexity_rows.append({"condition": condition, "draw": draw, "experts_removed": count, "domain": name,
                                        "predictions": int(predictions[d]), "nll": float(mean[d]),
                                        "ppl": float(np.exp(mean[d]))})
                for layer in range(num_layers):
                    sink_rows.append({"condition": condition, "draw": draw, "layer": layer, "domain": name,
                                      "sink_mass": float(result.sink[layer, d]),
                                      "uniform_mass": float(result.uniform[layer, d]),
                                      "residual_peak": float(result.residual_peak[layer, d])})
        perplexity = pd.DataFrame(perplexity_rows)
        sink = pd.DataFrame(sink_rows)
        out.save_table(perplexity, "outlier_perplexity")
        out.save_table(sink, "sink_mass")
        out.record(super_experts=[[s.layers[i].layer, e] for i, e, _, _ in named], rule_on=args.rule_on,
                   multiple=args.multiple, how=args.how, draws=args.draws,
                   sink_available=bool(sink.sink_mass.notna().any()))
        expert_table = pd.DataFrame(rows)
        out.save_figure(plot_expert_peaks(expert_table, pd.DataFrame(super_rows), args.multiple, args.rule_on),
                        "expert_peaks")
        out.save_figure(plot_massive_activations(pd.DataFrame(massive)), "massive_activations")
        out.save_figure(plot_sink_mass(sink), "sink_mass")
        out.save_figure(plot_outlier_perplexity(perplexity, slots), "outlier_perplexity")


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
