"""A tiny random OLMoE in which two experts of one layer compute the same function up to an orthogonal map of the
output: expert `twin` copies expert `source`'s gate/up weights and its down-projection is Q @ down(source), with
Q a random orthogonal H × H matrix. Their outputs Y_twin = Y_source Qᵀ have identical Gram matrices, so every CKA
of the pair is 1, while their cosine is not."""

from __future__ import annotations

from pathlib import Path

import torch

from common.model import tiny


def save_rotated_twin(path: Path, layer: int = 1, source: int = 0, twin: int = 1, seed: int = 0) -> Path:
    model, tokenizer = tiny.build_random_model("olmoe", seed=seed)
    experts = model.model.layers[layer].mlp.experts  # gate_up_proj [E, 2I, H], down_proj [E, H, I]
    hidden = experts.down_proj.shape[1]
    q, _ = torch.linalg.qr(torch.randn(hidden, hidden, generator=torch.Generator().manual_seed(seed + 1)))
    with torch.no_grad():
        experts.gate_up_proj[twin] = experts.gate_up_proj[source]
        experts.down_proj[twin] = q @ experts.down_proj[source]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
