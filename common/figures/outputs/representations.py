"""What the representation scripts write: weights.py (router and expert weights), sim.py (expert-output
similarity) and dim_reduc.py (PCA / UMAP), one `Output` per file under a heading per script (assembled into
`common.run.outputs.REGISTRY`). A new representation script adds its files here."""

from __future__ import annotations

from common.figures.outputs.entry import EXPERT, LAYER, Output

WEIGHTS = ("weights",)
SIM = ("sim",)
SIM_METHODS = ("cosine", "cka", "cka-debiased", "cka-rbf")  # sim.py --method; one npy and one figure each
# How the descriptions name each method (the figures' labels, common.analysis.similarity.METHOD_LABELS, which this
# torch-free module cannot import): the README capitalises a description's first letter, and "cka" became "Cka".
SIM_METHOD_NAMES = {"cosine": "mean cosine", "cka": "linear CKA", "cka-debiased": "debiased linear CKA",
                    "cka-rbf": "RBF CKA"}
SIM_EXPERT = "expert index within the layer (0-based), or 'shared' for the layer's shared experts"

# fmt: off
OUTPUTS: tuple[Output, ...] = (
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
           "layer, with the other experts' rows; a metric with nothing to show (ungated experts' gate; the row-space "
           "shares when W has full column rank) gets no panel, and the caption says why", "router-expert-alignment",
           WEIGHTS),
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
    *(Output(f"similarity_{m}.npy", f"{SIM_METHOD_NAMES[m]} similarity matrices, one per layer",
             "expert-output-similarity", SIM,
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
    *(Output(f"figures/similarity_{m}_layer{{L}}.{{ext}}", f"{SIM_METHOD_NAMES[m]} similarity of one layer as an "
             "expert × expert heatmap in clustering order, dendrogram on top (diagonal hatched, undefined pairs grey)",
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
)
# fmt: on
