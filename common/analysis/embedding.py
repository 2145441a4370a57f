"""Expert outputs on the tokens routed to them, their 2-D embeddings (PCA, UMAP) and how well labels separate.

`dim_reduc.py` (SPEC "UMAP / PCA"): one point per (token, routed expert) of a `TokenSample`, the expert's
unweighted output E_e(x) (or w_e · E_e(x) with `weighted`), at most `per_expert` points per expert. Which points an
expert keeps is seeded: the sample's tokens carry uniform random keys drawn from the seed, and each expert keeps
the routed tokens with the smallest keys (a uniform sample without replacement, whatever the device).

Separation: leave-one-out k-nearest-neighbour accuracy (Euclidean; a point is never its own neighbour; majority
vote, ties to the smallest label) of a label, beside the same accuracy with the labels permuted (seeded: the
chance control) and the majority-class share.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from common.model import MoELayer, all_expert_outputs

# Rows of the distance matrix computed at once: chunk × n distances in memory.
_DISTANCE_ROWS = 1024
# UMAP's spectral initialisation needs a few more points than components; below this it starts at random.
_MIN_SPECTRAL_POINTS = 4
# A 2-D UMAP needs n_neighbors >= 2, hence 3 points.
MIN_POINTS = 3


@dataclass
class ExpertPoints:
    """The points of one layer, ordered by (expert, key): output rows and what each row is."""

    layer: int
    outputs: np.ndarray  # [n, H] float32: E_e(x), or w_e · E_e(x) when weighted
    expert: np.ndarray  # [n] int: the routed expert e
    slot: np.ndarray  # [n] int: the top-k slot (column of the routing record) that names e for this token
    rank: np.ndarray  # [n] int: rank of w_e among the token's k weights, 1 = largest (ties: the earlier slot)
    weight: np.ndarray  # [n] float: the routing weight w_e the expert received
    token: np.ndarray  # [n] int: row of the token in the sample
    weighted: bool

    def __len__(self) -> int:
        return len(self.expert)


def select_points(
    topk_index: torch.Tensor, key: torch.Tensor, num_experts: int, per_expert: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token rows, experts, top-k slots) of up to `per_expert` routed (token, expert) pairs per expert.

    Each expert keeps the tokens routed to it with the smallest `key` (ties: the earlier row), so the choice is
    a seeded uniform sample. Slots naming no expert with parameters (zero-compute experts) are skipped.
    """
    index = topk_index.cpu().numpy()
    order = np.argsort(key.cpu().numpy(), kind="stable")  # tokens by key
    by_key = index[order]  # [T, k] in key order
    rows, slots = np.nonzero((by_key >= 0) & (by_key < num_experts))
    experts = by_key[rows, slots]
    # Stable sort by expert keeps key order inside each expert; the first `per_expert` of each expert are kept.
    grouped = np.argsort(experts, kind="stable")
    rows, slots, experts = rows[grouped], slots[grouped], experts[grouped]
    starts = np.searchsorted(experts, experts, side="left")
    keep = np.arange(len(experts)) - starts < per_expert
    return order[rows[keep]], experts[keep], slots[keep]


@torch.no_grad()
def expert_points(
    moe_layer: MoELayer,
    sample: dict[str, torch.Tensor],
    per_expert: int,
    *,
    weighted: bool = False,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> ExpertPoints:
    """E_e(x) (× w_e if `weighted`) for up to `per_expert` tokens routed to each expert of `moe_layer`.

    `sample` is `TokenSample.result()`; experts run on `device` / `dtype` (default: those of the layer's expert
    weights, which under `--device_map auto` may differ from layer to layer), outputs come back as float32 numpy.
    """
    layer = moe_layer.layer
    inputs, index, weights = sample[f"input_{layer}"], sample[f"topk_index_{layer}"], sample[f"topk_weight_{layer}"]
    tokens, experts, slots = select_points(index, sample["key"], moe_layer.num_experts, per_expert)
    all_weights = weights.float().cpu().numpy()
    weight = all_weights[tokens, slots]
    row_weights = all_weights[tokens]  # [n, k]
    earlier = np.arange(row_weights.shape[1])[None, :] < slots[:, None]
    rank = 1 + (row_weights > weight[:, None]).sum(1) + ((row_weights == weight[:, None]) & earlier).sum(1)
    weight_tensor = next(moe_layer.experts.parameters(), None)
    device = device or (weight_tensor.device if weight_tensor is not None else inputs.device)
    dtype = dtype or (weight_tensor.dtype if weight_tensor is not None else inputs.dtype)
    outputs = np.zeros((len(tokens), inputs.shape[-1]), dtype=np.float32)
    present = np.unique(experts)
    for e in tqdm(present, desc=f"expert outputs, layer {layer}", unit="expert", disable=not progress, leave=False):
        rows = np.nonzero(experts == e)[0]
        x = inputs[torch.from_numpy(tokens[rows]).to(inputs.device)].to(device=device, dtype=dtype)
        y = all_expert_outputs(moe_layer, x, experts=[int(e)])[0].float()
        if weighted:
            y = y * torch.from_numpy(weight[rows]).to(y.device).unsqueeze(1)
        outputs[rows] = y.cpu().numpy()
    return ExpertPoints(layer, outputs, experts.astype(np.int64), slots.astype(np.int64), rank.astype(np.int64),
                        weight.astype(np.float32), tokens.astype(np.int64), weighted)


# --------------------------------------------------------------------------------------------- kNN separation


def loo_neighbours(points: np.ndarray | torch.Tensor, k: int, device: torch.device | str = "cpu",
                   progress: bool = False, desc: str = "neighbours") -> np.ndarray:
    """[n, min(k, n-1)] indices of each point's nearest other points (Euclidean), nearest first.

    Distances are computed in chunks of rows on `device` (float64 on CPU, float32 elsewhere); a point is never its
    own neighbour, even when it has an exact duplicate elsewhere.
    """
    device = torch.device(device)
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    x = torch.as_tensor(points).to(device=device, dtype=dtype)
    n = x.shape[0]
    k = min(k, n - 1)
    if k < 1:
        raise ValueError("loo_neighbours: need at least 2 points")
    found = torch.empty(n, k, dtype=torch.long)
    starts = range(0, n, _DISTANCE_ROWS)
    for start in tqdm(starts, desc=desc, unit="chunk", disable=not progress or len(starts) < 2, leave=False):
        stop = min(n, start + _DISTANCE_ROWS)
        block = x[start:stop]
        squared = (block * block).sum(1, keepdim=True) - 2 * block @ x.T + (x * x).sum(1)
        rows = torch.arange(stop - start, device=device)
        squared[rows, rows + start] = torch.inf
        found[start:stop] = squared.topk(k, dim=1, largest=False).indices.cpu()
    return found.numpy()


def knn_accuracy_from_neighbours(neighbours: np.ndarray, labels: np.ndarray) -> float:
    """Share of points whose label is the majority label of their neighbours (ties: the smallest label)."""
    classes, codes = np.unique(np.asarray(labels), return_inverse=True)
    votes = np.zeros((len(codes), len(classes)), dtype=np.int64)
    np.add.at(votes, (np.repeat(np.arange(len(codes)), neighbours.shape[1]), codes[neighbours].reshape(-1)), 1)
    return float(np.mean(votes.argmax(1) == codes))


def knn_accuracy(points: np.ndarray | torch.Tensor, labels: np.ndarray, k: int = 10, device: str = "cpu") -> float:
    """Leave-one-out k-NN accuracy of `labels` from `points` [n, d] (Euclidean, majority vote)."""
    return knn_accuracy_from_neighbours(loo_neighbours(points, k, device), labels)


def majority_share(labels: np.ndarray) -> float:
    """The share of the most frequent label: what always guessing it scores."""
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    return float(counts.max() / counts.sum())


def separation_rows(
    points: np.ndarray | torch.Tensor,
    labels: dict[str, np.ndarray],
    *,
    layer: int,
    space: str,
    k: int,
    seed: int,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> list[dict]:
    """One row per label: LOO k-NN accuracy, the same with the labels permuted (seeded), and the majority share.

    The neighbours are found once and serve every label and its permutation.
    """
    neighbours = loo_neighbours(points, k, device, progress, desc=f"neighbours, layer {layer}, {space}")
    rows = []
    for name, values in labels.items():
        values = np.asarray(values)
        permuted = np.random.default_rng([seed, layer, len(rows)]).permutation(values)
        rows.append({
            "layer": layer, "space": space, "label": name,
            "accuracy": knn_accuracy_from_neighbours(neighbours, values),
            "accuracy_permuted": knn_accuracy_from_neighbours(neighbours, permuted),
            "majority_baseline": majority_share(values),
            "k": neighbours.shape[1], "num_points": len(values), "num_classes": len(np.unique(values)),
            "dims": int(points.shape[1]),
        })
    return rows


# --------------------------------------------------------------------------------------------- 2-D embeddings


def embed_pca(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([n, 2] coordinates, explained-variance ratio of the 2 components): exact SVD, signs fixed by sklearn."""
    from sklearn.decomposition import PCA

    components = min(2, *points.shape)
    pca = PCA(n_components=components, svd_solver="full")
    coords = pca.fit_transform(points.astype(np.float64))
    ratio = np.nan_to_num(pca.explained_variance_ratio_)
    if components < 2:  # a single point or a one-dimensional output space: a flat second axis
        coords = np.pad(coords, ((0, 0), (0, 2 - components)))
        ratio = np.pad(ratio, (0, 2 - components))
    return coords.astype(np.float32), ratio


def embed_umap(points: np.ndarray, seed: int, n_neighbors: int = 15, min_dist: float = 0.1) -> np.ndarray:
    """[n, 2] UMAP coordinates (Euclidean), reproducible: a fixed random_state, which makes UMAP single-threaded.

    n_neighbors is capped at n - 1; very small samples start from a random layout (spectral needs more points).
    """
    import umap

    n = points.shape[0]
    if n < MIN_POINTS:
        raise ValueError(f"embed_umap: need at least {MIN_POINTS} points, got {n}")
    reducer = umap.UMAP(
        n_components=2, n_neighbors=min(n_neighbors, n - 1), min_dist=min_dist, metric="euclidean",
        random_state=seed, n_jobs=1, init="spectral" if n >= _MIN_SPECTRAL_POINTS else "random",
    )
    with warnings.catch_warnings():
        # Disconnected graph components or a spectral fallback are facts of the data, not of the run.
        warnings.filterwarnings("ignore", category=UserWarning, module="umap")
        warnings.filterwarnings("ignore", category=UserWarning, module="sklearn")
        return reducer.fit_transform(points.astype(np.float32)).astype(np.float32)


def label_anchors(coords: np.ndarray, labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """[len(classes), 2] where to write each class's name: its point nearest to the class median (NaN if none).

    A point of the class itself, so a class split into several clusters is not labelled in the empty space
    between them.
    """
    out = np.full((len(classes), 2), np.nan, dtype=np.float64)
    for i, c in enumerate(classes):
        mine = coords[labels == c]
        if len(mine):
            median = np.median(mine, axis=0)
            out[i] = mine[np.argmin(((mine - median) ** 2).sum(1))]
    return out
