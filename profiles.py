"""What does one expert do? A JSON profile per expert of one MoE layer.

    uv run profiles.py --layer 1 --expert_id 9
    uv run profiles.py --layer 1 --all                  # every expert of the layer

A profile (docs/METRICS.md#expert-profile; lift: #lift) holds: selection frequency (top-k and top-1, with the uniform baselines), mean
and quantiles of its routing weight when selected, its domain mix, top input tokens by count and by lift over
their base rate, top next tokens, top contexts (±8 tokens around the activations with the largest w · ‖E_e(x)‖),
the tokens its mean output promotes and suppresses through the model's final norm and unembedding, the experts
most often co-activated with it, and its most frequent predecessors / successors in the neighbouring MoE layers.

Outputs: profile_layer<L>_expert<E>.json per expert, profiles_layer<L>.csv (one summary row per expert).
Under torchrun the counts, weights and outputs are summed over ranks and the top contexts merged: the same
profiles as one process.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from common import cli
from common.cli import at_least, base_parser, run_main
from common.errors import InputError

if TYPE_CHECKING:
    from common.model import MoELayer
    from common.model.config_facts import ConfigFacts

SCRIPT = "profiles"


def build_parser():
    parser = base_parser(__doc__.split("\n\n")[0], layers=False)
    parser.add_argument("--layer", "--layers", dest="layer", type=int, required=True,
                        help="decoder-layer index of the MoE layer (negatives from the end)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--expert_id", type=at_least(0), nargs="+", help="expert(s) to profile")
    which.add_argument("--all", action="store_true", help="profile every expert of the layer")
    parser.add_argument("--top", type=at_least(1), default=20, help="entries per list (tokens, contexts, experts)")
    parser.add_argument("--min_count", type=at_least(1), default=5,
                        help="a token needs this many occurrences to be ranked by lift (ties at equal lift: by count)")
    return parser


def chosen_experts(args: argparse.Namespace, layer: MoELayer) -> list[int]:
    """The experts to profile, checked against the layer (the weightless one: refused before any weight is read)."""
    experts = list(range(layer.num_experts)) if args.all else args.expert_id
    for e in experts:
        if not 0 <= e < layer.num_experts:
            raise InputError(f"--expert_id {e} out of range: layer {layer.layer} has experts 0..{layer.num_experts - 1}")
    return experts


def run(args: argparse.Namespace) -> None:
    config = cli.config(args, SCRIPT, layers=[args.layer])  # the flags and data specs, checked before torch is imported
    from common.cli import pipeline

    def preflight(skeleton, layers, domains) -> None:  # on the weightless model: refused before any weight is read
        chosen_experts(args, layers[0])

    def early(facts: ConfigFacts) -> None:  # on the config alone, before the modelling code is imported
        for expert in [] if args.all else args.expert_id:
            facts.check_expert("--expert_id", expert, args.layer)

    s = pipeline.setup(config, preflight, early)
    # imported once the input is known to be good: a refused run does not pay for them
    import pandas as pd
    import torch

    from common.analysis.expert_profile import ExpertActivity
    from common.analysis.profile_json import build_profile, token_display
    from common.analysis.specialization import RoutingCounts
    from common.figures.profiles import save_profile_figure
    from common.stats import DEFAULT_QUANTILES

    layer = s.layers[0]
    experts = chosen_experts(args, layer)
    position = s.moe.layers.index(layer)
    previous = s.moe.layers[position - 1] if position > 0 else None
    following = s.moe.layers[position + 1] if position + 1 < len(s.moe.layers) else None
    count_layers = [m for m in (previous, layer, following) if m is not None]
    domains = [d.name for d in s.domains]
    stream = pipeline.batches(s)
    with pipeline.start_run(s) as out:
        counts_acc = RoutingCounts(count_layers, domains, s.moe.vocab_size, s.moe.device, seed=args.seed)
        # The weight histogram grows its range with the data (common/stats), so every rank bins alike.
        activity = ExpertActivity(layer, experts, s.moe.device, hidden_size=s.moe.hidden_size, top_n=args.top)
        batches = pipeline.resumable(out, s, stream, counts=counts_acc, activity=activity)
        captured = pipeline.captured_batches(s.moe, batches, count_layers, ("logits", "topk", "input"))
        for records, batch, logits in captured:
            counts_acc.update(records, batch, predicted=logits.argmax(-1))
            activity.update(records[layer.layer], batch)
        counts_acc.all_reduce()
        activity.all_reduce()
        out.record(tokens=stream.report.to_dict())
        counts = counts_acc.arrays()
        weights = activity.weights.moments.result()
        levels = DEFAULT_QUANTILES
        with torch.no_grad():
            decoded = s.moe.unembed(activity.mean_outputs().to(s.moe.device).to(s.moe.dtype))
        ctx = {
            "tokenizer": s.moe.tokenizer, "layer": layer, "layer_position": count_layers.index(layer), "counts": counts,
            "domains": domains, "model": s.moe.name,
            "weights": {"count": weights.count, "mean": weights.mean, "std": weights.std},
            "quantile_levels": levels, "quantiles": activity.weights.histogram.quantiles(levels),
            "best_score": activity.best_score.cpu().numpy(), "best_window": activity.best_window.cpu().numpy(),
            "best_domain": activity.best_domain.cpu().numpy(), "best_weight": activity.best_weight.cpu().numpy(),
            "decoded": decoded.float().cpu().numpy(),
            "neighbours": {"previous": previous.layer if previous else None, "next": following.layer if following else None},
        }
        rows = []
        for column, e in enumerate(experts):
            profile = build_profile(e, column, ctx, args.top, args.min_count)
            out.save_json(profile, f"profile_layer{layer.layer}_expert{e}")
            save_profile_figure(out, profile)
            top_domain = max(profile["domains"], key=lambda d: d["tokens_routed"])
            rows.append({
                "layer": layer.layer, "expert": e, "frequency_topk": profile["frequency_topk"],
                "frequency_top1": profile["frequency_top1"], "mean_weight": profile["weight_when_selected"]["mean"],
                "top_domain": top_domain["domain"], "top_domain_share": top_domain["share_of_expert"],
                "top_tokens": " ".join(token_display(t) for t in profile["top_tokens_by_count"][:5]),
                "promoted": " ".join(token_display(t) for t in profile["promoted_tokens"][:5]),
            })
        out.save_table(pd.DataFrame(rows), f"profiles_layer{layer.layer}")


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
