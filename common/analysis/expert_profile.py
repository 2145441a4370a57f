"""Per-expert activity at one MoE layer, streamed: weights when selected, summed outputs, and top contexts.

`ExpertActivity` keeps, for every expert of one layer and on the model's device: a histogram + moments of its
routing weight over the tokens that selected it, the sum of its unweighted outputs E_e(x) over those tokens (its
mean output is what the profile decodes through the final norm and unembedding), and the `top_n` highest-scoring
contexts by w_e · ‖E_e(x)‖ with ±`radius` tokens around them. Memory is E × (bins + H + top_n · window), fixed.

Under torchrun each rank streams its share of the batches; `all_reduce` sums the weights and outputs and merges the
top contexts, which gives exactly the result of one process: equal scores are ranked by stream position (earliest
first), never by which rank or batch a context came from.
"""

from __future__ import annotations

import torch

from common import distributed
from common.analysis.routing import GrowingDistribution
from common.data import Batch
from common.hooks import LayerRecord
from common.model import MoELayer

_NO_KEY = torch.iinfo(torch.long).max  # stream key of an empty top-context slot
_ROW_STRIDE = 1 << 32  # stream key = batch number * _ROW_STRIDE + token index within the batch


def _best(score: torch.Tensor, key: torch.Tensor, n: int) -> torch.Tensor:
    """[n, X] rows of the n best entries of each column of score [N, X]: highest score first, equal scores by the
    smallest stream key. A strict order, so the best of the best of parts is the best of the whole, whatever the split."""
    by_key = key.argsort(dim=0)
    by_score = score.gather(0, by_key).sort(dim=0, descending=True, stable=True).indices
    return by_key.gather(0, by_score[:n])


class ExpertActivity:
    """`hidden_size` is the width of the experts' outputs. The weight histogram grows to cover the weights seen
    (`GrowingHistogram`: exact and identical under torchrun); `max_weight` is only its range while none is seen."""

    def __init__(self, moe_layer: MoELayer, experts: list[int], device: torch.device, *, hidden_size: int,
                 top_n: int = 20, radius: int = 8, bins: int = 100, max_weight: float = 1.0) -> None:
        self.moe_layer, self.experts, self.device = moe_layer, list(experts), device
        self.top_n, self.radius = top_n, radius
        self.weights = GrowingDistribution({"expert": self.experts}, bins=max(2, bins), lo=0.0, hi=max_weight,
                                           device=device)
        # Allocated up front, so that a rank that saw no batch still takes part in all_reduce.
        self.output_sum = torch.zeros(len(self.experts), hidden_size, dtype=torch.float64, device=device)
        self.selected = torch.zeros(len(self.experts), dtype=torch.float64, device=device)
        width = 2 * radius + 1
        self.best_score = torch.full((top_n, len(self.experts)), float("-inf"), device=device)
        self.best_key = torch.full((top_n, len(self.experts)), _NO_KEY, dtype=torch.long, device=device)
        self.best_window = torch.full((top_n, len(self.experts), width), -1, dtype=torch.long, device=device)
        self.best_domain = torch.full((top_n, len(self.experts)), -1, dtype=torch.long, device=device)
        self.best_weight = torch.zeros((top_n, len(self.experts)), device=device)

    @torch.no_grad()
    def update(self, record: LayerRecord, batch: Batch) -> None:
        x = record.expert_input  # stays on the layer's device for expert_fn
        index, weight = record.topk_index.to(self.device).long(), record.topk_weight.to(self.device).float()
        counted = batch.count_mask.reshape(-1).to(self.device)
        experts = torch.tensor(self.experts, device=index.device)
        hit = (index.unsqueeze(2) == experts.view(1, 1, -1)) & (weight.unsqueeze(2) != 0)  # [T, k, X]
        selected = hit.any(1) & counted.view(-1, 1)  # [T, X]
        w = (weight.unsqueeze(2) * hit).sum(1)  # [T, X] weight of each expert (0 if not selected)
        self.weights.update(w, {"expert": torch.arange(len(self.experts), device=w.device).view(1, -1)}, selected)
        self.selected += selected.sum(0).double()
        # One expert at a time: stacking all experts' outputs would need T × E × H floats (GBs for OLMoE-size layers).
        sums, norms = [], []
        for column, e in enumerate(self.experts):
            out = self.moe_layer.expert_fn(e, x).to(self.device).float()  # [T, H]
            sums.append((out * selected[:, column : column + 1]).sum(0).double())
            norms.append(out.norm(dim=1))
        self.output_sum += torch.stack(sums)  # [X, H]
        norm = torch.stack(norms, dim=1)  # [T, X]
        score = torch.where(selected, w * norm, torch.tensor(float("-inf"), device=w.device))
        self._keep_best(score, w, batch)

    def _keep_best(self, score: torch.Tensor, weight: torch.Tensor, batch: Batch) -> None:
        """Merge this batch's top contexts per expert into the running top-N (all on the device)."""
        S = batch.input_ids.shape[1]
        n = min(self.top_n, score.shape[0])
        token_key = batch.number * _ROW_STRIDE + torch.arange(score.shape[0], device=score.device)
        top_token = _best(score, token_key.view(-1, 1).expand_as(score), n)  # [n, X]
        top_score, top_key = score.gather(0, top_token), batch.number * _ROW_STRIDE + top_token
        rows, positions = top_token // S, top_token % S
        offsets = torch.arange(-self.radius, self.radius + 1, device=score.device)
        window_pos = positions.unsqueeze(2) + offsets  # [n, X, W]
        inside = (window_pos >= 0) & (window_pos < S)
        gathered = batch.input_ids[rows.unsqueeze(2).expand_as(window_pos), window_pos.clamp(0, S - 1)]
        real = batch.attention_mask[rows.unsqueeze(2).expand_as(window_pos), window_pos.clamp(0, S - 1)].bool()
        windows = torch.where(inside & real, gathered, torch.full_like(gathered, -1))
        domains = batch.domain_ids[rows]
        weights = weight.gather(0, top_token)
        self._keep(torch.cat([self.best_score, top_score]), torch.cat([self.best_key, top_key]),
                   torch.cat([self.best_window, windows]), torch.cat([self.best_domain, domains]),
                   torch.cat([self.best_weight, weights]))

    def _keep(self, score: torch.Tensor, key: torch.Tensor, window: torch.Tensor, domain: torch.Tensor,
              weight: torch.Tensor) -> None:
        """The best top_n of these candidate contexts [N, X(, W)] become the running top contexts."""
        keep = _best(score, key, self.top_n)  # [top_n, X]
        self.best_score, self.best_key = score.gather(0, keep), key.gather(0, keep)
        self.best_window = window.gather(0, keep.unsqueeze(2).expand(-1, -1, window.shape[2]))
        self.best_domain, self.best_weight = domain.gather(0, keep), weight.gather(0, keep)

    @torch.no_grad()
    def all_reduce(self) -> ExpertActivity:
        """Combine all ranks (no-op without torchrun): weights and outputs summed, top contexts merged. Once."""
        self.weights.all_reduce()
        distributed.all_reduce_sum_(self.selected)
        distributed.all_reduce_sum_(self.output_sum)
        if distributed.world_size() > 1:
            parts = [self.best_score, self.best_key, self.best_window, self.best_domain, self.best_weight]
            self._keep(*(distributed.all_gather(t).flatten(0, 1) for t in parts))
        return self

    def mean_outputs(self) -> torch.Tensor:
        """[X, H] mean unweighted output of each expert over the tokens that selected it."""
        return (self.output_sum / self.selected.clamp_min(1).view(-1, 1)).float()
