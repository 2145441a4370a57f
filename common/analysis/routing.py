"""Per-token routing quantities (SPEC "Entropy / decisiveness", "Distributions") and their streamed accumulators.

Per-token functions are pure tensor maps on one layer's record. The accumulators keep, per (layer, domain), the
moments and fixed-bin histograms of those quantities on the model's device; the overall ("all") row of every table
is the domain axis pooled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from common.analysis import ALL_DOMAINS
from common.hooks import Capture, LayerRecord
from common.moe import MoELayer
from common.stats import DEFAULT_QUANTILES, Distribution, StatSet


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
    top2 = p.topk(min(2, choices), dim=-1).values
    margin = top2[:, 0] - top2[:, 1] if choices > 1 else top2[:, 0]
    return {
        "entropy": entropy,
        "entropy_normalized": entropy / math.log(choices),
        "topk_entropy": topk_entropy,
        "topk_entropy_normalized": topk_entropy / math.log(k) if k > 1 else torch.zeros_like(mass),
        "top1_prob": top2[:, 0],
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
            for name, values in decisiveness(logits, index).items():
                self.stats[name].update(values, groups, weight)


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


def _padded_range(low: float, high: float) -> tuple[float, float]:
    """A range around the first batch's values with room on both sides (values beyond are clamped and counted)."""
    span = max(high - low, 1e-3)
    return math.floor(low - 0.5 * span), math.ceil(high + 0.5 * span)


class DistributionStats(_LayerDomainStats):
    """Histograms + moments of z and p (per layer, domain) and of p̃ and w (per layer, domain, rank)."""

    NAME_COLUMN = "quantity"
    RANKED = ("topk_renormalized", "weight")

    def __init__(self, layers: Sequence[MoELayer], domains: Sequence[str], device: torch.device, bins: int = 200) -> None:
        super().__init__(layers, domains, device)
        self.bins = bins
        self.max_k = max(m.top_k for m in self.layers)

    def _create(self, records: Capture) -> None:
        # Logits and weights have no fixed range; the first batch sets it once (one host sync for the whole run).
        low_z = min(float(records[m.layer].logits.min()) for m in self.layers)
        high_z = max(float(records[m.layer].logits.max()) for m in self.layers)
        high_w = max(float(records[m.layer].topk_weight.max()) for m in self.layers)
        if dist.is_initialized():  # every rank must bin identically for all_reduce to add like with like
            extremes = torch.tensor([-low_z, high_z, high_w], dtype=torch.float64, device=self.device)
            dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
            low_z, high_z, high_w = -float(extremes[0]), float(extremes[1]), float(extremes[2])
        ranges = {
            "logit": _padded_range(low_z, high_z),
            "softmax": (0.0, 1.0),
            "topk_renormalized": (0.0, 1.0),
            "weight": (0.0, max(1.0, math.ceil(high_w * 1.5))),
        }
        for name, (lo, hi) in ranges.items():
            axes = {**self.axes, "rank": list(range(1, self.max_k + 1))} if name in self.RANKED else self.axes
            self.stats[name] = Distribution(axes, bins=self.bins, lo=lo, hi=hi, device=self.device)

    def update(self, records: Capture, token_domain: torch.Tensor, token_weight: torch.Tensor) -> None:
        if not len(self.stats):
            self._create(records)
        for positions, logits, index, weight in _stacked_layers(self.layers, records, with_weights=True):
            layer_of_token = positions.repeat_interleave(token_domain.shape[0]).view(-1, 1)
            domain = token_domain.repeat(len(positions)).view(-1, 1)
            counted = token_weight.repeat(len(positions)).view(-1, 1)
            stacked = LayerRecord(logits=logits, topk_index=index, topk_weight=weight)
            for name, tensor in distribution_values(stacked).items():
                groups = {"layer": layer_of_token, "domain": domain}
                if name in self.RANKED:
                    groups["rank"] = torch.arange(tensor.shape[-1], device=tensor.device).view(1, -1)
                self.stats[name].update(tensor, groups, counted)

    def _tidy(self, table: pd.DataFrame) -> pd.DataFrame:
        if "rank" not in table.columns:  # z and p are not ranked: one row per (layer, domain)
            table.insert(table.columns.get_loc("domain") + 1, "rank", "all")
        return table
