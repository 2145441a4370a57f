"""A causal LM seen as a stack of decoder layers: the view every analysis starts from, dense or MoE.

`LanguageModel` finds, in any transformers causal LM, the decoder's layer list (whose outputs are the residual
stream), the dense feed-forward network of each layer that has one, the final norm and the unembedding. Dense
baselines (probing, logit lens) use it directly; `common.model.adapter.MoEModel` extends it with the MoE layers.
Callers ask the view for `vocab_size`, `dtype` and `context_length` instead of reading the model's config.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

from common.errors import InputError
from common.model.config_facts import CONTEXT_NAMES, LAYER_COUNT_NAMES, first_int, missing_layer, text_part

_LAYER_LIST_NAMES = ("layers", "blocks", "h")
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|blocks|h)\.(\d+)(?:\.|$)")
# LFM2 names its final norm `embedding_norm` (applied after the last layer).
_FINAL_NORM_NAMES = ("norm", "norm_f", "ln_f", "final_layernorm", "final_norm", "final_layer_norm", "embedding_norm")
# Where a decoder layer keeps its dense FFN. Nemotron-H's dense layers are a `mixer` (like its Mamba, attention and
# MoE layers); a Granite(-MoE-Hybrid/-Shared) layer without experts is its `shared_mlp` alone.
_FFN_NAMES = ("mlp", "feed_forward", "ffn", "mixer", "shared_mlp")
_ACTIVATION_NAMES = ("act_fn", "activation_fn", "act", "activation")
# Config fields naming the activation of FFNs that hard-code it in forward (see FFNSpelling.hardcoded_activation).
_CONFIG_ACTIVATION_NAMES = ("hidden_act", "hidden_activation", "activation_function")


@dataclass(frozen=True)
class FFNParams:
    """A feed-forward network's weights in textbook orientation: out = down @ (act(gate @ x + gate_bias) * (up @ x + up_bias)).

    Used for dense FFNs and for each expert. Tensors are views into the model's parameters (in-place edits reach
    the model).
    """

    gate: torch.Tensor | None  # [I, H]; None for ungated FFNs
    up: torch.Tensor  # [I, H]
    down: torch.Tensor  # [H, I]
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return self.up.shape[0]


def gated_neurons(params: FFNParams, activation: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The intermediate neurons act(gate·x)·(up·x) (act(up·x) when ungated) on x [..., H] -> [..., I]."""
    up = F.linear(x, params.up.to(x.dtype), _cast(params.up_bias, x))
    if params.gate is None:
        return activation(up)
    return activation(F.linear(x, params.gate.to(x.dtype), _cast(params.gate_bias, x))) * up


def project_down(params: FFNParams, neurons: torch.Tensor) -> torch.Tensor:
    """down · neurons (+ bias): the FFN's output from its intermediate neurons."""
    return F.linear(neurons, params.down.to(neurons.dtype), _cast(params.down_bias, neurons))


def _cast(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.to(like.dtype)


@dataclass(frozen=True)
class FFNSpelling:
    """How one dense-FFN layout names its projections (child modules of the FFN): gated (gate, up), fused [gate; up]
    (one projection whose outputs stack gate then up), or ungated (up only); and its down projection."""

    down: str
    up: str | None = None
    gate: str | None = None
    fused: str | None = None
    # The layout's reference code applies a fixed activation in forward with no attribute for it (LLaMA's original
    # `w2(F.silu(w1(x)) * w3(x))`, kept by LFM2-MoE): without an attribute, the config's `hidden_act` (or
    # `hidden_activation` / `activation_function`) is used, and SiLU when the config names none. Other spellings
    # need an activation attribute: an FFN without one computes a custom gate (MiniMax-M3's clamped `(up + 1) *
    # gate * sigmoid(alpha * gate)`) that act(gate) * up cannot express, so it is not taken for a dense FFN.
    hardcoded_activation: bool = False


# Checked in order, first match wins (a fused `gate_up_proj` before separate projections, as before).
# fmt: off
FFN_SPELLINGS: tuple[FFNSpelling, ...] = (
    FFNSpelling(down="down_proj", fused="gate_up_proj"),                    # Phi-3, MiniMax-M3
    FFNSpelling(down="down_proj", up="up_proj", gate="gate_proj"),          # Llama and most others
    FFNSpelling(down="down_proj", up="up_proj"),                            # ungated: Nemotron-H relu2(up x)
    FFNSpelling(down="w2", up="w3", gate="w1", hardcoded_activation=True),  # LLaMA reference, Mixtral, LFM2-MoE
    FFNSpelling(down="output_linear", fused="input_linear"),                # Granite `shared_mlp`
    FFNSpelling(down="fc2", up="fc1"),                                      # Phi-1/2 and other ungated fc1/fc2
    FFNSpelling(down="fc_out", up="fc_in"),                                 # GPT-J
    FFNSpelling(down="c_proj", up="c_fc"),                                  # GPT-2 (Conv1D: weights stored [in, out])
    FFNSpelling(down="dense_4h_to_h", up="dense_h_to_4h"),                  # GPT-NeoX, Falcon
)
# fmt: on


def _projection(module: nn.Module, name: str | None) -> nn.Module | None:
    """The child `name` if it is a linear projection (nn.Linear, or GPT-2's transposed Conv1D)."""
    child = getattr(module, name, None) if name else None
    return child if isinstance(child, (nn.Linear, Conv1D)) else None


def _features(projection: nn.Module) -> tuple[int, int]:
    """(in, out) features; from the layer's attributes, not its weight (quantized weights are packed)."""
    if isinstance(projection, Conv1D):
        return projection.weight.shape[0], projection.nf
    return projection.in_features, projection.out_features


def _weight(projection: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [out, in], bias): a view of a Conv1D's [in, out] weight in nn.Linear's orientation."""
    weight = projection.weight.T if isinstance(projection, Conv1D) else projection.weight
    return weight, projection.bias


def ffn_spelling(module: nn.Module) -> FFNSpelling | None:
    """The first spelling in FFN_SPELLINGS whose projections `module` has, with consistent shapes; None if none."""
    for spelling in FFN_SPELLINGS:
        down = _projection(module, spelling.down)
        if down is None:
            continue
        width, hidden = _features(down)  # down: I -> H
        if spelling.fused is not None:
            fused = _projection(module, spelling.fused)
            if fused is not None and _features(fused) == (hidden, 2 * width):
                return spelling
            continue
        up = _projection(module, spelling.up)
        gate = _projection(module, spelling.gate)
        if up is None or _features(up) != (hidden, width):
            continue
        if spelling.gate is not None and (gate is None or _features(gate) != (hidden, width)):
            continue
        return spelling
    return None


def config_activation(config: object) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The activation a config names (hidden_act and kin), or None."""
    for name in _CONFIG_ACTIVATION_NAMES:
        value = getattr(config, name, None)
        if isinstance(value, str) and value in ACT2FN:
            return ACT2FN[value]
    return None


def module_activation(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    for name in _ACTIVATION_NAMES:
        fn = getattr(module, name, None)
        if callable(fn):
            return fn
    return None


@dataclass(eq=False)
class DenseFFN:
    """The dense feed-forward network of one decoder layer (a dense model's, or a dense layer of a MoE model)."""

    layer: int  # 0-based decoder-layer index
    path: str
    module: nn.Module
    activation: Callable[[torch.Tensor], torch.Tensor]
    spelling: FFNSpelling | None = None  # how the module names its projections; None: found from the module

    def params(self) -> FFNParams:
        m = self.module
        spelling = self.spelling or ffn_spelling(m)
        if spelling is None:
            raise InputError(f"'{self.path}' ({type(m).__name__}) has no dense-FFN projections")
        down, down_bias = _weight(getattr(m, spelling.down))
        if spelling.fused is not None:  # one projection holding [gate; up]
            fused, fused_bias = _weight(getattr(m, spelling.fused))
            gate, up = fused.chunk(2, dim=0)
            gate_bias, up_bias = fused_bias.chunk(2) if fused_bias is not None else (None, None)
            return FFNParams(gate, up, down, gate_bias, up_bias, down_bias)
        up, up_bias = _weight(getattr(m, spelling.up))
        gate, gate_bias = _weight(getattr(m, spelling.gate)) if spelling.gate is not None else (None, None)
        return FFNParams(gate=gate, up=up, down=down, gate_bias=gate_bias, up_bias=up_bias, down_bias=down_bias)

    @property
    def width(self) -> int:
        return self.params().width

    def neurons(self, x: torch.Tensor) -> torch.Tensor:
        """Intermediate neurons act(gate·x)·(up·x) on the FFN's input x [..., H] -> [..., I]."""
        return gated_neurons(self.params(), self.activation, x)

    def describe(self) -> dict:
        return {"layer": self.layer, "path": self.path, "width": self.width}


def _dense_ffn(
    module: nn.Module, config: object = None
) -> tuple[FFNSpelling, Callable[[torch.Tensor], torch.Tensor]] | None:
    """(spelling, activation) if `module` is a dense FFN (see FFN_SPELLINGS), else None."""
    spelling = ffn_spelling(module)
    if spelling is None:
        return None
    activation = module_activation(module)
    if activation is None and spelling.hardcoded_activation:
        activation = config_activation(config) or F.silu
    return None if activation is None else (spelling, activation)


def _is_dense_ffn(module: nn.Module, config: object = None) -> bool:
    return _dense_ffn(module, config) is not None


def decoder_layer_index(path: str) -> int:
    found = _LAYER_INDEX.findall(path)
    if not found:
        raise InputError(f"cannot tell which decoder layer '{path}' belongs to")
    return int(found[-1])


def text_config(model: nn.Module) -> object:
    return text_part(getattr(model, "config", None))


def _logits_postprocess(config: object) -> tuple[float | None, float | None]:
    """(divide-by scale, soft cap) that some heads apply after the unembedding."""
    scaling = getattr(config, "logits_scaling", None)
    cap = getattr(config, "final_logit_softcapping", None)
    return (float(scaling) if scaling not in (None, 1, 1.0) else None, float(cap) if cap else None)


class LanguageModel:
    """A causal LM with its tokenizer: decoder layers, dense FFNs, final norm and unembedding."""

    def __init__(self, model: nn.Module, tokenizer=None, name: str = "", revision: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        self.revision = revision
        self._layers_path = self._find_layer_list()
        self.num_decoder_layers = len(self.model.get_submodule(self._layers_path))
        self.ffns: dict[int, DenseFFN] = self._find_dense_ffns()

    # -- facts callers need (so nobody reaches into .model.config)
    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embeddings' device (under device_map, accelerate moves them on from there);
        the CPU when those weights are offloaded (their parameters then sit on the meta device)."""
        embeddings = self.model.get_input_embeddings()
        weight = getattr(embeddings, "weight", None)
        device = weight.device if isinstance(weight, torch.Tensor) else next(self.model.parameters()).device
        return torch.device("cpu") if device.type == "meta" else device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def vocab_size(self) -> int:
        """Rows of the output head (can exceed the tokenizer's vocabulary: padded embeddings)."""
        head = self.model.get_output_embeddings()
        if head is not None and getattr(head, "weight", None) is not None:
            return head.weight.shape[0]
        return int(text_config(self.model).vocab_size)

    @property
    def hidden_size(self) -> int:
        return int(text_config(self.model).hidden_size)

    @property
    def context_length(self) -> int | None:
        """The longest sequence the model was configured for; None if the config does not say."""
        return first_int([text_config(self.model), self.model.config], CONTEXT_NAMES)

    # -- structure
    def _find_layer_list(self) -> str:
        """The path of the decoder's layer list: the longest ModuleList named layers/blocks/h."""
        expected = first_int([text_config(self.model), self.model.config], LAYER_COUNT_NAMES)
        best: tuple[bool, int, str] | None = None
        for path, module in self.model.named_modules():
            if isinstance(module, nn.ModuleList) and path.rsplit(".", 1)[-1] in _LAYER_LIST_NAMES and len(module) > 0:
                candidate = (len(module) == expected, len(module), path)  # the config's layer count wins ties
                if best is None or candidate[:2] > best[:2]:
                    best = candidate
        if best is None:
            raise InputError(f"{type(self.model).__name__}: cannot find the decoder layer list (layers/blocks/h)")
        return best[2]

    def _find_dense_ffns(self) -> dict[int, DenseFFN]:
        found = {}
        config = text_config(self.model)
        for index, layer in enumerate(self.decoder_layers()):
            for name in _FFN_NAMES:
                module = getattr(layer, name, None)
                match = _dense_ffn(module, config) if isinstance(module, nn.Module) else None
                if match is not None:
                    spelling, activation = match
                    found[index] = DenseFFN(index, f"{self._layers_path}.{index}.{name}", module, activation, spelling)
                    break
        return found

    def decoder_layers(self) -> nn.ModuleList:
        """The decoder's layer list (its outputs are the residual stream after each layer)."""
        return self.model.get_submodule(self._layers_path)

    def resolve_layer(self, index: int | str) -> int:
        """A 0-based decoder-layer index from a flag value (negatives count from the end)."""
        try:
            value = int(index)
        except (TypeError, ValueError):
            raise InputError(f"--layers: '{index}' is not a layer index or 'all'") from None
        resolved = value + self.num_decoder_layers if value < 0 else value
        if not 0 <= resolved < self.num_decoder_layers:
            raise missing_layer(value, self.num_decoder_layers)
        return resolved

    def select_ffns(self, spec: Sequence[int | str] | None) -> list[DenseFFN]:
        """Dense FFNs named by `--layers` (None / 'all' = every layer that has one)."""
        dense = ", ".join(str(i) for i in self.ffns) or "none"
        if not self.ffns:
            raise InputError(f"{type(self.model).__name__}: no dense feed-forward layer found (gate/up/down projections)")
        if spec is None or any(str(s).lower() == "all" for s in spec):
            return list(self.ffns.values())
        chosen = []
        for item in spec:
            index = self.resolve_layer(item)
            if index not in self.ffns:
                raise InputError(f"layer {item} has no dense feed-forward network; dense layers: {dense}")
            if self.ffns[index] not in chosen:
                chosen.append(self.ffns[index])
        return chosen

    def final_norm(self) -> nn.Module:
        """The norm applied after the last decoder layer: a sibling of the decoder's layer list."""
        parent = self._layers_path.rsplit(".", 1)[0] if "." in self._layers_path else ""
        decoder = self.model.get_submodule(parent)
        for name in _FINAL_NORM_NAMES:
            module = getattr(decoder, name, None)
            if isinstance(module, nn.Module):
                return module
        raise InputError(f"{type(self.model).__name__}: no final norm found among {', '.join(_FINAL_NORM_NAMES)}")

    def unembed(self, residual: torch.Tensor) -> torch.Tensor:
        """Logits from a residual-stream state, through the model's final norm and output head."""
        logits = self.model.get_output_embeddings()(self.final_norm()(residual))
        scaling, cap = _logits_postprocess(self.model.config)
        multiplier = getattr(self.model, "logit_scale", None)  # Cohere heads multiply their logits
        if isinstance(multiplier, (int, float)) and multiplier != 1:
            logits = logits * multiplier
        if scaling is not None:
            logits = logits / scaling
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        device = self.device
        mask = attention_mask.to(device) if attention_mask is not None else None
        return self.model(input_ids=input_ids.to(device), attention_mask=mask, use_cache=False, **kwargs)

    def describe(self) -> dict:
        return {
            "model": self.name,
            "revision": self.revision,
            "architecture": type(self.model).__name__,
            "dtype": str(self.dtype).removeprefix("torch."),
            "num_decoder_layers": self.num_decoder_layers,
            "dense_ffn_layers": sorted(self.ffns),
            # every parameter once (tied embeddings once); the meta-device skeleton counts the same
            "total_parameters": sum(p.numel() for p in self.model.parameters()),
        }
