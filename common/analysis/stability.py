"""Routing stability (stability.py, docs/METRICS.md#routing-stability): does the same token get the same experts when
the precision, the batch, the padding side or its context changes?

- `route_changes`: per token, whether the top-k set and the top-1 expert changed and Σ_e |w_e − w′_e| over the dense
  E-vector of the weights the experts receive; `ChangeStats` sums them per (comparison, layer, domain).
- `forward_routes`: a forward with given ids, mask and position ids, read back at chosen flat token positions;
  `cut_and_pad` builds the right- and left-padded versions of a batch; `RouterOnly` reruns each router on its own input
  in other dtypes during a forward (the router's own precision, without upstream drift).
- `RouteSample`: a bounded, seeded sample of each token id's occurrences (their compact routes at every layer);
  `consistency` compares a token id's routes across windows (weighted Jaccard) against pairs of different ids of
  the same frequency.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.hooks import capture
from common.hooks.routing import Hooks, special_router_routing
from common.model import MoELayer, MoEModel, resolve_dtype

# ------------------------------------------------------------------------------------------ per-token change


def dense_weights(index: torch.Tensor, weight: torch.Tensor, num_choices: int) -> torch.Tensor:
    """[T, C] float32: the weight each choice receives (0 where not chosen) from top-k index and weight [T, k]."""
    out = torch.zeros(index.shape[0], num_choices, dtype=torch.float32, device=index.device)
    return out.scatter_add_(1, index.long(), weight.to(torch.float32))


@dataclass
class RouteChange:
    """Per token: top-k set changed, top-1 changed (bool [T]) and Σ_e |w_e − w′_e| (float32 [T])."""

    set_changed: torch.Tensor
    top1_changed: torch.Tensor
    abs_dw: torch.Tensor


def route_changes(ref_index: torch.Tensor, ref_weight: torch.Tensor, var_index: torch.Tensor,
                  var_weight: torch.Tensor, num_choices: int) -> RouteChange:
    """How the routing of the same T tokens differs between a reference and a variant run ([T, k] each).

    The set comparison ignores order (sorted indices); top-1 is the choice with the largest weight (the lowest index
    among equal weights); Δw is the L1 distance of the dense weight vectors."""
    set_changed = (ref_index.long().sort(-1).values != var_index.long().sort(-1).values).any(-1)
    ref, var = dense_weights(ref_index, ref_weight, num_choices), dense_weights(var_index, var_weight, num_choices)
    return RouteChange(set_changed, ref.argmax(-1) != var.argmax(-1), (ref - var).abs().sum(-1))


FIELDS = ("tokens", "topk_changed", "top1_changed", "weight_changed", "dw_sum", "dw_max")


class ChangeStats:
    """Sums of `route_changes` per comparison (in first-seen order), layer position and domain (+ all, last)."""

    def __init__(self, num_layers: int, num_domains: int) -> None:
        self.num_layers, self.num_domains = num_layers, num_domains
        self.tables: dict[tuple[str, str, str], np.ndarray] = {}

    def update(self, key: tuple[str, str, str], position: int, change: RouteChange, domains: torch.Tensor) -> None:
        table = self.tables.setdefault(key, np.zeros((self.num_layers, self.num_domains + 1, len(FIELDS))))
        domains = domains.cpu().long()
        values = [torch.ones_like(change.abs_dw), change.set_changed.float(), change.top1_changed.float(),
                  (change.abs_dw > 0).float(), change.abs_dw.double()]
        for f, value in enumerate(values):
            sums = torch.bincount(domains, weights=value.cpu().double(), minlength=self.num_domains).numpy()
            table[position, : self.num_domains, f] += sums
            table[position, -1, f] += sums.sum()
        dw = change.abs_dw.cpu().double()
        if dw.numel():
            most = torch.full((self.num_domains,), 0.0, dtype=torch.float64).scatter_reduce(0, domains, dw, "amax")
            table[position, : self.num_domains, 5] = np.maximum(table[position, : self.num_domains, 5], most.numpy())
            table[position, -1, 5] = max(table[position, -1, 5], float(dw.max()))

    def rows(self, layers: Sequence[int], domains: Sequence[str]) -> list[dict]:
        rows = []
        for (comparison, reference, variant), table in self.tables.items():
            for i, layer in enumerate(layers):
                for d, domain in enumerate([*domains, "all"]):
                    tokens, topk, top1, moved, dw_sum, dw_max = table[i, d]
                    share = (lambda x, n=tokens: x / n if n else float("nan"))  # noqa: E731
                    rows.append({"comparison": comparison, "reference": reference, "variant": variant,
                                 "layer": layer, "domain": domain, "tokens": int(tokens), "topk_changed": int(topk),
                                 "topk_changed_fraction": share(topk), "top1_changed_fraction": share(top1),
                                 "weight_changed_fraction": share(moved), "mean_abs_dw": share(dw_sum),
                                 "max_abs_dw": dw_max if tokens else float("nan")})
        return rows


# Near ties: the gap between the k-th and (k+1)-th largest router logits of the reference, on log10 bins.
GAP_EDGES = 10.0 ** np.arange(-6.0, 2.01, 0.5)  # 1e-6 … 1e2; smaller gaps (0 included) fall in the first bin


def topk_gap(logits: torch.Tensor, k: int) -> torch.Tensor:
    """[T] float32: z_(k) − z_(k+1), the k-th minus the (k+1)-th largest router logit of each token (inf when the
    router has only k choices)."""
    if logits.shape[-1] <= k:
        return torch.full((logits.shape[0],), float("inf"))
    top = logits.float().topk(k + 1, dim=-1).values
    return (top[:, k - 1] - top[:, k]).cpu()


class MarginStats:
    """Per comparison and layer position: counted tokens and top-k changes in each bin of the reference's gap."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.tables: dict[tuple[str, str, str], np.ndarray] = {}

    def update(self, key: tuple[str, str, str], position: int, change: RouteChange, gap: torch.Tensor) -> None:
        bins = len(GAP_EDGES) - 1
        table = self.tables.setdefault(key, np.zeros((self.num_layers, bins, 2)))
        where = np.clip(np.searchsorted(GAP_EDGES, gap.double().numpy(), side="right") - 1, 0, bins - 1)
        table[position, :, 0] += np.bincount(where, minlength=bins)
        table[position, :, 1] += np.bincount(where, weights=change.set_changed.cpu().double().numpy(), minlength=bins)

    def rows(self, layers: Sequence[int]) -> list[dict]:
        rows = []
        for (comparison, reference, variant), table in self.tables.items():
            for i, layer in enumerate(layers):
                for b in range(table.shape[1]):
                    tokens, changed = table[i, b]
                    rows.append({"comparison": comparison, "reference": reference, "variant": variant, "layer": layer,
                                 "bin": b, "left": 0.0 if b == 0 else float(GAP_EDGES[b]),
                                 "right": math.inf if b == table.shape[1] - 1 else float(GAP_EDGES[b + 1]),
                                 "tokens": int(tokens), "topk_changed": int(changed),
                                 "topk_changed_fraction": changed / tokens if tokens else math.nan})
        return rows


# ------------------------------------------------------------------------------------------ forwards


def compact(index: torch.Tensor, weight: torch.Tensor, num_choices: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routes as stored: int16 indices (int32 past 32767 choices) and float32 weights, on the CPU."""
    kind = torch.int16 if num_choices <= torch.iinfo(torch.int16).max else torch.int32
    return index.to("cpu", kind), weight.to("cpu", torch.float32)


def forward_routes(moe: MoEModel, layers: Sequence[MoELayer], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   flat: torch.Tensor, position_ids: torch.Tensor | None = None,
                   gaps: list | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One forward; each layer's (top-k index, weight) at the flattened token positions `flat` (compact, CPU).
    `gaps`: a list that receives each layer's `topk_gap` at those tokens."""
    kwargs = {} if position_ids is None else {"position_ids": position_ids.to(moe.device)}
    with capture(moe, layers, ("topk", "logits") if gaps is not None else ("topk",)) as records:
        moe.forward(input_ids, attention_mask, **kwargs)
        if gaps is not None:
            gaps.extend(topk_gap(records[m.layer].logits[flat.to(records[m.layer].logits.device)], m.top_k)
                        for m in layers)
        return [routes_at(records[m.layer], flat, m.num_choices) for m in layers]


def routes_at(record, flat: torch.Tensor, num_choices: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = flat.to(record.topk_index.device)
    return compact(record.topk_index[flat], record.topk_weight[flat], num_choices)


def counted_flat(count_mask: torch.Tensor) -> torch.Tensor:
    """Flat (row-major) positions of the counted tokens of a [B, S] mask."""
    return count_mask.reshape(-1).nonzero().squeeze(1)


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as `generate` sets them: the count of real tokens before each one (pads get 1)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


@dataclass
class Padded:
    input_ids: torch.Tensor  # [B, W]
    attention_mask: torch.Tensor  # [B, W]
    position_ids: torch.Tensor  # [B, W]
    flat: torch.Tensor  # [N] flat positions of the compared tokens, in (row, position in the window) order


def cut_lengths(attention_mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each row's window cut to a seeded length uniform in [⌈n/2⌉, n] (n = its real tokens), so rows differ in length."""
    real = attention_mask.long().sum(-1)
    low = (real + 1) // 2
    draws = torch.rand(real.shape[0], generator=generator, dtype=torch.float64)
    return torch.minimum(low + (draws * (real - low + 1).double()).long(), real)


def cut_and_pad(input_ids: torch.Tensor, count_mask: torch.Tensor, lengths: torch.Tensor, side: str, pad_id: int,
                positions: str = "mask") -> Padded:
    """Rows 0..B−1 of a right-padded batch cut to `lengths`, padded on `side` (right/left) to the longest cut.

    `positions`: 'mask' numbers each row's real tokens 0, 1, … wherever they sit (as `generate` does); 'index'
    gives every slot its index 0..W−1 (a forward without position ids), so left-padded tokens start past 0.
    `flat` lists the counted tokens kept by the cut, in the same order for both sides."""
    rows, width = input_ids.shape[0], int(lengths.max())
    ids = torch.full((rows, width), pad_id, dtype=input_ids.dtype)
    mask = torch.zeros(rows, width, dtype=torch.long)
    flat = []
    for i in range(rows):
        n = int(lengths[i])
        start = width - n if side == "left" else 0
        ids[i, start:start + n] = input_ids[i, :n].cpu()
        mask[i, start:start + n] = 1
        kept = count_mask[i, :n].cpu().nonzero().squeeze(1)
        flat.append(i * width + start + kept)
    position_ids = mask_positions(mask) if positions == "mask" else torch.arange(width).expand(rows, width)
    return Padded(ids, mask, position_ids.contiguous(), torch.cat(flat) if flat else torch.zeros(0, dtype=torch.long))


# ------------------------------------------------------------------------------------------ router only


def _tuple_routing(moe_layer: MoELayer, out) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(index, weight) from a standard router's output tuple: its integer tensor and the float tensor of that shape."""
    if not isinstance(out, tuple):
        return None  # a router returning only logits (DBRX): its top-k is taken in the block
    items = [t for i, t in enumerate(out) if isinstance(t, torch.Tensor) and i != moe_layer.logit_index]
    index = next((t for t in items if not t.is_floating_point()), None)
    if index is None:
        return None
    weight = next((t for t in items if t.is_floating_point() and t.shape == index.shape), None)
    return None if weight is None else (index.reshape(-1, index.shape[-1]), weight.reshape(-1, weight.shape[-1]))


def _cast(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value


class RouterOnly:
    """During each forward, every router of `layers` is also run as a copy cast to each dtype, on its own input cast
    to that dtype; `routes[(layer, dtype)]` holds the copy's (index, weight) [T, k] of the last forward (the same
    tokens as the layer's own capture). Layers where this cannot be read (a router that returns only logits) are
    listed in `unsupported`."""

    def __init__(self, layers: Sequence[MoELayer], dtypes: Sequence[str]) -> None:
        self.layers, self.dtypes = list(layers), list(dtypes)
        self.routes: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.unsupported: set[int] = set()

    @contextlib.contextmanager
    def active(self) -> Iterator[RouterOnly]:
        hooks = Hooks()
        try:
            for moe_layer in self.layers:
                copies = {name: copy.deepcopy(moe_layer.router).to(resolve_dtype(name, torch.device("cpu")))
                          for name in self.dtypes}
                hooks.add(moe_layer.router.register_forward_hook(self._hook(moe_layer, copies), with_kwargs=True))
            yield self
        finally:
            hooks.remove()

    def _hook(self, moe_layer: MoELayer, copies: dict[str, torch.nn.Module]):
        def hook(module, args, kwargs, out):
            if moe_layer.kind == "standard" and _tuple_routing(moe_layer, out) is None:
                self.unsupported.add(moe_layer.layer)
                return None
            for name, router in copies.items():
                dtype = resolve_dtype(name, torch.device("cpu"))
                cast_args = tuple(_cast(a, dtype) for a in args)
                cast_kwargs = {k: _cast(v, dtype) for k, v in kwargs.items()}
                copy_out = router(*cast_args, **cast_kwargs)
                if moe_layer.kind == "standard":
                    routing = _tuple_routing(moe_layer, copy_out)
                else:
                    view = dataclasses.replace(moe_layer, router=router)
                    _, index, weight = special_router_routing(view, router, cast_args, copy_out)
                    routing = (index, weight)
                self.routes[(moe_layer.layer, name)] = routing
            return None

        return hook


# ------------------------------------------------------------------------------------------ route consistency


def weighted_jaccard(index_a: torch.Tensor, weight_a: torch.Tensor, index_b: torch.Tensor,
                     weight_b: torch.Tensor) -> torch.Tensor:
    """Σ_e min(r_e, s_e) / Σ_e max(r_e, s_e) of pairs of sparse routes ([P, k] each; weights ≥ 0); 1 where both are
    all zero. Computed on the k × k index matches, so it equals the dense formula when no index repeats with a
    nonzero weight."""
    wa, wb = weight_a.double(), weight_b.double()
    same = index_a.long().unsqueeze(2) == index_b.long().unsqueeze(1)
    low = torch.where(same, torch.minimum(wa.unsqueeze(2), wb.unsqueeze(1)), torch.zeros((), dtype=torch.float64))
    overlap = low.sum((1, 2))
    union = wa.sum(1) + wb.sum(1) - overlap
    return torch.where(union > 0, overlap / union.clamp_min(1e-300), torch.ones_like(union))


class RouteSample:
    """Up to `size` occurrences of every token id, a uniform sample without replacement: each occurrence gets a seeded
    random key and each id keeps its `size` smallest keys (bottom-k sampling: independent of the order the batches
    come in). Each kept occurrence holds its window id and its compact top-k route at every layer. `counts` counts
    every occurrence."""

    def __init__(self, size: int, vocab: int) -> None:
        self.size = size
        self.counts = np.zeros(vocab, dtype=np.int64)
        self.ids = np.zeros(0, dtype=np.int64)
        self.keys = np.zeros(0, dtype=np.float64)
        self.windows = np.zeros(0, dtype=np.int64)
        self.index: np.ndarray | None = None  # [N, L, k]
        self.weight: np.ndarray | None = None  # [N, L, k] float32
        self._pending: list[tuple] = []
        self._pending_rows = 0

    def add(self, ids: torch.Tensor, windows: torch.Tensor, keys: torch.Tensor,
            routes: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        ids_np = ids.cpu().numpy().astype(np.int64)
        if ids_np.size and ids_np.max() >= self.counts.size:
            self.counts = np.pad(self.counts, (0, int(ids_np.max()) + 1 - self.counts.size))
        np.add.at(self.counts, ids_np, 1)
        index = np.stack([r[0].numpy() for r in routes], 1)
        weight = np.stack([r[1].numpy() for r in routes], 1)
        self._pending.append((ids_np, keys.cpu().numpy(), windows.cpu().numpy().astype(np.int64), index, weight))
        self._pending_rows += ids_np.size
        if self._pending_rows > max(65536, 4 * self.ids.size):
            self.compact()

    def compact(self) -> None:
        if not self._pending:
            return
        parts = list(zip(*self._pending, strict=True))
        self._pending, self._pending_rows = [], 0
        ids = np.concatenate([self.ids, *parts[0]])
        keys = np.concatenate([self.keys, *parts[1]])
        windows = np.concatenate([self.windows, *parts[2]])
        index = np.concatenate(([self.index] if self.index is not None else []) + list(parts[3]))
        weight = np.concatenate(([self.weight] if self.weight is not None else []) + list(parts[4]))
        order = np.lexsort((keys, ids))  # by id, then by key
        sorted_ids = ids[order]
        rank = np.arange(sorted_ids.size) - np.searchsorted(sorted_ids, sorted_ids, side="left")
        keep = order[rank < self.size]  # each id's `size` smallest keys, still sorted by (id, key)
        self.ids, self.keys, self.windows = ids[keep], keys[keep], windows[keep]
        self.index, self.weight = index[keep], weight[keep]


def frequency_bins(counts: np.ndarray) -> np.ndarray:
    """⌊log2 count⌋ of each id; a bin holding a single id is merged into the next lower bin (from the top down), and
    a single id left in the lowest bin into the next higher one, so every id has another of about its frequency."""
    bins = np.floor(np.log2(np.maximum(counts, 1))).astype(np.int64)
    labels = sorted(set(bins.tolist()), reverse=True)
    for high, low in itertools.pairwise(labels):
        if (bins == high).sum() == 1:
            bins[bins == high] = low
    present = sorted(set(bins.tolist()))
    if len(present) > 1 and (bins == present[0]).sum() == 1:
        bins[bins == present[0]] = present[1]
    return bins


@dataclass
class Pairs:
    first: np.ndarray  # rows of the sample
    second: np.ndarray
    owner: np.ndarray  # position of the token id (in `ids`) the pair belongs to


def _pairs(sample: RouteSample, ids: np.ndarray, starts: np.ndarray, sizes: np.ndarray, bins: np.ndarray,
           max_pairs: int, rng: np.random.Generator) -> tuple[Pairs, Pairs]:
    """Same-id pairs (two occurrences of one id in different windows; all, or `max_pairs` drawn without replacement)
    and as many baseline pairs per id (one of its occurrences, one of a different id of its frequency bin, in
    different windows; drawn with replacement)."""
    same, base = ([], [], []), ([], [], [])
    by_bin = {b: np.flatnonzero(bins == b) for b in set(bins.tolist())}
    for v in range(ids.size):
        rows = starts[v] + np.arange(sizes[v])
        a, b = np.triu_indices(sizes[v], 1)
        a, b = rows[a], rows[b]
        cross = sample.windows[a] != sample.windows[b]
        a, b = a[cross], b[cross]
        if a.size > max_pairs:
            chosen = np.sort(rng.choice(a.size, max_pairs, replace=False))
            a, b = a[chosen], b[chosen]
        for part, values in zip(same, (a, b, np.full(a.size, v)), strict=True):
            part.append(values)
        others = by_bin[bins[v]]
        others = others[others != v]
        if not a.size or not others.size:
            continue
        draws = 4 * a.size
        first = rows[rng.integers(0, sizes[v], draws)]
        other = others[rng.integers(0, others.size, draws)]
        second = starts[other] + (rng.random(draws) * sizes[other]).astype(np.int64)
        ok = np.flatnonzero(sample.windows[first] != sample.windows[second])[: a.size]
        for part, values in zip(base, (first[ok], second[ok], np.full(ok.size, v)), strict=True):
            part.append(values)

    def pairs(parts) -> Pairs:
        return Pairs(*(np.concatenate(p) if p else np.zeros(0, dtype=np.int64) for p in parts))

    return pairs(same), pairs(base)


def _pair_means(sample: RouteSample, pairs: Pairs, position: int, num_ids: int,
                chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Per token id: the mean weighted Jaccard of its pairs at one layer position (NaN without pairs), and their count."""
    total = np.zeros(num_ids)
    for start in range(0, pairs.first.size, chunk):
        a, b = pairs.first[start:start + chunk], pairs.second[start:start + chunk]
        values = weighted_jaccard(*(torch.from_numpy(x[:, position]) for x in (sample.index[a], sample.weight[a],
                                                                                 sample.index[b], sample.weight[b])))
        total += np.bincount(pairs.owner[start:start + chunk], weights=values.numpy(), minlength=num_ids)
    count = np.bincount(pairs.owner, minlength=num_ids)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan), count


def consistency(sample: RouteSample, layers: Sequence[int], min_count: int, max_pairs: int,
                seed: int) -> tuple[list[dict], list[dict]]:
    """Route consistency per layer (docs/METRICS.md#route-consistency): (summary rows per layer, rows per layer and
    token id). A token id counts when it occurred at least `min_count` times and its sample spans ≥ 2 windows."""
    sample.compact()
    if sample.index is None:
        return [], []
    unique, starts, sizes = np.unique(sample.ids, return_index=True, return_counts=True)
    windows = np.array([np.unique(sample.windows[s:s + n]).size for s, n in zip(starts, sizes, strict=True)])
    keep = (sample.counts[unique] >= min_count) & (windows >= 2)
    ids, starts, sizes, windows = unique[keep], starts[keep], sizes[keep], windows[keep]
    counts = sample.counts[ids]
    bins = frequency_bins(counts) if ids.size else np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng([seed, 0x5AB1E])
    same, base = _pairs(sample, ids, starts, sizes, bins, max_pairs, rng)
    summary, tokens = [], []
    for position, layer in enumerate(layers):
        mean_same, n_same = _pair_means(sample, same, position, ids.size)
        mean_base, n_base = _pair_means(sample, base, position, ids.size)
        difference = mean_same - mean_base
        both = np.isfinite(difference)
        summary.append({
            "layer": layer, "ids": int(both.sum()), "pairs_same": int(n_same[both].sum()),
            "pairs_baseline": int(n_base[both].sum()),
            "same_id_mean": float(mean_same[both].mean()) if both.any() else math.nan,
            "baseline_mean": float(mean_base[both].mean()) if both.any() else math.nan,
            "difference_mean": float(difference[both].mean()) if both.any() else math.nan,
            "difference_sem": float(difference[both].std(ddof=1) / math.sqrt(both.sum())) if both.sum() > 1 else math.nan,
        })
        for v in range(ids.size):
            tokens.append({"layer": layer, "token_id": int(ids[v]), "count": int(counts[v]), "sampled": int(sizes[v]),
                           "windows": int(windows[v]), "frequency_bin": int(bins[v]), "pairs": int(n_same[v]),
                           "consistency": float(mean_same[v]), "baseline_pairs": int(n_base[v]),
                           "baseline": float(mean_base[v]), "difference": float(difference[v])})
    return summary, tokens

