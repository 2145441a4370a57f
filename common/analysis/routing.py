"""Per-token routing quantities (SPEC "Entropy / decisiveness", "Distributions") and their streamed accumulators.

Per-token functions are pure tensor maps on one layer's record. The accumulators keep, per (layer, domain), the
moments and histograms of those quantities on the model's device: fixed ranges where a quantity has one (entropies,
probabilities, margins), a `GrowingHistogram` that widens to cover the data otherwise (raw logits, weights). The
overall ("all") row of every table is the domain axis pooled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from common.analysis import ALL_DOMAINS
from common.hooks import Capture, LayerRecord
from common.model import MoELayer
from common.stats import DEFAULT_QUANTILES, Accumulator, Distribution, Histogram, Moments, StatSet
from common.stats.base import _all_reduce_, _zeros


def routing_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """p = softmax(z) over all router choices, in float32 whatever the model dtype."""
    return torch.softmax(logits.float(), dim=-1)


def decisiveness(logits: torch.Tensor, topk_index: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token decisiveness of one layer's router; every value is [T].

    K is the set of experts the token was really sent to (for biased or sigmoid routers it need not be the top-k
    of p). entropy = -Σ p ln p over all C choices (max ln C); topk_entropy is the entropy of p restricted to K
    and renormalised (max ln k); margin = p(1) - p(2) of the sorted p.
    """
    p = routing_probabilities(logits)
    choices, k = p.shape[-1], topk_index.shape[-1]
    entropy = torch.special.entr(p).sum(-1)
    p_topk = p.gather(-1, topk_index.long())
    mass = p_topk.sum(-1)
    renormalised = p_topk / mass.clamp_min(torch.finfo(p.dtype).tiny).unsqueeze(-1)
    topk_entropy = torch.special.entr(renormalised).sum(-1)
    top1, first = p.max(-1)
    if choices > 1:  # the largest of the others: topk(2)'s second value (ties included), at a fifth of its cost
        top2 = p.scatter(-1, first.unsqueeze(-1), -math.inf).amax(-1)
        margin = top1 - top2
    else:
        margin = top1
    return {
        "entropy": entropy,
        "entropy_normalized": entropy / math.log(choices),
        "topk_entropy": topk_entropy,
        "topk_entropy_normalized": topk_entropy / math.log(k) if k > 1 else torch.zeros_like(mass),
        "top1_prob": top1,
        "top1_top2_margin": margin,
        "topk_mass": mass,
    }


def metric_ranges(layers: Sequence[MoELayer]) -> dict[str, tuple[float, float]]:
    """Fixed histogram ranges: each quantity's mathematical range, so bins are identical across runs and ranks."""
    max_choices = max(m.num_choices for m in layers)
    max_k = max(m.top_k for m in layers)
    unit = (0.0, 1.0)
    return {
        "entropy": (0.0, math.log(max_choices)),
        "entropy_normalized": unit,
        "topk_entropy": (0.0, math.log(max_k) if max_k > 1 else 1.0),
        "topk_entropy_normalized": unit,
        "top1_prob": unit,
        "top1_top2_margin": unit,
        "topk_mass": unit,
    }


def _stacked_layers(layers: Sequence[MoELayer], records: Capture, with_weights: bool = False):
    """Records of the layers that share a shape (router width, top-k), concatenated along the tokens.

    Yields (layer positions [n], logits [n·T, C], top-k index [n·T, k][, top-k weight]) per shape group.
    """
    by_shape: dict[tuple[int, int], list[int]] = {}
    for position, moe_layer in enumerate(layers):
        by_shape.setdefault((moe_layer.num_choices, moe_layer.top_k), []).append(position)
    for positions in by_shape.values():
        recs = [records[layers[p].layer] for p in positions]
        device = recs[0].logits.device
        stacked = [
            torch.tensor(positions, device=device),
            torch.cat([r.logits.to(device) for r in recs]),
            torch.cat([r.topk_index.to(device) for r in recs]),
        ]
        if with_weights:
            stacked.append(torch.cat([r.topk_weight.to(device) for r in recs]))
        yield tuple(stacked)


class _LayerDomainStats:
    """Shared bookkeeping: axes (layer, domain), the token weights, and tidy tables with an 'all' domain row."""

    def __init__(self, layers: Sequence[MoELayer], domains: Sequence[str], device: torch.device) -> None:
        self.layers = list(layers)
        self.domains = list(domains)
        self.device = device
        self.axes = {"layer": [m.layer for m in self.layers], "domain": self.domains}
        self.stats = StatSet()

    NAME_COLUMN = "metric"  # the column naming which accumulated quantity a row belongs to

    def all_reduce(self):
        self.stats.all_reduce()
        return self

    def summary(self, qs: Sequence[float] = DEFAULT_QUANTILES) -> pd.DataFrame:
        """One row per (quantity, layer, domain incl. 'all'[, rank]): count, mean, std, min, max, quantiles."""
        return self._long_table(lambda acc: self._with_overall(acc, qs))

    def histograms(self) -> pd.DataFrame:
        """One row per (quantity, layer, domain incl. 'all'[, rank], bin): left, right, count."""
        return self._long_table(self._hist_with_overall)

    def _long_table(self, frame) -> pd.DataFrame:
        tables = []
        for name in self.stats:
            table = self._tidy(frame(self.stats[name]))
            table.insert(0, self.NAME_COLUMN, name)
            tables.append(table)
        return pd.concat(tables, ignore_index=True)

    def _tidy(self, table: pd.DataFrame) -> pd.DataFrame:
        return table

    @staticmethod
    def _with_overall(acc: Distribution, qs: Sequence[float]) -> pd.DataFrame:
        per_domain = acc.frame(qs)
        overall = acc.marginalize("domain").frame(qs)
        overall.insert(list(per_domain.columns).index("domain"), "domain", ALL_DOMAINS)
        return pd.concat([per_domain, overall[per_domain.columns]], ignore_index=True)

    def histogram_array(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """counts [layer, domain + 1 ('all' last)(, rank), bins] and the bin edges."""
        result = self.stats[name].histogram.result()
        counts = np.concatenate([result.counts, result.counts.sum(axis=1, keepdims=True)], axis=1)
        return counts, result.edges

    @staticmethod
    def _hist_with_overall(acc: Distribution) -> pd.DataFrame:
        per_domain = acc.histogram.frame()
        overall = acc.histogram.marginalize("domain").frame()
        overall.insert(list(per_domain.columns).index("domain"), "domain", ALL_DOMAINS)
        return pd.concat([per_domain, overall[per_domain.columns]], ignore_index=True)


class DecisivenessStats(_LayerDomainStats):
    """Streamed moments + histograms of every `decisiveness` quantity per (layer, domain)."""

    def __init__(self, layers: Sequence[MoELayer], domains: Sequence[str], device: torch.device, bins: int = 200) -> None:
        super().__init__(layers, domains, device)
        for name, (lo, hi) in metric_ranges(self.layers).items():
            self.stats[name] = Distribution(self.axes, bins=bins, lo=lo, hi=hi, device=device)

    def update(self, records: Capture, token_domain: torch.Tensor, token_weight: torch.Tensor) -> None:
        for positions, logits, index in _stacked_layers(self.layers, records):
            # One call per quantity for all layers of a shape: the op count no longer grows with the layers.
            layer_of_token = positions.repeat_interleave(token_domain.shape[0])
            groups = {"layer": layer_of_token, "domain": token_domain.repeat(len(positions))}
            weight = token_weight.repeat(len(positions))
            for name, values in decisiveness(logits, index).items():  # one value per token: rows of one
                self.stats[name].update_rows(values.view(-1, 1), groups, weight)


def _rank_sorted(values: torch.Tensor) -> torch.Tensor:
    """Each token's k values in descending order: column r is rank r+1."""
    return values.sort(dim=-1, descending=True).values


def distribution_values(record: LayerRecord) -> dict[str, torch.Tensor]:
    """SPEC 'Distributions' for one layer: (a) raw logits z [T, C], (b) softmax p [T, C], (c) renormalised top-k
    p̃ [T, k] and (d) the weights the experts really receive w [T, k], both sorted by rank."""
    p = routing_probabilities(record.logits)
    p_topk = p.gather(-1, record.topk_index.long())
    renormalised = p_topk / p_topk.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    return {
        "logit": record.logits.float(),
        "softmax": p,
        "topk_renormalized": _rank_sorted(renormalised),
        "weight": _rank_sorted(record.topk_weight.float()),
    }


# ------------------------------------------------------------------------------ histograms that grow to fit

MIN_LEVEL = -16  # finest bin width of a growing histogram: 2^-16 ≈ 1.5e-5


def _pow2(level: torch.Tensor) -> torch.Tensor:
    """2^level as float64, exactly (built from the exponent bits; -1022 ≤ level ≤ 1023)."""
    return ((level.long().clamp(-1022, 1023) + 1023) << 52).view(torch.float64)


class GrowingHistogram(Histogram):
    """A `Histogram` whose range grows to cover every counted finite value: streamed, exact, and identical under
    torchrun. For unbounded quantities (raw router logits, weights of scaled or sigmoid routers).

    The bins lie on a power-of-two grid: width w = 2^level, and bin i covers [(start + i)·w, (start + i + 1)·w).
    The grid is always the canonical one of the counted finite values seen so far (weight ≠ 0; their min m and
    max M): the smallest level ≥ `min_level` at which ⌊M/w⌋ − ⌊m/w⌋ + 1 ≤ bins, and start = ⌊m/w⌋. So the edges
    span [m, M] with m in the first bin, at least about half of the bins lie inside [m, M], and `below`/`above`
    only ever hold ±inf. When a batch widens [m, M], the counts move to the new grid by merging whole bins (grids
    of different levels are nested), so every count is exactly the count of its bin, as if the final edges had
    been known from the start; values are never stored. The grid depends on (m, M) alone, so `all_reduce` first
    agrees on the global (m, M) (one MIN all_reduce, which a rank without batches joins too), moves every rank to
    that grid, then sums: the counts of one process, bin for bin. Everything runs on the device without a host
    sync; the edges reach the host in `result()`. Before any finite value the edges are linspace(lo, hi).
    """

    _reduce_ops: ClassVar[dict[str, str]] = {"counts": "sum", "extra": "sum", "span": "min"}

    def __init__(self, groups=None, bins: int = 100, lo: float = 0.0, hi: float = 1.0, *, device="cpu",
                 min_level: int = MIN_LEVEL) -> None:
        if int(bins) < 2:
            raise ValueError(f"a growing histogram needs at least 2 bins, got {bins}")
        self.min_level = int(min_level)
        super().__init__(groups, bins, lo, hi, device=device)

    def config(self) -> dict:
        return {**super().config(), "min_level": self.min_level}

    def _init_state(self) -> None:
        super()._init_state()
        # span = (min, -max) of the counted finite values (+inf: none yet); grid = (level, start), exact in float64.
        self._state["span"] = _zeros(2, self.device, math.inf)
        self._state["grid"] = _zeros(2, self.device)
        self._state["grid"][0] = self.min_level

    @property
    def edges(self) -> np.ndarray:
        span, (level, start) = self._state["span"].cpu().numpy(), self._state["grid"].cpu().numpy()
        if span[0] > -span[1]:  # nothing finite counted: the fallback range
            return np.linspace(self.lo, self.hi, self.bins + 1)
        return np.ldexp(start + np.arange(self.bins + 1, dtype=np.float64), int(level))

    def _grid_of(self, span: torch.Tensor) -> torch.Tensor:
        """The canonical (level, start) of the values with (min, -max) = span, as float64 [2] on the device."""
        B = self.bins
        lo, hi = span[0], -span[1]
        empty = lo > hi
        lo, hi = torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)
        # start = lo / w must stay exact in float64: w ≥ 2^(exponent of max |value| - 50).
        exponent = torch.frexp(torch.maximum(lo.abs(), hi.abs())).exponent.to(torch.float64)
        floor_level = torch.clamp(exponent - 50, min=self.min_level)
        guess = torch.ceil(torch.log2(((hi - lo) / B).clamp_min(2.0**-1000)))
        # The smallest fitting level is guess or guess + 1 (bins ≥ 2) unless the floor is higher; bins needed only
        # shrink as the level rises, so the first fitting candidate is it.
        candidates = torch.maximum(guess - 1, floor_level) + torch.arange(4, device=span.device, dtype=torch.float64)
        scale = _pow2(-candidates)
        needed = torch.floor(hi * scale) - torch.floor(lo * scale) + 1
        level = candidates[(needed <= B).long().argmax()]
        start = torch.floor(lo * _pow2(-level))
        return torch.where(empty, self._state["grid"], torch.stack([level, start]))

    def _regrid(self, span: torch.Tensor) -> None:
        """Move the counts to the canonical grid of `span` (never finer than the current one), merging bins."""
        G, B = self.num_groups, self.bins
        grid = self._grid_of(span)
        old_level, old_start = self._state["grid"]
        counts = self._state["counts"][: G * B].view(G, B)
        below, above = self._state["extra"][: G * 3].view(G, 3)[:, :2].unbind(1)  # ±inf, clamped into the edge bins
        finite = counts.clone()
        finite[:, 0] -= below
        finite[:, B - 1] -= above
        shift = (grid[0] - old_level).clamp(0, 62).long()
        old_bin = old_start.long() + torch.arange(B, device=counts.device)
        new_bin = ((old_bin >> shift) - grid[1].long()).clamp(0, B - 1)  # >>: floor division by 2^shift
        moved = torch.zeros_like(counts).index_add_(1, new_bin, finite)
        moved[:, 0] += below
        moved[:, B - 1] += above
        counts.copy_(moved)
        self._state["grid"].copy_(grid)
        self._state["span"].copy_(span)

    def _accumulate(self, v: torch.Tensor, g: torch.Tensor, w: torch.Tensor) -> None:
        G, B = self.num_groups, self.bins
        if v.numel():
            live = (w != 0) & torch.isfinite(v)
            batch = torch.stack([v.masked_fill(~live, math.inf).amin(), (-v).masked_fill(~live, math.inf).amin()])
            self._regrid(torch.minimum(self._state["span"], batch))
        nan = torch.isnan(v)
        level, start = self._state["grid"]
        position = torch.floor(v.masked_fill(nan, 0.0) * _pow2(-level)) - start  # exact: w is a power of two
        below, above = position < 0, position >= B
        flat = torch.where(g < G, g * B + position.clamp(0, B - 1).long(), G * B)  # g == G is the spare group
        self._state["counts"].index_add_(0, flat, w.masked_fill(nan, 0.0))
        kind = torch.where(nan, 2, torch.where(above, 1, 0))
        self._state["extra"].index_add_(0, g * 3 + kind, w.masked_fill(~(nan | below | above), 0.0))

    def _prepare_rows(self, v: torch.Tensor, w: torch.Tensor, plain: bool) -> None:
        if not v.numel():
            return
        if plain:  # on the CPU, all finite (a finite sum), rows of weight 0 already dropped: the common case
            batch = torch.stack([v.amin(), -v.amax()])
        else:
            live = (w != 0).view(-1, 1) & torch.isfinite(v)
            batch = torch.stack([v.masked_fill(~live, math.inf).amin(), (-v).masked_fill(~live, math.inf).amin()])
        self._regrid(torch.minimum(self._state["span"], batch))

    def _row_bins(self, v: torch.Tensor, plain: bool):
        level, start = self._state["grid"]
        position = (v * _pow2(-level)).floor_().sub_(start)  # exact: the width is a power of two
        # plain (all finite, on the CPU): the grid now spans every value, nothing lies outside it
        outside = None if plain else (position < 0, position >= self.bins)
        return position.clamp_(0, self.bins - 1), outside

    def _all_reduce_state(self, group) -> None:
        span = self._state["span"].clone()
        _all_reduce_(span, "min", group)  # every rank, batches or not: the global (min, -max)
        self._regrid(span)
        for name in ("counts", "extra"):
            _all_reduce_(self._state[name], "sum", group)

    @torch.no_grad()
    def merge(self, other: GrowingHistogram) -> GrowingHistogram:
        self._check_compatible(other)
        other = other.copy().to(self.device)
        span = torch.minimum(self._state["span"], other._state["span"])
        self._regrid(span)
        other._regrid(span)
        for name in ("counts", "extra"):
            self._state[name].add_(other._state[name])
        return self

    @torch.no_grad()
    def marginalize(self, *axes: str) -> Histogram:
        """A plain `Histogram` with the same edges over the remaining axes, summing over the named ``axes``."""
        edges = self.edges
        flat = Histogram(self.groups, self.bins, float(edges[0]), float(edges[-1]), device=self.device)
        assert np.array_equal(flat.edges, edges)  # power-of-two widths: linspace rebuilds them exactly
        for name in ("counts", "extra"):
            flat._state[name].copy_(self._state[name])
        flat.reduced = self.reduced
        return flat.marginalize(*axes) if axes else flat


class GrowingDistribution(Distribution):
    """`Distribution` (moments + histogram in one pass) whose histogram is a `GrowingHistogram`."""

    def __init__(self, groups=None, bins: int = 100, lo: float = 0.0, hi: float = 1.0, *, device="cpu",
                 min_level: int = MIN_LEVEL) -> None:
        Accumulator.__init__(self, groups, device)
        self.moments = Moments(self.groups, device=device)
        self.histogram = GrowingHistogram(self.groups, bins, lo, hi, device=device, min_level=min_level)
        self._init_state()


class DistributionStats(_LayerDomainStats):
    """Histograms + moments of z and p (per layer, domain) and of p̃ and w (per layer, domain, rank)."""

    NAME_COLUMN = "quantity"
    RANKED = ("topk_renormalized", "weight")
    UNBOUNDED = ("logit", "weight")

    def __init__(self, layers: Sequence[MoELayer], domains: Sequence[str], device: torch.device, bins: int = 200) -> None:
        super().__init__(layers, domains, device)
        self.bins = bins
        self.max_k = max(m.top_k for m in self.layers)
        # Probabilities have a fixed range; logits and weights (scaled or sigmoid routers exceed 1) have none: their
        # histograms grow to cover the data. Created up front, so a rank without batches joins every all_reduce.
        for name in ("logit", "softmax", "topk_renormalized", "weight"):
            axes = {**self.axes, "rank": list(range(1, self.max_k + 1))} if name in self.RANKED else self.axes
            if name in self.UNBOUNDED:
                self.stats[name] = GrowingDistribution(axes, bins=max(2, bins), device=device)
            else:
                self.stats[name] = Distribution(axes, bins=bins, lo=0.0, hi=1.0, device=device)

    def update(self, records: Capture, token_domain: torch.Tensor, token_weight: torch.Tensor) -> None:
        for positions, logits, index, weight in _stacked_layers(self.layers, records, with_weights=True):
            layer_of_token = positions.repeat_interleave(token_domain.shape[0]).view(-1, 1)
            domain = token_domain.repeat(len(positions)).view(-1, 1)
            counted = token_weight.repeat(len(positions)).view(-1, 1)
            stacked = LayerRecord(logits=logits, topk_index=index, topk_weight=weight)
            for name, tensor in distribution_values(stacked).items():
                if name in self.RANKED:  # each value its own (layer, domain, rank) group: rows of one value
                    rank = torch.arange(tensor.shape[-1], device=tensor.device).view(1, -1)
                    flat = self.stats[name].groups.index(layer=layer_of_token, domain=domain, rank=rank)
                    self.stats[name].update_rows(tensor.reshape(-1, 1), flat.reshape(-1),
                                                 counted.expand_as(tensor).reshape(-1))
                else:  # every choice of a token shares its (layer, domain) and weight: reduced per token first
                    groups = {"layer": layer_of_token.view(-1), "domain": domain.view(-1)}
                    self.stats[name].update_rows(tensor, groups, counted.view(-1))

    def _tidy(self, table: pd.DataFrame) -> pd.DataFrame:
        if "rank" not in table.columns:  # z and p are not ranked: one row per (layer, domain)
            table.insert(table.columns.get_loc("domain") + 1, "rank", "all")
        return table
