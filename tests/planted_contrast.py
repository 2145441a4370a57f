"""A one-layer OLMoE whose behaviour expert is planted: expert A_EXPERT takes every token of domain A (letters a–h)
and no token of domain B (letters i–p), and its output is what keeps the model writing A's letters.

Hidden coordinates: 0 = A flag, 1 = B flag, 2 = a constant 1, 3 = "language", 4–7 = the half-domain flags (a–d,
e–h, i–l, m–p). Attention writes nothing (o_proj = 0). The router reads the flags: an A token goes to A_EXPERT (top-1)
and to expert 1 (a–d) or 4 (e–h); a B token to B_EXPERT (top-1) and to expert 3 (i–l) or 6 (m–p). So p_A = 1, p_B = 0
for A_EXPERT (Δ = +1, the largest), and Δ = −1 for B_EXPERT; experts 1, 4, 3, 6 have |Δ| ≈ ½ and 0, 7 never fire.
Only A_EXPERT has an output: +~13 on the language coordinate. The head gives A's letters 5 × language and B's
letters 10 × the constant: with A_EXPERT routed (an A token) A's letters win by ~15 nats; without it (a B token, or
A_EXPERT switched off) B's letters win by ~7 nats over any other token. Switching A_EXPERT off therefore turns an A
prompt's continuation into B's letters; switching any other expert off changes nothing."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from transformers import OlmoeConfig, OlmoeForCausalLM

from common.model import tiny_tokenizer

A_LETTERS, B_LETTERS = "abcdefgh", "ijklmnop"
A_EXPERT, B_EXPERT = 5, 2
NUM_EXPERTS, HIDDEN, VOCAB = 8, 16, 259


def build_model() -> OlmoeForCausalLM:
    config = OlmoeConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, num_experts=NUM_EXPERTS, num_experts_per_tok=2, norm_topk_prob=False,
        max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=256, eos_token_id=257, pad_token_id=258,
    )
    torch.manual_seed(0)
    model = OlmoeForCausalLM(config).eval()
    with torch.no_grad():
        embedding = torch.zeros(VOCAB, HIDDEN)
        embedding[:, 2] = 1.0
        for i, letter in enumerate(A_LETTERS + B_LETTERS):
            token = ord(letter)
            embedding[token, 0 if i < 8 else 1] = 4.0
            embedding[token, 4 + i // 4] = 4.0
        model.model.embed_tokens.weight.copy_(embedding)
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        router = torch.zeros(NUM_EXPERTS, HIDDEN)
        router[A_EXPERT, 0] = router[B_EXPERT, 1] = 1.0
        for expert, flag in ((1, 4), (4, 5), (3, 6), (6, 7)):
            router[expert, flag] = 0.6
        layer.mlp.gate.weight.copy_(router)
        experts = layer.mlp.experts
        experts.down_proj.zero_()
        experts.gate_up_proj.zero_()
        inner = config.intermediate_size
        experts.gate_up_proj[A_EXPERT, 0, 0] = experts.gate_up_proj[A_EXPERT, inner, 0] = 1.0  # read the A flag
        experts.down_proj[A_EXPERT, 3, 0] = 3.0  # write the language coordinate
        head = torch.zeros(VOCAB, HIDDEN)
        for letter in A_LETTERS:
            head[ord(letter), 3] = 5.0
        for letter in B_LETTERS:
            head[ord(letter), 2] = 10.0
        model.lm_head.weight.copy_(head)
    return model


def save_model(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    build_model().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def write_data(folder: Path, documents: int = 40, length: int = 60, seed: int = 0) -> list[str]:
    """A.jsonl and B.jsonl of random strings over each domain's letters; returns the `--data` specs (A first)."""
    rng = random.Random(seed)
    specs = []
    for name, letters in (("A", A_LETTERS), ("B", B_LETTERS)):
        path = folder / f"{name}.jsonl"
        lines = ["".join(rng.choice(letters) for _ in range(length)) for _ in range(documents)]
        path.write_text("\n".join(json.dumps({"text": line}) for line in lines))
        specs.append(f"{name}={path}")
    return specs
