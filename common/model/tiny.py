"""Tiny random MoE models, built offline: a byte-level tokenizer and a shrunken config of any MoE causal LM.

Used by the tests and by `--model random:<arch>`. Nothing here downloads: the tokenizer is assembled from the
256 byte values, and configs come from transformers' own defaults (`AutoConfig.for_model`), shrunk generically by
field name plus a few per-architecture overrides (`_OVERRIDES`, each commented with the config quirk
it works around).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

from common.errors import InputError

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")  # ids 256, 257, 258: right after the 256 byte tokens

# Found by the `_can_record_outputs` mechanism but not usable generically (notes §3); the reason is the message.
UNSUPPORTED = {"doge": "product-key CDMoE: no separable router/experts submodules"}


# ----------------------------------------------------------------------------------------------- tokenizer
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte: the alphabet the ByteLevel pre-tokenizer/decoder work in."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with no merges: token id == byte value (0..255), so any text round-trips exactly.

    No training and no downloads, hence deterministic. Nothing is prepended or appended when encoding.
    """
    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: no GPT-2 word splitting is needed when every token is a single byte.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    bos, eos, pad = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)


# ----------------------------------------------------------------------------------------------- discovery
def _records_router_logits(model_type: str) -> bool:
    """True if transformers itself records router logits for this model type: the mechanism that marks MoE layers.

    `_can_record_outputs` lives on the base model class (e.g. `MixtralModel`), for some types only there.
    """
    names = (MODEL_MAPPING_NAMES.get(model_type), MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type))
    classes = [getattr(transformers, n, None) for n in names if isinstance(n, str)]
    return any("router_logits" in (getattr(c, "_can_record_outputs", None) or {}) for c in classes)


def _text_type(model_type: str) -> str | None:
    """For a composite (multimodal) type such as 'llama4', the model_type of its text part, else None."""
    text_config = CONFIG_MAPPING[model_type].sub_configs.get("text_config")
    return getattr(text_config, "model_type", None)


@functools.cache
def _moe_model_types() -> tuple[str, ...]:
    found = {
        mt for mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if mt not in UNSUPPORTED and _records_router_logits(mt)
    }
    return tuple(sorted(mt for mt in found if _text_type(mt) not in found))


def moe_model_types() -> list[str]:
    """Sorted model_types of the MoE causal LMs in the installed transformers (imports their modeling code once).

    A composite type whose text part is listed too (e.g. 'qwen3_5_moe' next to 'qwen3_5_moe_text') is left out.
    """
    return list(_moe_model_types())


# ----------------------------------------------------------------------------------------------- configs
DENSE_I, EXPERT_I = 128, 32  # dense-MLP and per-expert intermediate sizes
MAX_POSITIONS = 512

# Generic shrink, by field name: applied to every field the architecture's config class declares.
# fmt: off
_SHRINK: dict[str, object] = {
    # width and attention
    "hidden_size": 64, "d_model": 64, "num_attention_heads": 4, "n_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "kv_channels": 16, "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 16,
    # depth
    "num_hidden_layers": 4, "n_layers": 4, "num_layers": 4,
    # dense FFN (dense layers, LongCat's dense MLPs, Llama4's non-MoE layers)
    "intermediate_size_mlp": DENSE_I, "ffn_hidden_size": DENSE_I, "dense_intermediate_size": DENSE_I,
    # experts: 8 routed, top-2, 1 shared where the arch has shared experts
    "moe_intermediate_size": EXPERT_I, "expert_ffn_hidden_size": EXPERT_I,
    "shared_expert_intermediate_size": EXPERT_I, "shared_intermediate_size": EXPERT_I,
    "moe_shared_expert_intermediate_size": EXPERT_I, "shared_experts_intermediate_size": EXPERT_I,
    "num_experts": 8, "num_local_experts": 8, "n_routed_experts": 8, "moe_num_experts": 8,
    "num_experts_per_tok": 2, "num_experts_per_token": 2, "moe_topk": 2, "moe_k": 2, "top_k_experts": 2,
    "n_shared_experts": 1, "num_shared_experts": 1, "moe_num_shared_experts": 1,
    # group-limited routing: 4 groups of 2 experts, pick 2 groups (only where the default uses groups, see below)
    "n_group": 4, "num_expert_group": 4, "topk_group": 2,
    # multi-head latent attention
    "q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
    # sparse-attention indexers, linear attention, Mamba mixers
    "index_n_heads": 2, "index_head_dim": 16, "linear_num_heads": 2, "linear_head_dim": 16,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_state": 16, "mamba_num_heads": 8, "mamba_head_dim": 16,
    "ssm_state_size": 16, "mamba_dt_rank": 8, "n_groups": 1, "mamba_n_groups": 1,
    # positions
    "max_position_embeddings": MAX_POSITIONS, "max_seq_len": MAX_POSITIONS, "model_max_length": MAX_POSITIONS,
    # dense-first / interleaved stacks: layer 0 dense, layers 1-3 MoE (see also _OVERRIDES)
    "first_k_dense_replace": 1, "num_dense_layers": 1, "mlp_only_layers": [0], "decoder_sparse_step": 1,
    "moe_layer_start_index": 1, "moe_layer_end_index": 3, "moe_layer_interval": 1,
}
# fmt: on
_EXPERT_SIZE_KEYS = ("moe_intermediate_size", "expert_ffn_hidden_size", "ffn_config")
_GROUP_KEYS = ("n_group", "num_expert_group", "topk_group")

# Per-architecture quirks, applied last (keys that are not fields are passed on as legacy/extra kwargs).
# fmt: off
_OVERRIDES: dict[str, dict[str, object]] = {
    # clip_qkv=None crashes (clamp(min=None, max=None)); the attention reads rope_theta from attn_config; experts and
    # top-k live in the nested ffn_config.
    "dbrx": {
        "attn_config": {"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
        "ffn_config": {"ffn_hidden_size": EXPERT_I, "moe_num_experts": 8, "moe_top_k": 2},
    },
    # Llama4: MoE on every 2nd layer (1, 3), dense MLPs elsewhere.
    "llama4_text": {"interleave_moe_layer_step": 2},
    # Jamba: experts on odd layers (default period 2, offset 1); attention on even layers (default: 1 in 8).
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 0},
    # LongCat: zero-compute (identity) experts come on top of the routed ones: router logits are [T, 8 + 2].
    "longcat_flash": {"zero_expert_num": 2},
    # LFM2: no default layer pattern at all; short-conv and attention layers alternate.
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv", "full_attention"]},
    # Nemotron-H: one mixer per layer, depth = len(layer_types): Mamba, MoE, attention, MoE, dense MLP.
    "nemotron_h": {"layers_block_type": ["linear_attention", "moe", "full_attention", "moe", "mlp"]},
    # DeepSeek-V4: one hash-routed layer (no router logits), then learned top-k routing; low-rank grouped o-proj.
    "deepseek_v4": {"mlp_layer_types": ["hash_moe", "moe", "moe", "moe"], "o_lora_rank": 16, "o_groups": 2},
    # Gemma4: the MoE block is off by default; full-attention layers use a (large) separate head_dim.
    "gemma4_text": {
        "enable_moe_block": True, "hidden_size_per_layer_input": 16, "global_head_dim": 32,
        "layer_types": ["sliding_attention", "full_attention"] * 2,  # the last layer must be full attention
    },
    # Dots3-Note: sliding-window layers take their MLA sizes from swa_* kwargs (head_dim = nope + rope).
    "dots3_note_text": {
        "swa_num_attention_heads": 4, "swa_num_key_value_heads": 4, "swa_q_lora_rank": 32, "swa_kv_lora_rank": 32,
        "swa_head_dim": 24, "swa_qk_nope_head_dim": 16, "swa_v_head_dim": 16,
    },
    # Qwen4-Exp: its "indexed" attention layers need the (all-None by default) QSA indexer sizes.
    "qwen4_exp_text": {
        "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 64,
        "indexer_compress_ratio": 4, "hc_lowrank": 16,
    },
    "zaya": {"num_experts_per_tok": 1, "router_hidden_size": 32},  # Zaya only accepts top-1
}
# fmt: on


def _fields(config: PretrainedConfig) -> dict[str, object]:
    """The config class's declared fields with their default values."""
    values = config.to_dict()  # not getattr: per-layer (heterogeneous) attributes refuse global access
    if dataclasses.is_dataclass(config):
        return {f.name: values.get(f.name) for f in dataclasses.fields(config)}
    return values


def _fix_layer_patterns(config: PretrainedConfig) -> dict[str, list[str]]:
    """Per-layer patterns that the re-derivation for 4 layers got wrong; empty if none."""
    fixes = {}
    mlp = getattr(config, "mlp_layer_types", None)
    if isinstance(mlp, list) and set(mlp) <= {"dense", "sparse"} and mlp[:2] != ["dense", "sparse"]:
        # mixed stack: layer 0 dense, then MoE (defaults may give 3 dense layers, or none)
        fixes["mlp_layer_types"] = ["dense"] + ["sparse"] * (len(mlp) - 1)
    # Hybrids: a pattern such as "attention every 4th/6th layer" may leave no attention layer at all, and the cache
    # then refuses `get_seq_length`. Alternate linear and full attention instead.
    kinds = config.to_dict().get("layer_types")
    attention = [k for k in kinds or [] if k.endswith("attention") and k != "linear_attention"]
    if isinstance(kinds, list) and "linear_attention" in kinds and not attention:
        fixes["layer_types"] = [("linear_attention", "full_attention")[i % 2] for i in range(len(kinds))]
    return fixes


def tiny_config(model_type: str, vocab_size: int) -> PretrainedConfig:
    """A tiny config (hidden 64, 4 layers, 8 experts top-2, ...) of the MoE causal LM `model_type`.

    Special-token ids are cleared (the arch defaults point outside the tiny vocabulary); `build_random_model` sets them.
    """
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if model_type not in causal:
        what = f"unknown random model type {model_type!r}"
        if model_type in CONFIG_MAPPING:
            what = f"model type {model_type!r} is not a causal LM"
        raise InputError(f"{what}; MoE types: {', '.join(moe_model_types())}")
    if model_type in UNSUPPORTED:
        raise InputError(f"random model type {model_type!r} is not supported: {UNSUPPORTED[model_type]}")
    if (text := _text_type(model_type)) in causal:
        model_type = text  # e.g. 'llama4' -> 'llama4_text': only the language model
    if not _records_router_logits(model_type):
        raise InputError(
            f"model type {model_type!r} has no MoE layers; MoE types: {', '.join(moe_model_types())}"
        )

    fields = _fields(AutoConfig.for_model(model_type))
    kwargs: dict[str, object] = {k: v for k, v in _SHRINK.items() if k in fields}
    # Without a separate expert size, `intermediate_size` *is* the expert size (Mixtral, Granite, Jamba, ...).
    if "intermediate_size" in fields:
        has_expert_size = any(fields.get(k) is not None for k in _EXPERT_SIZE_KEYS)
        kwargs["intermediate_size"] = DENSE_I if has_expert_size else EXPERT_I
    if not (fields.get("n_group") or fields.get("num_expert_group") or 1) > 1:
        # keep ungrouped routers ungrouped (group-limited routing only where the arch defaults to it)
        kwargs.update({k: 1 for k in _GROUP_KEYS if k in fields})
    if fields.get("q_lora_rank") is None:
        kwargs.pop("q_lora_rank", None)  # None means "no q compression"; keep it
    if "kv_lora_rank" in fields:  # MLA attention has one latent kv per head: kv heads == heads
        kwargs["num_key_value_heads"] = 4
    if "qk_rope_head_dim" in fields and fields.get("head_dim") == fields["qk_rope_head_dim"]:
        kwargs["head_dim"] = kwargs["qk_rope_head_dim"]  # MLA: head_dim names the rotary part (LongCat)
    rope = fields.get("rope_parameters")
    if isinstance(rope, dict) and rope.get("factor") and rope.get("original_max_position_embeddings"):
        # YaRN: keep factor == max_positions / original_max_positions (gpt-oss), else transformers warns
        kwargs["rope_parameters"] = {
            **rope,
            "original_max_position_embeddings": MAX_POSITIONS // int(rope["factor"]),
        }
    n_layers = next((fields[k] for k in ("num_hidden_layers", "n_layers", "num_layers") if k in fields), None)
    for k, v in fields.items():
        if isinstance(v, list) and len(v) == n_layers:
            kwargs[k] = None  # per-layer patterns: re-derived for the new depth by the config's __post_init__
        elif "vocab_size" in k and v == fields.get("vocab_size"):
            kwargs[k] = vocab_size  # e.g. Gemma4's per-layer-input embedding table
    kwargs.update({k: None for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in fields})
    kwargs.update(_OVERRIDES.get(model_type, {}))
    kwargs["vocab_size"] = vocab_size
    config = AutoConfig.for_model(model_type, **kwargs)
    if fixes := _fix_layer_patterns(config):
        config = AutoConfig.for_model(model_type, **{**kwargs, **fixes})
    return config


# ----------------------------------------------------------------------------------------------- models
def build_random_model(
    model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A randomly initialised tiny MoE model (eval mode) and the byte tokenizer. Same seed -> identical weights."""
    tokenizer = tiny_tokenizer()
    config = tiny_config(model_type, vocab_size=len(tokenizer))
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), tokenizer
