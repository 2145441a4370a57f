"""Router saturation across checkpoints (OLMoE's training-dynamics figure): how much of each token's top-k at an
earlier checkpoint is already the final checkpoint's top-k, on identical tokens. Definition: docs/METRICS.md."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import pandas as pd
import torch

from common.analysis.specialization import top1_index
from common.config import ModelSpec
from common.data import Batch
from common.hooks import capture
from common.model import load_moe
from common.stats import Moments


@torch.no_grad()
def saturation(specs: Sequence[ModelSpec], layers: Sequence[int], stream: Callable[[], Iterable[Batch]]) -> pd.DataFrame:
    """Per revision and layer: mean |K_r ∩ K_final| / k and top-1 agreement on identical tokens (OLMoE Fig. 'router
    saturation'). The final model stays loaded; the others are loaded one at a time. `stream()` yields this rank's
    share of the token batches afresh (every token is counted once across ranks)."""
    final = load_moe(specs[-1])
    final_layers = final.select(list(layers))
    rows = []
    for position, spec in enumerate(specs[:-1]):
        other = load_moe(spec)
        other_layers = other.select(list(layers))
        overlap = Moments({"layer": [m.layer for m in final_layers]}, device=final.device)
        agree = Moments({"layer": [m.layer for m in final_layers]}, device=final.device)
        with capture(final, final_layers, ("topk",)) as ref, capture(other, other_layers, ("topk",)) as cur:
            for batch in stream():
                batch = batch.to(final.device)
                final.forward(batch.input_ids, batch.attention_mask)
                other.forward(batch.input_ids.to(other.device), batch.attention_mask.to(other.device))
                weight = batch.token_weights()
                for li, moe_layer in enumerate(final_layers):
                    a, b = ref[moe_layer.layer], cur[moe_layer.layer]
                    ia, ib = a.topk_index.long(), b.topk_index.to(a.topk_index.device).long()
                    shared = (ia.unsqueeze(2) == ib.unsqueeze(1)).any(2).sum(1).float() / moe_layer.top_k
                    same_top1 = (top1_index(ia, a.topk_weight) == top1_index(ib, b.topk_weight.to(ia.device))).float()
                    overlap.update(shared, li, weight)
                    agree.update(same_top1, li, weight)
        overlap.all_reduce()
        agree.all_reduce()
        for li, moe_layer in enumerate(final_layers):
            rows.append({
                "position": position, "revision": spec.revision or spec.model, "final": specs[-1].revision or specs[-1].model,
                "layer": moe_layer.layer, "topk_overlap": overlap.result().mean[li], "top1_agreement": agree.result().mean[li],
                "tokens": overlap.result().count[li],
            })
        del other
    return pd.DataFrame(rows)
