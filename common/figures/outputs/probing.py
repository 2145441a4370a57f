"""What the probing and labelling scripts write: cluster.py (token-cluster specialization), label.py (automatic
expert labels) and probing.py (k-sparse probes), one `Output` per file under a heading per script (assembled
into `common.run.outputs.REGISTRY`). A new such script adds its files here."""

from __future__ import annotations

from common.figures.outputs.entry import EXPERT, LAYER, Output

CLUSTER = ("cluster",)
PROBING = ("probing",)

# fmt: off
OUTPUTS: tuple[Output, ...] = (
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
                    "num_negative": "negative examples of the cell, train + held out (count; at most --max_examples)",
                    "neurons": "the k neurons the probe read: their indices within the expert (or dense FFN), "
                               "space-separated, best-ranked first for ranked probes"},
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
                    "neurons": "the neurons of that best probe (indices within the expert or dense FFN, as in "
                               "probing.csv)",
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
