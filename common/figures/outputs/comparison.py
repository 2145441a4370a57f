"""What compare.py writes: the tidy table joining several runs with their model metadata, one figure per per-layer
metric over relative depth and absolute layer, and the probing gap against routing sparsity with its rank
correlation (assembled into `common.run.outputs.REGISTRY`). The metric names are those of
`common.analysis.comparison.METRICS` (not imported here: the registry stays free of pandas)."""

from __future__ import annotations

from common.figures.outputs.entry import DOMAIN, Output

COMPARE = ("compare",)
ANCHOR = "comparison-across-runs"
RUN_LABEL = "the run's name in legends: model id, '@revision' when given, the run id where two would read the same"
SPARSITY = "routing sparsity k / E of the model (fraction; docs/METRICS.md#comparison-across-runs)"
PROBE_K = "neurons the probe reads (count; probing.py's k)"
BASELINE = ("what the expert neurons' best-layer F1 is compared with: dense (ranked dense FFN neurons of the run's "
            "--dense_model) or random (k expert neurons drawn at random, the control)")

METADATA = {
    "label": RUN_LABEL,
    "model": "model id of the run (run.json → model)",
    "revision": "model revision of the run (empty: the default branch or a local model)",
    "run_id": "run id of the compared run folder",
    "architecture": "model class (run.json → model_info.architecture)",
    "layers": "decoder layers of the model (count)",
    "num_experts": "routed experts E of its first MoE layer (count)",
    "top_k": "experts chosen per token k (count)",
    "shared_experts": "shared (always-on) experts per MoE layer (count)",
    "total_parameters": "all parameters of the model when run.json records them (count; empty otherwise)",
    "active_parameters": "parameters used per token when run.json records them (count; empty otherwise)",
    "sparsity": SPARSITY,
    "dtype": "dtype the model ran in",
    "data": "--data of the run (space-separated)",
    "num_tokens": "--num_tokens of the run: counted tokens asked per domain (count)",
    "tokens": "counted tokens read, all domains (count; run.json → tokens)",
}
METADATA_INTEGERS = frozenset({"layers", "num_experts", "top_k", "shared_experts", "total_parameters",
                               "active_parameters", "num_tokens", "tokens"})

# (metric, what its figure shows) for every per-layer metric compare.py draws
METRIC_FIGURES = (
    ("entropy_normalized", "router entropy H / ln E"),
    ("topk_entropy_normalized", "entropy of the renormalised top-k / ln k"),
    ("top1_prob", "top-1 router probability"),
    ("top1_top2_margin", "top-1 − top-2 router probability"),
    ("topk_mass", "router probability inside the top-k"),
    ("load_balance_cv", "load balance: coefficient of variation of the top-k selection frequencies"),
    ("max_over_mean", "load balance: largest selection frequency over the mean"),
    ("jsd_specialization", "JSD specialization, mean over the experts that were chosen"),
    ("coverage50", "coverage50: share of experts handling half of all assignments"),
    ("frequency_spread", "selection-frequency spread: coefficient of variation over experts"),
    ("similarity_cosine", "expert-output cosine similarity, mean over pairs of routed experts (sim.py)"),
    ("similarity_cka", "expert-output linear CKA, mean over pairs of routed experts (sim.py)"),
    ("similarity_cka_debiased", "expert-output debiased linear CKA, mean over pairs of routed experts (sim.py)"),
    ("similarity_cka_rbf", "expert-output RBF CKA, mean over pairs of routed experts (sim.py)"),
    ("lens_cosine", "cosine of the residual with only the top-1 expert kept against the full run's (logit_lens.py)"),
    ("ablation_importance", "ΔNLL of the costliest single-expert ablation (interv.py dataset mode)"),
)

# fmt: off
OUTPUTS: tuple[Output, ...] = (
    Output("comparison.csv", "the compared runs' per-layer tables joined with each run's model metadata: one row per "
           "run, metric, layer and domain (probing: per concept, units, selection and probe k); every figure is "
           "drawn from it", ANCHOR, COMPARE,
           columns={**METADATA,
                    "table": "the compared runs' CSV the value comes from (file name without .csv; <L> = the layer)",
                    "metric": "per-layer metric: entropy_normalized, topk_entropy_normalized, top1_prob, "
                              "top1_top2_margin, topk_mass (router_decisive: the mean over tokens of "
                              "entropy_summary.csv); load_balance_cv, max_over_mean (load_balance.csv), "
                              "jsd_specialization (mean jsd_bits over chosen experts), coverage50 "
                              "(fraction_of_experts), frequency_spread (CV of freq_topk over experts) "
                              "(router_metrics); similarity_<method> (sim: mean_offdiag of similarity_summary.csv); "
                              "lens_cosine (logit_lens: mean cosine at the smallest k′ of cosine_summary.csv); "
                              "ablation_importance (interv: delta_nll_max of importance_summary_layer<L>.csv); "
                              "best_layer_f1 (probing)",
                    "layer": "decoder-layer index (0-based; probing: the layer where the best F1 is reached)",
                    "relative_depth": "layer / (layers − 1): 0 = first decoder layer, 1 = last (fraction)",
                    "domain": DOMAIN,
                    "concept": "probing concept (probing.py --list-concepts)",
                    "units": "moe (expert neurons) or dense (FFN neurons of the dense baseline)",
                    "selection": "ranked (top-k neurons by mean gap) or random (the control)",
                    "probe_k": PROBE_K,
                    "value": "the metric's value (its unit: fractions, bits for jsd_specialization, F1 as a "
                             "fraction)"},
           integers=METADATA_INTEGERS | {"layer", "probe_k"}),
    Output("gap_vs_sparsity.csv", "per probing run, baseline and probe k: the median over concepts of the best-layer "
           "F1 gap, with the model's routing sparsity", ANCHOR, COMPARE,
           columns={"label": RUN_LABEL, "sparsity": SPARSITY, "baseline": BASELINE, "probe_k": PROBE_K,
                    "median_gap": "median over concepts of best-layer F1 (ranked expert neurons) − the baseline's "
                                  "(F1 difference, fraction)",
                    "concepts": "concepts with both F1 values, what the median runs over (count)"},
           integers=frozenset({"probe_k", "concepts"})),
    Output("gap_correlation.csv", "per baseline and probe k, over the runs: Spearman's rank correlation of the median "
           "gap with k / E and its p-value, and the least-squares line on log10(k / E)", ANCHOR, COMPARE,
           columns={"baseline": BASELINE, "probe_k": PROBE_K, "models": "runs (points) the fit uses (count)",
                    "spearman_rho": "Spearman's ρ of (k / E, median_gap) (scipy.stats.spearmanr; empty below 3 "
                                    "models or with a constant axis)",
                    "p_value": "two-sided p-value of ρ against no correlation (empty as for spearman_rho)",
                    "slope": "least-squares slope of median_gap on log10(k / E) (F1 per decade; empty below 2 "
                             "distinct k / E)",
                    "intercept": "its intercept: the fitted gap at k / E = 1"},
           integers=frozenset({"probe_k", "models"})),
    *(Output(f"figures/by_depth_{metric}.{{ext}}", f"{text} of every compared run per layer (all domains pooled), "
             "against relative depth and against absolute layer; legend = models", ANCHOR, COMPARE)
      for metric, text in METRIC_FIGURES),
    *(Output(f"figures/over_training_{metric}.{{ext}}", f"{text} of a checkpoint series (runs of one model that "
             "differ only in revision) in training order, one line per layer, all domains pooled", ANCHOR, COMPARE)
      for metric, text in METRIC_FIGURES),
    Output("perplexity_by_k.csv", "logit_lens runs: every run's perplexity.csv (top-k′ restriction) with its model "
           "metadata", ANCHOR, COMPARE,
           columns={**METADATA, "table": "perplexity (the compared runs' CSV)", "metric": "normalized_log_ppl",
                    "domain": DOMAIN, "k_prime": "experts kept per token k′ (count)",
                    "ppl": "perplexity exp(nll) with k′ experts kept",
                    "normalized_log_ppl": "log PPL(k′) / log PPL(k) (ratio, 1 at k′ = k)",
                    "k_fraction": "k′ / k: the share of the model's experts per token kept (fraction)"},
           integers=METADATA_INTEGERS | {"k_prime"}),
    Output("figures/perplexity_vs_k.{ext}", "logit_lens runs: normalised log-perplexity against k′ and against k′ / "
           "k, one line per model (MoE Lens Figure 3 left, across models)", ANCHOR, COMPARE),
    Output("saturation_over_training.csv", "a checkpoint series: the saturation.csv of the compared run that measured the most "
           "checkpoints (router_metrics --revisions), with its label", "router-saturation", COMPARE,
           columns={"position": "checkpoint index in the order given to --revisions", "revision": "the checkpoint",
                    "final": "the checkpoint compared with (the last)", "layer": "decoder-layer index",
                    "topk_overlap": "share of the top-k the two checkpoints have in common (fraction)",
                    "top1_agreement": "share of tokens with the same top-1 expert (fraction)",
                    "tokens": "tokens compared (count)", "label": RUN_LABEL,
                    "run_id": "run id of the router_metrics run it comes from"},
           integers=frozenset({"position", "layer", "tokens"})),
    Output("figures/saturation_over_training.{ext}", "a checkpoint series: router saturation per checkpoint and layer (from the "
           "run that measured it)", "router-saturation", COMPARE),
    Output("figures/gap_vs_sparsity.{ext}", "median best-layer F1 gap over concepts against routing sparsity k / E "
           "(log axis), one marker per model, colour per probe k, dashed least-squares lines, Spearman's ρ and p in "
           "the legend; one panel per baseline (dense, random control)", ANCHOR, COMPARE),
)
# fmt: on
