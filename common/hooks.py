"""Capture and intervention on MoE routing, as context managers that always remove their hooks.

Hooks are global state on the model's modules: every hook registered here is removed in `finally`, also when
the forward pass raises. Capture hooks only read (`detach`), so the model's outputs stay bit-identical.

Where routing is read and rewritten, per `MoELayer.kind` (measured in `shared/notes/transformers-moe.md`):
- standard: a forward pre-hook on `experts` sees exactly the (hidden, top-k index, top-k weight) the experts use,
  whatever the scoring rule; router logits come from a forward hook on the router.
- llama4: the router returns dense sigmoid scores that multiply the expert *inputs*; edits rewrite those scores.
- jetmoe: the router returns a sorted/grouped encoding; it is decoded to [T, k] and re-encoded after an edit.
- legacy (DeepSeekMoE remote code): the gate returns (topk_idx, topk_weight, aux_loss); logits are recomputed from
  the gate's input with the same linear map.

Token positions: hooks see T = B·S flattened tokens; a forward pre-hook on the whole model records the batch shape
(and `cache_position` during cached generation) so `positions` can be turned into a token mask.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from common.errors import InputError
from common.moe import MoELayer, MoEModel, router_logits_from_gate_input

Capturable = Literal["logits", "topk", "input"]
EditMode = Literal["scale", "set", "force", "logit"]

# Llama4 routing edited by an intervention, read back by a capture hook on the same router call: after an
# ablation the dense scores alone cannot tell a zero-weighted selected expert from an unselected one.
_EDITED_LLAMA4_ROUTING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class LayerRecord:
    """What one MoE layer saw in the last forward pass; tokens are flattened (T = B·S, row-major)."""

    logits: torch.Tensor | None = None  # [T, C] router logits (C = num_choices)
    topk_index: torch.Tensor | None = None  # [T, k] experts the tokens were sent to
    topk_weight: torch.Tensor | None = None  # [T, k] weights the experts really received
    expert_input: torch.Tensor | None = None  # [T, H] the experts' input


@dataclass
class Capture:
    """Records of the last forward pass, keyed by decoder-layer index."""

    records: dict[int, LayerRecord] = field(default_factory=dict)

    def __getitem__(self, layer: int) -> LayerRecord:
        return self.records[layer]

    def clear(self) -> None:
        self.records.clear()


class _Hooks:
    """Handles registered by one context manager; removed together."""

    def __init__(self) -> None:
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.restore: list[Callable[[], None]] = []

    def add(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        self.handles.append(handle)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for undo in self.restore:
            undo()
        self.handles.clear()
        self.restore.clear()


def _experts_call_args(moe_layer: MoELayer, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden, top-k index, top-k weight) of a standard experts call; positional in every in-tree caller."""
    if len(args) >= 3:
        return args[0], args[1], args[2]
    values = list(args) + list(kwargs.values())
    if len(values) < 3:
        raise RuntimeError(f"{moe_layer.path}: unexpected experts call with {len(values)} arguments")
    return values[0], values[1], values[2]


def _jetmoe_decode(out: tuple, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def _jetmoe_encode(index: torch.Tensor, weight: torch.Tensor, logits: torch.Tensor) -> tuple:
    """The JetMoE gating tuple for given top-k routing (same construction as JetMoeTopKGating)."""
    top_k, num_experts = index.shape[1], logits.shape[-1]
    flat = index.flatten()
    _, index_sorted = flat.sort(0)
    batch_index = index_sorted.div(top_k, rounding_mode="trunc")
    sizes = torch.bincount(flat, minlength=num_experts).tolist()
    return index_sorted, batch_index, weight.flatten()[index_sorted], sizes, logits


def _legacy_routing(moe_layer: MoELayer, out, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


# --------------------------------------------------------------------------------------------- capture


@contextlib.contextmanager
def capture(
    moe: MoEModel,
    layers: Sequence[MoELayer] | None = None,
    what: Sequence[Capturable] = ("logits", "topk", "input"),
) -> Iterator[Capture]:
    """Record router logits, the top-k routing the experts used, and the experts' input, per selected layer.

    Records are overwritten by every forward pass inside the block; read them after each one.
    """
    wanted = set(what)
    unknown = wanted - {"logits", "topk", "input"}
    if unknown:
        raise ValueError(f"capture: unknown items {sorted(unknown)}")
    result = Capture()
    hooks = _Hooks()
    try:
        for moe_layer in layers if layers is not None else moe.layers:
            _register_capture(moe_layer, result, wanted, hooks)
        yield result
    finally:
        hooks.remove()


def _register_capture(moe_layer: MoELayer, result: Capture, wanted: set[str], hooks: _Hooks) -> None:
    def record() -> LayerRecord:
        return result.records.setdefault(moe_layer.layer, LayerRecord())

    kind = moe_layer.kind
    if kind == "standard":

        def router_hook(module, args, out):
            logits = out[moe_layer.logit_index] if isinstance(out, tuple) else out
            record().logits = logits.detach().reshape(-1, logits.shape[-1])

        def experts_pre_hook(module, args, kwargs):
            hidden, index, weight = _experts_call_args(moe_layer, args, kwargs)
            rec = record()
            if "topk" in wanted:
                rec.topk_index = index.detach().reshape(-1, index.shape[-1])
                rec.topk_weight = weight.detach().reshape(-1, weight.shape[-1])
            if "input" in wanted:
                rec.expert_input = hidden.detach().reshape(-1, hidden.shape[-1])

        if "logits" in wanted:
            hooks.add(moe_layer.router.register_forward_hook(router_hook))
        if wanted & {"topk", "input"}:
            hooks.add(moe_layer.experts.register_forward_pre_hook(experts_pre_hook, with_kwargs=True))
        return

    def router_hook_special(module, args, out):
        hidden = args[0].detach()
        hidden = hidden.reshape(-1, hidden.shape[-1])
        rec = record()
        if kind == "llama4":
            logits = out[1]
            edited = _EDITED_LLAMA4_ROUTING.pop(module, None)
            if edited is not None:
                index, weight = edited
            else:  # the router's own selection, recomputed with the same op
                index = torch.topk(logits, moe_layer.top_k, dim=1).indices
                weight = out[0].gather(1, index)
        elif kind == "jetmoe":
            logits = out[4]
            index, weight = _jetmoe_decode(out, moe_layer.top_k)
        else:
            logits = router_logits_from_gate_input(moe_layer, hidden)
            index, weight = _legacy_routing(moe_layer, out, logits)
        if "logits" in wanted:
            rec.logits = logits.detach()
        if "topk" in wanted:
            rec.topk_index, rec.topk_weight = index.detach(), weight.detach()
        if "input" in wanted:
            rec.expert_input = hidden

    hooks.add(moe_layer.router.register_forward_hook(router_hook_special))


# --------------------------------------------------------------------------------------------- intervene


@dataclass(frozen=True)
class RoutingEdit:
    """One change to the routing of one expert at one layer.

    scale: w_e *= value (0 ablates); set: w_e = value; force: route to the expert even if not selected, replacing
    the lowest-weighted slot, with weight `value` (None: the replaced slot's weight); logit: z_e += value before
    selection. `positions`: sequence positions (negatives count from the end of the forward's input); None = all.
    `renormalize` rescales each edited token's weights to their original sum.
    """

    layer: int
    expert: int
    mode: EditMode = "scale"
    value: float | None = 0.0
    positions: Sequence[int] | None = None
    renormalize: bool = False


def _token_mask(edit: RoutingEdit, batch_shape: dict, num_tokens: int, device: torch.device) -> torch.Tensor | None:
    """[T] bool mask of the tokens an edit applies to; None = all tokens."""
    if edit.positions is None:
        return None
    batch, seq = batch_shape.get("shape", (1, num_tokens))
    if batch * seq != num_tokens:  # a call outside the recorded forward (e.g. a direct block call)
        batch, seq = 1, num_tokens
    absolute = batch_shape.get("cache_position")
    if absolute is None or absolute.numel() != seq:
        absolute = torch.arange(seq, device=device)
    wanted = torch.tensor([p if p >= 0 else seq + p for p in edit.positions], device=device)
    per_position = (absolute.to(device).view(-1, 1) == wanted.view(1, -1)).any(dim=1)
    return per_position.view(1, seq).expand(batch, seq).reshape(-1)


def edit_routing(
    index: torch.Tensor, weight: torch.Tensor, edit: RoutingEdit, token_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a scale/set/force edit to top-k routing [T, k]; returns new (index, weight)."""
    tokens = torch.ones(index.shape[0], dtype=torch.bool, device=index.device) if token_mask is None else token_mask
    hit = (index == edit.expert) & tokens.view(-1, 1)
    new_index = index
    if edit.mode == "scale":
        new_weight = torch.where(hit, weight * edit.value, weight)
    elif edit.mode == "set":
        new_weight = torch.where(hit, torch.full_like(weight, edit.value), weight)
    elif edit.mode == "force":
        missing = tokens & ~hit.any(dim=1)
        slot = weight.argmin(dim=1, keepdim=True)
        replace = torch.zeros_like(hit).scatter_(1, slot, True) & missing.view(-1, 1)
        forced_weight = weight.gather(1, slot).expand_as(weight) if edit.value is None else torch.full_like(weight, edit.value)
        new_index = torch.where(replace, torch.full_like(index, edit.expert), index)
        new_weight = torch.where(replace, forced_weight, weight)
        if edit.value is not None:
            new_weight = torch.where(hit, torch.full_like(weight, edit.value), new_weight)
    else:
        raise ValueError(f"edit_routing does not handle mode '{edit.mode}'")
    if edit.renormalize:
        edited = tokens.view(-1, 1)
        old_sum, new_sum = weight.sum(1, keepdim=True), new_weight.sum(1, keepdim=True)
        factor = torch.where(new_sum != 0, old_sum / torch.where(new_sum != 0, new_sum, 1), 1)
        new_weight = torch.where(edited, new_weight * factor, new_weight)
    return new_index, new_weight.to(weight.dtype)


class _ShiftLogit(TorchFunctionMode):
    """Adds `delta` to column `column` of the first linear output of width `width` (the router logits)."""

    def __init__(self, width: int, column: int, delta: float, mask_fn: Callable[[int, torch.device], torch.Tensor | None]):
        super().__init__()
        self.width, self.column, self.delta, self.mask_fn, self.done = width, column, delta, mask_fn, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (
            not self.done
            and func is torch.nn.functional.linear
            and isinstance(out, torch.Tensor)
            and out.shape[-1] == self.width
        ):
            self.done = True
            flat = out.reshape(-1, self.width)
            shift = torch.zeros(self.width, dtype=out.dtype, device=out.device)
            shift[self.column] = self.delta
            mask = self.mask_fn(flat.shape[0], out.device)
            rows = shift.expand_as(flat) if mask is None else shift * mask.view(-1, 1).to(out.dtype)
            out = (flat + rows).reshape(out.shape)
        return out


@contextlib.contextmanager
def intervene(moe: MoEModel, edits: Sequence[RoutingEdit]) -> Iterator[None]:
    """Apply routing edits during every forward pass inside the block (register before any `capture`)."""
    hooks = _Hooks()
    batch_shape: dict = {}

    def model_pre_hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if isinstance(ids, torch.Tensor):
            batch_shape["shape"] = (ids.shape[0], ids.shape[1])
        batch_shape["cache_position"] = kwargs.get("cache_position")
        for moe_layer in moe.layers:  # a previous forward's Llama4 edits must not leak into this one
            _EDITED_LLAMA4_ROUTING.pop(moe_layer.router, None)

    try:
        hooks.add(moe.model.register_forward_pre_hook(model_pre_hook, with_kwargs=True, prepend=True))
        for edit in edits:
            moe_layer = moe.layer(edit.layer)
            if not 0 <= edit.expert < moe_layer.num_choices:
                raise InputError(
                    f"expert {edit.expert} out of range: layer {moe_layer.layer} has experts 0..{moe_layer.num_experts - 1}"
                )
            _register_edit(moe_layer, edit, batch_shape, hooks)
        yield
    finally:
        hooks.remove()
        for moe_layer in moe.layers:
            _EDITED_LLAMA4_ROUTING.pop(moe_layer.router, None)


def _register_edit(moe_layer: MoELayer, edit: RoutingEdit, batch_shape: dict, hooks: _Hooks) -> None:
    def mask_for(num_tokens: int, device: torch.device) -> torch.Tensor | None:
        return _token_mask(edit, batch_shape, num_tokens, device)

    if edit.mode == "logit":
        router = moe_layer.router
        original_forward = router.forward

        def shifted_forward(*args, **kwargs):
            with _ShiftLogit(moe_layer.num_choices, edit.expert, float(edit.value or 0.0), mask_for):
                return original_forward(*args, **kwargs)

        router.forward = shifted_forward
        hooks.restore.append(lambda: delattr(router, "forward"))
        return

    kind = moe_layer.kind
    if kind == "standard":

        def experts_pre_hook(module, args, kwargs):
            hidden, index, weight = _experts_call_args(moe_layer, args, kwargs)
            flat_index, flat_weight = index.reshape(-1, index.shape[-1]), weight.reshape(-1, weight.shape[-1])
            new_index, new_weight = edit_routing(flat_index, flat_weight, edit, mask_for(flat_index.shape[0], index.device))
            return (hidden, new_index.view(index.shape), new_weight.view(weight.shape)), {}

        hooks.add(moe_layer.experts.register_forward_pre_hook(experts_pre_hook, with_kwargs=True, prepend=True))
        return

    def router_hook(module, args, out):
        if kind == "llama4":
            scores, logits = out
            index = _EDITED_LLAMA4_ROUTING.get(module, (torch.topk(logits, moe_layer.top_k, dim=1).indices, None))[0]
            weight = scores.gather(1, index)
            new_index, new_weight = edit_routing(index, weight, edit, mask_for(index.shape[0], index.device))
            _EDITED_LLAMA4_ROUTING[module] = (new_index, new_weight)
            return torch.zeros_like(scores).scatter(1, new_index, new_weight), logits
        if kind == "jetmoe":
            index, weight = _jetmoe_decode(out, moe_layer.top_k)
            new_index, new_weight = edit_routing(index, weight, edit, mask_for(index.shape[0], index.device))
            return _jetmoe_encode(new_index, new_weight, out[4])
        if not isinstance(out, tuple):
            raise InputError(f"{moe_layer.path}: its gate returns plain logits; only --mode logit can edit it")
        hidden = args[0].reshape(-1, args[0].shape[-1])
        index, weight = _legacy_routing(moe_layer, out, router_logits_from_gate_input(moe_layer, hidden))
        new_index, new_weight = edit_routing(index, weight, edit, mask_for(index.shape[0], index.device))
        items = list(out)
        positions = [i for i, t in enumerate(out) if isinstance(t, torch.Tensor)]
        int_pos = next(i for i in positions if not out[i].is_floating_point())
        float_pos = next(i for i in positions if out[i].is_floating_point() and out[i].dim() >= 2)
        items[int_pos] = new_index.view(out[int_pos].shape)
        items[float_pos] = new_weight.view(out[float_pos].shape)
        return tuple(items)

    hooks.add(moe_layer.router.register_forward_hook(router_hook, prepend=True))


def registered_hook_count(module: nn.Module) -> int:
    """Forward (pre-)hooks left on a module tree: tests assert it returns to its baseline after a context exits."""
    total = 0
    for sub in module.modules():
        total += len(sub._forward_hooks) + len(sub._forward_pre_hooks)
        total += int("forward" in sub.__dict__)
    return total
