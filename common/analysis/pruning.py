"""What if experts go (prune.py): which experts each criterion removes first, the observations the criteria read,
and the perplexity of the model with them removed. Definitions: docs/METRICS.md#expert-pruning.

Criteria, each ranking the routed experts of a layer from least to most important (removed in that order):
- `frequency`: share of the counted tokens routed to the expert (w ≠ 0);
- `weight`: mean routing weight over all counted tokens (0 where the expert is not chosen);
- `saliency`: REAP-style, mean over the tokens routed to the expert of w · ‖E_e(x)‖ (0 for an expert never routed);
- `random`: a seeded permutation per draw (the control every curve needs).
`--merge` (a what-if beside them): average-linkage clusters of a sim.py similarity, each cluster's experts replaced by
the frequency-weighted average of their weights (HC-SMoE). With `scope="layer"` each MoE layer loses the same fraction of its experts; with `scope="global"` the experts of
all layers are ranked together by the criterion's score. A layer always keeps at least top-k experts.
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from common.analysis.lens import add_domain_nll
from common.data import Batch
from common.hooks import ExpertRemoval, intervene
from common.model import MoELayer, MoEModel


def routed_output_norms(layer: MoELayer, index: torch.Tensor, weight: torch.Tensor, x: torch.Tensor):
    """For each routed expert e of the tokens' top-k (index, weight [T, k], w ≠ 0), with x [T, H] their expert inputs:
    (e, the tokens routed to it [n], their weights w [n] float64, ‖E_e(x)‖₂ [n] float64); one expert call each."""
    routed = (weight != 0) & (index < layer.num_experts)
    token, slot = routed.nonzero(as_tuple=True)
    experts = index[token, slot]
    for e in experts.unique().tolist():
        mine = experts == e
        tokens = token[mine]
        yield e, tokens, weight[tokens, slot[mine]].double(), layer.expert_fn(e, x[tokens]).double().norm(dim=-1)


class ExpertObservations:
    """Per layer and routed expert, streamed on the device: counted tokens, tokens routed (w ≠ 0), Σ w, Σ w·‖E_e(x)‖."""

    def __init__(self, layers: Sequence[MoELayer], device: torch.device, include_shared: bool = False) -> None:
        self.layers = list(layers)
        self.include_shared = include_shared
        # with shared experts counted, column E of a layer is its shared experts as one unit (every token uses them)
        width = max(m.num_experts for m in self.layers) + int(include_shared)
        self.tokens = torch.zeros(len(self.layers), dtype=torch.float64, device=device)
        self.routed = torch.zeros(len(self.layers), width, dtype=torch.float64, device=device)
        self.weight = torch.zeros_like(self.routed)
        self.saliency = torch.zeros_like(self.routed)

    @torch.no_grad()
    def update(self, records, batch: Batch) -> None:
        counted = batch.count_mask.reshape(-1).to(self.routed.device)
        for i, layer in enumerate(self.layers):
            record = records[layer.layer]
            index, weight = record.topk_index.long(), record.topk_weight.float()
            keep = counted.to(index.device)
            index, weight, x = index[keep], weight[keep], record.expert_input[keep]
            self.tokens[i] += float(keep.sum())
            routed = (weight != 0) & (index < layer.num_experts)
            flat_e, flat_w = index[routed], weight[routed].double()
            self.routed[i].index_add_(0, flat_e.to(self.routed.device), torch.ones_like(flat_w).to(self.routed.device))
            self.weight[i].index_add_(0, flat_e.to(self.routed.device), flat_w.to(self.routed.device))
            if self.include_shared and layer.shared_experts and record.shared_output is not None:
                shared = record.shared_output[keep].double().norm(dim=-1)
                E = layer.num_experts
                self.routed[i, E] += float(keep.sum())
                self.weight[i, E] += float(keep.sum())  # weight 1: the shared experts' output enters whole
                self.saliency[i, E] += shared.sum().to(self.saliency.device)
            for e, _, w, norms in routed_output_norms(layer, index, weight, x):
                self.saliency[i, e] += (w * norms).sum().to(self.saliency.device)

    def scores(self, criterion: str) -> list[np.ndarray]:
        """Per layer, the criterion's score of each routed expert (higher = more important)."""
        tokens = self.tokens.clamp_min(1).view(-1, 1)
        table = {"frequency": self.routed / tokens, "weight": self.weight / tokens,
                 "saliency": self.saliency / self.routed.clamp_min(1)}[criterion].cpu().numpy()
        return [table[i, : self.units(m)] for i, m in enumerate(self.layers)]

    def units(self, layer: MoELayer) -> int:
        """Removable units of a layer: its routed experts, + its shared experts as one (index E) when counted."""
        return layer.num_experts + int(self.include_shared and bool(layer.shared_experts))


def computed_importance(moe: MoEModel, layers: Sequence[MoELayer], batches: Sequence[Batch],
                        domains: Sequence[str]) -> list[np.ndarray]:
    """Per layer, each routed expert's ablation importance: ΔNLL over all counted predictions when its weight is 0
    (docs/METRICS.md#expert-importance), computed as interv.py --data computes it."""
    from common.analysis.importance import ImportanceAccumulator, accumulate_importance

    scores = []
    for layer in layers:
        acc = ImportanceAccumulator(layer, list(range(layer.num_experts)), domains, moe.device)
        accumulate_importance(moe, acc, iter(batches), False)
        arrays = acc.arrays()
        scores.append(arrays["delta"].sum(1) / max(arrays["tokens"].sum(), 1.0))
    return scores


def read_importance(folders: Sequence[Path], layers: Sequence[MoELayer], model: str | None = None) -> list[np.ndarray]:
    """Per layer, ΔNLL of each expert on all domains pooled, from interv.py --data run folders (one per layer) of
    `model` (another model's run is refused)."""
    import json

    import pandas as pd

    from common.errors import InputError

    found: dict[int, np.ndarray] = {}
    for folder in folders:
        try:
            info = json.loads((Path(folder) / "run.json").read_text())
        except (OSError, ValueError):
            raise InputError(f"--importance {folder}: not a run folder (no readable run.json)") from None
        if info.get("script") != "interv":
            raise InputError(f"--importance {folder}: a run of {info.get('script')}.py, not of interv.py --data")
        if model is not None and info.get("model") != model:
            raise InputError(f"--importance {folder}: a run of model {info.get('model')}, not of {model}")
        for path in sorted(Path(folder).glob("importance_layer*.csv")):
            table = pd.read_csv(path)
            pooled = table[table.domain == "all"]
            layer = int(pooled.layer.iloc[0])
            values = np.full(int(pooled.expert.max()) + 1, np.nan)
            values[pooled.expert.to_numpy()] = pooled.delta_nll.to_numpy()
            found[layer] = values
    scores = []
    for layer in layers:
        values = found.get(layer.layer)
        if values is None or len(values) < layer.num_experts or np.isnan(values[: layer.num_experts]).any():
            have = ", ".join(map(str, sorted(found))) or "none"
            raise InputError(f"--importance: no ablation of every expert of layer {layer.layer} in the run folders "
                             f"given (layers with one: {have}); run interv.py --data --layer {layer.layer} first")
        scores.append(values[: layer.num_experts])
    return scores


def redundancy_order(similarity: np.ndarray) -> list[int]:
    """Experts in the order output-similarity redundancy removes them: repeatedly, of the most similar pair left, the
    member more similar on average to the others left (ties: the higher index) goes; the last one stays last."""
    left = list(range(similarity.shape[0]))
    matrix = np.where(np.isfinite(similarity), similarity, -np.inf)
    order = []
    while len(left) > 1:
        sub = matrix[np.ix_(left, left)].copy()
        np.fill_diagonal(sub, -np.inf)
        i, j = np.unravel_index(np.argmax(sub), sub.shape)
        finite = np.where(np.isfinite(sub), sub, np.nan)
        mean_i, mean_j = np.nanmean(finite[i]), np.nanmean(finite[j])
        gone = left[i] if (mean_i, left[i]) > (mean_j, left[j]) else left[j]
        order.append(gone)
        left.remove(gone)
    return order + left


def read_similarity(folder: Path, layers: Sequence[MoELayer], method: str | None) -> tuple[list[list[int]], str]:
    """Per layer, the redundancy removal order from a sim.py run folder's similarity.csv (`method`, or the first the
    run has), and the method used."""
    import pandas as pd

    from common.errors import InputError

    path = Path(folder) / "similarity.csv"
    if not path.is_file():
        raise InputError(f"--similarity {folder}: no similarity.csv (give a sim.py run folder)")
    table = pd.read_csv(path)
    methods = list(dict.fromkeys(table.method))
    method = method or methods[0]
    if method not in methods:
        raise InputError(f"--similarity_method {method}: the run has {', '.join(methods)}")
    table = table[(table.method == method) & (table.expert_i != "shared") & (table.expert_j != "shared")]
    orders = []
    for layer in layers:
        rows = table[table.layer == layer.layer]
        if rows.empty:
            raise InputError(f"--similarity {folder}: no layer {layer.layer} (it has {sorted(set(table.layer))})")
        matrix = np.full((layer.num_experts, layer.num_experts), np.nan)
        matrix[rows.expert_i.astype(int), rows.expert_j.astype(int)] = rows.value.to_numpy(dtype=float)
        orders.append(redundancy_order(matrix))
    return orders, method


def read_similarity_matrices(folder: Path, layers: Sequence[MoELayer], method: str | None) -> list[np.ndarray]:
    """Per layer, the routed experts' similarity matrix from a sim.py run folder (NaN where undefined)."""
    import pandas as pd

    table = pd.read_csv(Path(folder) / "similarity.csv")
    method = method or next(iter(dict.fromkeys(table.method)))
    table = table[(table.method == method) & (table.expert_i != "shared") & (table.expert_j != "shared")]
    matrices = []
    for layer in layers:
        rows = table[table.layer == layer.layer]
        matrix = np.full((layer.num_experts, layer.num_experts), np.nan)
        matrix[rows.expert_i.astype(int), rows.expert_j.astype(int)] = rows.value.to_numpy(dtype=float)
        matrices.append(matrix)
    return matrices


def merge_clusters(similarity: np.ndarray, count: int) -> list[list[int]]:
    """The experts in `count` clusters by average linkage on the distance 1 − similarity (undefined pairs: distance
    1), as HC-SMoE groups them; each cluster sorted, clusters by their first member."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    experts = similarity.shape[0]
    if count >= experts:
        return [[e] for e in range(experts)]
    distance = 1.0 - np.nan_to_num(similarity, nan=0.0)
    distance = np.clip((distance + distance.T) / 2, 0.0, None)
    np.fill_diagonal(distance, 0.0)
    labels = fcluster(linkage(squareform(distance, checks=False), method="average"), t=max(count, 1),
                      criterion="maxclust")
    clusters: dict[int, list[int]] = {}
    for expert, label in enumerate(labels):
        clusters.setdefault(int(label), []).append(expert)
    return sorted(clusters.values(), key=lambda members: members[0])


@contextlib.contextmanager
def merged(layers: Sequence[MoELayer], clusters: Sequence[Sequence[Sequence[int]]],
           frequency: Sequence[np.ndarray]) -> Iterator[None]:
    """Inside the block every member of a cluster computes the frequency-weighted average of its members' weights
    (every expert tensor indexed by expert), the routing unchanged: a token routed to any member is served by the
    merged expert, which is HC-SMoE's merge with the cluster's router rows pointing at it. Restored afterwards."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for layer, groups, freq in zip(layers, clusters, frequency, strict=True):
                for _, param in list(layer.experts.named_parameters()):
                    if not (param.dim() and param.shape[0] == layer.num_experts):
                        continue
                    original = param.detach().clone()
                    saved.append((param, original))
                    for members in groups:
                        if len(members) < 2:
                            continue
                        weights = torch.tensor(np.asarray(freq, dtype=np.float64)[list(members)])
                        weights = weights / weights.sum() if weights.sum() > 0 else torch.full_like(weights, 1 / len(members))
                        shape = (-1,) + (1,) * (param.dim() - 1)
                        average = (original[list(members)].double() * weights.view(shape).to(param.device)).sum(0)
                        param[list(members)] = average.to(param.dtype)
        yield
    finally:
        with torch.no_grad():
            for param, original in saved:
                param.copy_(original)


def removal_order(scores: Sequence[np.ndarray]) -> list[list[int]]:
    """Per layer, experts from least to most important (ties: the lower index first)."""
    return [list(np.lexsort((np.arange(len(s)), s))) for s in scores]


def random_order(layers: Sequence[MoELayer], seed: int, draw: int, include_shared: bool = False) -> list[list[int]]:
    rng = random.Random(f"moescope:prune:{seed}:{draw}")
    orders = []
    for layer in layers:
        experts = list(range(layer.num_experts + int(include_shared and bool(layer.shared_experts))))
        rng.shuffle(experts)
        orders.append(experts)
    return orders


def removed_sets(layers: Sequence[MoELayer], orders: Sequence[Sequence[int]], fraction: float, scope: str,
                 scores: Sequence[np.ndarray] | None = None, how: str = "drop") -> list[tuple[int, ...]]:
    """Per layer, the experts removed at `fraction`: the first of each layer's order (`layer`), or the lowest scores
    over all layers (`global`; random orders by their position); with `drop` at most E − k routed experts per layer
    (the router needs k to choose from; prune.py refuses a --scope layer fraction past it), with `zero` up to E − 1."""
    caps = [m.num_experts - (m.top_k if how == "drop" else 1) for m in layers]
    if scope == "layer":  # routed experts past the cap are skipped; the shared unit (index E) has no cap
        chosen_per_layer = []
        for m, order, cap in zip(layers, orders, caps, strict=True):
            wanted, picked, routed = round(fraction * len(order)), [], 0
            for expert in order:
                if len(picked) == wanted:
                    break
                if expert < m.num_experts:
                    if routed == cap:
                        continue
                    routed += 1
                picked.append(expert)
            chosen_per_layer.append(tuple(sorted(picked)))
        return chosen_per_layer
    total = round(fraction * sum(len(order) for order in orders))
    candidates = []
    for i, order in enumerate(orders):
        for rank, expert in enumerate(order):
            value = float(scores[i][expert]) if scores is not None else rank / max(len(order), 1)
            candidates.append((value, i, rank, expert))
    candidates.sort()
    chosen: list[list[int]] = [[] for _ in layers]
    for _, i, _, expert in candidates:
        if total <= 0:
            break
        if expert >= layers[i].num_experts or sum(e < layers[i].num_experts for e in chosen[i]) < caps[i]:
            chosen[i].append(expert)
            total -= 1
    return [tuple(sorted(c)) for c in chosen]


def removal_edits(layers: Sequence[MoELayer], removed: Sequence[tuple[int, ...]], how: str) -> list[ExpertRemoval]:
    """The edits that take `removed[i]` out of layers[i] (index E = the layer's shared experts as one unit)."""
    return [ExpertRemoval(m.layer, tuple(e for e in experts if e < m.num_experts), how, shared=m.num_experts in experts)
            for m, experts in zip(layers, removed, strict=True) if experts]


@torch.no_grad()
def perplexity(moe: MoEModel, batches: Iterable[Batch], removed: Sequence[tuple[int, ...]],
               layers: Sequence[MoELayer], num_domains: int, how: str = "drop") -> tuple[np.ndarray, np.ndarray]:
    """(Σ NLL [domain], predictions [domain]) of next tokens with `removed[i]` taken out of layers[i]."""
    nll_sum, count = np.zeros(num_domains), np.zeros(num_domains)
    with intervene(moe, removal_edits(layers, removed, how)):
        for batch in batches:
            batch = batch.to(moe.device)
            add_domain_nll(nll_sum, count, moe.forward(batch.input_ids, batch.attention_mask).logits, batch)
    return nll_sum, count


def save_pruned(moe: MoEModel, keep: Sequence[Sequence[int]], folder: Path) -> Path:
    """A checkpoint with only the `keep[i]` experts of each MoE layer (the same number in every layer): the router's
    rows and every expert tensor indexed by expert re-indexed, the config's expert count updated, saved with
    save_pretrained (loadable with from_pretrained)."""
    counts = {len(k) for k in keep}
    if len(counts) != 1:
        raise ValueError("a checkpoint has one expert count: keep as many experts in every layer")
    model = copy.deepcopy(moe.model)
    for layer, kept in zip(moe.layers, keep, strict=True):
        index = torch.tensor(sorted(kept))
        for module in (model.get_submodule(_path(moe, layer.router)), model.get_submodule(_path(moe, layer.experts))):
            for name, tensor in list(module.named_parameters(recurse=True)) + list(module.named_buffers(recurse=True)):
                if tensor.dim() and tensor.shape[0] == layer.num_experts:
                    owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
                    leaf = name.rsplit(".", 1)[-1]
                    selected = tensor.detach().index_select(0, index.to(tensor.device)).clone()
                    if isinstance(tensor, torch.nn.Parameter):
                        setattr(owner, leaf, torch.nn.Parameter(selected, requires_grad=False))
                    else:
                        owner.register_buffer(leaf, selected)
            for attribute in ("num_experts", "out_features", "n_routed_experts"):
                if getattr(module, attribute, None) == layer.num_experts:
                    setattr(module, attribute, len(index))
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for attribute in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        if getattr(config, attribute, None) == moe.layers[0].num_experts:
            setattr(config, attribute, len(keep[0]))
    model.save_pretrained(folder)
    if moe.tokenizer is not None and hasattr(moe.tokenizer, "save_pretrained"):
        moe.tokenizer.save_pretrained(folder)
    return folder


def _path(moe: MoEModel, module: torch.nn.Module) -> str:
    for name, candidate in moe.model.named_modules():
        if candidate is module:
            return name
    raise ValueError("module not found in the model")


def nll_table(nll_sum: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean NLL per domain and pooled ('all' last), and the prediction counts."""
    mean = np.append(nll_sum / np.maximum(count, 1), nll_sum.sum() / max(count.sum(), 1))
    return mean, np.append(count, count.sum())
