"""A seeded, bounded sample of tokens with what the MoE layers saw for them, for analyses that need raw activations
(expert-output similarity, UMAP / PCA, probing).

Every counted token gets a random key drawn from (seed, the batch's stream number), and each domain keeps the
`per_domain` tokens with the smallest keys: a uniform sample without replacement, streamed (memory is the sample,
never the stream), the same for the same seed and batch layout, and the same under torchrun (each rank keeps its
own smallest keys; `all_reduce` gathers them and keeps the overall smallest).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from common import distributed
from common.data import Batch
from common.hooks import Capture
from common.model import MoELayer

# Per-token facts kept beside the activations: where the token came from, so results can be traced back to text.
META_COLUMNS = ("key", "token_id", "domain", "batch_number", "row", "position")


class TokenSample:
    """Up to `per_domain` tokens per domain, with each selected layer's expert input [H] and top-k routing [k]."""

    def __init__(self, layers: Sequence[MoELayer], num_domains: int, per_domain: int, seed: int, device: torch.device):
        if per_domain < 1:
            raise ValueError("TokenSample: per_domain must be at least 1")
        self.layers, self.num_domains, self.per_domain = list(layers), num_domains, per_domain
        self.seed, self.device = seed, device
        self.kept: dict[str, torch.Tensor] | None = None

    def update(self, records: Capture, batch: Batch) -> None:
        counted = batch.count_mask.reshape(-1).to(self.device)
        rows, positions = torch.nonzero(batch.count_mask.to(self.device), as_tuple=True)
        generator = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + batch.number)
        keys = torch.rand(counted.shape[0], generator=generator, device=self.device)[counted]
        flat = rows * batch.count_mask.shape[1] + positions
        candidate = {
            "key": keys,
            "token_id": batch.input_ids.to(self.device).reshape(-1)[flat],
            "domain": batch.domain_ids.to(self.device)[rows],
            "batch_number": torch.full_like(rows, batch.number),
            "row": rows,
            "position": positions,
        }
        for moe_layer in self.layers:
            rec = records[moe_layer.layer]
            candidate[f"input_{moe_layer.layer}"] = rec.expert_input[flat.to(rec.expert_input.device)].to(self.device)
            candidate[f"topk_index_{moe_layer.layer}"] = rec.topk_index[flat.to(rec.topk_index.device)].to(self.device)
            candidate[f"topk_weight_{moe_layer.layer}"] = rec.topk_weight[flat.to(rec.topk_weight.device)].to(self.device)
        self._keep(candidate)

    def _keep(self, candidate: dict[str, torch.Tensor]) -> None:
        merged = candidate if self.kept is None else {k: torch.cat([self.kept[k], v]) for k, v in candidate.items()}
        chosen = []
        for d in range(self.num_domains):
            index = torch.nonzero(merged["domain"] == d, as_tuple=True)[0]
            if index.numel() > self.per_domain:
                index = index[merged["key"][index].topk(self.per_domain, largest=False).indices]
            chosen.append(index)
        order = torch.cat(chosen)
        self.kept = {k: v[order] for k, v in merged.items()}

    def all_reduce(self) -> TokenSample:
        """torchrun: gather every rank's kept tokens and keep the smallest keys (the one-process sample)."""
        if distributed.world_size() > 1 and self.kept is not None:
            gathered = {k: distributed.all_gather_rows(v) for k, v in self.kept.items()}
            self.kept = None
            self._keep(gathered)
        return self

    def result(self) -> dict[str, torch.Tensor]:
        """The sample ordered by (domain, key): meta columns (`META_COLUMNS`) and `input_L`, `topk_index_L`, `topk_weight_L`."""
        if self.kept is None:
            raise ValueError("TokenSample: no tokens were seen")
        order = torch.argsort(self.kept["domain"].double() * 2 + self.kept["key"].double())
        return {k: v[order] for k, v in self.kept.items()}
