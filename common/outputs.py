"""Every file a script writes, described once: what it holds, where its metric is defined, its columns or axes.

`REGISTRY` lists each output by file-name pattern (relative to the run folder; `{L}` a layer, `{E}` an expert,
`{A}`/`{B}` two layers, `{ext}` pdf or png). An entry gives a one-line description, the anchor of its definition
in docs/METRICS.md, and:

- for CSV files every column (name -> meaning with unit) and the columns that hold whole numbers (`integers`:
  `Run.save_table` writes those as integers);
- for npy files the axis order and dtype;
- for JSON files the top-level keys.

`Run.finish` turns this into the README.md of every run folder; a file or CSV column that no entry describes is
listed there as undocumented, and the tests fail on it. A new script adds its files here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

METRICS_DOC = Path(__file__).resolve().parent.parent / "docs" / "METRICS.md"
METRICS_PATH = "docs/METRICS.md"  # as named in READMEs and docstrings, relative to the repository

# What a {placeholder} of a pattern matches; any other name matches a (possibly negative) integer.
_PLACEHOLDERS = {"ext": r"(?:pdf|png)", "level": r"[0-9][0-9.e+-]*"}


def _regex(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", pattern)
    body = "".join(re.escape(p) if i % 2 == 0 else _PLACEHOLDERS.get(p, r"-?\d+") for i, p in enumerate(parts))
    return re.compile(body + r"\Z")


@dataclass(frozen=True)
class Output:
    pattern: str  # file name relative to the run folder, with {placeholders}
    description: str  # one line
    anchor: str | None  # section of docs/METRICS.md (None: run metadata)
    scripts: tuple[str, ...] = ()  # scripts that write it; () = every script
    columns: Mapping[str, str] = field(default_factory=dict)  # CSV: column (may hold {placeholders}) -> meaning
    integers: frozenset[str] = frozenset()  # CSV: columns whose values are whole numbers
    axes: str | None = None  # npy: axis order
    dtype: str | None = None  # npy: dtype and what the values are
    keys: Mapping[str, str] = field(default_factory=dict)  # JSON: top-level key -> meaning

    @cached_property
    def regex(self) -> re.Pattern[str]:
        return _regex(self.pattern)

    @cached_property
    def _column_regexes(self) -> list[tuple[re.Pattern[str], str]]:
        return [(_regex(name), text) for name, text in self.columns.items()]

    def matches(self, relative: str) -> bool:
        return self.regex.match(relative) is not None

    def column(self, name: str) -> str | None:
        """The description of a CSV column, or None if this entry does not describe it."""
        if name in self.columns:
            return self.columns[name]
        return next((text for regex, text in self._column_regexes if regex.match(name)), None)

    @property
    def link(self) -> str | None:
        return f"{METRICS_PATH}#{self.anchor}" if self.anchor else None


# ------------------------------------------------------------------------------------------ shared columns
LAYER = "decoder-layer index of the MoE layer (0-based, as in --layers)"
DOMAIN = "domain name from --data; 'all' pools the tokens of every domain"
EXPERT = "expert index within the layer (0-based)"
BIN_COLUMNS = {
    "bin": "histogram bin index (0-based)",
    "left": "left edge of the bin (the quantity's unit)",
    "right": "right edge of the bin (the quantity's unit)",
    "count": "values that fell in the bin (count; values outside the range are clamped into the first/last bin)",
}


def _summary_columns(unit: str, count: str) -> dict[str, str]:
    return {
        "count": count,
        "mean": f"exact mean ({unit})",
        "std": f"exact population standard deviation ({unit})",
        "min": f"exact minimum ({unit})",
        "max": f"exact maximum ({unit})",
        "q{level}": f"quantile at that level, e.g. q0.5 = median, estimated from the histogram ({unit})",
        "below": "values below the histogram range, counted in its first bin (count; 0 for bounded quantities)",
        "above": "values above the histogram range, counted in its last bin (count; 0 for bounded quantities)",
        "nonfinite": "NaN or infinite values, left out of every other column (count)",
    }


DECISIVENESS_METRIC = ("which per-token quantity: entropy, topk_entropy (nats); entropy_normalized, "
                       "topk_entropy_normalized, top1_prob, top1_top2_margin, topk_mass (fractions)")
DECISIVENESS_UNIT = "the metric's unit: nats for entropy and topk_entropy, fraction otherwise"
DISTRIBUTION_QUANTITY = ("which quantity: logit (raw router logits), softmax (p over all experts), "
                         "topk_renormalized (p̃ of the chosen experts), weight (the weights the experts receive)")
DISTRIBUTION_UNIT = "the quantity's unit: logits, fractions for softmax and topk_renormalized, the model's weight scale for weight"
RANK = "rank of the value among the token's chosen experts, 1 = largest; 'all' for logit and softmax (unranked)"
HIST_DTYPE = "float64, whole-number counts"

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
    "top_tokens_by_count": "ids it received most often: token_id, token, count",
    "top_tokens_by_lift": "ids most over-represented among its tokens: token_id, token, lift, count",
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
WEIGHTS = ("weights",)
LENS = ("logit_lens",)
SIM = ("sim",)
SIM_METHODS = ("cosine", "cka", "cka-debiased", "cka-rbf")  # sim.py --method; one npy and one figure each
SIM_EXPERT = "expert index within the layer (0-based), or 'shared' for the layer's shared experts"
INTERV = ("interv",)
CLUSTER = ("cluster",)
PROBING = ("probing",)

# fmt: off
REGISTRY: tuple[Output, ...] = (
    # ------------------------------------------------------------------------------------ every run
    Output("run.json", "the run's record: every flag, model id and revision, MoE layers found, package versions, "
           "git commit, seed, tokens counted per domain, wall time", "run-folder"),
    Output("README.md", "this file: what each file of the run folder holds", "run-folder"),

    # ------------------------------------------------------------------------------------ router_decisive.py
    Output("entropy_summary.csv", "router decisiveness per (metric, layer, domain): count, mean, std, extremes, "
           "quantiles", "entropy-and-decisiveness", DECISIVE,
           columns={"metric": DECISIVENESS_METRIC, "layer": LAYER, "domain": DOMAIN,
                    **_summary_columns(DECISIVENESS_UNIT, "tokens summarised (count)")},
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
                    **_summary_columns(DISTRIBUTION_UNIT, "values summarised (count): tokens × experts for logit "
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
           "chosen, top tokens by count and by lift, next tokens, promoted and suppressed tokens", "expert-profile",
           PROFILES),
    Output("profiles_layer{L}.csv", "one summary row per profiled expert of the layer", "expert-profile", PROFILES,
           columns={"layer": LAYER, "expert": EXPERT,
                    "frequency_topk": "share of tokens with the expert among their chosen experts (fraction)",
                    "frequency_top1": "share of tokens whose largest-weight expert it is (fraction)",
                    "mean_weight": "mean routing weight when chosen (the model's weight scale)",
                    "top_domain": "domain with the most of the expert's assignments",
                    "top_domain_share": "share of the expert's assignments from top_domain (fraction)",
                    "top_tokens": "its five most frequent input tokens (Python reprs, space-separated)",
                    "promoted": "the five tokens its mean output promotes most (Python reprs, space-separated)"},
           integers=frozenset({"layer", "expert"})),

    # ------------------------------------------------------------------------------------ weights.py
    Output("router_summary.csv", "per layer and for all selected routers stacked: rank, effective rank and "
           "spectrum summary of the router weight, within-layer router-row cosines", "router-singular-spectra-and-effective-rank",
           WEIGHTS,
           columns={"scope": "'layer' (one router) or 'stacked' (every selected layer's router stacked row-wise)",
                    "layer": f"{LAYER}; empty for the stacked row",
                    "rows": "router rows C, the routing choices (count; stacked: Σ C)",
                    "hidden_size": "hidden size H (count)",
                    "rank": "numerical rank: σ_k > σ_1 · max(rows, H) · float64 eps (count)",
                    "effective_rank": "components with σ_k² / Σσ² > 0.01 (count)",
                    "participation_ratio": "(Σσ²)² / Σσ⁴ (dimensionless, 1 … rows)",
                    "top1_variance_share": "σ_1² / Σσ² (fraction)",
                    "mean_cosine": "mean router-row cosine over pairs a ≠ b (dimensionless; empty when stacked)",
                    "mean_abs_cosine": "mean |cosine| over pairs a ≠ b (dimensionless)",
                    "max_abs_cosine": "largest |cosine| over pairs a ≠ b (dimensionless)",
                    "abs_cosine_random": "E|cos| of two random directions in ℝ^H, the reference for the above (dimensionless)",
                    "row_norm_mean": "mean ‖r_c‖ (the weights' units)",
                    "has_bias": "whether the router adds a bias (not analysed)",
                    "router_class": "class of the router module",
                    "parameter": "name of the router weight inside the router module"},
           integers=frozenset({"layer", "rows", "hidden_size", "rank", "effective_rank"})),
    Output("router_cosine.csv", "router-row cosine for each unordered pair of rows of each layer",
           "router-row-cosine", WEIGHTS,
           columns={"layer": LAYER, "expert_a": "router row (routing choice) a, 0-based",
                    "expert_b": "router row b > a", "cosine": "cos(r_a, r_b) (dimensionless, −1 … 1)"},
           integers=frozenset({"layer", "expert_a", "expert_b"})),
    Output("router_cosine.npy", "router-row cosine matrices (full, diagonal 1)", "router-row-cosine", WEIGHTS,
           axes="[layer, router row a, router row b]", dtype="float64, cosine (NaN pads layers with fewer rows)"),
    Output("router_spectra.csv", "singular values of each router weight and of all routers stacked, with their "
           "variance shares", "router-singular-spectra-and-effective-rank", WEIGHTS,
           columns={"scope": "'layer' or 'stacked'", "layer": f"{LAYER}; empty for the stacked rows",
                    "component": "k, 1 = largest singular value", "singular_value": "σ_k (the weights' units)",
                    "variance_share": "σ_k² / Σσ² (fraction)", "cumulative_share": "Σ_{j≤k} σ_j² / Σσ² (fraction)",
                    "above_threshold": "variance_share > 0.01: counted in the effective rank"},
           integers=frozenset({"layer", "component"})),
    Output("router_singular_values.npy", "singular values σ_k of each layer's router weight, descending",
           "router-singular-spectra-and-effective-rank", WEIGHTS, axes="[layer, component]",
           dtype="float64, the weights' units (NaN pads layers with fewer components)"),
    Output("stacked_singular_values.npy", "singular values of all selected routers stacked row-wise, descending",
           "router-singular-spectra-and-effective-rank", WEIGHTS, axes="[component]", dtype="float64, the weights' units"),
    Output("cross_layer.csv", "cross-layer router similarity for every ordered pair of selected layers, with controls",
           "cross-layer-router-similarity", WEIGHTS,
           columns={"layer_a": LAYER, "layer_b": "the other layer (decoder index); equal to layer_a on the diagonal",
                    "mean_cosine": "mean cos(r_a, r_b) over all row pairs (a ≠ b when the layers are equal) (dimensionless)",
                    "mean_abs_cosine": "the same mean of |cos| (dimensionless)",
                    "best_match_abs_cosine": "½ (mean over a of max_b |cos| + mean over b of max_a |cos|) (dimensionless)",
                    "alignment": "mean_k cos θ_k over the principal angles of the two row spaces (fraction)",
                    "abs_cosine_random": "E|cos| of two random directions in ℝ^H (dimensionless)",
                    "rank_a": "numerical rank of layer_a's router (count)", "rank_b": "numerical rank of layer_b's router (count)",
                    "alignment_random_mean": "alignment of random subspaces of the same ranks, mean of 32 draws (fraction)",
                    "alignment_random_std": "its standard deviation over the draws (fraction)",
                    "alignment_z": "(alignment − random mean) / random std (dimensionless; empty on the diagonal)"},
           integers=frozenset({"layer_a", "layer_b", "rank_a", "rank_b"})),
    Output("cross_layer.npy", "cross-layer router similarity matrices", "cross-layer-router-similarity", WEIGHTS,
           axes="[metric (0 mean_cosine, 1 mean_abs_cosine, 2 best_match_abs_cosine, 3 alignment), layer_a, layer_b]",
           dtype="float64, dimensionless"),
    Output("principal_angles.csv", "every principal angle between the row spaces of two selected layers' routers",
           "cross-layer-router-similarity", WEIGHTS,
           columns={"layer_a": LAYER, "layer_b": "the later-listed layer of the pair (decoder index)",
                    "component": "k, 1 = smallest angle", "cosine": "cos θ_k (fraction)", "angle_deg": "θ_k (degrees)"},
           integers=frozenset({"layer_a", "layer_b", "component"})),
    Output("expert_weight_cosine.csv", "cosine of flattened expert weights for each unordered expert pair, per layer "
           "and matrix", "expert-weight-cosine", WEIGHTS,
           columns={"layer": LAYER, "matrix": "which weight: gate, up or down", "expert_a": EXPERT,
                    "expert_b": "the other expert, b > a",
                    "cosine": "cos(vec W_a, vec W_b) (dimensionless; empty for the gate of ungated experts)"},
           integers=frozenset({"layer", "expert_a", "expert_b"})),
    Output("expert_weight_cosine.npy", "expert weight cosine matrices (full, diagonal 1)", "expert-weight-cosine",
           WEIGHTS, axes="[layer, matrix (0 gate, 1 up, 2 down), expert a, expert b]",
           dtype="float64, cosine (NaN for ungated experts' gate and pads)"),
    Output("expert_weight_summary.csv", "per layer and matrix: mean and largest expert weight cosine over pairs",
           "expert-weight-cosine", WEIGHTS,
           columns={"layer": LAYER, "matrix": "gate, up or down", "experts": "routed experts E (count)",
                    "mean_cosine": "mean cosine over pairs a ≠ b (dimensionless)",
                    "mean_abs_cosine": "mean |cosine| over pairs a ≠ b (dimensionless)",
                    "max_cosine": "largest cosine over pairs a ≠ b (dimensionless)",
                    "max_pair_a": "expert a of that pair", "max_pair_b": "expert b of that pair",
                    "abs_cosine_random": "E|cos| of two random vectors with as many entries (dimensionless)"},
           integers=frozenset({"layer", "experts", "max_pair_a", "max_pair_b"})),
    Output("router_expert_alignment.csv", "per expert: response of its gate/up weights to its own router row, and "
           "the share of that row in their row spaces, against random directions", "router-expert-alignment", WEIGHTS,
           columns={"layer": LAYER, "expert": EXPERT,
                    "metric": "gate_norm, up_norm (‖W r̂_e‖, the weights' units) or gate_rowspace_share, "
                              "up_rowspace_share (‖P_W r_e‖² / ‖r_e‖², fraction)",
                    "value": "the metric for the expert's own router row r_e",
                    "control_mean": "mean over --num_random random unit directions",
                    "control_std": "sample standard deviation over the random directions",
                    "control_z": "(value − control_mean) / control_std (dimensionless; empty when the std is 0)",
                    "control_percentile": "share of random directions below value, ties counted half (percent)",
                    "other_rows_mean": "mean over the other experts' router rows r̂_e', e' ≠ e",
                    "expected": "exact value over random directions: rank/H for shares, √(‖W‖²_F / H) (root mean square) for norms",
                    "rank": "numerical rank of W (count; empty for ungated gates)", "hidden_size": "H (count)"},
           integers=frozenset({"layer", "expert", "rank", "hidden_size"})),
    Output("router_expert_alignment.npy", "router-expert alignment with its controls", "router-expert-alignment",
           WEIGHTS, axes="[layer, expert, metric (0 gate_norm, 1 up_norm, 2 gate_rowspace_share, 3 up_rowspace_share), "
           "stat (0 value, 1 control_mean, 2 control_std, 3 control_z, 4 control_percentile, 5 other_rows_mean, 6 expected)]",
           dtype="float64 (NaN for ungated gates and pads)"),
    Output("figures/router_cosine.{ext}", "router-row cosine heatmap per layer (diagonal grey)", "router-row-cosine",
           WEIGHTS),
    Output("figures/cross_layer.{ext}", "layer × layer maps of mean |cos|, best-match |cos| and row-space alignment of "
           "the routers, with their random references", "cross-layer-router-similarity", WEIGHTS),
    Output("figures/router_spectra.{ext}", "variance share σ_k²/Σσ² of each router and all stacked (log scale, 1% "
           "line), and effective rank per layer", "router-singular-spectra-and-effective-rank", WEIGHTS),
    *(Output(f"figures/expert_weight_cosine_{m}.{{ext}}", f"cosine of flattened W_{m} per expert pair, one heatmap per "
             "layer (diagonal grey)", "expert-weight-cosine", WEIGHTS) for m in ("gate", "up", "down")),
    Output("figures/router_expert_alignment.{ext}", "each expert's alignment z-scores against random directions per "
           "layer, with the other experts' rows", "router-expert-alignment", WEIGHTS),
    # ------------------------------------------------------------------------------------ logit_lens.py
    Output("lens_grid.csv", "logit lens of one prompt position: every cell's top tokens through the final norm and "
           "unembedding, one row per (layer, column, rank)", "logit-lens-over-experts", LENS,
           columns={"layer": "decoder-layer index of the row (MoE layers; every decoder layer of a dense model)",
                    "column": "vector decoded: layer_output (r, the residual after the layer), before_moe (b = r − α·m, "
                              "the residual at the MoE input), top<k′> (b + α·Σ of the k′ highest-weighted experts' "
                              "weighted outputs), all_shared (b + α·(all k + shared experts) = r), alone<j> (b + α·the "
                              "j-th expert's weighted output alone)",
                    "column_index": "order of the column in the grid (0 = layer_output)",
                    "rank": "rank of the token in the cell's next-token distribution (1 = top-1)",
                    "token": "the token's text (tokenizer.decode of token_id)",
                    "token_id": "the token's id",
                    "probability": "softmax probability of the token for the decoded vector (fraction)",
                    "expert": "expert the column adds: for top<k′> the k′-th ranked, for alone<j> the j-th "
                              "(empty for the other columns)",
                    "weight": "that expert's routing weight as the model applies it (the model's weight scale; empty "
                              "for the other columns)",
                    "position": "prompt position lensed (0-based, the tokenizer's leading specials included); the "
                                "distribution is the prediction of the token after it"},
           integers=frozenset({"layer", "column_index", "rank", "token_id", "expert", "position"})),
    Output("figures/lens_grid.{ext}", "the lens grid (MoE Lens Figure 2): top-1 token per layer and column, colour = "
           "its probability, the expert a column adds and its weight in the corners", "logit-lens-over-experts", LENS),
    Output("perplexity.csv", "next-token perplexity per domain with every restricted MoE layer keeping only its k′ "
           "highest-weighted experts", "top-k-restriction", LENS,
           columns={"domain": DOMAIN,
                    "k_prime": "experts kept per token k′ (k′ = k: the unrestricted model)",
                    "renormalize": "whether the kept weights were rescaled to their original sum (--renormalize)",
                    "tokens": "next-token predictions averaged: counted tokens with a predecessor in their window (count)",
                    "nll": "mean next-token negative log-likelihood (nats per token)",
                    "ppl": "perplexity exp(nll)",
                    "normalized_log_ppl": "log PPL(k′) / log PPL(k) = nll / nll at k′ = k (ratio, 1 at k′ = k)"},
           integers=frozenset({"k_prime", "tokens"})),
    Output("cosine_summary.csv", "cosine between the residual after each decoder layer in the top-k′ run and in the "
           "full run, per (k′, layer, domain), at every counted token", "top-k-restriction", LENS,
           columns={"k_prime": "experts kept per token in the restricted run (k′ < k)",
                    "layer": "decoder-layer index whose output residual is compared (every layer, dense ones included)",
                    "restricted": "whether the layer is one of the restricted MoE layers",
                    "domain": DOMAIN,
                    **_summary_columns("cosine, −1 … 1", "counted tokens compared (count)")},
           integers=frozenset({"k_prime", "layer", "count", "below", "above", "nonfinite"})),
    Output("cosine_hist.npy", "histogram of the per-token cosines of cosine_summary.csv", "top-k-restriction", LENS,
           axes="[k′ (ascending, as in cosine_summary.csv), decoder layer, domain (+ 'all' last), bin]", dtype=HIST_DTYPE),
    Output("cosine_hist_edges.npy", "bin edges of cosine_hist.npy (−1 … 1, --bins bins)", "summaries-and-histograms",
           LENS, axes="[edge] (bins + 1 values)", dtype="float64, cosine"),
    Output("figures/perplexity_vs_k.{ext}", "normalised log-perplexity (MoE Lens Figure 3 left) and perplexity "
           "against k′ per domain", "top-k-restriction", LENS),
    Output("figures/cosine_by_layer.{ext}", "mean cosine of the top-1 run and the full run per decoder layer and "
           "domain with the pooled 5–95% band (MoE Lens Figure 3 right); every k′ pooled beside it when k > 2",
           "top-k-restriction", LENS),
    # ------------------------------------------------------------------------------------ interv.py
    Output("prompt_tokens.csv", "every token of every prompt (prompt mode): which positions the edit targets and the "
           "expert's weight there before the edit", "intervention", INTERV,
           columns={"prompt": "prompt number (0-based, order of --prompt / the lines of --prompts)",
                    "position": "token position in the tokenised prompt (0-based, the tokenizer's leading specials included)",
                    "token_id": "the token's id", "token": "the token's text (tokenizer.decode of token_id)",
                    "target": "whether --target_idx edits this position",
                    "selected_before": "whether the expert is among the token's chosen experts (w_e ≠ 0) without the edit",
                    "weight_before": "w_e at this token without the edit (the model's weight scale; 0 if not chosen)"},
           integers=frozenset({"prompt", "position", "token_id"})),
    Output("intervention_sweep.csv", "one row per prompt and value (prompt mode): the change of the next-token "
           "distribution at the last position and of the continuation", "intervention", INTERV,
           columns={"prompt": "prompt number (0-based)", "layer": LAYER, "expert": EXPERT,
                    "mode": "scale (w_e *= value), set (w_e = value), force (route to e with weight value) or logit (z_e += value)",
                    "value": "the edit's value (empty: --mode force without --value, the replaced expert's weight)",
                    "renormalize": "whether edited tokens' weights were rescaled to their original sum",
                    "targets": "edited positions, space-separated, or 'all'",
                    "n_targets": "number of edited positions (count)",
                    "selected_before": "targets where the expert is chosen (w_e ≠ 0) without the edit (count)",
                    "selected_after": "targets where it is chosen with w_e ≠ 0 under the edit (count)",
                    "weight_before_mean": "mean w_e over the targets without the edit (0 where not chosen)",
                    "weight_after_mean": "mean w_e over the targets under the edit (0 where not chosen)",
                    "kl_nats": "KL(before ‖ after) of the next-token distributions at the last position (nats)",
                    "entropy_before": "entropy of the next-token distribution without the edit (nats)",
                    "entropy_after": "entropy of the next-token distribution under the edit (nats)",
                    "top1_before": "most probable next token without the edit (text)",
                    "top1_prob_before": "its probability (fraction)",
                    "top1_after": "most probable next token under the edit (text)",
                    "top1_prob_after": "its probability (fraction)",
                    "target_token": "--target_token (empty if not given)",
                    "target_prob_before": "probability of --target_token as the next token without the edit (fraction)",
                    "target_prob_after": "its probability under the edit (fraction)",
                    "continuation_before": "--max_new_tokens generated without the edit (text; greedy or sampled)",
                    "continuation_after": "the same generated under the edit (same seed when sampled)",
                    "continuation_changed": "whether the generated token ids differ"},
           integers=frozenset({"prompt", "layer", "expert", "n_targets", "selected_before", "selected_after"})),
    Output("next_token_top.csv", "the --top most probable next tokens at each prompt's last position, before the edit "
           "and under each value (prompt mode)", "intervention", INTERV,
           columns={"prompt": "prompt number (0-based)",
                    "value": "the edit's value (empty for the 'before' rows and for --mode force without --value)",
                    "which": "'before' (no edit) or 'after' (under the edit with this value)",
                    "rank": "rank in the distribution (1 = most probable)", "token_id": "the token's id",
                    "token": "the token's text", "prob": "its next-token probability (fraction)"},
           integers=frozenset({"prompt", "rank", "token_id"})),
    Output("sweep_token_probs.csv", "the next tokens a prompt's figure follows (the target token, the top tokens "
           "before and after): probability before and under each value", "intervention", INTERV,
           columns={"prompt": "prompt number (0-based)",
                    "value": "the edit's value (empty: --mode force without --value)",
                    "token_id": "the token's id", "token": "the token's text",
                    "prob_before": "its next-token probability without the edit (fraction)",
                    "prob_after": "its next-token probability under the edit (fraction)"},
           integers=frozenset({"prompt", "token_id"})),
    Output("interventions.json", "everything of the prompt mode, nested per prompt", "intervention", INTERV,
           keys={"layer": "decoder-layer index edited", "expert": "expert edited", "mode": "scale, set, force or logit",
                 "values": "the values, in order (null: force with the replaced expert's weight)",
                 "renormalize": "whether edited weights were renormalised",
                 "target_token": "--target_token", "target_token_id": "its id",
                 "generation": "sample, temperature, seed, eos_id, max_new_tokens",
                 "prompts": "per prompt: prompt, token_ids, targets (null = all), tokens (as prompt_tokens.csv), "
                            "before {next_token {top, entropy, target_prob}, continuation, continuation_ids}, after "
                            "[per value: value, kl_nats, selected_after, weight_after_mean, next_token, continuation, "
                            "continuation_ids]"}),
    Output("figures/sweep_prompt{N}.{ext}", "one prompt: the followed next tokens' probability against the value "
           "(dotted: before; log x when the values span decades) beside KL(before ‖ after); one value: before / "
           "after bars", "intervention", INTERV),
    Output("figures/kl_by_value.{ext}", "several prompts: KL(before ‖ after) against the value, one line per prompt "
           "and their mean", "intervention", INTERV),
    Output("importance_layer{L}.csv", "expert importance (dataset mode): the change of the mean next-token NLL on each "
           "domain when one expert is ablated (w_e = 0 at every token), beside its selection frequency",
           "expert-importance", INTERV,
           columns={"layer": LAYER, "expert": "ablated expert (0-based; those of --experts)", "domain": DOMAIN,
                    "delta_nll": "ΔNLL = NLL with the expert ablated − NLL unedited, on the same predictions (nats per token)",
                    "nll_base": "mean next-token NLL of the unedited model (nats per token)",
                    "nll_ablated": "mean next-token NLL with the expert ablated (nats per token)",
                    "tokens": "next-token predictions averaged: counted tokens with a predecessor in their window (count)",
                    "freq_topk": "share of the domain's counted tokens routed to the expert (w ≠ 0) without the edit (fraction)",
                    "selected": "counted tokens routed to the expert without the edit (count)",
                    "freq_rank": "rank of freq_topk among all experts of the layer on the domain (1 = most selected)",
                    "delta_rank": "rank of delta_nll among the ablated experts on the domain (1 = costliest ablation)"},
           integers=frozenset({"layer", "expert", "tokens", "selected", "freq_rank", "delta_rank"})),
    Output("importance_summary_layer{L}.csv", "per domain: the costliest ablation, whether it hits one of the domain's "
           "3 most-selected experts, and the rank correlation of ΔNLL with selection frequency", "expert-importance",
           INTERV,
           columns={"layer": LAYER, "domain": DOMAIN, "tokens": "next-token predictions averaged (count)",
                    "nll_base": "mean next-token NLL of the unedited model (nats per token)",
                    "most_important_expert": "the ablated expert with the largest delta_nll",
                    "delta_nll_max": "its delta_nll (nats per token)",
                    "its_freq_topk": "its selection frequency on the domain (fraction)",
                    "its_freq_rank": "its selection rank among all experts of the layer (1 = most selected)",
                    "top3_selected": "the domain's 3 most-selected experts, most selected first (space-separated)",
                    "important_in_top3_selected": "whether most_important_expert is one of them",
                    "spearman_delta_vs_freq": "Spearman ρ between delta_nll and freq_topk over the ablated experts "
                                              "(NaN with fewer than 3 or a constant input)"},
           integers=frozenset({"layer", "tokens", "most_important_expert", "its_freq_rank"})),
    Output("importance_layer{L}.npy", "ΔNLL of each ablated expert on each domain (importance_layer{L}.csv's delta_nll)",
           "expert-importance", INTERV, axes="[expert (order of --experts, default 0..E-1), domain (no 'all')]",
           dtype="float64, nats per token"),
    Output("importance_frequency_layer{L}.npy", "selection frequency of the same experts on the same domains",
           "expert-importance", INTERV, axes="[expert (order of --experts, default 0..E-1), domain (no 'all')]",
           dtype="float64, fraction of the domain's counted tokens"),
    Output("figures/importance_heatmap_layer{L}.{ext}", "ΔNLL expert × domain (symmetric log colours centred at 0); "
           "box: each domain's costliest ablation, dots: its 3 most-selected experts", "expert-importance", INTERV),
    Output("figures/importance_vs_frequency_layer{L}.{ext}", "per domain: ΔNLL of each ablation against the expert's "
           "selection frequency, with the uniform k/E line and Spearman ρ", "expert-importance", INTERV),
    # ------------------------------------------------------------------------------------ sim.py
    Output("similarity.csv", "expert-output similarity of every ordered pair of experts (shared experts included), "
           "per layer and method", "expert-output-similarity", SIM,
           columns={"layer": LAYER, "expert_i": SIM_EXPERT, "expert_j": "the other expert (same labels)",
                    "method": "cosine (mean cosine), cka (linear CKA), cka-debiased (unbiased HSIC), cka-rbf (RBF kernel)",
                    "value": "the similarity (dimensionless; cosine −1 … 1, CKA ≤ 1; empty = NaN: too few shared tokens "
                             "or undefined)",
                    "tokens": "tokens the pair was compared on: the sample size n, or with --routed-only the tokens "
                              "routed to both (count)"},
           integers=frozenset({"layer", "tokens"})),
    *(Output(f"similarity_{m}.npy", f"{m} similarity matrices, one per layer", "expert-output-similarity", SIM,
             axes="[layer (--layers order), expert i, expert j]: rows 0 … E−1 the routed experts, row E the shared "
                  "experts where the layer has them",
             dtype="float64, dimensionless (NaN: undefined pairs, and padding of layers with fewer rows)")
      for m in SIM_METHODS),
    Output("similarity_tokens.npy", "tokens each pair of experts was compared on", "expert-output-similarity", SIM,
           axes="[layer, expert i, expert j], as similarity_<method>.npy",
           dtype="float64, whole-number counts (NaN pads layers with fewer rows)"),
    Output("figures/similarity_by_layer.{ext}", "per method: mean off-diagonal similarity of the routed experts "
           "per layer (± std) with the most and least similar pair (similarity_summary.csv)",
           "expert-output-similarity", SIM),
    Output("similarity_summary.csv", "per layer and method: mean off-diagonal similarity, most and least similar "
           "pairs of routed experts, undefined pairs", "expert-output-similarity", SIM,
           columns={"layer": LAYER, "method": "as in similarity.csv",
                    "experts": "rows of the matrix: routed experts E, + 1 with shared experts (count)",
                    "tokens": "sample size n (count)",
                    "pairs": "unordered pairs i < j of rows, shared row included (count)",
                    "nan_pairs": "of those, pairs with no value (too few shared tokens, or undefined) (count)",
                    "mean_offdiag": "mean similarity over pairs of routed experts i < j with a value (dimensionless)",
                    "std_offdiag": "their population standard deviation (dimensionless)",
                    "mean_vs_shared": "mean similarity of the shared row to the routed experts (dimensionless; "
                                      "empty without shared experts)",
                    "most_similar_i": "first expert of the most similar routed pair",
                    "most_similar_j": "second expert of that pair",
                    "most_similar_value": "its similarity (dimensionless)",
                    "least_similar_i": "first expert of the least similar routed pair",
                    "least_similar_j": "second expert of that pair",
                    "least_similar_value": "its similarity (dimensionless)",
                    "top_pairs": "the three most similar routed pairs as 'i-j (value)', '; '-separated"},
           integers=frozenset({"layer", "experts", "tokens", "pairs", "nan_pairs"})),
    Output("cluster_order.csv", "the experts' order in each heatmap: average-linkage clustering of 1 − similarity",
           "expert-output-similarity", SIM,
           columns={"layer": LAYER, "method": "as in similarity.csv",
                    "position": "place in the heatmap, 0 = first row / column", "expert": SIM_EXPERT},
           integers=frozenset({"layer", "position"})),
    Output("rbf_sigma.csv", "RBF bandwidth σ_e of each expert (cka-rbf only)", "expert-output-similarity", SIM,
           columns={"layer": LAYER, "expert": SIM_EXPERT,
                    "sigma": "σ_e (the residual stream's units)",
                    "source": "'given (--sigma)' or 'median on N tokens' (median pairwise distance of its outputs)"},
           integers=frozenset({"layer"})),
    *(Output(f"figures/similarity_{m}_layer{{L}}.{{ext}}", f"{m} similarity of one layer as an expert × expert "
             "heatmap in clustering order, dendrogram on top (diagonal hatched, undefined pairs grey)",
             "expert-output-similarity", SIM) for m in SIM_METHODS),
    # ------------------------------------------------------------------------------------ dim_reduc.py
    Output("embedding_coords.csv", "2-D PCA / UMAP coordinates of expert outputs, one row per (layer, method, point); "
           "a point is one (token, routed expert) pair of the seeded sample", "umap-pca-and-separation", ("dim_reduc",),
           columns={"layer": LAYER, "method": "the embedding: umap or pca",
                    "point": "index of the point within its layer (0-based; the same point in every method)",
                    "x": "first coordinate (PCA: along PC1, the outputs' units; UMAP: no unit)",
                    "y": "second coordinate (PCA: along PC2; UMAP: no unit)",
                    "expert": "the routed expert e whose output E_e(x) (× w_e with --weighted) is the point",
                    "rank": "rank of w_e among the token's k weights, 1 = largest",
                    "weight": "routing weight w_e the expert receives for this token (the model's weight scale)",
                    "domain": "domain name from --data of the token", "token_id": "id of the token",
                    "token": "the token decoded alone", "batch": "stream number of the batch holding the token",
                    "row": "window (row) of the token within that batch", "position": "position of the token in its window (0-based)"},
           integers=frozenset({"layer", "point", "expert", "rank", "token_id", "batch", "row", "position"})),
    Output("separation.csv", "per layer, space and label: leave-one-out k-NN accuracy beside the same accuracy "
           "with permuted labels and the majority-class share", "umap-pca-and-separation", ("dim_reduc",),
           columns={"layer": LAYER, "space": "where neighbours are found: original (the expert outputs, H dims), pca or umap (2-D)",
                    "label": "what is predicted: expert or domain",
                    "accuracy": "share of points whose label is the majority label of their k nearest other points (fraction)",
                    "accuracy_permuted": "the same with the labels randomly permuted, seeded: the chance control (fraction)",
                    "majority_baseline": "share of the most frequent label (fraction)",
                    "k": "neighbours per vote, min(--knn, points − 1) (count)", "num_points": "points of the layer (count)",
                    "num_classes": "distinct labels among the points (count)", "dims": "dimensions of the space (count)"},
           integers=frozenset({"layer", "k", "num_points", "num_classes", "dims"})),
    Output("figures/umap_layer{L}_by_expert.{ext}", "UMAP of one layer's expert outputs coloured by expert (ids on "
           "the points), with the expert's k-NN separation", "umap-pca-and-separation", ("dim_reduc",)),
    Output("figures/umap_layer{L}_by_domain.{ext}", "UMAP of one layer's expert outputs coloured by domain, with "
           "the domain's k-NN separation", "umap-pca-and-separation", ("dim_reduc",)),
    Output("figures/pca_layer{L}_by_expert.{ext}", "PCA of one layer's expert outputs coloured by expert (ids on "
           "the points), with the expert's k-NN separation", "umap-pca-and-separation", ("dim_reduc",)),
    Output("figures/pca_layer{L}_by_domain.{ext}", "PCA of one layer's expert outputs coloured by domain, with the "
           "domain's k-NN separation", "umap-pca-and-separation", ("dim_reduc",)),
    # ------------------------------------------------------------------------------------ cluster.py
    Output("cluster_scores.csv", "token-cluster specialization of every expert: JSD (bits) of the cluster mix of its "
           "input and of its logit-lens output tokens from the layer's, the random-sample baseline and their "
           "difference, per layer, expert and k", "token-cluster-specialization", CLUSTER,
           columns={"layer": LAYER, "expert": EXPERT, "k": "number of unembedding clusters (--clusters)",
                    "tokens": "picks n_e: counted tokens routed to the expert with a non-zero weight (count; also "
                              "its number of output tokens)",
                    "jsd_input_bits": "JSD(π_e ‖ μ) of the clusters of the tokens it receives (bits; empty if n_e = 0)",
                    "baseline_input_bits": "expected JSD of n_e tokens drawn from μ, mean of --baseline_draws "
                                           "multinomial samples (bits)",
                    "score_input": "jsd_input_bits − baseline_input_bits (bits; ≈ 0 = a random sample of the layer's "
                                   "tokens)",
                    "jsd_output_bits": "the same JSD for its output tokens: top-1 token of w_e·E_e(x) through the "
                                       "final norm and unembedding, one per pick (bits)",
                    "baseline_output_bits": "expected JSD of n_e draws from the layer's output-token cluster mix (bits)",
                    "score_output": "jsd_output_bits − baseline_output_bits (bits)"},
           integers=frozenset({"layer", "expert", "k", "tokens"})),
    Output("cluster_sizes.csv", "every unembedding cluster of every k: size, cohesion and its most central tokens",
           "token-cluster-specialization", CLUSTER,
           columns={"k": "number of clusters of this clustering", "cluster": "cluster id (0-based, as in "
                    "clusters_k<K>.json)", "size": "token ids in the cluster (count)",
                    "mean_cosine": "mean cosine of its members' centred unembedding rows with the centroid "
                                   "(dimensionless; empty for an empty cluster)",
                    "central_tokens": "its 8 tokens closest to the centroid (Python reprs, space-separated)"},
           integers=frozenset({"k", "cluster", "size"})),
    Output("clusters_k{K}.json", "the clustering with k = K as {\"<cluster id>\": [token, ...]}, the format of "
           "The Expert Strikes Back's data: every token id's decoded text once, most central first (text that is "
           "not valid on its own, e.g. a partial UTF-8 byte: the tokenizer's raw piece; head rows beyond the "
           "tokenizer: #<id>)", "token-cluster-specialization", CLUSTER),
    Output("cluster_assignment.npy", "the cluster of every token id, for each k", "token-cluster-specialization",
           CLUSTER, axes="[k (order of --clusters), token id]", dtype="int64, cluster id"),
    Output("cluster_counts_k{K}.npy", "expert × cluster counts N_{e,c} the scores of k = K come from",
           "token-cluster-specialization", CLUSTER,
           axes="[side (0 input tokens, 1 output tokens), layer (order of --layers), expert, cluster]",
           dtype="int64, picks (0 pads layers with fewer experts)"),
    Output("figures/cluster_scores_layer{L}.{ext}", "each expert's specialization score (bits), input vs output "
           "tokens, one panel per k", "token-cluster-specialization", CLUSTER),
    Output("figures/cluster_scores_by_layer.{ext}", "mean over experts and highest expert score per layer, input vs "
           "output tokens, one panel per k", "token-cluster-specialization", CLUSTER),
    Output("figures/cluster_sizes.{ext}", "cluster sizes from largest to smallest for each k (log-log), with the "
           "equal-size line", "token-cluster-specialization", CLUSTER),
    # ------------------------------------------------------------------------------------ label.py
    Output("label_layer{L}_expert{E}.json", "one expert's automatic label: its top windows, the explainer's and "
           "scorer's prompts and responses, and the label's detection scores", "automatic-labels", ("label",),
           keys={"layer": "decoder-layer index of the MoE layer", "expert": "expert index", "model": "model id",
                 "label": "the explainer's label (null: no label)",
                 "f1": "detection F1 of the class 'belongs to the expert' over the answered windows (fraction; null: undefined)",
                 "accuracy": "share of answered windows the scorer got right (fraction; null: none answered)",
                 "precision": "TP / (TP + FP) (fraction; null: undefined)",
                 "recall": "TP / (TP + FN) (fraction; null: undefined)",
                 "windows_explained": "windows in the explainer's prompt (count)",
                 "windows_scored": "windows the scorer answered for (count)",
                 "positives": "the expert's own windows sent to the scorer (count)",
                 "negatives": "other experts' windows sent to the scorer (count)",
                 "confusion": "true_positives, false_positives, true_negatives, false_negatives (counts)",
                 "malformed": "replies that could not be fully parsed (count)",
                 "failed": "requests with no reply after all retries, or refused (count)",
                 "note": "why the expert has no label or score, or fewer negatives than positives (null: nothing to say)",
                 "control": "'shuffled windows' under --shuffle-windows, else null",
                 "llm": "the LLM: backend, model, endpoint (null for a local model) or local path",
                 "explanation": "the explainer request: prompt (chat messages as sent), response, error, cached, "
                                "note, malformed, and the windows shown: id ('<expert>:<rank>', rank 0 = strongest), "
                                "expert, rank, score = w·‖E_e(x)‖ and weight of the top token, domain, top_position, "
                                "top_token, text and marked (newlines kept; prompts write them as \\n), "
                                "active_tokens (position, token, weight, output_norm = ‖w·E_e(x)‖, logit_lens)",
                 "scoring": "requests (window ids, prompt, response, error, cached, note, malformed, answers) and "
                            "windows (the scored windows with belongs = truth and answer = the scorer's yes/no/null; "
                            "marks only on the expert's own, the scorer saw plain text)"}),
    Output("labels_layer{L}.csv", "one row per labelled expert: label and detection scores", "automatic-labels",
           ("label",),
           columns={"layer": LAYER, "expert": EXPERT, "label": "the explainer's label (empty: none)",
                    "f1": "detection F1 over the answered windows (fraction; empty: undefined)",
                    "accuracy": "share of the answered windows the scorer got right (fraction; empty: none answered)",
                    "windows_explained": "windows in the explainer's prompt (count)",
                    "windows_scored": "windows the scorer answered for (count)",
                    "malformed": "replies that could not be fully parsed (count)",
                    "failed": "requests with no reply after all retries, or refused (count)"},
           integers=frozenset({"layer", "expert", "windows_explained", "windows_scored", "malformed", "failed"})),
    Output("figures/labels_layer{L}.{ext}", "each expert's label beside its detection F1 (bars) and accuracy (dots), "
           "0.5 marked (random answers)", "automatic-labels", ("label",)),
    # ------------------------------------------------------------------------------------ probing.py
    Output("probing.csv", "one row per k-sparse probe: concept, unit (a layer's expert, or a dense FFN layer), k and "
           "neuron selection, with the held-out F1, precision and recall", "k-sparse-probing", PROBING,
           columns={"concept": "concept name (probing.py --list-concepts)",
                    "layer": "decoder-layer index of the unit: a MoE layer of --model for an expert; for expert "
                             "'dense' a layer of the dense baseline (--dense_model; 'same': of --model)",
                    "expert": "expert index within the layer (0-based), or 'dense' for a dense FFN layer",
                    "k": "neurons the probe reads (count)",
                    "selection": "ranked: the k neurons with the largest train-split gap |mean(pos) − mean(neg)|; "
                                 "random: k neurons drawn at random, seeded (the control)",
                    "f1": "binary F1 of the positive class on the held-out split (fraction)",
                    "precision": "TP / (TP + FP) on the held-out split (fraction; 0 if nothing is predicted positive)",
                    "recall": "TP / (TP + FN) on the held-out split (fraction)",
                    "num_positive": "positive examples of the cell, train + held out (count; at most --max_examples)",
                    "num_negative": "negative examples of the cell, train + held out (count; at most --max_examples)"},
           integers=frozenset({"layer", "k", "num_positive", "num_negative"})),
    Output("probing_best_layer.csv", "best-layer F1 per concept, model, selection and k: the maximum over a layer's "
           "experts, then over layers", "k-sparse-probing", PROBING,
           columns={"concept": "concept name (probing.py --list-concepts)",
                    "model": "moe (expert neurons of --model) or dense (FFN neurons of the dense baseline)",
                    "selection": "ranked or random, as in probing.csv",
                    "k": "neurons the probe reads (count)",
                    "f1": "the best held-out F1 (fraction)",
                    "layer": "decoder layer where it is reached (the first in probing.csv order on ties)",
                    "expert": "expert where it is reached, or 'dense'",
                    "units_probed": "units (expert-layer pairs, or dense layers) probed for this concept, k and "
                                    "selection: what the maximum runs over (count)"},
           integers=frozenset({"k", "layer", "units_probed"})),
    Output("probing_examples.csv", "examples per concept and unit (what it saw, what was kept) and whether the cell "
           "was probed or skipped", "k-sparse-probing", PROBING,
           columns={"concept": "concept name (probing.py --list-concepts)",
                    "model": "moe or dense, as in probing_best_layer.csv",
                    "layer": "decoder-layer index of the unit, as in probing.csv",
                    "expert": "expert index, or 'dense'",
                    "seen_positive": "positive tokens the unit saw in the stream (count; an expert sees the tokens "
                                     "routed to it)",
                    "seen_negative": "eligible negative tokens it saw (count; see --negatives)",
                    "num_positive": "positives kept: min(seen_positive, --max_examples) (count)",
                    "num_negative": "negatives kept: min(seen_negative, --max_examples) (count)",
                    "probed": "1 if num_positive and num_negative both reach --min_examples (probed), else 0 "
                              "(skipped)"},
           integers=frozenset({"layer", "seen_positive", "seen_negative", "num_positive", "num_negative", "probed"})),
    Output("figures/probing_f1_vs_k.{ext}", "best-layer F1 against k (log scale): MoE expert neurons vs dense FFN "
           "neurons, top-k by mean gap (solid) vs k at random (dashed); median over the concepts probed for both, "
           "band = 25th–75th percentile", "k-sparse-probing", PROBING),
    Output("figures/probing_concepts.{ext}", "best-layer F1 of every probed concept at k = 1 and k = 16, MoE vs "
           "dense, ranked (filled) vs random (open markers); concepts never probed are named below",
           "k-sparse-probing", PROBING),
)
# fmt: on


def lookup(relative: str | Path) -> Output | None:
    """The entry describing a file (path relative to the run folder, '/'-separated), or None."""
    name = Path(relative).as_posix()
    return next((entry for entry in REGISTRY if entry.matches(name)), None)


def integer_columns(filename: str) -> frozenset[str]:
    """Columns of a CSV file (by its name in the run folder) that hold whole numbers."""
    entry = lookup(filename)
    return entry.integers if entry is not None else frozenset()


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def metric_anchors(text: str | None = None) -> set[str]:
    """Every heading anchor of docs/METRICS.md (or of `text`)."""
    text = METRICS_DOC.read_text(encoding="utf-8") if text is None else text
    anchors: set[str] = set()
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        match = None if in_code else re.match(r"#{1,6}\s+(.*)", line)
        if match:
            anchor = github_anchor(match.group(1))
            base, n = anchor, 0
            while anchor in anchors:  # GitHub numbers repeated headings
                n += 1
                anchor = f"{base}-{n}"
            anchors.add(anchor)
    return anchors
