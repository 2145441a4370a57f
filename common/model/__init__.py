"""The model: loading, the MoE adapter, the dense view, tiny random models, the native DeepSeekMoE, all experts at once.

Follow `--model` from a script: `load_moe(spec)` (`load.py`) resolves the name (`demo`, `random:<model_type>` built
by `tiny.py`, a folder, a hub id; DeepSeekMoE v1 through `deepseek_moe.py`), loads weights and tokenizer, and wraps
the transformers module in `MoEModel` (`adapter.py`): a `LanguageModel` (`view.py`: decoder layers, dense FFNs,
final norm, unembedding) plus one `MoELayer` per MoE block. `experts.py` runs every expert of a layer on the same
tokens in bounded chunks. Capturing and intervening live one floor up, in `common.hooks`.

Public surface (the names below are stable; everything else in this package is an implementation detail):
"""

from __future__ import annotations

import importlib

# name -> module that defines it; a name is imported on first use, so `from common.model import MoELayer` does not
# pull in the loader (and through it the native DeepSeekMoE and transformers' modelling internals)
_HOME = {
    "ModelSpec": "common.config",
    "load_moe": "common.model.load", "load_model": "common.model.load", "inspect_moe": "common.model.load",
    "inspect_model": "common.model.load", "load_model_and_tokenizer": "common.model.load",
    "resolve_device": "common.model.load", "resolve_dtype": "common.model.load",
    "MoEModel": "common.model.adapter", "MoELayer": "common.model.adapter", "find_moe_layers": "common.model.adapter",
    "LanguageModel": "common.model.view", "DenseFFN": "common.model.view", "FFNParams": "common.model.view",
    "all_expert_outputs": "common.model.experts", "expert_output_chunks": "common.model.experts",
    "expert_neuron_chunks": "common.model.experts",
    "moe_model_types": "common.model.tiny", "tiny_config": "common.model.tiny", "tiny_tokenizer": "common.model.tiny",
    "build_random_model": "common.model.tiny",
}

__all__ = [  # noqa: RUF022 (grouped by module, not sorted)
    # loading (load.py)
    "ModelSpec",  # what to load: model name, revision, dtype, device (common.config)
    "load_moe",  # ModelSpec -> MoEModel with weights; refuses a dense model in one line
    "load_model",  # ModelSpec -> LanguageModel (MoE or dense) with weights
    "inspect_moe",  # ModelSpec -> MoEModel on the meta device: config-only checks, no weights read
    "inspect_model",  # ModelSpec -> LanguageModel on the meta device
    "load_model_and_tokenizer",  # ModelSpec -> (transformers model, tokenizer), unwrapped
    "resolve_device",  # 'auto' / 'cpu' / 'cuda:N' -> torch.device
    "resolve_dtype",  # 'auto' / 'float32' / 'bfloat16' ... -> torch.dtype for a device
    # the adapter (adapter.py, view.py)
    "MoEModel",  # a loaded MoE: .layers (MoELayer), .forward, .tokenizer, .select(layers), dense view of the rest
    "MoELayer",  # one MoE block: .num_experts, .top_k, .expert_fn(e, x), .expert_neurons(e, x), shared experts
    "LanguageModel",  # any decoder LM: decoder layers, dense FFNs, final norm, unembedding
    "DenseFFN",  # one dense FFN: its parameters and intermediate neurons
    "FFNParams",  # gate / up / down weights of one FFN in textbook orientation
    "find_moe_layers",  # nn.Module -> [MoELayer], through transformers' router registry
    # all experts at once (experts.py)
    "all_expert_outputs",  # (MoELayer, x [T, H]) -> [E, T, H], every expert on every token
    "expert_output_chunks",  # the same in expert chunks of bounded memory
    "expert_neuron_chunks",  # every expert's intermediate neurons, in chunks
    # tiny random models (tiny.py)
    "moe_model_types",  # every transformers model_type with MoE layers
    "tiny_config",  # a tiny random config of one model_type
    "tiny_tokenizer",  # the byte-level tokenizer the random models use
    "build_random_model",  # model_type -> tiny random transformers model
]


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'common.model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value
