"""What the routing scripts write: router_decisive.py, router_stats.py, router_metrics.py and profiles.py, one
`Output` per file under a heading per script (assembled into `common.run.outputs.REGISTRY`). A new routing
script adds its files here."""

from __future__ import annotations

from common.figures.outputs.entry import (
    BIN_COLUMNS,
    DOMAIN,
    EXPERT,
    HIST_DTYPE,
    LAYER,
    Output,
    summary_columns,
)

DECISIVENESS_METRIC = ("which per-token quantity: entropy, topk_entropy (nats); entropy_normalized, "
                       "topk_entropy_normalized, top1_prob, top1_top2_margin, topk_mass (fractions)")
DECISIVENESS_UNIT = "the metric's unit: nats for entropy and topk_entropy, fraction otherwise"
DISTRIBUTION_QUANTITY = ("which quantity: logit (raw router logits), softmax (p over all experts), "
                         "topk_renormalized (p̃ of the chosen experts), weight (the weights the experts receive)")
DISTRIBUTION_UNIT = "the quantity's unit: logits, fractions for softmax and topk_renormalized, the model's weight scale for weight"
RANK = "rank of the value among the token's chosen experts, 1 = largest; 'all' for logit and softmax (unranked)"

PROFILE_KEYS = {
    "layer": "decoder-layer index of the MoE layer",
    "expert": "expert index",
    "model": "model id",
    "tokens": "counted tokens N (count)",
    "selected_topk": "tokens that chose this expert, n_e (count)",
    "frequency_topk": "n_e / N (fraction)",
    "frequency_top1": "share of tokens whose largest-weight expert is this one (fraction)",
    "uniform_topk": "uniform baseline k / E (fraction)",
    "uniform_top1": "uniform baseline 1 / E (fraction)",
    "weight_when_selected": "count, mean, std and quantiles q<level> of the routing weight over the tokens that chose it",
    "domains": "per domain: tokens_routed (count), share_of_expert and share_of_domain (fractions)",
    "top_tokens_by_count": "ids it received most often: token_id, token, count (every token list: bytes, hex, for a "
                           "token that decodes to '�', a fragment of a UTF-8 character)",
    "top_tokens_by_lift": "ids most over-represented among its tokens, ties by count: token_id, token, lift, count "
                          "(routed here), occurrences (in all counted tokens)",
    "lift_min_count": "--min_count: the occurrences a token needs to be ranked by lift (count)",
    "lift_ceiling": "the largest possible lift, N / n_e = 1 / frequency_topk, reached by a token whose every "
                    "occurrence is routed here (null if never chosen)",
    "lift_at_ceiling": "tokens with at least lift_min_count occurrences that reach lift_ceiling (count)",
    "top_next_tokens": "ids that most often follow its tokens: token_id, token, count",
    "top_contexts": "highest w·‖E_e(x)‖ positions: score, weight, domain, token, before, after (±8 tokens)",
    "promoted_tokens": "ids with the largest logits of its mean output through final norm + unembedding: token_id, token, logit",
    "suppressed_tokens": "ids with the smallest such logits: token_id, token, logit",
    "coactivated_experts": "partners in the same layer: expert, count, p_given_this = C_ej / n_e",
    "predecessors": "experts of the previous MoE layer: layer, expert, probability P(e' chosen there | this chosen)",
    "successors": "experts of the next MoE layer: layer, expert, probability P(e' chosen there | this chosen)",
}

DECISIVE = ("router_decisive",)
STATS = ("router_stats",)
METRICS = ("router_metrics",)
PROFILES = ("profiles",)

# fmt: off
OUTPUTS: tuple[Output, ...] = (
    # ------------------------------------------------------------------------------------ router_decisive.py
    Output("entropy_summary.csv", "router decisiveness per (metric, layer, domain): count, mean, std, extremes, "
           "quantiles", "entropy-and-decisiveness", DECISIVE,
           columns={"metric": DECISIVENESS_METRIC, "layer": LAYER, "domain": DOMAIN,
                    **summary_columns(DECISIVENESS_UNIT, "tokens summarised (count)")},
           integers=frozenset({"layer", "count", "below", "above", "nonfinite"})),
    Output("entropy_histograms.csv", "histogram of each decisiveness metric per (layer, domain), one row per bin",
           "summaries-and-histograms", DECISIVE,
           columns={"metric": DECISIVENESS_METRIC, "layer": LAYER, "domain": DOMAIN, **BIN_COLUMNS},
           integers=frozenset({"layer", "bin", "count"})),
    Output("entropy_normalized_hist.npy", "histogram of H / ln E (the violin figure's data)", "entropy-and-decisiveness",
           DECISIVE, axes="[layer, domain (+ 'all' last), bin]", dtype=HIST_DTYPE),
    Output("entropy_normalized_hist_edges.npy", "bin edges of entropy_normalized_hist.npy (0 … 1)",
           "summaries-and-histograms", DECISIVE, axes="[edge] (bins + 1 values)", dtype="float64, fraction"),
    Output("figures/entropy_violin.{ext}", "H / ln E per layer as violins from its histogram, all domains pooled "
           "(line = median)", "entropy-and-decisiveness", DECISIVE),
    Output("figures/decisiveness_by_layer.{ext}", "mean of each normalised decisiveness metric per layer and domain",
           "entropy-and-decisiveness", DECISIVE),

    # ------------------------------------------------------------------------------------ router_stats.py
    Output("distribution_summary.csv", "router output distributions per (quantity, layer, domain, rank): count, "
           "mean, std, extremes, quantiles", "router-output-distributions", STATS,
           columns={"quantity": DISTRIBUTION_QUANTITY, "layer": LAYER, "domain": DOMAIN, "rank": RANK,
                    **summary_columns(DISTRIBUTION_UNIT, "values summarised (count): tokens × experts for logit "
                                       "and softmax, tokens for each rank otherwise")},
           integers=frozenset({"layer", "count", "below", "above", "nonfinite"})),
    Output("distribution_histograms.csv", "histogram of each router quantity per (layer, domain, rank), one row per bin",
           "router-output-distributions", STATS,
           columns={"quantity": DISTRIBUTION_QUANTITY, "layer": LAYER, "domain": DOMAIN, "rank": RANK, **BIN_COLUMNS},
           integers=frozenset({"layer", "bin", "count"})),
    Output("logit_hist.npy", "histogram of the raw router logits z", "router-output-distributions", STATS,
           axes="[layer, domain (+ 'all' last), bin]", dtype=HIST_DTYPE),
    Output("softmax_hist.npy", "histogram of p = softmax(z) over all experts", "router-output-distributions", STATS,
           axes="[layer, domain (+ 'all' last), bin]", dtype=HIST_DTYPE),
    Output("topk_renormalized_hist.npy", "histogram of the renormalised top-k probabilities p̃ per rank",
           "router-output-distributions", STATS, axes="[layer, domain (+ 'all' last), rank (1 = largest), bin]",
           dtype=HIST_DTYPE),
    Output("weight_hist.npy", "histogram of the weights the experts receive, per rank", "router-output-distributions",
           STATS, axes="[layer, domain (+ 'all' last), rank (1 = largest), bin]", dtype=HIST_DTYPE),
    Output("logit_edges.npy", "bin edges of logit_hist.npy (range set from the data)",
           "summaries-and-histograms", STATS, axes="[edge] (bins + 1 values)", dtype="float64, logits"),
    Output("softmax_edges.npy", "bin edges of softmax_hist.npy (0 … 1)", "summaries-and-histograms", STATS,
           axes="[edge] (bins + 1 values)", dtype="float64, fraction"),
    Output("topk_renormalized_edges.npy", "bin edges of topk_renormalized_hist.npy (0 … 1)", "summaries-and-histograms",
           STATS, axes="[edge] (bins + 1 values)", dtype="float64, fraction"),
    Output("weight_edges.npy", "bin edges of weight_hist.npy (range set from the data)",
           "summaries-and-histograms", STATS, axes="[edge] (bins + 1 values)", dtype="float64, the model's weight scale"),
    Output("figures/distributions_layer{L}.{ext}", "densities of z, p, p̃ and w for one layer, all domains pooled "
           "(one line per rank)", "router-output-distributions", STATS),

    # ------------------------------------------------------------------------------------ router_metrics.py
    Output("frequency.csv", "selection frequency per (layer, domain, expert), top-k and top-1, with uniform baselines; "
           "the domain rows are the domain specialization", "selection-frequency", METRICS,
           columns={"layer": LAYER, "domain": DOMAIN, "expert": EXPERT,
                    "count_topk": "tokens of the domain with the expert among their chosen experts, N_{D,e} (count)",
                    "freq_topk": "count_topk / tokens: selection frequency, or domain specialization spec(e, D) (fraction)",
                    "count_top1": "tokens of the domain whose largest-weight expert it is (count)",
                    "freq_top1": "count_top1 / tokens (fraction)",
                    "uniform_topk": "uniform baseline k / E (fraction)",
                    "uniform_top1": "uniform baseline 1 / E (fraction)",
                    "tokens": "counted tokens of the domain, N_D (count)"},
           integers=frozenset({"layer", "expert", "count_topk", "count_top1", "tokens"})),
    Output("counts_topk.npy", "top-k selection counts N_{D,e}", "selection-frequency", METRICS,
           axes="[layer, domain (no 'all'), expert]", dtype="float64, whole-number counts"),
    Output("counts_top1.npy", "top-1 selection counts (largest-weight expert)", "selection-frequency", METRICS,
           axes="[layer, domain (no 'all'), expert]", dtype="float64, whole-number counts"),
    Output("expert_specialization.csv", "per expert: Jensen-Shannon divergence of its domain mix from the overall "
           "mix, and its top domain", "jsd-specialization", METRICS,
           columns={"layer": LAYER, "expert": EXPERT,
                    "assignments": "tokens that chose the expert, all domains, n_e (count)",
                    "jsd_bits": "JSD between the expert's domain distribution and the layer's domain mix (bits, 0 = no specialization)",
                    "top_domain": "domain with the most of the expert's assignments ('' if it got none)",
                    "top_domain_share": "share of the expert's assignments from top_domain (fraction)"},
           integers=frozenset({"layer", "expert", "assignments"})),
    Output("coverage50.csv", "per (layer, domain): the fewest experts that handle half of the domain's assignments",
           "coverage50", METRICS,
           columns={"layer": LAYER, "domain": DOMAIN,
                    "share": "target share of the domain's assignments (fraction, 0.5)",
                    "experts_needed": "fewest experts whose assignments reach the target share (count)",
                    "fraction_of_experts": "experts_needed / E (fraction)",
                    "share_handled": "share of the domain's assignments those experts handle (fraction, ≥ share)"},
           integers=frozenset({"layer", "experts_needed"})),
    Output("load_balance.csv", "per layer, all domains pooled: spread of the selection frequencies, dead experts and "
           "the switch auxiliary loss", "load-balance", METRICS,
           columns={"layer": LAYER, "experts": "routing choices E of the layer (count)",
                    "top_k": "experts per token k (count)", "tokens": "counted tokens N (count)",
                    "cv": "coefficient of variation std(f)/mean(f) of the top-k frequencies (dimensionless, 0 = even)",
                    "max_over_mean": "max_e f_e / mean(f) (ratio, 1 = even)",
                    "dead_experts": "experts never chosen (count)",
                    "min_over_mean": "min_e f_e / mean(f) (ratio, 1 = even)",
                    "aux_loss": "switch auxiliary loss E · Σ_e f_e · P̄_e (dimensionless; k = perfectly even)"},
           integers=frozenset({"layer", "experts", "top_k", "tokens", "dead_experts"})),
    Output("coactivation.csv", "per layer and ordered expert pair i ≠ j: co-activation counts, conditional "
           "probability and Jaccard index with its independence baseline", "co-activation", METRICS,
           columns={"layer": LAYER, "i": EXPERT, "j": "the other expert's index",
                    "count": "tokens with both i and j among their chosen experts, C_ij (count)",
                    "p_j_given_i": "C_ij / n_i: chance that j is chosen when i is (fraction)",
                    "jaccard": "C_ij / (n_i + n_j − C_ij) (fraction)",
                    "jaccard_independent": "Jaccard index expected if i and j were chosen independently, "
                                           "p_i p_j / (p_i + p_j − p_i p_j) with p_i = n_i / N (fraction)"},
           integers=frozenset({"layer", "i", "j", "count"})),
    Output("coactivation_counts.npy", "co-activation counts C_ij (symmetric, zero diagonal)", "co-activation", METRICS,
           axes="[layer, expert i, expert j]", dtype="float64, whole-number counts"),
    Output("transitions.csv", "per pair of consecutive selected layers: how tokens move from each expert to each "
           "expert of the next layer", "cross-layer-transitions", METRICS,
           columns={"layer_from": "earlier layer a (decoder index)", "layer_to": "later layer b (decoder index)",
                    "expert_from": "expert e at layer a", "expert_to": "expert e' at layer b",
                    "count": "tokens with e chosen at a and e' chosen at b (count)",
                    "probability": "P(e' chosen at b | e chosen at a) = count / n_e(a) (fraction; NaN if e never chosen)"},
           integers=frozenset({"layer_from", "layer_to", "expert_from", "expert_to", "count"})),
    Output("transition_probabilities.npy", "P(e' chosen at the next selected layer | e chosen at this one)",
           "cross-layer-transitions", METRICS,
           axes="[layer pair (consecutive selected layers), expert at the earlier layer, expert at the later layer]",
           dtype="float64, fraction (NaN rows for experts never chosen)"),
    Output("indicator_correlation.npy", "Pearson correlation of the binary top-k indicators of every (layer, expert)",
           "indicator-correlation", METRICS,
           axes="[layer·expert, layer·expert], index = layer position × E + expert",
           dtype="float64, Pearson r in −1 … 1 (NaN for indicators that never vary)"),
    Output("indicator_correlation_shuffled.npy", "the same correlation with tokens shuffled independently per layer "
           "within each batch (the control)", "indicator-correlation", METRICS,
           axes="[layer·expert, layer·expert], index = layer position × E + expert",
           dtype="float64, Pearson r in −1 … 1 (NaN for indicators that never vary)"),
    Output("indicator_correlation_summary.csv", "per pair of layers: mean |Pearson r| of the indicator correlation "
           "and of its shuffled control", "indicator-correlation", METRICS,
           columns={"layer_a": LAYER, "layer_b": "the other layer (decoder index); equal to layer_a for within-layer blocks",
                    "mean_abs_pearson": "mean |r| over the block of the two layers, diagonal left out when equal (dimensionless)",
                    "mean_abs_pearson_shuffled": "the same for the shuffled control (dimensionless)"},
           integers=frozenset({"layer_a", "layer_b"})),
    Output("token_overlap.csv", "per layer and ordered expert pair: overlap of the token ids the two experts receive",
           "token-overlap", METRICS,
           columns={"layer": LAYER, "expert_i": EXPERT, "expert_j": "the other expert's index",
                    "jaccard": "Jaccard index of the id sets (ids seen ≥ --min_count times by each) (fraction)",
                    "weighted_overlap": "Σ_t min(c_i(t), c_j(t)) / Σ_t max(c_i(t), c_j(t)) over token ids (fraction)"},
           integers=frozenset({"layer", "expert_i", "expert_j"})),
    Output("token_overlap.npy", "token-id overlap matrices", "token-overlap", METRICS,
           axes="[layer, measure (0 = jaccard, 1 = weighted_overlap), expert i, expert j]",
           dtype="float64, fraction (NaN where both experts received nothing)"),
    Output("token_specialization.csv", "per layer: how consistently each token id goes to one expert (current, next "
           "and predicted token)", "token-id-specialization", METRICS,
           columns={"layer": LAYER,
                    "token": "which id: current (the routed token), next (the following token), predicted (the model's argmax)",
                    "ids": "token ids seen ≥ --min_count times, over which the means are taken (count)",
                    "unweighted": "mean over ids of max_e N_{t,e} / n_t (fraction; 1 = always the same expert)",
                    "weighted": "the same mean weighted by each id's occurrences n_t (fraction)",
                    "uniform": "value under even routing, k / E (fraction)"},
           integers=frozenset({"layer", "ids"})),
    Output("saturation.csv", "router saturation: agreement of each --revisions checkpoint's routing with the final one "
           "on identical tokens", "router-saturation", METRICS,
           columns={"position": "order of the checkpoint in --revisions (0 = first)",
                    "revision": "the checkpoint compared (hub revision or folder)",
                    "final": "the reference checkpoint (last of --revisions, or --model)",
                    "layer": LAYER,
                    "topk_overlap": "mean |K_r ∩ K_final| / k over the tokens (fraction)",
                    "top1_agreement": "share of tokens with the same largest-weight expert (fraction)",
                    "tokens": "tokens compared (count)"},
           integers=frozenset({"position", "layer", "tokens"})),
    Output("figures/frequency_layer{L}.{ext}", "top-k selection frequency per expert (%) with the uniform line k/E, "
           "one panel per domain", "selection-frequency", METRICS),
    Output("figures/domain_heatmap_layer{L}.{ext}", "domain × expert share of each domain's tokens routed to each "
           "expert (%)", "domain-specialization", METRICS),
    Output("figures/coactivation_layer{L}.{ext}", "co-activation P(j chosen | i chosen) as an expert × expert heatmap",
           "co-activation", METRICS),
    Output("figures/transitions_{A}_{B}.{ext}", "P(e' chosen at layer B | e chosen at layer A) as a heatmap",
           "cross-layer-transitions", METRICS),
    Output("figures/indicator_correlation.{ext}", "indicator correlation matrix beside its shuffled control",
           "indicator-correlation", METRICS),
    Output("figures/saturation.{ext}", "% of the top-k shared with the final checkpoint, per checkpoint and layer",
           "router-saturation", METRICS),
    Output("figures/expert_specialization.{ext}", "each expert's JSD (bits) from the overall domain mix, per layer, "
           "coloured by its top domain", "jsd-specialization", METRICS),
    Output("figures/coverage50.{ext}", "experts needed for half of each domain's assignments, per layer and domain, "
           "against even routing", "coverage50", METRICS),
    Output("figures/load_balance.{ext}", "per layer: CV and max/mean of the selection frequencies, dead experts and "
           "the switch auxiliary loss", "load-balance", METRICS),
    Output("figures/token_overlap_layer{L}.{ext}", "expert × expert token-id overlap, Jaccard and weighted",
           "token-overlap", METRICS),
    Output("figures/token_specialization.{ext}", "token-id specialization per layer (current, next, predicted "
           "token; unweighted and weighted) against k / E", "token-id-specialization", METRICS),

    # ------------------------------------------------------------------------------------ profiles.py
    Output("profile_layer{L}_expert{E}.json", "everything about one expert at one layer", "expert-profile", PROFILES,
           keys=PROFILE_KEYS),
    Output("figures/profile_layer{L}_expert{E}.{ext}", "one expert's profile on a page: domain mix, weight when "
           "chosen, top tokens by count and by lift (with the lift ceiling and the minimum count), next tokens, "
           "promoted and suppressed tokens, top contexts", "expert-profile", PROFILES),
    Output("profiles_layer{L}.csv", "one summary row per profiled expert of the layer", "expert-profile", PROFILES,
           columns={"layer": LAYER, "expert": EXPERT,
                    "frequency_topk": "share of tokens with the expert among their chosen experts (fraction)",
                    "frequency_top1": "share of tokens whose largest-weight expert it is (fraction)",
                    "mean_weight": "mean routing weight when chosen (the model's weight scale)",
                    "top_domain": "domain with the most of the expert's assignments",
                    "top_domain_share": "share of the expert's assignments from top_domain (fraction)",
                    "top_tokens": "its five most frequent input tokens (Python reprs, space-separated; a "
                                  "fragment of a UTF-8 character as its bytes, b'\\xe2\\x80')",
                    "promoted": "the five tokens its mean output promotes most (as top_tokens)"},
           integers=frozenset({"layer", "expert"})),

)
# fmt: on
