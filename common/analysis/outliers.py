"""Super experts (outliers.py): the peaks entering and leaving each routed expert's down projection, the residual
stream's massive activations, the attention mass on the first token, and the rule that names super experts.
Definitions: docs/METRICS.md#super-experts.

Everything is streamed: per (layer, expert, domain) the running maximum and where it occurred (batch, row,
position, neuron or dimension), never the tokens' activations. Ties keep the first occurrence in stream order, as
`argmax` over the whole pass would. Every real token of a window is measured (attention mask 1), the tokenizer's
specials included: the massive activations of the literature sit on the first token and on delimiters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.analysis.lens import add_domain_nll
from common.analysis.pruning import removal_edits
from common.data import Batch
from common.hooks import capture, intervene
from common.model import MoELayer, MoEModel

# log10 |h| histogram of the residual stream, for its median: 0.002 decades per bin (0.46% relative resolution).
LOG_LOW, LOG_HIGH, LOG_BINS = -8.0, 6.0, 7000
TOP_RESIDUAL = 3  # the Massive Activations paper reports the top-1, -2 and -3 magnitudes against the median


@dataclass
class Peak:
    """Where a running maximum occurred."""

    value: float
    index: int  # neuron (down-projection input) or dimension (output, residual)
    batch: int  # position in the stream of kept batches
    row: int
    position: int


class _RunningMax:
    """Running max |value| per (unit, slot) with its provenance, on the device; strict > keeps the first occurrence."""

    def __init__(self, units: int, slots: int, device: torch.device) -> None:
        self.value = torch.full((units, slots), -1.0, dtype=torch.float64, device=device)
        self.where = torch.full((units, slots, 4), -1, dtype=torch.long, device=device)  # index, batch, row, position

    def offer(self, unit: int, slots: torch.Tensor, values: torch.Tensor, index: torch.Tensor, batch: int,
              rows: torch.Tensor, positions: torch.Tensor) -> None:
        """Candidates [n] of one batch in stream order: |value|, the domain slot of each, their neuron/dimension, row
        and position; the last slot ('all') takes every candidate. No host synchronisation."""
        n = values.numel()
        if n == 0:
            return
        device = self.value.device
        values, order = values.to(device, torch.float64), torch.arange(n, device=device)
        provenance = torch.stack([index.to(device), torch.full((n,), batch, device=device), rows.to(device),
                                  positions.to(device)], 1)
        count = self.value.shape[1]
        for group in (slots.to(device), torch.full((n,), count - 1, device=device)):
            best = torch.full((count,), -1.0, dtype=torch.float64, device=device).scatter_reduce(
                0, group, values, "amax", include_self=True)
            first = torch.full((count,), n, dtype=torch.long, device=device).scatter_reduce(
                0, group, torch.where(values == best[group], order, n), "amin", include_self=True)  # first maximum
            better = best > self.value[unit]
            self.value[unit] = torch.where(better, best, self.value[unit])
            self.where[unit] = torch.where(better.view(-1, 1), provenance[first.clamp(max=n - 1)], self.where[unit])

    def peak(self, unit: int, slot: int) -> Peak | None:
        if float(self.value[unit, slot]) < 0:
            return None
        index, batch, row, position = (int(v) for v in self.where[unit, slot])
        return Peak(float(self.value[unit, slot]), index, batch, row, position)


class ExpertPeaks:
    """Per MoE layer and routed expert, per domain and over all ('all' = slot D): the largest |value| of the
    down-projection input (the neurons act(gate·x)·(up·x)) and of the expert's output E_e(x), and how many tokens
    reached the expert, over the tokens routed to it (w ≠ 0)."""

    def __init__(self, layers: Sequence[MoELayer], num_domains: int, device: torch.device) -> None:
        self.layers = list(layers)
        self.num_domains = num_domains
        self.inputs = [_RunningMax(m.num_experts, num_domains + 1, device) for m in self.layers]
        self.outputs = [_RunningMax(m.num_experts, num_domains + 1, device) for m in self.layers]
        self.routed = torch.zeros(len(self.layers), max(m.num_experts for m in self.layers), num_domains + 1,
                                  dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, records, batch: Batch, number: int) -> None:
        real = batch.attention_mask.reshape(-1).bool()
        seq = batch.input_ids.shape[1]
        flat = torch.arange(real.numel(), device=real.device)
        rows_of, positions_of = flat // seq, flat % seq
        domains = batch.token_domains()
        all_slot = self.num_domains
        for i, layer in enumerate(self.layers):
            record = records[layer.layer]
            index, weight = record.topk_index.long(), record.topk_weight
            routed = (weight != 0) & (index < layer.num_experts) & real.to(index.device).view(-1, 1)
            token, slot = routed.nonzero(as_tuple=True)  # token ascending: stream order
            experts = index[token, slot]
            order = torch.argsort(experts, stable=True)  # grouped by expert, stream order kept within each
            sizes = torch.bincount(experts, minlength=layer.num_experts).tolist()
            for e, tokens in enumerate(torch.split(token[order], sizes)):
                if not sizes[e]:
                    continue
                neurons = layer.expert_neurons(e, record.expert_input[tokens])
                output = layer.expert_output_from_neurons(e, neurons)
                in_value, in_index = neurons.detach().abs().max(dim=-1)
                out_value, out_index = output.detach().abs().max(dim=-1)
                where = tokens.to(rows_of.device)
                rows, positions, slots = rows_of[where], positions_of[where], domains[where.to(domains.device)]
                self.routed[i, e].index_add_(0, slots.to(self.routed.device),
                                             torch.ones(len(slots), dtype=torch.float64, device=self.routed.device))
                self.routed[i, e, all_slot] += sizes[e]
                self.inputs[i].offer(e, slots, in_value, in_index, number, rows, positions)
                self.outputs[i].offer(e, slots, out_value, out_index, number, rows, positions)

    def peaks(self, which: str, slot: int) -> list[np.ndarray]:
        """Per layer, the peak of every routed expert in a slot (NaN for an expert never routed there)."""
        table = self.inputs if which == "input" else self.outputs
        out = []
        for i, layer in enumerate(self.layers):
            values = table[i].value[: layer.num_experts, slot].double().cpu().numpy()
            out.append(np.where(values < 0, np.nan, values))
        return out


class ResidualPeaks:
    """Per decoder layer and domain (+ all): the top-3 |h| of the residual stream after the layer over every real
    token and dimension (with where they occurred), Σ|h| and the entry count (mean |h|), and a log-spaced histogram
    of |h| for its median."""

    def __init__(self, num_layers: int, num_domains: int, device: torch.device) -> None:
        self.num_layers, self.num_domains = num_layers, num_domains
        slots = num_domains + 1
        self.top = torch.full((num_layers, slots, TOP_RESIDUAL), -1.0, dtype=torch.float64, device=device)
        self.where = torch.full((num_layers, slots, TOP_RESIDUAL, 4), -1, dtype=torch.long, device=device)
        self.abs_sum = torch.zeros(num_layers, slots, dtype=torch.float64, device=device)
        self.entries = torch.zeros(num_layers, slots, dtype=torch.float64, device=device)
        self.histogram = torch.zeros(num_layers, slots, LOG_BINS, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, records, batch: Batch, number: int) -> None:
        real = batch.attention_mask.reshape(-1).bool()
        seq = batch.input_ids.shape[1]
        domains = batch.token_domains()
        for layer in range(self.num_layers):
            h = records[layer].residual
            h = h.reshape(h.shape[0], -1).abs()  # [T, H] (hyper-connection streams side by side)
            width = h.shape[1]
            for d in [*domains[real].unique().tolist(), self.num_domains]:
                mine = real & ((domains == d) if d < self.num_domains else torch.ones_like(real))
                tokens = mine.nonzero(as_tuple=True)[0].to(h.device)
                if tokens.numel() == 0:
                    continue
                values = h[tokens]
                self.abs_sum[layer, d] += values.double().sum()
                self.entries[layer, d] += values.numel()
                logs = torch.log10(values.float().clamp_min(10 ** LOG_LOW))
                self.histogram[layer, d] += torch.histc(logs, LOG_BINS, LOG_LOW, LOG_HIGH).double()
                flat = values.reshape(-1)
                count = min(TOP_RESIDUAL, flat.numel())
                # the batch's top entries, earliest first among equals (a stable sort of the negated values)
                order = torch.sort(-flat.double(), stable=True).indices[:count]
                token = tokens[order // width]
                candidates = torch.stack([order % width, torch.full_like(order, number), token // seq, token % seq], 1)
                merged_values = torch.cat([self.top[layer, d], flat[order].double().to(self.top.device)])
                merged_where = torch.cat([self.where[layer, d], candidates.to(self.where.device)])
                keep = torch.sort(-merged_values, stable=True).indices[:TOP_RESIDUAL]  # the kept ones first on ties
                self.top[layer, d], self.where[layer, d] = merged_values[keep], merged_where[keep]

    def median(self, layer: int, slot: int) -> float:
        """Median |h| from the histogram (the centre of the bin holding the middle entry, in log space)."""
        counts = self.histogram[layer, slot].cpu().numpy()
        if counts.sum() == 0:
            return float("nan")
        middle = np.searchsorted(np.cumsum(counts), counts.sum() / 2)
        width = (LOG_HIGH - LOG_LOW) / LOG_BINS
        return float(10 ** (LOG_LOW + (middle + 0.5) * width))

    def peaks(self, layer: int, slot: int) -> list[Peak]:
        out = []
        for j in range(TOP_RESIDUAL):
            value = float(self.top[layer, slot, j])
            if value >= 0:
                index, batch, row, position = (int(v) for v in self.where[layer, slot, j])
                out.append(Peak(value, index, batch, row, position))
        return out


def super_experts(peaks: Sequence[np.ndarray], multiple: float,
                  chosen: Sequence[tuple[int, int]] | None = None) -> list[tuple[int, float, float]]:
    """Per layer, the experts whose peak exceeds `multiple` × the median peak of the layer's routed experts (experts
    never routed left out of the median), or the (layer position, expert) pairs of `chosen` whatever their peak:
    (layer position, expert, peak, median) in layer order, experts ascending."""
    named = []
    for i, values in enumerate(peaks):
        seen = values[np.isfinite(values)]
        median = float(np.median(seen)) if seen.size else float("nan")
        if chosen is not None:
            experts = sorted({e for j, e in chosen if j == i})
        else:
            experts = np.flatnonzero(np.nan_to_num(values, nan=-np.inf) > multiple * median) if seen.size else []
        named.extend((i, int(e), float(values[e]), median) for e in experts)
    return named


class SinkMass:
    """Attention mass on the window's first token, per decoder layer: the mean over heads and over the real query
    tokens at positions ≥ 1 of the attention weight a[q, 0] (position 0 attends only to itself). Needs the attention
    probabilities, which only the eager attention implementation returns: `attention_weights(moe)` switches to it."""

    def __init__(self, num_layers: int, num_domains: int) -> None:
        self.sum = np.zeros((num_layers, num_domains + 1))
        self.count = np.zeros((num_layers, num_domains + 1))
        self.uniform = np.zeros((num_layers, num_domains + 1))  # Σ 1/(keys visible): what uniform attention gives
        self.missing: set[int] = set()

    def add(self, layer: int, weights: torch.Tensor | None, batch: Batch) -> None:
        if not isinstance(weights, torch.Tensor) or weights.dim() != 4 or weights.shape[-1] != batch.input_ids.shape[1]:
            self.missing.add(layer)
            return
        query = batch.attention_mask.bool().clone()
        query[:, 0] = False  # position 0 attends only to itself
        first = weights[..., 0].float().mean(dim=1)  # [B, S]: mass on key 0, mean over heads
        query = query.to(first.device)
        per_row = (first * query).sum(1).double().cpu().numpy()
        rows = query.sum(1).double().cpu().numpy()
        visible = batch.attention_mask.cumsum(1).double().to(query.device)  # real keys up to each query (right padding)
        uniform = ((1 / visible.clamp_min(1)) * query).sum(1).cpu().numpy()
        domains = batch.domain_ids.cpu().numpy()
        for total, values in ((self.sum, per_row), (self.count, rows), (self.uniform, uniform)):
            np.add.at(total[layer], domains, values)
            total[layer, -1] += values.sum()

    def mass(self) -> np.ndarray:
        """[decoder layer, domain + all] mean sink mass (NaN where no attention weights were seen)."""
        return np.where(self.count > 0, self.sum / np.maximum(self.count, 1), np.nan)

    def uniform_mass(self) -> np.ndarray:
        """[decoder layer, domain + all] the same mean under uniform attention over the visible keys, 1/(q + 1)."""
        return np.where(self.count > 0, self.uniform / np.maximum(self.count, 1), np.nan)


@contextlib.contextmanager
def attention_weights(moe: MoEModel, sink: SinkMass, current: dict) -> Iterator[None]:
    """Within the block the model attends eagerly (so its attention modules return their probabilities) and each
    decoder layer's attention probabilities go to `sink` for the batch in `current["batch"]`; the attention
    implementation and the hooks are restored in `finally`."""
    model = moe.model
    previous = getattr(model.config, "_attn_implementation", None)
    handles = []
    try:
        if hasattr(model, "set_attn_implementation") and previous not in (None, "eager"):
            model.set_attn_implementation("eager")
        for index, layer in enumerate(moe.decoder_layers()):
            attention = next((module for name, module in layer.named_children()
                              if "attn" in name.lower() or "attention" in name.lower()), None)
            if attention is None:
                sink.missing.add(index)
                continue

            def hook(module, args, out, index=index):
                weights = out[1] if isinstance(out, tuple) and len(out) > 1 else None
                sink.add(index, weights, current["batch"])

            handles.append(attention.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
        if hasattr(model, "set_attn_implementation") and previous not in (None, "eager"):
            model.set_attn_implementation(previous)


@dataclass
class Consequence:
    """What one forward condition (experts removed or not) gives on the kept batches."""

    nll_sum: np.ndarray  # [domain] Σ next-token NLL over the counted predictions
    count: np.ndarray  # [domain] counted predictions
    sink: np.ndarray  # [decoder layer, domain + all] mean attention mass on the first token (NaN: not available)
    uniform: np.ndarray  # [decoder layer, domain + all] that mass under uniform attention (the no-sink baseline)
    residual_peak: np.ndarray  # [decoder layer, domain + all] max |h| of the residual stream after the layer


@torch.no_grad()
def consequences(moe: MoEModel, batches: Sequence[Batch], removed: Sequence[tuple[int, ...]],
                 layers: Sequence[MoELayer], num_domains: int, how: str = "zero") -> Consequence:
    """Next-token NLL per domain, sink mass and residual peak per decoder layer, with `removed[i]` taken out of
    layers[i] (`ExpertRemoval`, prune.py's drop / zero), in one forward per batch."""
    num_layers = len(moe.decoder_layers())
    nll_sum, count = np.zeros(num_domains), np.zeros(num_domains)
    sink = SinkMass(num_layers, num_domains)
    peak = np.zeros((num_layers, num_domains + 1))
    current: dict = {}
    with intervene(moe, removal_edits(layers, removed, how)), attention_weights(moe, sink, current), \
            capture(moe, [], ("residual",)) as records:
        for batch in batches:
            batch = batch.to(moe.device)
            current["batch"] = batch
            add_domain_nll(nll_sum, count, moe.forward(batch.input_ids, batch.attention_mask).logits, batch)
            domains = batch.domain_ids.cpu().numpy()
            real = batch.attention_mask.bool()
            for layer in range(num_layers):
                h = records[layer].residual
                h = h.reshape(*real.shape, -1).abs().amax(-1).masked_fill(~real.to(h.device), 0)  # [B, S]
                per_row = h.amax(1).double().cpu().numpy()
                np.maximum.at(peak[layer], domains, per_row)
                peak[layer, -1] = max(peak[layer, -1], per_row.max(initial=0.0))
            records.clear()
    return Consequence(nll_sum, count, sink.mass(), sink.uniform_mass(), peak)
