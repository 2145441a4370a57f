"""What stability.py (routing stability): how much the top-k choices change across dtypes, batch composition, padding side and contexts writes, one `Output` per file (assembled into `common.run.outputs.REGISTRY`)."""

from __future__ import annotations

from common.figures.outputs.entry import DOMAIN, LAYER, Output

SCRIPT = ("stability",)
ANCHOR = "routing-stability"
CONSISTENCY = "route-consistency"
NEAR_TIES = "near-ties"

# fmt: off
OUTPUTS: tuple[Output, ...] = (
    Output("stability_summary.csv", "per comparison, MoE layer and domain: how often the same counted tokens' routing "
           "changed between the reference and the variant run", ANCHOR, SCRIPT,
           columns={"comparison": "dtype (the model loaded in another precision), router (each router alone in another "
                                  "precision, on the reference's router input), batch (each window alone vs in its "
                                  "batch) or padding (left vs right padding)",
                    "reference": "the reference run: its dtype (dtype, router), 'batched' or 'right'",
                    "variant": "the variant run: its dtype, 'alone' or 'left (mask|index positions)'",
                    "layer": LAYER, "domain": DOMAIN,
                    "tokens": "counted tokens compared (count)",
                    "topk_changed": "tokens whose set of top-k experts differs, order ignored (count)",
                    "topk_changed_fraction": "topk_changed / tokens (fraction)",
                    "top1_changed_fraction": "share of tokens whose highest-weighted expert differs (fraction)",
                    "weight_changed_fraction": "share of tokens with Σ_e |w_e − w′_e| > 0 (fraction)",
                    "mean_abs_dw": "mean over tokens of Σ_e |w_e − w′_e|, the L1 distance of the dense vectors of "
                                   "the weights the experts receive (the model's weight units; ≤ 2 for weights "
                                   "summing to 1)",
                    "max_abs_dw": "largest Σ_e |w_e − w′_e| of a token (weight units)"},
           integers=frozenset({"layer", "tokens", "topk_changed"})),
    Output("stability_margin.csv", "per comparison and MoE layer: counted tokens and top-k set changes by the "
           "reference's gap between its k-th and (k+1)-th router logits (half-decade bins)", NEAR_TIES, SCRIPT,
           columns={"comparison": "dtype, router, batch or padding (as in stability_summary.csv)",
                    "reference": "the reference run (as in stability_summary.csv)",
                    "variant": "the variant run (as in stability_summary.csv)", "layer": LAYER,
                    "bin": "gap bin (0-based; 16 bins of half a decade from 10^-6 to 10^2, the first also holding "
                           "every smaller gap, 0 included, the last every larger one)",
                    "left": "the bin's lower edge (logit units; 0 for the first bin)",
                    "right": "the bin's upper edge (logit units; inf for the last bin)",
                    "tokens": "counted tokens whose reference gap falls in the bin (count)",
                    "topk_changed": "of them, tokens whose top-k set changed in the variant (count)",
                    "topk_changed_fraction": "topk_changed / tokens (fraction; empty without tokens)"},
           integers=frozenset({"layer", "bin", "tokens", "topk_changed"})),
    Output("stability_consistency.csv", "per MoE layer: how consistently a token id routes across windows against "
           "different ids of the same frequency (weighted Jaccard of routes)", CONSISTENCY, SCRIPT,
           columns={"layer": LAYER,
                    "ids": "token ids compared: seen ≥ --min_count times, sampled in ≥ 2 windows, with a baseline (count)",
                    "pairs_same": "pairs of occurrences of one id in different windows, over those ids (count)",
                    "pairs_baseline": "baseline pairs: an occurrence of the id and one of another id of its "
                                      "frequency bin, in different windows (count)",
                    "same_id_mean": "mean over ids of the id's mean weighted Jaccard Σ_e min(r_e, s_e) / Σ_e "
                                    "max(r_e, s_e) over its pairs (0 … 1)",
                    "baseline_mean": "mean over ids of the mean weighted Jaccard of its baseline pairs (0 … 1)",
                    "difference_mean": "mean over ids of (same id − baseline) (weighted Jaccard units)",
                    "difference_sem": "standard error of that mean: sd over ids / √ids (weighted Jaccard units)"},
           integers=frozenset({"layer", "ids", "pairs_same", "pairs_baseline"})),
    Output("stability_tokens.csv", "per MoE layer and token id seen ≥ --min_count times in ≥ 2 windows: its route "
           "consistency and baseline", CONSISTENCY, SCRIPT,
           columns={"layer": LAYER, "token_id": "the token's id", "token": "the token's text (tokenizer.decode)",
                    "count": "counted occurrences of the id in the data (count)",
                    "sampled": "occurrences kept in the seeded sample, at most --sample (count)",
                    "windows": "distinct windows among the sampled occurrences (count)",
                    "frequency_bin": "⌊log2 count⌋ of its frequency bin (single-id bins merged downwards)",
                    "pairs": "pairs of its sampled occurrences in different windows compared (count)",
                    "consistency": "mean weighted Jaccard of those pairs' routes (0 … 1)",
                    "baseline_pairs": "baseline pairs drawn for it (count; 0 when its bin holds no other id)",
                    "baseline": "mean weighted Jaccard of its baseline pairs (0 … 1; empty without pairs)",
                    "difference": "consistency − baseline (weighted Jaccard units; empty without a baseline)"},
           integers=frozenset({"layer", "token_id", "count", "sampled", "windows", "frequency_bin", "pairs",
                               "baseline_pairs"})),
    Output("figures/stability_by_layer.{ext}", "share of tokens whose top-k set / top-1 expert changed and the mean "
           "|Δw| against the layer, a line per comparison (log scale, exact zeros hollow)", ANCHOR, SCRIPT),
    Output("figures/stability_margin.{ext}", "share of tokens whose top-k set changed against the reference's "
           "k-th minus (k+1)-th router logit gap, and the tokens per gap bin, a line per comparison (layers pooled)",
           NEAR_TIES, SCRIPT),
    Output("figures/stability_consistency.{ext}", "same-id vs baseline weighted Jaccard by layer (± s.e.m.) and their "
           "distributions over token ids", CONSISTENCY, SCRIPT),
    Output("figures/stability_consistency_tokens.{ext}", "each token id's consistency against its frequency at up to "
           "four layers, with the baseline per frequency bin and the most and least consistent ids named",
           CONSISTENCY, SCRIPT),
)
# fmt: on
