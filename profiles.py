"""What does one expert do? A JSON profile per expert of one MoE layer.

    uv run profiles.py --layer 1 --expert_id 9
    uv run profiles.py --layer 1 --all                  # every expert of the layer

A profile (SPEC "Expert profile") holds: selection frequency (top-k and top-1, with the uniform baselines), mean
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
import itertools
import math
import sys
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from common import cli, distributed, pipeline
from common.analysis.expert_profile import ExpertActivity
from common.analysis.specialization import RoutingCounts, transition_probabilities
from common.cli import base_parser, run_main
from common.errors import InputError
from common.stats import DEFAULT_QUANTILES

SCRIPT = "profiles"


def build_parser():
    parser = base_parser(__doc__.split("\n\n")[0], layers=False)
    parser.add_argument("--layer", type=int, required=True, help="decoder-layer index of the MoE layer (negatives from the end)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--expert_id", type=int, nargs="+", help="expert(s) to profile")
    which.add_argument("--all", action="store_true", help="profile every expert of the layer")
    parser.add_argument("--top", type=int, default=20, help="entries per list (tokens, contexts, experts)")
    parser.add_argument("--min_count", type=int, default=5, help="a token needs this many occurrences to be ranked by lift")
    return parser


def _decode(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id]) if token_id >= 0 else ""


def _token_list(tokenizer, ids: np.ndarray, values: np.ndarray, name: str, extra: dict[str, np.ndarray] | None = None) -> list[dict]:
    out = []
    for position, token_id in enumerate(ids):
        item = {"token_id": int(token_id), "token": _decode(tokenizer, int(token_id)), name: float(values[position])}
        for key, column in (extra or {}).items():
            item[key] = float(column[position])
        out.append(item)
    return out


def build_profile(e: int, position: int, ctx: dict, top: int, min_count: int) -> dict:
    """The JSON profile of expert e (its column `position` in the activity accumulator)."""
    tok, layer = ctx["tokenizer"], ctx["layer"]
    li = ctx["layer_position"]
    counts, domains = ctx["counts"], ctx["domains"]
    tokens_total = counts["tokens"].sum()
    per_domain = counts["topk"][li][:, e]
    selected = per_domain.sum()
    profile: dict = {
        "layer": layer.layer, "expert": e, "model": ctx["model"], "tokens": tokens_total,
        "selected_topk": selected, "frequency_topk": selected / tokens_total,
        "frequency_top1": counts["top1"][li][:, e].sum() / tokens_total,
        "uniform_topk": layer.top_k / layer.num_choices, "uniform_top1": 1 / layer.num_choices,
    }
    weights = ctx["weights"]
    profile["weight_when_selected"] = {
        "count": float(weights["count"][position]), "mean": float(weights["mean"][position]),
        "std": float(weights["std"][position]),
        **{f"q{q}": float(v) for q, v in zip(ctx["quantile_levels"], ctx["quantiles"][position], strict=True)},
    }
    profile["domains"] = [
        {"domain": name, "tokens_routed": float(per_domain[d]), "share_of_expert": float(per_domain[d] / selected) if selected else 0.0,
         "share_of_domain": float(per_domain[d] / counts["tokens"][d]) if counts["tokens"][d] else 0.0}
        for d, name in enumerate(domains)
    ]
    table, occurrences = counts["token_current"][li][:, e], counts["occurrences_current"]
    by_count = np.argsort(-table, kind="stable")[:top]
    by_count = by_count[table[by_count] > 0]
    profile["top_tokens_by_count"] = _token_list(tok, by_count, table[by_count], "count")
    with np.errstate(invalid="ignore", divide="ignore"):
        lift = (table / max(selected, 1)) / (occurrences / tokens_total)
    lift = np.where((occurrences >= min_count) & (table > 0), lift, -np.inf)
    by_lift = np.argsort(-lift, kind="stable")[:top]
    by_lift = by_lift[np.isfinite(lift[by_lift])]
    profile["top_tokens_by_lift"] = _token_list(tok, by_lift, lift[by_lift], "lift", {"count": table[by_lift]})
    next_table = counts["token_next"][li][:, e]
    by_next = np.argsort(-next_table, kind="stable")[:top]
    by_next = by_next[next_table[by_next] > 0]
    profile["top_next_tokens"] = _token_list(tok, by_next, next_table[by_next], "count")

    contexts = []
    for rank in range(ctx["best_score"].shape[0]):
        score = float(ctx["best_score"][rank, position])
        if not math.isfinite(score):
            break
        window = [int(t) for t in ctx["best_window"][rank, position]]
        centre = len(window) // 2
        contexts.append({
            "score": score, "weight": float(ctx["best_weight"][rank, position]),
            "domain": domains[int(ctx["best_domain"][rank, position])],
            "token": _decode(tok, window[centre]),
            "before": tok.decode([t for t in window[:centre] if t >= 0]),
            "after": tok.decode([t for t in window[centre + 1 :] if t >= 0]),
        })
    profile["top_contexts"] = contexts

    logits = ctx["decoded"][position]
    promoted, suppressed = np.argsort(-logits, kind="stable")[:top], np.argsort(logits, kind="stable")[:top]
    profile["promoted_tokens"] = _token_list(tok, promoted, logits[promoted], "logit")
    profile["suppressed_tokens"] = _token_list(tok, suppressed, logits[suppressed], "logit")

    coact = counts["coactivation"][li][e]
    with np.errstate(invalid="ignore", divide="ignore"):
        conditional = coact / selected if selected else np.zeros_like(coact)
    partners = [j for j in np.argsort(-coact, kind="stable") if j != e and coact[j] > 0][:top]
    profile["coactivated_experts"] = [{"expert": int(j), "count": float(coact[j]), "p_given_this": float(conditional[j])} for j in partners]

    for key, pair, neighbour in (("predecessors", li - 1, "previous"), ("successors", li, "next")):
        profile[key] = []
        if ctx["neighbours"].get(neighbour) is None:
            continue
        transitions = counts["transitions"][pair]
        if key == "successors":
            probs = transition_probabilities(transitions, counts["topk"][li].sum(0))[e]
        else:  # P(e' ∈ K_prev | e ∈ K_this): column e of the previous layer's pair counts, over n_e
            probs = transitions[:, e] / selected if selected else np.zeros(transitions.shape[0])
        order = [j for j in np.argsort(-np.nan_to_num(probs), kind="stable") if probs[j] > 0][:top]
        profile[key] = [{"layer": ctx["neighbours"][neighbour], "expert": int(j), "probability": float(probs[j])} for j in order]
    return profile


def run(args: argparse.Namespace) -> None:
    s = pipeline.setup(cli.config(args, SCRIPT, layers=[args.layer]))
    layer = s.layers[0]
    experts = list(range(layer.num_experts)) if args.all else args.expert_id
    for e in experts:
        if not 0 <= e < layer.num_experts:
            raise InputError(f"--expert_id {e} out of range: layer {layer.layer} has experts 0..{layer.num_experts - 1}")
    position = s.moe.layers.index(layer)
    previous = s.moe.layers[position - 1] if position > 0 else None
    following = s.moe.layers[position + 1] if position + 1 < len(s.moe.layers) else None
    count_layers = [m for m in (previous, layer, following) if m is not None]
    domains = [d.name for d in s.domains]
    stream = pipeline.batches(s)
    with pipeline.start_run(s) as out:
        counts_acc = RoutingCounts(count_layers, domains, s.moe.vocab_size, s.moe.device, seed=args.seed)
        captured = pipeline.captured_batches(s.moe, stream, count_layers, ("logits", "topk", "input"))
        first = next(captured, None)
        # The weight histogram's range comes from the stream's first batch (sigmoid/scaled routers exceed 1). Rank 0
        # holds it and every rank must bin alike for all_reduce, so rank 0's value is broadcast (before the loop:
        # a rank without batches takes part too).
        first_max = float(first[0][layer.layer].topk_weight.max()) if first is not None else 0.0
        max_weight = max(1.0, math.ceil(1.5 * distributed.broadcast(first_max)))
        activity = ExpertActivity(layer, experts, s.moe.device, hidden_size=s.moe.hidden_size, top_n=args.top,
                                  max_weight=max_weight)
        for records, batch, logits in itertools.chain([first] if first is not None else [], captured):
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
            top_domain = max(profile["domains"], key=lambda d: d["tokens_routed"])
            rows.append({
                "layer": layer.layer, "expert": e, "frequency_topk": profile["frequency_topk"],
                "frequency_top1": profile["frequency_top1"], "mean_weight": profile["weight_when_selected"]["mean"],
                "top_domain": top_domain["domain"], "top_domain_share": top_domain["share_of_expert"],
                "top_tokens": " ".join(repr(t["token"]) for t in profile["top_tokens_by_count"][:5]),
                "promoted": " ".join(repr(t["token"]) for t in profile["promoted_tokens"][:5]),
            })
        out.save_table(pd.DataFrame(rows), f"profiles_layer{layer.layer}")


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
