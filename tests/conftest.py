"""Shared fixtures: tiny random MoE models of many architectures, saved once per session and loaded back from disk."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from common.model import tiny

# Every run any test makes must describe every file, CSV column and JSON key it writes (common/run/outputs.py): an
# undocumented output fails the run (subprocesses inherit the variable).
os.environ["MOESCOPE_STRICT_OUTPUTS"] = "1"

# Tiny models run 2-3x faster single-threaded on a shared CPU: intra-op threads only spin-wait on ops this small.
torch.set_num_threads(1)

# fmt: off
# Architectures the MoE adapter must support (the list; `llama4_text` is the text part of llama4).
ARCHS = [
    "olmoe", "flex_olmo", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss",
    "granitemoe", "granitemoeshared", "phimoe", "dbrx", "jetmoe", "glm4_moe", "ernie4_5_moe", "minimax",
    "hunyuan_v1_moe", "dots1", "llama4_text", "longcat_flash", "lfm2_moe", "afmoe", "jamba",
]
# Of those, the ones whose tiny config mixes dense and MoE layers (the arch supports dense layers).
MIXED_ARCHS = [
    "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "glm4_moe", "ernie4_5_moe", "dots1", "llama4_text",
    "lfm2_moe", "afmoe", "jamba",
]
# fmt: on
# Every MoE causal LM transformers has (56 in 5.23): the adapter must handle all of them.
ALL_MOE_TYPES = tiny.moe_model_types()


@pytest.fixture(scope="session")
def saved_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: model_type -> folder holding `build_random_model(model_type)` (seed 0) and its tokenizer.

    Built and saved once per session and type; load it back with `from_pretrained`, the real loading path.
    """
    saved: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in saved:
            model, tokenizer = tiny.build_random_model(model_type)
            path = tmp_path_factory.mktemp(f"tiny-{model_type}")
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            saved[model_type] = path
        return saved[model_type]

    return get


@pytest.fixture(scope="session")
def saved_dense_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random dense Llama (no MoE layer) with the tiny tokenizer, saved: what MoE-only scripts must refuse."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("dense")
    config = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4)
    LlamaForCausalLM(config).save_pretrained(path)
    tiny.tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def tiny_tokenizer():
    """The byte-level tokenizer of the tiny models (ids 0..255 are bytes; bos/eos/pad follow)."""
    return tiny.tiny_tokenizer()
