"""What the causal scripts write: logit_lens.py (logit lens, top-k restriction) and interv.py (routing edits,
expert ablation), one `Output` per file under a heading per script (assembled into
`common.run.outputs.REGISTRY`). A new causal script adds its files here."""

from __future__ import annotations

from common.figures.outputs.entry import DOMAIN, EXPERT, HIST_DTYPE, LAYER, Output, summary_columns

LENS = ("logit_lens",)
INTERV = ("interv",)
PRUNE = ("prune",)

# fmt: off
OUTPUTS: tuple[Output, ...] = (
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
                    **summary_columns("cosine, −1 … 1", "counted tokens compared (count)")},
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
                            "routed_at_targets (targets where w_e ≠ 0 without the edit, count), edit_cannot_act (true "
                            "when --mode scale/set and routed_at_targets = 0: the edit changes nothing), "
                            "before {next_token {top, entropy, target_prob}, continuation, continuation_ids}, after "
                            "[per value: value, kl_nats, selected_after, weight_after_mean, next_token, continuation, "
                            "continuation_ids]"}),
    Output("figures/sweep_prompt{N}.{ext}", "one prompt: the followed next tokens' probability against the value "
           "(dotted: before; log x when the values span decades) beside KL(before ‖ after); one value: before / "
           "after bars; a framed note when scale/set cannot act (the expert not routed at any target)",
           "intervention", INTERV),
    Output("figures/kl_by_value.{ext}", "several prompts: KL(before ‖ after) against the value, one line per prompt "
           "and their mean; the title names the prompts where scale/set cannot act", "intervention", INTERV),
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
    Output("audit_layer{L}.csv", "the causal audit's values per ablated expert, on the same counted tokens as the "
           "ablations", "causal-audit", INTERV,
           columns={"layer": LAYER, "expert": EXPERT,
                    "delta_nll": "ablation importance: ΔNLL over all domains pooled (nats per token)",
                    "frequency": "share of the counted tokens routed to the expert, w ≠ 0 (fraction)",
                    "mean_weight": "mean routing weight over the counted tokens, 0 where not chosen",
                    "saliency": "REAP saliency: mean over the tokens routed to the expert of w · ‖E_e(x)‖",
                    "output_norm": "mean ‖E_e(x)‖ over the tokens routed to the expert",
                    "jsd_specialization": "Jensen-Shannon divergence of the expert's domain mix from the layer's (bits)",
                    "token_coverage": "distinct token ids routed to the expert / distinct token ids counted (fraction)"},
           integers=frozenset({"layer", "expert"})),
    Output("audit_correlation_layer{L}.csv", "the causal audit: per observational metric, its rank correlation with "
           "ΔNLL over the ablated experts, with bootstrap intervals over documents, and the top-10 overlap",
           "causal-audit", INTERV,
           columns={"layer": LAYER, "metric": "the observational metric (audit_layer{L}.csv's columns)",
                    "spearman": "Spearman ρ between the metric and ΔNLL over the experts (NaN: a constant input)",
                    "spearman_low": "2.5th percentile of ρ over bootstrap resamples of the documents",
                    "spearman_high": "97.5th percentile of ρ",
                    "kendall": "Kendall τ-b between the metric and ΔNLL",
                    "kendall_low": "2.5th percentile of τ over the resamples", "kendall_high": "97.5th percentile of τ",
                    "top10_overlap": "how many of the 10 experts with the largest ΔNLL the metric also ranks top-10 (count)",
                    "experts": "experts compared (count)", "documents": "documents resampled (count)",
                    "bootstrap_draws": "resamples drawn (0 for token_coverage, whose token sets are not kept per "
                                       "document: no interval)"},
           integers=frozenset({"layer", "top10_overlap", "experts", "documents", "bootstrap_draws"})),
    Output("figures/audit_layer{L}.{ext}", "the causal audit: each metric against ΔNLL (one dot per expert) and the "
           "rank correlations with their intervals", "causal-audit", INTERV),
    # ------------------------------------------------------------------------------------ prune.py
    Output("prune_scores.csv", "what the pruning criteria read, per layer and routed expert, on the counted tokens",
           "expert-pruning", PRUNE,
           columns={"layer": LAYER, "expert": "expert index within the layer (0-based), or 'shared' for the layer's "
                                              "shared experts counted as one unit (--include-shared)",
                    "frequency": "share of the counted tokens routed to the expert, w ≠ 0 (fraction)",
                    "weight": "mean routing weight over all counted tokens, 0 where not chosen (the model's weight scale)",
                    "saliency": "REAP-style saliency: mean over the tokens routed to the expert of w · ‖E_e(x)‖ (the "
                                "hidden state's units; 0 for an expert never routed)"},
           integers=frozenset({"layer", "expert"})),
    Output("prune_importance.csv", "the importance criterion's scores: each expert's ablation ΔNLL on all domains "
           "pooled (read from --importance run folders, or computed as interv.py --data does)", "expert-pruning", PRUNE,
           columns={"layer": LAYER, "expert": EXPERT,
                    "delta_nll": "ΔNLL when the expert's weight is 0 at every token (nats per token; higher = more "
                                 "important, removed later)"},
           integers=frozenset({"layer", "expert"})),
    Output("prune_perplexity.csv", "next-token perplexity per domain with a fraction of the experts removed, least "
           "important first by each criterion", "expert-pruning", PRUNE,
           columns={"criterion": "order of removal: frequency, weight, saliency, importance (least first), redundancy "
                                 "(the more redundant member of the most similar pair first), random (the control), or merge (--merge: "
                                 "clusters merged into their frequency-weighted average, not removed)",
                    "draw": "random: the seeded draw (0..--draws−1); 0 for the other criteria",
                    "fraction": "fraction of each layer's routed experts removed (--scope global: of all layers')",
                    "experts_removed": "routed experts removed over all measured layers (count; at most E − k per layer); "
                                       "merge: experts merged away (E − clusters, summed over layers)",
                    "domain": DOMAIN,
                    "predictions": "next-token predictions averaged (count)",
                    "nll": "mean next-token NLL (nats per token)",
                    "ppl": "perplexity exp(nll)"},
           integers=frozenset({"draw", "experts_removed", "predictions"})),
    Output("prune_perplexity.npy", "perplexity per criterion, fraction and domain (random: exp of the mean NLL over "
           "its draws)",
           "expert-pruning", PRUNE, axes="[criterion (run.json criteria order), fraction (run.json fractions), "
           "domain (+ all last)]", dtype="float64, perplexity"),
    Output("figures/prune_scores.{ext}", "per criterion, each layer's experts sorted by their score (one line per "
           "layer): how steeply a few experts stand out", "expert-pruning", PRUNE),
    Output("figures/prune_perplexity.{ext}", "perplexity (log scale) against the fraction of experts removed, one line "
           "per criterion, random's band exp(mean ± sd of the NLL over draws); a panel per domain and pooled",
           "expert-pruning", PRUNE),
)
# fmt: on
