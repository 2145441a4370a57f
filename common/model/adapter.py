"""One view of every MoE layer of a transformers causal LM, whatever its architecture.

Discovery uses transformers' own registry: `type(base_model)._can_record_outputs["router_logits"]` names the router
class of every MoE causal LM in transformers 5.x, and the router's parent module is the MoE block. Remote-code
models in the older DeepSeekMoE layout (a gate returning `(topk_idx, topk_weight, aux_loss)` or plain logits, a
`ModuleList` of experts, ungated shared experts) are found structurally. A model where neither applies is
refused with a message naming what was found; nothing is guessed from class-name substrings.

Each `MoELayer` says how its routing is encoded (`kind`), so that `common.hooks` can read and rewrite the top-k
indices and weights the experts really use, and gives `expert_fn(e, x)`, one expert's unweighted output.
Why these cases: in transformers 5.x nearly every MoE block calls `router(h) -> (logits, top-k weights, top-k index)`,
then `experts(h, index, weights)`; the exceptions (Llama4, JetMoE, DBRX, LongCat, Zaya, Gemma4, gpt-oss) were found on
tiny random models of every architecture, and tests/test_moe.py and tests/test_capture.py re-check them all.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import InputError
from common.model.view import (
    FFNParams,
    LanguageModel,
    decoder_layer_index,
    first_int,
    gated_neurons,
    module_activation,
    project_down,
    text_config,
)

# standard: router(h) -> (logits, w, idx) or logits only (DBRX); experts(h, idx, w) authoritative.
# llama4:   router(h) -> (dense sigmoid scores [T,E], logits); scores multiply the expert *inputs*.
# jetmoe:   router(h) -> (index_sorted, batch_index, batch_gates, expert_size, logits); ParallelExperts.
# legacy:   gate(h) -> (topk_idx, topk_weight, aux_loss) or logits; experts is a ModuleList (DeepSeekMoE remote code).
RoutingKind = Literal["standard", "llama4", "jetmoe", "legacy"]



# Set while the adapter itself calls a model's experts (`MoELayer.expert_fn`): hooks skip those calls.
_ADAPTER_CALL: contextvars.ContextVar[bool] = contextvars.ContextVar("moescope_adapter_call", default=False)


def in_adapter_call() -> bool:
    """Whether the current experts call comes from the adapter (`expert_fn`), not from the model's forward."""
    return _ADAPTER_CALL.get()


@dataclass(eq=False)
class MoELayer:
    """One MoE block: where it lives, its routing encoding, sizes, and per-expert access."""

    position: int  # index among the model's MoE layers
    layer: int  # 0-based decoder-layer index
    path: str  # module path of the block
    kind: RoutingKind
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    num_experts: int  # routed experts with parameters (E)
    num_choices: int  # width of the router logits: E, or E + zero-compute experts (LongCat)
    top_k: int
    logit_index: int | None  # where the logits sit in the router's output tuple; None = output is the logits
    shared_experts: list[nn.Module] = field(default_factory=list)

    def expert_fn(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Expert `expert`'s unweighted output on hidden states x [..., H] (the experts' own input space).

        Runs the model's own experts module; capture and intervention hooks ignore this call (`in_adapter_call`), so
        it neither overwrites a layer's captured routing nor is edited by an active intervention.
        """
        if not 0 <= expert < self.num_experts:
            raise InputError(f"expert {expert} out of range: layer {self.layer} has experts 0..{self.num_experts - 1}")
        token = _ADAPTER_CALL.set(True)
        try:
            return self._expert_fn(expert, x)
        finally:
            _ADAPTER_CALL.reset(token)

    def _expert_fn(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        n = x.shape[0]
        if self.kind == "standard":
            # A zero-weight second slot: LongCat's experts crash with k=1, every other class accepts k=2.
            other = (expert + 1) % self.num_experts
            index = torch.tensor([[expert, other]], device=x.device).expand(n, 2)
            weight = torch.tensor([[1.0, 0.0]], device=x.device, dtype=x.dtype).expand(n, 2)
            out = self.experts(x, index, weight)
        elif self.kind == "llama4":
            routed_in = x.new_zeros(self.num_experts, n, shape[-1])
            routed_in[expert] = x
            out = self.experts(routed_in.view(-1, shape[-1])).view(self.num_experts, n, -1)[expert]
        elif self.kind == "jetmoe":
            sizes = [0] * self.num_experts
            sizes[expert] = n
            gate, up = self.block.input_linear(x, sizes).chunk(2, dim=-1)
            out = self.block.output_linear(self.block.activation(gate) * up, sizes)
        else:
            out = self.experts[expert](x)
        return out.reshape(shape)

    def expert_params(self, expert: int) -> FFNParams:
        """Views of expert `expert`'s weights in textbook orientation (see `FFNParams`)."""
        ex = self.experts
        if self.kind == "standard" and hasattr(ex, "mlp") and hasattr(ex.mlp, "w1"):  # DBRX: [E*I, H] stacks
            e_i_h = (self.num_experts, -1, ex.mlp.w1.shape[-1])
            return FFNParams(
                gate=ex.mlp.w1.view(e_i_h)[expert],
                up=ex.mlp.v1.view(e_i_h)[expert],
                down=ex.mlp.w2.view(e_i_h)[expert].T,
            )
        if self.kind in ("standard", "llama4") and not isinstance(ex, nn.ModuleList):
            # Llama4 stores [E, H, 2I] / [E, I, H] like the decorator's is_transposed layout.
            transposed = self.kind == "llama4" or getattr(ex, "is_transposed", False)
            if getattr(ex, "has_gate", True) and hasattr(ex, "gate_up_proj"):
                interleaved = _gate_up_interleaved(ex)
                gate_up = ex.gate_up_proj[expert]
                gate_up = gate_up.T if transposed else gate_up  # -> [2I, H]
                gate, up = (gate_up[::2], gate_up[1::2]) if interleaved else gate_up.chunk(2, dim=0)
                bias = getattr(ex, "gate_up_proj_bias", None)
                gate_bias, up_bias = (None, None)
                if bias is not None:
                    b = bias[expert]
                    gate_bias, up_bias = (b[::2], b[1::2]) if interleaved else b.chunk(2)
            else:
                gate, gate_bias = None, None
                up = ex.up_proj[expert].T if transposed else ex.up_proj[expert]
                up_bias = ex.up_proj_bias[expert] if getattr(ex, "up_proj_bias", None) is not None else None
            down = ex.down_proj[expert].T if transposed else ex.down_proj[expert]
            down_bias = ex.down_proj_bias[expert] if getattr(ex, "down_proj_bias", None) is not None else None
            return FFNParams(gate, up, down, gate_bias, up_bias, down_bias)
        if self.kind == "jetmoe":
            gate, up = self.block.input_linear.weight[expert].chunk(2, dim=0)
            return FFNParams(gate=gate, up=up, down=self.block.output_linear.weight[expert])
        mlp = self.experts[expert]  # a ModuleList of per-expert MLPs (DeepSeekMoE layout, native or remote code)
        gate = getattr(mlp, "gate_proj", None)
        return FFNParams(
            gate=gate.weight if gate is not None else None,
            up=mlp.up_proj.weight,
            down=mlp.down_proj.weight,
            gate_bias=getattr(gate, "bias", None),
            up_bias=mlp.up_proj.bias,
            down_bias=mlp.down_proj.bias,
        )

    def activation(self, expert: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
        """The experts' activation (the gate's, for gated experts)."""
        if isinstance(self.experts, nn.ModuleList):
            found = module_activation(self.experts[expert])
        elif self.kind == "jetmoe":
            found = getattr(self.block, "activation", None)
        elif hasattr(self.experts, "mlp") and hasattr(self.experts.mlp, "activation_fn"):  # DBRX
            found = self.experts.mlp.activation_fn
        else:
            found = module_activation(self.experts)
        if found is None:
            raise InputError(f"MoE block '{self.path}': cannot find its experts' activation function")
        return found

    def _custom_gate(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A fused-experts class's own gating of the [gate; up] product (gpt-oss' clamped SwiGLU and kin)."""
        ex = self.experts
        if "_apply_gate" in type(ex).__dict__ and hasattr(ex, "gate_up_proj") and getattr(ex, "has_gate", True):
            return ex._apply_gate
        return None

    def expert_neurons(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Expert `expert`'s intermediate neurons act(gate·x)·(up·x) on x [..., H] -> [..., I].

        `expert_output_from_neurons` of them is `expert_fn(expert, x)`.
        """
        if not 0 <= expert < self.num_experts:
            raise InputError(f"expert {expert} out of range: layer {self.layer} has experts 0..{self.num_experts - 1}")
        custom = self._custom_gate()
        if custom is None:
            return gated_neurons(self.expert_params(expert), self.activation(expert), x)
        ex = self.experts
        weight = ex.gate_up_proj[expert]
        fused = x @ weight.to(x.dtype) if getattr(ex, "is_transposed", False) else F.linear(x, weight.to(x.dtype))
        bias = getattr(ex, "gate_up_proj_bias", None)
        if bias is not None:
            fused = fused + bias[expert].to(x.dtype)
        return custom(fused)

    def expert_output_from_neurons(self, expert: int, neurons: torch.Tensor) -> torch.Tensor:
        """down · neurons (+ bias) with expert `expert`'s down projection."""
        return project_down(self.expert_params(expert), neurons)

    def describe(self) -> dict:
        return {
            "layer": self.layer,
            "path": self.path,
            "kind": self.kind,
            "num_experts": self.num_experts,
            "num_choices": self.num_choices,
            "top_k": self.top_k,
            "shared_experts": len(self.shared_experts),
        }


def _gate_up_interleaved(experts: nn.Module) -> bool:
    """Whether a fused gate_up axis alternates gate/up (gpt-oss) rather than holding [gate; up].

    Read off the module's own gating function: nudging input 1 moves output 1 when the halves are stacked and
    output 0 when they alternate. Classes without a custom `_apply_gate` use the stacked layout.
    """
    apply_gate = getattr(experts, "_apply_gate", None)
    if apply_gate is None or "_apply_gate" not in type(experts).__dict__:
        return False
    width = experts.gate_up_proj.shape[-1 if getattr(experts, "is_transposed", False) else -2]
    probe = torch.linspace(0.1, 0.9, width, dtype=torch.float64).view(1, -1)
    nudged = probe.clone()
    nudged[0, 1] += 0.25
    with torch.no_grad():
        moved = (apply_gate(nudged) - apply_gate(probe)).abs().view(-1)
    return bool(moved[0] > moved[1])


# --------------------------------------------------------------------------------------------- discovery


def _router_specs(model: nn.Module) -> list[tuple[type, int]]:
    """(router class, index of the logits in its output) from transformers' output-recording registry."""
    for module in model.modules():
        spec = (getattr(type(module), "_can_record_outputs", None) or {}).get("router_logits")
        if spec is None:
            continue
        specs = []
        for item in spec if isinstance(spec, list) else [spec]:
            target = getattr(item, "target_class", item)
            specs.append((target, getattr(item, "index", 0)))
        return specs
    return []


def _shared_experts(block: nn.Module, decoder_layer: nn.Module | None) -> list[nn.Module]:
    shared = [getattr(block, n) for n in ("shared_experts", "shared_expert", "shared_mlp") if hasattr(block, n)]
    if decoder_layer is not None and hasattr(decoder_layer, "shared_mlp") and decoder_layer.shared_mlp not in shared:
        shared.append(decoder_layer.shared_mlp)  # GraniteMoeShared keeps it on the decoder layer
    return shared


def _standard_layers(model: nn.Module, specs: list[tuple[type, int]]) -> list[MoELayer]:
    named = dict(model.named_modules())
    found = []
    for path, module in model.named_modules():
        for router_cls, logit_index in specs:
            if not isinstance(module, router_cls) or "." not in path:
                continue
            block_path = path.rsplit(".", 1)[0]
            block = named[block_path]
            experts = getattr(block, "experts", None)
            if hasattr(block, "input_linear") and hasattr(block, "output_linear"):
                if hasattr(block, "reduce"):
                    continue  # JetMoE mixture-of-attention: attention heads, not FFN experts
                kind, experts = "jetmoe", block.input_linear
            elif isinstance(experts, nn.Module) and len(inspect.signature(experts.forward).parameters) == 1:
                kind = "llama4"
            elif isinstance(experts, nn.Module):
                kind = "standard"
            else:
                continue  # a wrapper that records logits but holds no experts (JetMoeAttention)
            routed = first_int([experts], ["num_routed_experts"]) or first_int(
                [experts, module, block], ["num_experts", "moe_num_experts", "n_routed_experts"]
            )
            top_k = first_int([module, block], ["top_k", "moe_top_k", "num_experts_per_tok", "moe_topk"]) or first_int(
                [text_config(model)], ["num_experts_per_tok", "top_k_experts", "moe_top_k", "moe_topk", "moe_k"]
            )
            if routed is None or top_k is None:
                raise InputError(f"MoE block '{block_path}' ({type(block).__name__}): cannot read its expert count / top-k")
            # Zero-compute choices widen the logits: LongCat's identity experts, Zaya's skip expert.
            choices = first_int([module], ["n_routed_experts", "num_router_classes"]) if kind == "standard" else None
            layer_index = decoder_layer_index(block_path)
            decoder_layer = named.get(block_path.rsplit(".", 1)[0]) if "." in block_path else None
            found.append(
                MoELayer(
                    position=len(found),
                    layer=layer_index,
                    path=block_path,
                    kind=kind,
                    block=block,
                    router=module,
                    experts=experts,
                    num_experts=routed,
                    num_choices=max(choices or routed, routed),
                    top_k=top_k,
                    logit_index=logit_index,
                    shared_experts=_shared_experts(block, decoder_layer),
                )
            )
    return found


def _legacy_layers(model: nn.Module) -> list[MoELayer]:
    """DeepSeekMoE-style remote code: a block with `gate` and a `ModuleList` of experts."""
    config = getattr(model, "config", None)
    found = []
    for path, block in model.named_modules():
        experts, gate = getattr(block, "experts", None), getattr(block, "gate", None)
        if not (isinstance(experts, nn.ModuleList) and len(experts) > 1 and isinstance(gate, nn.Module)):
            continue
        weight = getattr(gate, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise InputError(f"MoE block '{path}': its gate {type(gate).__name__} has no [E, H] weight to read logits from")
        top_k = first_int([gate, block, config], ["top_k", "num_experts_per_tok", "moe_top_k"])
        if top_k is None:
            raise InputError(f"MoE block '{path}': cannot read top-k from the gate, block or config")
        found.append(
            MoELayer(
                position=len(found),
                layer=decoder_layer_index(path),
                path=path,
                kind="legacy",
                block=block,
                router=gate,
                experts=experts,
                num_experts=len(experts),
                num_choices=weight.shape[0],
                top_k=top_k,
                logit_index=None,
                shared_experts=_shared_experts(block, None),
            )
        )
    return found


def _config_says_moe(config: object) -> list[str]:
    names = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")
    hits = []
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 1:
            hits.append(f"{name}={value}")
    return hits


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """All MoE blocks of `model` in decoder-layer order; a clear `InputError` if there are none or the layout is unknown."""
    specs = _router_specs(model)
    layers = _standard_layers(model, specs) if specs else _legacy_layers(model)
    if layers:
        layers.sort(key=lambda m: m.layer)
        for position, moe_layer in enumerate(layers):
            moe_layer.position = position
        return layers
    name = type(model).__name__
    hints = _config_says_moe(getattr(model, "config", None))
    if specs:
        routers = ", ".join(cls.__name__ for cls, _ in specs)
        raise InputError(f"{name}: routers of type {routers} are declared but none sits next to separable experts")
    if hints:
        raise InputError(
            f"{name}: the config suggests a MoE ({', '.join(hints)}) but its layout is unknown: no router in "
            "transformers' registry and no block with a `gate` and a ModuleList of `experts`"
        )
    raise InputError(f"{name} has no MoE layers (a dense model?)")


# --------------------------------------------------------------------------------------------- model view


class MoEModel(LanguageModel):
    """A causal LM with its tokenizer, the view of its decoder (see `LanguageModel`) and of its MoE layers.

    Building one from a dense model raises the one-line `InputError` the routing scripts show.
    """

    def __init__(self, model: nn.Module, tokenizer=None, name: str = "", revision: str | None = None):
        self.layers = find_moe_layers(model)
        self._by_layer = {m.layer: m for m in self.layers}
        super().__init__(model, tokenizer, name, revision)
        # A MoE block's own shared/dense MLP is not a dense FFN layer (Qwen2-MoE names it `mlp.shared_expert`).
        self.ffns = {i: ffn for i, ffn in self.ffns.items() if i not in self._by_layer}

    def select(self, spec: Sequence[int | str] | None) -> list[MoELayer]:
        """Layers named by `--layers`: decoder indices (negatives count from the end) or 'all'; None = all."""
        if spec is None or any(str(s).lower() == "all" for s in spec):
            return list(self.layers)
        chosen: list[MoELayer] = []
        moe_list = ", ".join(str(m.layer) for m in self.layers)
        for item in spec:
            try:
                resolved = self.resolve_layer(item)
            except InputError as err:
                raise InputError(f"{err}; MoE layers: {moe_list}") from None
            if resolved not in self._by_layer:
                raise InputError(f"layer {item} is a dense (non-MoE) layer; MoE layers: {moe_list}")
            if self._by_layer[resolved] not in chosen:
                chosen.append(self._by_layer[resolved])
        return chosen

    def layer(self, index: int) -> MoELayer:
        return self.select([index])[0]

    def describe(self) -> dict:
        described = super().describe()
        return {**described, "active_parameters": active_parameters(described["total_parameters"], self.layers),
                "moe_layers": [m.describe() for m in self.layers]}


def active_parameters(total: int, layers: Sequence[MoELayer]) -> int:
    """Parameters a token uses: all but the unchosen share (1 − k/E) of each MoE layer's routed experts
    (docs/METRICS.md#comparison-across-runs)."""
    idle = 0.0
    for layer in layers:
        routed = sum(p.numel() for p in layer.experts.parameters())
        idle += routed * (1 - layer.top_k / layer.num_experts)
    return total - round(idle)


def router_logits_from_gate_input(moe_layer: MoELayer, gate_input: torch.Tensor) -> torch.Tensor:
    """Legacy gates return no logits; they are the same linear map the gate applies, recomputed identically."""
    hidden = gate_input.reshape(-1, gate_input.shape[-1])
    return F.linear(hidden, moe_layer.router.weight, getattr(moe_layer.router, "bias", None))
