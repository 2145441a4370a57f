"""`capture`: record what chosen layers see and produce in each forward pass; hooks removed in `finally`.

Capture hooks only read (`detach`; outputs a module may later modify in place are cloned), so the model's outputs
stay bit-identical. Tokens are flattened (T = B·S, row-major) in every record.

The vocabulary (`Capturable`):
- MoE layers: `logits` (router logits [T, C]), `topk` (the top-k index and weight [T, k] the experts really use),
  `input` (the experts' input [T, H]), `moe_output` (the MoE block's output [T, H], shared experts included),
  `routed_output` (the routed experts' weighted sum Σ_k w_k E_k(x) [T, H]) and `shared_output` (the shared experts'
  part [T, H], where the layer has shared experts).
- every decoder layer: `residual` (the residual stream after the layer [T, H], before the final norm).
- dense FFNs (dense models, and the dense layers of MoE models): `ffn_input` [T, H] and `ffn_neurons`
  act(gate·x)·(up·x) [T, I].
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from common.hooks.routing import Hooks, experts_call_args, special_router_routing
from common.model import DenseFFN, LanguageModel
from common.model.adapter import MoELayer, in_adapter_call

Capturable = Literal[
    "logits", "topk", "input", "moe_output", "routed_output", "shared_output", "residual", "ffn_input", "ffn_neurons"
]
MOE_ITEMS = frozenset({"logits", "topk", "input", "moe_output", "routed_output", "shared_output"})
DECODER_ITEMS = frozenset({"residual"})
FFN_ITEMS = frozenset({"ffn_input", "ffn_neurons"})
_OUTPUT_ITEMS = frozenset({"moe_output", "routed_output", "shared_output"})


@dataclass
class LayerRecord:
    """What one decoder layer saw in the last forward pass; tokens are flattened (T = B·S, row-major)."""

    logits: torch.Tensor | None = None  # [T, C] router logits (C = num_choices)
    topk_index: torch.Tensor | None = None  # [T, k] experts the tokens were sent to
    topk_weight: torch.Tensor | None = None  # [T, k] weights the experts really received
    expert_input: torch.Tensor | None = None  # [T, H] the experts' input
    moe_output: torch.Tensor | None = None  # [T, H] the MoE block's output (routed + shared)
    routed_output: torch.Tensor | None = None  # [T, H] Σ_k w_k E_k(x)
    shared_output: torch.Tensor | None = None  # [T, H] shared experts' part; None without shared experts
    residual: torch.Tensor | None = None  # [T, H] residual stream after the decoder layer ([T, streams, H] with hyper-connections)
    ffn_input: torch.Tensor | None = None  # [T, H] dense FFN input
    ffn_neurons: torch.Tensor | None = None  # [T, I] dense FFN intermediate neurons


@dataclass
class Capture:
    """Records of the last forward pass, keyed by decoder-layer index."""

    records: dict[int, LayerRecord] = field(default_factory=dict)

    def __getitem__(self, layer: int) -> LayerRecord:
        return self.records[layer]

    def clear(self) -> None:
        self.records.clear()


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _first(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def capture(
    model: LanguageModel,
    layers: Sequence[MoELayer] | None = None,
    what: Sequence[Capturable] = ("logits", "topk", "input"),
    decoder_layers: Sequence[int] | None = None,
) -> Iterator[Capture]:
    """Record `what` during every forward pass inside the block; records are overwritten by each pass.

    `layers`: the MoE layers for MoE items (default: all of them). `decoder_layers`: decoder-layer indices for
    `residual` (default: all) and for the FFN items (default: every layer with a dense FFN).
    """
    wanted = set(what)
    unknown = wanted - MOE_ITEMS - DECODER_ITEMS - FFN_ITEMS
    if unknown:
        raise ValueError(f"capture: unknown items {sorted(unknown)}")
    moe_layers = list(layers) if layers is not None else list(getattr(model, "layers", []))
    if wanted & MOE_ITEMS and not moe_layers:
        raise ValueError(f"capture: {sorted(wanted & MOE_ITEMS)} need MoE layers; {type(model.model).__name__} has none")
    result = Capture()
    hooks = Hooks()
    try:
        if wanted & MOE_ITEMS:
            for moe_layer in moe_layers:
                _register_moe(moe_layer, model, result, wanted, hooks)
        if "residual" in wanted:
            all_layers = model.decoder_layers()
            indices = range(len(all_layers)) if decoder_layers is None else [model.resolve_layer(i) for i in decoder_layers]
            for index in indices:
                _register_residual(all_layers[index], index, result, hooks)
        if wanted & FFN_ITEMS:
            for ffn in model.select_ffns(decoder_layers):
                _register_ffn(ffn, result, wanted, hooks)
        yield result
    finally:
        hooks.remove()


def _register_residual(layer: nn.Module, index: int, result: Capture, hooks: Hooks) -> None:
    def hook(module, args, out):
        hidden = _first(out)  # [B, S, H]; [B, S, streams, H] with hyper-connections (DeepSeek-V4)
        hidden = hidden.flatten(0, 1) if hidden.dim() >= 3 else hidden
        result.records.setdefault(index, LayerRecord()).residual = hidden.detach().clone()

    hooks.add(layer.register_forward_hook(hook))


def _register_ffn(ffn: DenseFFN, result: Capture, wanted: set[str], hooks: Hooks) -> None:
    def hook(module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        rec = result.records.setdefault(ffn.layer, LayerRecord())
        if "ffn_input" in wanted:
            rec.ffn_input = _flat(x).detach()
        if "ffn_neurons" in wanted:
            with torch.no_grad():
                rec.ffn_neurons = _flat(ffn.neurons(x.detach()))

    hooks.add(ffn.module.register_forward_pre_hook(hook, with_kwargs=True))


def _register_moe(moe_layer: MoELayer, model: LanguageModel, result: Capture, wanted: set[str], hooks: Hooks) -> None:
    def record() -> LayerRecord:
        return result.records.setdefault(moe_layer.layer, LayerRecord())

    kind = moe_layer.kind
    if kind == "standard":

        def router_hook(module, args, out):
            logits = out[moe_layer.logit_index] if isinstance(out, tuple) else out
            record().logits = _flat(logits.detach())

        def experts_pre_hook(module, args, kwargs):
            if in_adapter_call():
                return
            hidden, index, weight = experts_call_args(moe_layer, args, kwargs)
            rec = record()
            if "topk" in wanted:
                rec.topk_index, rec.topk_weight = _flat(index.detach()), _flat(weight.detach())
            if "input" in wanted:
                rec.expert_input = _flat(hidden.detach())

        if "logits" in wanted:
            hooks.add(moe_layer.router.register_forward_hook(router_hook))
        if wanted & {"topk", "input"}:
            hooks.add(moe_layer.experts.register_forward_pre_hook(experts_pre_hook, with_kwargs=True))
    else:

        def router_hook_special(module, args, out):
            logits, index, weight = special_router_routing(moe_layer, module, args, out)
            rec = record()
            if "logits" in wanted:
                rec.logits = logits.detach()
            if "topk" in wanted:
                rec.topk_index, rec.topk_weight = index.detach(), weight.detach()
            if "input" in wanted:
                rec.expert_input = _flat(args[0].detach())

        if wanted & {"logits", "topk", "input"}:
            hooks.add(moe_layer.router.register_forward_hook(router_hook_special))
    if wanted & _OUTPUT_ITEMS:
        _register_moe_outputs(moe_layer, model, record, hooks)


def _inside(module: nn.Module, parent: nn.Module) -> bool:
    return any(module is m for m in parent.modules())


def _register_moe_outputs(moe_layer: MoELayer, model: LanguageModel, record, hooks: Hooks) -> None:
    """MoE block output, routed sum and shared part.

    The routed sum is read where the experts hand it back (standard, llama4); elsewhere it is the block's output
    minus the shared experts' outputs (legacy) or minus the block's output bias (JetMoE). A shared part inside the
    block is the block's output minus the routed sum, so gates applied to it (Qwen2-MoE's sigmoid gate) count; a
    shared MLP outside the block (GraniteMoeShared, on the decoder layer) is read from its own output.
    """
    block_is_decoder_layer = any(moe_layer.block is layer for layer in model.decoder_layers())  # Gemma4
    inside = [m for m in moe_layer.shared_experts if _inside(m, moe_layer.block) and not block_is_decoder_layer]
    outside = [m for m in moe_layer.shared_experts if m not in inside]
    from_experts = moe_layer.kind in ("standard", "llama4")
    state: dict[str, torch.Tensor] = {}

    if from_experts:

        def experts_hook(module, args, out):
            if in_adapter_call():
                return
            routed = _first(out)
            if moe_layer.kind == "llama4":  # [E·T, H] per-expert outputs of score-weighted inputs
                routed = routed.view(moe_layer.num_experts, -1, routed.shape[-1]).sum(0)
            record().routed_output = _flat(routed).detach().clone()

        hooks.add(moe_layer.experts.register_forward_hook(experts_hook))
    else:

        def shared_hook(module, args, out):
            part = _flat(_first(out)).detach().clone()
            state["inside"] = part if "inside" not in state else state["inside"] + part

        for module in inside:
            hooks.add(module.register_forward_hook(shared_hook))

    def block_hook(module, args, out):
        rec = record()
        block_out = _flat(_first(out)).detach().clone()
        if block_is_decoder_layer:
            rec.moe_output = rec.routed_output
            return
        if from_experts:
            if inside:
                rec.shared_output = block_out - rec.routed_output
        else:
            shared = state.pop("inside", None)
            routed = block_out if shared is None else block_out - shared
            bias = getattr(moe_layer.block, "bias", None) if moe_layer.kind == "jetmoe" else None
            rec.routed_output = routed - bias.detach() if isinstance(bias, torch.Tensor) else routed
            rec.shared_output = shared
        rec.moe_output = block_out

    hooks.add(moe_layer.block.register_forward_hook(block_hook))

    def outside_hook(module, args, out):
        rec = record()
        part = _flat(_first(out)).detach().clone()
        rec.shared_output = part if rec.shared_output is None else rec.shared_output + part
        rec.moe_output = part if rec.moe_output is None else rec.moe_output + part

    for module in outside:
        hooks.add(module.register_forward_hook(outside_hook))
