"""The analyses: pure computations over captured records and streamed counts, one module per family.

Routing (`routing`, `specialization`, `saturation`, `expert_profile`, `profile_json`, `memory`), representations
(`similarity`, `embedding`, `weights`, `subspaces`), causal (`importance`, `lens`), probing and labelling (`probing`,
`concepts`, `labelling`, `clusters`). Infrastructure (model, hooks, data, stats, run folder) lives beside this package
in `common/`; scripts combine the two. Every metric is defined in docs/METRICS.md.

The stable public surface is `PUBLIC` below (name -> module, one line each); `from common.analysis import NAME`
imports the module only when the name is first used, so this package stays cheap to import.
"""

from __future__ import annotations

import importlib

# The label of the row that pools every domain, in every table the analyses write.
ALL_DOMAINS = "all"

PUBLIC: dict[str, tuple[str, str]] = {
    # routing, on captured tensors
    "routing_probabilities": ("routing", "router logits [T, C] -> p = softmax over all choices, float32"),
    "decisiveness": ("routing", "(logits [T, C], topk_index [T, k]) -> per-token entropy, top-k entropy, top-1 p, margin"),
    "expert_frequency": ("specialization", "(topk_index [T, k], E) -> top-k selection frequency of each expert [E]"),
    "top1_index": ("specialization", "(topk_index, topk_weight) -> each token's highest-weighted expert [T]"),
    # routing, streamed over batches and domains
    "DecisivenessStats": ("routing", "streamed entropy / decisiveness summaries and histograms per layer and domain"),
    "DistributionStats": ("routing", "streamed logit / softmax / renormalised / weight histograms per layer and domain"),
    "RoutingCounts": ("specialization", "streamed selection, co-activation, token-id and transition counts"),
    "selection_frequency": ("specialization", "RoutingCounts arrays -> frequency table (top-k, top-1, uniform)"),
    "expert_specialization": ("specialization", "RoutingCounts arrays -> N_{D,e} / N_D with the JSD index"),
    "coverage": ("specialization", "RoutingCounts arrays -> experts covering a share of each domain's tokens"),
    "load_balance": ("specialization", "RoutingCounts arrays -> CV, max/mean, dead experts, switch aux loss"),
    "saturation": ("saturation", "router saturation of earlier checkpoints against the final one"),
    # representations
    "TensorOutputs": ("similarity", "wrap expert outputs [E, T, H] as the input of expert_similarities"),
    "expert_similarities": ("similarity", "all-pairs cosine / linear CKA / debiased CKA / RBF CKA matrices"),
    "embed_pca": ("embedding", "points [n, d] -> ([n, 2] PCA coordinates, explained-variance ratios)"),
    "knn_accuracy": ("embedding", "(points [n, d], labels [n]) -> leave-one-out k-NN accuracy"),
    # causal
    "next_token_nll": ("importance", "(logits [B, S, V], input_ids [B, S]) -> next-token NLL [B, S-1] in nats"),
    "kl_divergence": ("importance", "(log p, log q) -> KL(p‖q) in nats"),
    "expert_contribution": ("lens", "(MoE layer, expert, weight, x [H]) -> w·E_e(x), as the block adds it"),
    # probing
    "select_concepts": ("concepts", "the regex concepts probing.py probes, by name"),
    "rank_neurons": ("probing", "neurons ranked by |mean(positives) - mean(negatives)| per concept"),
    "fit_logistic": ("probing", "batched L2 logistic regression (scikit-learn's objective), Newton's method"),
}

__all__ = ["ALL_DOMAINS", *PUBLIC]


def __getattr__(name: str):
    if name not in PUBLIC:
        raise AttributeError(f"module 'common.analysis' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"common.analysis.{PUBLIC[name][0]}"), name)
    globals()[name] = value
    return value
