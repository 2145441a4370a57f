"""How each routing encoding is read and rewritten: the one place that knows the per-kind tuple layouts.

Each case was established on tiny random models of every MoE architecture; tests/test_moe.py re-checks it (captures
equal `output_router_logits=True`, and editing a weight equals scaling the expert's down-projection).
- standard: a forward pre-hook on `experts` sees exactly the (hidden, top-k index, top-k weight) the experts use.
- llama4: the router returns dense sigmoid scores that multiply the expert *inputs*.
- jetmoe: the router returns a sorted/grouped encoding; it is decoded to [T, k] and re-encoded after an edit.
- legacy (DeepSeekMoE remote code): the gate returns (topk_idx, topk_weight, aux_loss); logits are recomputed from
  the gate's input with the same linear map.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn

from common.errors import InputError
from common.model.adapter import MoELayer, in_adapter_call, router_logits_from_gate_input

# Llama4 routing edited by an intervention, read back by a capture hook on the same router call: after an
# ablation the dense scores alone cannot tell a zero-weighted selected expert from an unselected one.
EDITED_LLAMA4_ROUTING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Hooks:
    """Handles registered by one context manager; removed together (hooks are global state on the modules)."""

    def __init__(self) -> None:
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.restore: list[Callable[[], None]] = []

    def add(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        self.handles.append(handle)

    def replace_forward(self, module: torch.nn.Module, forward: Callable) -> None:
        """`module.forward = forward` until `remove`, which puts back what was there: the class's forward, or an
        instance attribute of its own (accelerate's offloading wrapper under `device_map`, which must survive)."""
        previous = module.__dict__.get("forward")
        module.forward = forward
        if previous is None:
            self.restore.append(lambda: module.__dict__.pop("forward", None))
        else:
            self.restore.append(lambda: setattr(module, "forward", previous))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for undo in reversed(self.restore):  # last change first: two replacements of one forward unwind in order
            undo()
        self.handles.clear()
        self.restore.clear()


def experts_call_args(moe_layer: MoELayer, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden, top-k index, top-k weight) of a standard experts call; positional in every in-tree caller."""
    if len(args) >= 3:
        return args[0], args[1], args[2]
    values = list(args) + list(kwargs.values())
    if len(values) < 3:
        raise RuntimeError(f"{moe_layer.path}: unexpected experts call with {len(values)} arguments")
    return values[0], values[1], values[2]


def jetmoe_decode(out: tuple, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    index_sorted, _, gates, sizes, logits = out
    num_experts = logits.shape[-1]
    sorted_experts = torch.repeat_interleave(
        torch.arange(num_experts, device=logits.device), torch.as_tensor(sizes, device=logits.device)
    )
    index = torch.empty_like(index_sorted)
    index[index_sorted] = sorted_experts
    weight = torch.empty_like(gates)
    weight[index_sorted] = gates
    return index.view(-1, top_k), weight.view(-1, top_k)


def jetmoe_encode(index: torch.Tensor, weight: torch.Tensor, logits: torch.Tensor) -> tuple:
    """The JetMoE gating tuple for given top-k routing (same construction as JetMoeTopKGating)."""
    top_k, num_experts = index.shape[1], logits.shape[-1]
    flat = index.flatten()
    _, index_sorted = flat.sort(0)
    batch_index = index_sorted.div(top_k, rounding_mode="trunc")
    sizes = torch.bincount(flat, minlength=num_experts).tolist()
    return index_sorted, batch_index, weight.flatten()[index_sorted], sizes, logits


def legacy_routing(moe_layer: MoELayer, out, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(out, tuple):
        ints = [t for t in out if isinstance(t, torch.Tensor) and not t.is_floating_point()]
        floats = [t for t in out if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 2]
        return ints[0].reshape(logits.shape[0], -1), floats[0].reshape(logits.shape[0], -1)
    # A gate returning plain logits: softmax then top-k, renormalised iff the config says so (old Mixtral style).
    probs = torch.softmax(logits.float(), dim=-1)
    weight, index = probs.topk(moe_layer.top_k, dim=-1)
    if getattr(moe_layer.router, "norm_topk_prob", False):
        weight = weight / weight.sum(-1, keepdim=True)
    return index, weight.to(logits.dtype)


def special_router_routing(moe_layer: MoELayer, module: nn.Module, args: tuple, out) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, top-k index, top-k weight) from a llama4 / jetmoe / legacy router call."""
    if moe_layer.kind == "llama4":
        logits = out[1]
        edited = EDITED_LLAMA4_ROUTING.pop(module, None)
        if edited is not None:
            return logits, edited[0], edited[1]
        index = torch.topk(logits, moe_layer.top_k, dim=1).indices  # the router's own selection, same op
        return logits, index, out[0].gather(1, index)
    if moe_layer.kind == "jetmoe":
        index, weight = jetmoe_decode(out, moe_layer.top_k)
        return out[4], index, weight
    hidden = args[0].reshape(-1, args[0].shape[-1])
    logits = router_logits_from_gate_input(moe_layer, hidden)
    index, weight = legacy_routing(moe_layer, out, logits)
    return logits, index, weight


RoutingRewrite = Callable[[torch.Tensor, torch.Tensor, int, torch.device], tuple[torch.Tensor, torch.Tensor]]


def register_routing_rewrite(moe_layer: MoELayer, rewrite: RoutingRewrite, hooks: Hooks) -> None:
    """Rewrite the top-k routing [T, k] (index, weight) the experts of `moe_layer` receive, whatever the encoding.

    `rewrite(index, weight, num_tokens, device)` returns the new (index, weight).
    """
    kind = moe_layer.kind
    if kind == "standard":

        def experts_pre_hook(module, args, kwargs):
            if in_adapter_call():  # expert_fn's own call: the unedited expert, whatever the intervention
                return None
            hidden, index, weight = experts_call_args(moe_layer, args, kwargs)
            flat_index, flat_weight = index.reshape(-1, index.shape[-1]), weight.reshape(-1, weight.shape[-1])
            new_index, new_weight = rewrite(flat_index, flat_weight, flat_index.shape[0], index.device)
            return (hidden, new_index.view(index.shape), new_weight.view(weight.shape)), {}

        hooks.add(moe_layer.experts.register_forward_pre_hook(experts_pre_hook, with_kwargs=True, prepend=True))
        return

    def router_hook(module, args, out):
        if kind == "llama4":
            scores, logits = out
            index = EDITED_LLAMA4_ROUTING.get(module, (torch.topk(logits, moe_layer.top_k, dim=1).indices, None))[0]
            weight = scores.gather(1, index)
            new_index, new_weight = rewrite(index, weight, index.shape[0], index.device)
            EDITED_LLAMA4_ROUTING[module] = (new_index, new_weight)
            return torch.zeros_like(scores).scatter(1, new_index, new_weight), logits
        if kind == "jetmoe":
            index, weight = jetmoe_decode(out, moe_layer.top_k)
            new_index, new_weight = rewrite(index, weight, index.shape[0], index.device)
            return jetmoe_encode(new_index, new_weight, out[4])
        if not isinstance(out, tuple):
            raise InputError(f"{moe_layer.path}: its gate returns plain logits; only --mode logit can edit it")
        hidden = args[0].reshape(-1, args[0].shape[-1])
        index, weight = legacy_routing(moe_layer, out, router_logits_from_gate_input(moe_layer, hidden))
        new_index, new_weight = rewrite(index, weight, index.shape[0], index.device)
        items = list(out)
        positions = [i for i, t in enumerate(out) if isinstance(t, torch.Tensor)]
        int_pos = next(i for i in positions if not out[i].is_floating_point())
        float_pos = next(i for i in positions if out[i].is_floating_point() and out[i].dim() >= 2)
        items[int_pos] = new_index.view(out[int_pos].shape)
        items[float_pos] = new_weight.view(out[float_pos].shape)
        return tuple(items)

    hooks.add(moe_layer.router.register_forward_hook(router_hook, prepend=True))
