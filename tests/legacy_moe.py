"""A small model in the legacy remote-code MoE layout (as in deepseek-ai/deepseek-moe-16b's modeling code).

Written for the tests from the layout's description: a gate returning `(topk_idx, topk_weight, aux_loss)`, a
`ModuleList` of SwiGLU experts, ungated shared experts added to the routed output, and a dense first layer. The
token mixer is a causal running mean (no attention), which is all the adapter tests need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class LegacyMoeConfig(PretrainedConfig):
    model_type = "legacy_moe_test"

    def __init__(
        self,
        vocab_size: int = 259,
        hidden_size: int = 32,
        intermediate_size: int = 64,
        moe_intermediate_size: int = 16,
        num_hidden_layers: int = 3,
        n_routed_experts: int = 6,
        num_experts_per_tok: int = 2,
        n_shared_experts: int = 1,
        first_k_dense_replace: int = 1,
        norm_topk_prob: bool = False,
        **kwargs,
    ) -> None:
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.intermediate_size, self.moe_intermediate_size = intermediate_size, moe_intermediate_size
        self.num_hidden_layers, self.n_routed_experts = num_hidden_layers, n_routed_experts
        self.num_experts_per_tok, self.n_shared_experts = num_experts_per_tok, n_shared_experts
        self.first_k_dense_replace, self.norm_topk_prob = first_k_dense_replace, norm_topk_prob
        super().__init__(**kwargs)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    def __init__(self, config: LegacyMoeConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        nn.init.normal_(self.weight, std=0.5)

    def forward(self, hidden_states: torch.Tensor):
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
        scores = F.linear(hidden, self.weight).softmax(dim=-1)
        topk_weight, topk_idx = torch.topk(scores, self.top_k, dim=-1)
        if self.norm_topk_prob:
            topk_weight = topk_weight / topk_weight.sum(dim=-1, keepdim=True)
        return topk_idx, topk_weight, None


class LegacyMoE(nn.Module):
    def __init__(self, config: LegacyMoeConfig) -> None:
        super().__init__()
        self.gate = MoEGate(config)
        self.experts = nn.ModuleList(
            SwiGLU(config.hidden_size, config.moe_intermediate_size) for _ in range(config.n_routed_experts)
        )
        self.shared_experts = SwiGLU(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        topk_idx, topk_weight, _ = self.gate(hidden_states)
        flat = hidden_states.reshape(-1, shape[-1])
        out = torch.zeros_like(flat)
        for slot in range(topk_idx.shape[1]):
            for expert_id, expert in enumerate(self.experts):
                rows = topk_idx[:, slot] == expert_id
                if rows.any():
                    out[rows] += expert(flat[rows]) * topk_weight[rows, slot, None]
        return out.reshape(shape) + self.shared_experts(hidden_states)


class LegacyDecoderLayer(nn.Module):
    def __init__(self, config: LegacyMoeConfig, index: int) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size)
        self.mix = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        dense = index < config.first_k_dense_replace
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size) if dense else LegacyMoE(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = self.input_layernorm(hidden_states)
        counts = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype).view(1, -1, 1)
        hidden_states = hidden_states + self.mix(x.cumsum(dim=1) / counts)  # causal running mean
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class LegacyMoeModel(nn.Module):
    def __init__(self, config: LegacyMoeConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LegacyDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.norm(hidden)


class LegacyMoeForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LegacyMoeConfig
    base_model_prefix = "model"

    def __init__(self, config: LegacyMoeConfig) -> None:
        super().__init__(config)
        self.model = LegacyMoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.2)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_decoder(self) -> nn.Module:
        return self.model

    def forward(self, input_ids: torch.Tensor, attention_mask=None, labels=None, **kwargs) -> CausalLMOutputWithPast:
        logits = self.lm_head(self.model(input_ids))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


def register() -> None:
    """Make the layout loadable through the Auto classes, as `trust_remote_code` would."""
    try:
        AutoConfig.register(LegacyMoeConfig.model_type, LegacyMoeConfig)
        AutoModelForCausalLM.register(LegacyMoeConfig, LegacyMoeForCausalLM)
    except ValueError:
        pass  # already registered in this process


def build_legacy_model(seed: int = 0, **overrides) -> LegacyMoeForCausalLM:
    torch.manual_seed(seed)
    return LegacyMoeForCausalLM(LegacyMoeConfig(**overrides)).eval()
