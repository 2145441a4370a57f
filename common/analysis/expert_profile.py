"""Per-expert activity at one MoE layer, streamed: weights when selected, summed outputs, and top contexts.

`ExpertActivity` keeps, for every expert of one layer and on the model's device: a histogram + moments of its
routing weight over the tokens that selected it, the sum of its unweighted outputs E_e(x) over those tokens (its
mean output is what the profile decodes through the final norm and unembedding), and the `top_n` highest-scoring
contexts by w_e · ‖E_e(x)‖ with ±`radius` tokens around them. Memory is E × (bins + H + top_n · window), fixed.
"""

from __future__ import annotations

import torch

from common.data import Batch
from common.hooks import LayerRecord
from common.moe import MoELayer
from common.stats import Distribution


class ExpertActivity:
    def __init__(self, moe_layer: MoELayer, experts: list[int], device: torch.device, *, top_n: int = 20,
                 radius: int = 8, bins: int = 100, max_weight: float = 1.0) -> None:
        self.moe_layer, self.experts, self.device = moe_layer, list(experts), device
        self.top_n, self.radius = top_n, radius
        self.weights = Distribution({"expert": self.experts}, bins=bins, lo=0.0, hi=max_weight, device=device)
        self.output_sum: torch.Tensor | None = None  # [X, H] once the hidden size is seen
        self.selected = torch.zeros(len(self.experts), dtype=torch.float64, device=device)
        width = 2 * radius + 1
        self.best_score = torch.full((top_n, len(self.experts)), float("-inf"), device=device)
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
        summed = torch.stack(sums)  # [X, H]
        self.output_sum = summed if self.output_sum is None else self.output_sum + summed
        norm = torch.stack(norms, dim=1)  # [T, X]
        score = torch.where(selected, w * norm, torch.tensor(float("-inf"), device=w.device))
        self._keep_best(score, w, batch)

    def _keep_best(self, score: torch.Tensor, weight: torch.Tensor, batch: Batch) -> None:
        """Merge this batch's top contexts per expert into the running top-N (all on the device)."""
        S = batch.input_ids.shape[1]
        n = min(self.top_n, score.shape[0])
        top_score, top_token = score.topk(n, dim=0)  # [n, X]
        rows, positions = top_token // S, top_token % S
        offsets = torch.arange(-self.radius, self.radius + 1, device=score.device)
        window_pos = positions.unsqueeze(2) + offsets  # [n, X, W]
        inside = (window_pos >= 0) & (window_pos < S)
        gathered = batch.input_ids[rows.unsqueeze(2).expand_as(window_pos), window_pos.clamp(0, S - 1)]
        real = batch.attention_mask[rows.unsqueeze(2).expand_as(window_pos), window_pos.clamp(0, S - 1)].bool()
        windows = torch.where(inside & real, gathered, torch.full_like(gathered, -1))
        domains = batch.domain_ids[rows]
        weights = weight.gather(0, top_token)
        all_score = torch.cat([self.best_score, top_score])
        keep = all_score.topk(self.top_n, dim=0).indices  # [top_n, X]
        self.best_score = all_score.gather(0, keep)
        self.best_window = torch.cat([self.best_window, windows]).gather(0, keep.unsqueeze(2).expand(-1, -1, windows.shape[2]))
        self.best_domain = torch.cat([self.best_domain, domains]).gather(0, keep)
        self.best_weight = torch.cat([self.best_weight, weights]).gather(0, keep)

    def mean_outputs(self) -> torch.Tensor:
        """[X, H] mean unweighted output of each expert over the tokens that selected it."""
        if self.output_sum is None:
            return torch.zeros(len(self.experts), 1, device=self.device)
        return (self.output_sum / self.selected.clamp_min(1).view(-1, 1)).float()
