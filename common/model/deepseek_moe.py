"""DeepSeekMoE v1 (deepseek-ai/deepseek-moe-16b-base / -chat) written natively for transformers 5.x.

The checkpoints' own remote code targets transformers 4.3x and no longer imports; this module loads the published
`config.json` (`model_type: "deepseek"`) and safetensors with their parameter names unchanged, without
`trust_remote_code`. Facts behind it: the published config
(tests/fixtures/deepseek-moe-16b-base/config.json) and the checkpoints' remote code, which imports
`is_torch_fx_available` and calls `DynamicCache.from_legacy_cache`, both gone in transformers 5.x.

Layout: Llama-style multi-head attention with rotate-half RoPE and float32 RMSNorm; the first
`first_k_dense_replace` layers have a dense SwiGLU MLP, the others (every `moe_layer_freq`-th) a MoE block of a
softmax top-k gate (a bare [E, H] weight), a ModuleList of SwiGLU experts and ungated shared experts.

The gate returns `(router_logits, top_k_weights, top_k_index)` and the experts are called as
`experts(hidden, top_k_index, top_k_weights)`, the calling convention of transformers' own MoE models, so
`output_router_logits=True` and the project's MoE adapter (`common.model.adapter`) treat it like any in-tree MoE.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

MODEL_TYPE = "deepseek"


@strict
class DeepseekMoEConfig(PretrainedConfig):
    """The published DeepSeekMoE v1 configuration; defaults are deepseek-moe-16b's. Unknown keys are kept as attributes.

    Legacy `rope_theta` / `rope_scaling` keys are folded into `rope_parameters` by transformers' RoPE standardisation.
    `n_routed_experts=None` makes every layer dense.
    """

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]

    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 10944
    moe_intermediate_size: int = 1408
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    n_shared_experts: int | None = 2
    n_routed_experts: int | None = 64
    num_experts_per_tok: int | None = 6
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float | int = 0.001
    seq_aux: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float | int = 0.02
    rms_norm_eps: float | int = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 100000
    eos_token_id: int | list[int] | None = 100001
    pretraining_tp: int | None = 1
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    output_router_logits: bool = False

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )


class DeepseekMoERMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class DeepseekMoERotaryEmbedding(nn.Module):
    """cos/sin tables of rotate-half RoPE (and the scaled variants transformers implements, e.g. linear, dynamic)."""

    def __init__(self, config: DeepseekMoEConfig) -> None:
        super().__init__()
        self.config = config
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters["rope_type"]
        init_fn = self.compute_default_rope_parameters
        if self.rope_type != "default":
            init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: DeepseekMoEConfig, **kwargs) -> tuple[torch.Tensor, float]:
        dim = config.hidden_size // config.num_attention_heads
        base = config.rope_parameters["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def eager_attention_forward(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0, **_):
    groups = module.num_key_value_groups
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class DeepseekMoEAttention(nn.Module):
    def __init__(self, config: DeepseekMoEConfig, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias, hidden = config.attention_bias, config.hidden_size
        self.q_proj = nn.Linear(hidden, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, hidden, bias=bias)

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values: Cache | None = None, **kw):
        input_shape = hidden_states.shape[:-1]
        shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kw,
        )
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class DeepseekMoEMLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x)); the dense MLP, each routed expert, and the shared experts."""

    def __init__(self, config: DeepseekMoEConfig, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DeepseekMoEGate(nn.Module):
    """Softmax top-k router over a bare [E, H] weight (the checkpoints' `mlp.gate.weight`)."""

    def __init__(self, config: DeepseekMoEConfig) -> None:
        super().__init__()
        if config.scoring_func != "softmax":
            raise ValueError(f"DeepSeekMoE: unsupported scoring_func {config.scoring_func!r} (only 'softmax')")
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits [T, E], top-k weights [T, k], top-k expert indices [T, k])."""
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
        router_logits = F.linear(hidden, self.weight)
        scores = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        top_k_weights, top_k_index = torch.topk(scores, self.top_k, dim=-1)
        if self.norm_topk_prob and self.top_k > 1:
            top_k_weights = top_k_weights / (top_k_weights.sum(dim=-1, keepdim=True) + 1e-20)
        return router_logits, top_k_weights.to(hidden.dtype), top_k_index


class DeepseekMoEExperts(nn.ModuleList):
    """The routed experts: a ModuleList (parameters `experts.{e}.*_proj.weight`) callable on top-k routing."""

    def __init__(self, config: DeepseekMoEConfig) -> None:
        self.num_experts = config.n_routed_experts
        super().__init__(DeepseekMoEMLP(config, config.moe_intermediate_size) for _ in range(self.num_experts))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """sum_j w[t, j] * expert_{idx[t, j]}(h[t]) for hidden [T, H], index and weights [T, k]."""
        out = torch.zeros_like(hidden_states)
        for expert in torch.unique(top_k_index).tolist():
            if not 0 <= expert < self.num_experts:
                continue
            tokens, slots = torch.where(top_k_index == expert)
            routed = self[expert](hidden_states[tokens]) * top_k_weights[tokens, slots, None]
            out.index_add_(0, tokens, routed.to(out.dtype))
        return out


class DeepseekMoESparseBlock(nn.Module):
    def __init__(self, config: DeepseekMoEConfig) -> None:
        super().__init__()
        self.gate = DeepseekMoEGate(config)
        self.experts = DeepseekMoEExperts(config)
        self.shared_experts = None
        if config.n_shared_experts:
            width = config.moe_intermediate_size * config.n_shared_experts
            self.shared_experts = DeepseekMoEMLP(config, width)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        _, top_k_weights, top_k_index = self.gate(flat)
        out = self.experts(flat, top_k_index, top_k_weights).view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return out


class DeepseekMoEDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: DeepseekMoEConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = DeepseekMoEAttention(config, layer_idx)
        if config.is_moe_layer(layer_idx):
            self.mlp = DeepseekMoESparseBlock(config)
        else:
            self.mlp = DeepseekMoEMLP(config, config.intermediate_size)
        self.input_layernorm = DeepseekMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DeepseekMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attn_out, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = hidden_states + attn_out
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class DeepseekMoEPreTrainedModel(PreTrainedModel):
    config_class = DeepseekMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["DeepseekMoEDecoderLayer"]
    _skip_keys_device_placement: ClassVar[list[str]] = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs: ClassVar[dict] = {
        "router_logits": OutputRecorder(DeepseekMoEGate, index=0),
        "hidden_states": DeepseekMoEDecoderLayer,
        "attentions": DeepseekMoEAttention,
    }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, DeepseekMoEGate):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)


class DeepseekMoEModel(DeepseekMoEPreTrainedModel):
    def __init__(self, config: DeepseekMoEConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(DeepseekMoEDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DeepseekMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DeepseekMoERotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> MoeModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(past_seen, past_seen + inputs_embeds.shape[1], device=inputs_embeds.device)
            position_ids = position_ids.unsqueeze(0)
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return MoeModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)


class DeepseekMoEForCausalLM(DeepseekMoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}  # if tied
    _pp_plan: ClassVar[dict] = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: DeepseekMoEConfig) -> None:
        super().__init__(config)
        self.model = DeepseekMoEModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        """Causal-LM logits; the DeepSeekMoE auxiliary balance loss is a training-only term and is not computed."""
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )


def register() -> None:
    """Make `model_type: "deepseek"` load through AutoConfig / AutoModel / AutoModelForCausalLM (idempotent).

    Should transformers ever ship its own "deepseek" type, that one is left in place.
    """
    if MODEL_TYPE in CONFIG_MAPPING_NAMES:
        return
    AutoConfig.register(MODEL_TYPE, DeepseekMoEConfig, exist_ok=True)
    AutoModel.register(DeepseekMoEConfig, DeepseekMoEModel, exist_ok=True)
    AutoModelForCausalLM.register(DeepseekMoEConfig, DeepseekMoEForCausalLM, exist_ok=True)

