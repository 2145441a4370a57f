"""A tiny OLMoE whose routing is planted: every token id is sent to experts known in advance.

The residual stream never changes (attention output and expert down-projections are zero), the embedding of a
token is a one-hot of its id plus a strong one-hot of its *group*, and each router reads only the group
coordinates. So at layer ℓ every token of group g goes to experts planted_experts(ℓ, g) = (first, second) with the
first taking the larger weight, whatever its context. The output head copies the embedding, so the model predicts the
current token. Domains are letters: domain d uses the 8 letters of RANGES[d], split into two groups of 4.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import OlmoeConfig, OlmoeForCausalLM

from common.model import tiny_tokenizer

RANGES = ("abcdefgh", "ijklmnop", "qrstuvwx")
GROUPS = [half for letters in RANGES for half in (letters[:4], letters[4:])]  # group g belongs to domain g // 2
NUM_EXPERTS, TOP_K, NUM_LAYERS = 14, 2, 3  # experts 12 and 13 are never planted: dead unless swapped in
VOCAB = 259
GROUP_DIMS = len(GROUPS)
HIDDEN = 272  # 6 group coordinates + 259 token coordinates, rounded up to a multiple of 16 (4 heads of an even size)


def planted_experts(layer: int, group: int) -> tuple[int, int]:
    """(top-1, top-2) experts of a group at a layer: a different pairing in every layer, so transitions are known."""
    shift = 5 * layer
    return ((2 * group + shift) % 12, (2 * group + 1 + shift) % 12)


def group_of(token_id: int) -> int | None:
    char = chr(token_id) if token_id < 128 else ""
    for g, letters in enumerate(GROUPS):
        if char and char in letters:
            return g
    return None


def carriers(layer: int = 1) -> tuple[int, int]:
    """The two experts that carry domain 0 in a model built with `carry_layer=layer`: its groups' top-1 experts."""
    return planted_experts(layer, 0)[0], planted_experts(layer, 1)[0]


def build_planted_model(swap_group: int | None = None, swap_layer: int = 1,
                        carry_layer: int | None = None) -> OlmoeForCausalLM:
    """The planted model; `swap_group` routes that group, at `swap_layer`, to the two experts no group uses.

    `carry_layer`: at that layer the two `carriers` (the top-1 experts of domain 0's groups) output a constant vector
    that raises the other group's coordinate (group 0's carrier writes group 1's, and back), so after the layer a
    domain-0 token's logits are about equal over all 8 letters of its domain instead of its own group's 4: the
    next-token NLL on domain 0 falls from ~9 to ~2.3 nats. Every other expert's output stays 0. The carriers are also
    the second choice of the other domains' groups (with a weight of ~0.002 there), so they are the most selected
    experts of the layer: frequency, like saliency, ranks them first."""
    config = OlmoeConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=8, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4, num_key_value_heads=4, num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K,
        norm_topk_prob=False, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=256, eos_token_id=257, pad_token_id=258,
    )
    torch.manual_seed(0)
    model = OlmoeForCausalLM(config).eval()
    with torch.no_grad():
        embedding = torch.zeros(VOCAB, HIDDEN)
        for token in range(VOCAB):
            embedding[token, GROUP_DIMS + token] = 1.0
            g = group_of(token)
            if g is not None:
                embedding[token, g] = 4.0
        model.model.embed_tokens.weight.copy_(embedding)
        model.lm_head.weight.copy_(embedding)
        for layer_index, layer in enumerate(model.model.layers):
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.experts.down_proj.zero_()
            router = torch.zeros(NUM_EXPERTS, HIDDEN)
            for g in range(len(GROUPS)):
                first, second = planted_experts(layer_index, g)
                if swap_group == g and swap_layer == layer_index:
                    first, second = NUM_EXPERTS - 1, NUM_EXPERTS - 2
                if carry_layer == layer_index and g >= 2:  # the carriers are every other group's second choice too
                    second = carriers(layer_index)[g % 2]
                router[first, g] = 1.0
                router[second, g] = 0.6
            layer.mlp.gate.weight.copy_(router)
            if carry_layer == layer_index:
                inner = config.intermediate_size
                for group, expert in enumerate(carriers(layer_index)):
                    # gate and up unit 0 read the token's group coordinate (16 after the RMS norm): act ≈ 15.7
                    for row in (0, inner):
                        layer.mlp.experts.gate_up_proj[expert, row, group] = 0.25
                    layer.mlp.experts.down_proj[expert, 1 - group, 0] = 4.0 / 15.7  # +4 on the other group
    return model


def save_planted(path: Path, swap_group: int | None = None, carry_layer: int | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    build_planted_model(swap_group, carry_layer=carry_layer).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def write_domains(folder: Path, documents: int = 40, length: int = 60, seed: int = 0) -> list[str]:
    """One .jsonl per domain of random strings over the domain's letters; returns `--data` specs."""
    import json

    rng = random.Random(seed)
    specs = []
    for d, letters in enumerate(RANGES):
        lines = ["".join(rng.choice(letters) for _ in range(length)) for _ in range(documents)]
        path = folder / f"domain{d}.jsonl"
        path.write_text("\n".join(json.dumps({"text": line}) for line in lines))
        specs.append(f"d{d}={path}")
    return specs
