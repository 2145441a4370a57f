"""Tiny random MoE models: save/load round trip, router logits, mixed dense/MoE stacks, seeds, tokenizer, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.errors import InputError
from common.model import tiny
from tests.conftest import ARCHS, MIXED_ARCHS

TEXT = "Grüße, 数学 — tiny MoE\n"


def _num_layers(config) -> int:
    return config.num_layers if config.model_type == "longcat_flash" else config.num_hidden_layers


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_forward_router_logits(arch, saved_tiny_model):
    built, _ = tiny.build_random_model(arch)
    loaded = AutoModelForCausalLM.from_pretrained(saved_tiny_model(arch)).eval()
    assert type(loaded) is type(built)
    want, got = built.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), "parameters changed in save -> from_pretrained"

    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = loaded(ids, output_router_logits=True)
    assert out.logits.shape == (2, 9, 259) and torch.isfinite(out.logits).all()
    n_experts = 8 + getattr(loaded.config, "zero_expert_num", 0)  # LongCat: + zero-compute experts
    assert out.router_logits, "no router logits"
    for logits in out.router_logits:
        assert logits.shape == (18, n_experts)
        assert torch.isfinite(logits).all()

    n_moe = len(out.router_logits) // (3 if arch == "jetmoe" else 1)  # JetMoE: MoE-MLP + 2x attention router
    if arch in MIXED_ARCHS:
        assert 2 <= n_moe < _num_layers(loaded.config), "expected a mixed dense/MoE stack"
    else:
        assert n_moe == _num_layers(loaded.config)


def test_seed_determinism():
    a, _ = tiny.build_random_model("mixtral", seed=0)
    b, _ = tiny.build_random_model("mixtral", seed=0)
    c, _ = tiny.build_random_model("mixtral", seed=1)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not all(torch.equal(pa[k], pc[k]) for k in pa)
    assert not a.training


def test_dtype_and_special_ids():
    model, tok = tiny.build_random_model("qwen3_moe", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    cfg = model.config
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (256, 257, 258)
    assert cfg.vocab_size == len(tok) == 259


def test_tokenizer_round_trip(tiny_tokenizer, tmp_path):
    ids = tiny_tokenizer(TEXT)["input_ids"]
    assert ids == list(TEXT.encode("utf-8"))  # one token per byte, nothing prepended or appended
    assert tiny_tokenizer.decode(ids) == TEXT
    names = (tiny_tokenizer.bos_token, tiny_tokenizer.eos_token, tiny_tokenizer.pad_token)
    assert names == tiny.SPECIAL_TOKENS
    assert (tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id) == (
        256,
        257,
        258,
    )

    tiny_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(TEXT)["input_ids"] == ids and loaded.decode(ids) == TEXT
    assert len(loaded) == 259 and loaded.pad_token_id == 258
    assert loaded.decode([loaded.bos_token_id, *ids], skip_special_tokens=True) == TEXT


def test_tokenizer_is_byte_level_and_fixed():
    # Independent of how it is built: byte b is id b, and the three specials follow the 256 bytes.
    tok = tiny.tiny_tokenizer()
    vocab = tok.get_vocab()
    assert len(vocab) == 259
    assert tok("hé!", add_special_tokens=False)["input_ids"] == list("hé!".encode())
    assert sorted({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == [256, 257, 258]


def test_moe_model_types():
    types = tiny.moe_model_types()
    assert set(ARCHS) <= set(types)
    assert "llama" not in types and "doge" not in types
    assert types == sorted(types)


@pytest.mark.parametrize(
    ("model_type", "message"),
    [
        ("nope", "unknown random model type 'nope'; MoE types: "),
        ("llama", "model type 'llama' has no MoE layers"),
        ("vit", "model type 'vit' is not a causal LM"),
        ("doge", "not supported"),
    ],
)
def test_bad_model_types(model_type, message):
    with pytest.raises(InputError, match=message) as err:
        tiny.tiny_config(model_type, vocab_size=259)
    if "MoE types" in message:
        assert "mixtral" in str(err.value)


def test_composite_type_resolves_to_text_model():
    assert tiny.tiny_config("llama4", vocab_size=259).model_type == "llama4_text"
