"""On a GPU every aten op is a kernel launch: a full router_metrics update must dispatch no more ops per batch than
the bare forward of an OLMoE-1B-7B-shaped model (16 MoE layers, 64 experts, top-8; small widths, same op graph)."""

from __future__ import annotations

import torch
from transformers import OlmoeConfig, OlmoeForCausalLM

from common.analysis.specialization import RoutingCounts
from common.data import Batch
from common.hooks import capture
from common.measure import OpCounter
from common.model import MoEModel


def test_router_metrics_update_dispatches_fewer_ops_than_the_forward():
    torch.manual_seed(0)
    config = OlmoeConfig(vocab_size=50_304, hidden_size=64, intermediate_size=32, num_hidden_layers=16,
                         num_attention_heads=4, num_key_value_heads=4, num_experts=64, num_experts_per_tok=8)
    moe = MoEModel(OlmoeForCausalLM(config).eval())
    ids = torch.randint(0, config.vocab_size, (4, 64))
    batch = Batch(ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool), torch.zeros(4, dtype=torch.long),
                  torch.zeros_like(ids))
    with torch.inference_mode(), OpCounter() as bare:
        moe.model(input_ids=ids, use_cache=False)
    with torch.inference_mode(), capture(moe, moe.layers, ("logits", "topk")) as records:
        predicted = moe.model(input_ids=ids, use_cache=False).logits.argmax(-1)
    counts = RoutingCounts(moe.layers, ["d"], config.vocab_size, torch.device("cpu"))
    with OpCounter() as update:
        counts.update(records, batch, predicted=predicted)
    assert 0 < update.count <= bare.count, (update.count, bare.count)
    assert counts.arrays()["topk"].sum() == 16 * ids.numel() * 8  # and it counted every selection of every layer
