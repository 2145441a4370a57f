"""`intervene`: edit the routing of chosen experts during every forward pass; hooks removed in `finally`.

Edits (`RoutingEdit`): scale / set / force an expert's routing weight, or shift its router logit before selection,
at chosen token positions. `TopKRestriction` keeps only each token's k' highest-weighted experts at a layer (MoE
Lens' "perplexity vs experts kept"); shared experts are never touched.

Token positions: hooks see T = B·S flattened tokens; a forward pre-hook on the whole model records the batch shape
(and `cache_position` during cached generation) so `positions` can be turned into a token mask.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from common.errors import InputError
from common.hooks.routing import EDITED_LLAMA4_ROUTING, Hooks, register_routing_rewrite
from common.model import MoELayer, MoEModel

EditMode = Literal["scale", "set", "force", "logit"]


# --------------------------------------------------------------------------------------------- intervene


@dataclass(frozen=True)
class RoutingEdit:
    """One change to the routing of one expert at one layer.

    scale: w_e *= value (0 ablates); set: w_e = value; force: route to the expert even if not selected, replacing
    the lowest-weighted slot, with weight `value` (None: the replaced slot's weight); logit: z_e += value before
    selection. `positions`: sequence positions (negatives count from the end of the forward's input); None = all.
    `renormalize` rescales each edited token's weights to their original sum. `rows`: the batch rows [start, stop)
    the edit applies to (None = all), so that one forward can carry several variants of a batch side by side.
    """

    layer: int
    expert: int
    mode: EditMode = "scale"
    value: float | None = 0.0
    positions: Sequence[int] | None = None
    renormalize: bool = False
    rows: tuple[int, int] | None = None


def _token_mask(edit: RoutingEdit, batch_shape: dict, num_tokens: int, device: torch.device) -> torch.Tensor | None:
    """[T] bool mask of the tokens an edit applies to; None = all tokens."""
    if edit.positions is None and edit.rows is None:
        return None
    batch, seq = batch_shape.get("shape", (1, num_tokens))
    if batch * seq != num_tokens:  # a call outside the recorded forward (e.g. a direct block call)
        batch, seq = 1, num_tokens
    if edit.positions is None:
        return _row_mask(edit.rows, batch, seq, device)
    # Absolute positions of this forward's tokens: cached generation feeds one new token at position p, given as
    # cache_position [S] or (transformers 5.x generate) position_ids [B, S]; a plain forward starts at 0.
    absolute = batch_shape.get("cache_position")
    if absolute is None or absolute.numel() != seq:
        ids = batch_shape.get("position_ids")
        absolute = ids if ids is not None and ids.numel() == batch * seq else None
    if absolute is None:
        absolute = torch.arange(seq, device=device)
    absolute = absolute.to(device).reshape(-1, seq).expand(batch, seq)
    wanted = torch.tensor([p if p >= 0 else seq + p for p in edit.positions], device=device)
    mask = (absolute.unsqueeze(-1) == wanted.view(1, 1, -1)).any(dim=-1).reshape(-1)
    return mask if edit.rows is None else mask & _row_mask(edit.rows, batch, seq, device)


def _row_mask(rows: tuple[int, int] | None, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """[batch · seq] bool: the tokens of rows [start, stop)."""
    index = torch.arange(batch, device=device)
    start, stop = rows if rows is not None else (0, batch)
    return ((index >= start) & (index < stop)).repeat_interleave(seq)


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


class _RouterLogits(TorchFunctionMode):
    """Rewrites the first linear output of width `width` inside the block (the router logits) with `rewrite`."""

    def __init__(self, width: int, rewrite: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.width, self.rewrite, self.done = width, rewrite, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.done and func is torch.nn.functional.linear and isinstance(out, torch.Tensor) \
                and out.shape[-1] == self.width:
            self.done = True
            out = self.rewrite(out)
        return out


def _rewrite_router_logits(moe_layer: MoELayer, rewrite: Callable[[torch.Tensor], torch.Tensor], hooks: Hooks) -> None:
    """Every call of the layer's router rewrites its logits [..., C] with `rewrite` before selection."""
    router = moe_layer.router
    original_forward = router.forward

    def rewritten_forward(*args, **kwargs):
        with _RouterLogits(moe_layer.num_choices, rewrite):
            return original_forward(*args, **kwargs)

    hooks.replace_forward(router, rewritten_forward)


@dataclass(frozen=True)
class TopKRestriction:
    """Keep only each token's `keep` highest-weighted experts at decoder layer `layer` (ties: the earlier slot).

    The others get weight 0, so they contribute nothing; `renormalize` rescales the kept weights to the original
    sum of the token's top-k weights. `keep` >= k leaves the routing untouched.
    """

    layer: int
    keep: int
    renormalize: bool = False


def restrict_topk(index: torch.Tensor, weight: torch.Tensor, keep: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing [T, k] with all but the `keep` largest weights of each token set to 0."""
    if keep >= weight.shape[1]:
        return index, weight
    order = weight.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(weight.shape[1], device=weight.device).expand_as(order))
    kept = torch.where(rank < keep, weight, torch.zeros_like(weight))
    if renormalize:
        total, kept_total = weight.sum(1, keepdim=True), kept.sum(1, keepdim=True)
        kept = kept * torch.where(kept_total != 0, total / torch.where(kept_total != 0, kept_total, 1), 1)
    return index, kept.to(weight.dtype)


@dataclass(frozen=True)
class ExpertRemoval:
    """Remove routed experts of decoder layer `layer` (prune.py's what-if).

    `drop`: their router logits become -inf before selection, so the router chooses among the others with the
    model's own normalisation, which is what a checkpoint with those experts deleted computes (softmax routers);
    `zero`: the routing is left as it is and the removed experts get weight 0, so their outputs vanish, as with
    zeroed down projections. Shared experts are not touched.
    """

    layer: int
    experts: tuple[int, ...]
    how: Literal["drop", "zero"] = "drop"
    shared: bool = False  # also remove the layer's shared experts: their outputs become 0 (prune.py --include-shared)


ACTIVATION_MARGIN = 0.1  # ε of ExpertActivation: z_e ← max_j z_j + max(ε, |max_j z_j| / 32) (survives bfloat16)


@dataclass(frozen=True)
class ExpertActivation:
    """Force routed experts of decoder layer `layer` into every token's top-k (SteerMoE's activation): their router
    logits become the token's largest logit plus a margin before selection, so the router's own selection and
    normalisation choose them with the token's top weight. Routers that select on biased or group-limited scores
    (DeepSeek-V3's correction bias) can still pass one over where the bias outweighs the margin; `RoutingEdit(mode=
    "force")` puts an expert in the top-k whatever the router says."""

    layer: int
    experts: tuple[int, ...]


def _register_activation(moe_layer: MoELayer, activation: ExpertActivation, hooks: Hooks) -> None:
    columns = torch.zeros(moe_layer.num_choices, dtype=torch.bool)
    columns[list(activation.experts)] = True

    def lift(out: torch.Tensor) -> torch.Tensor:
        top = out.max(dim=-1, keepdim=True).values
        return torch.where(columns.to(out.device), top + torch.clamp(top.abs() / 32, min=ACTIVATION_MARGIN), out)

    _rewrite_router_logits(moe_layer, lift, hooks)


def _register_removal(moe_layer: MoELayer, removal: ExpertRemoval, hooks: Hooks) -> None:
    removed = torch.zeros(moe_layer.num_choices, dtype=torch.bool)
    removed[list(removal.experts)] = True
    if removal.how == "drop":
        _rewrite_router_logits(moe_layer, lambda out: out.masked_fill(removed.to(out.device), float("-inf")), hooks)
        return

    def rewrite(index: torch.Tensor, weight: torch.Tensor, num_tokens: int, device: torch.device):
        gone = removed.to(index.device)[index.long().clamp(0, moe_layer.num_choices - 1)]
        return index, torch.where(gone, torch.zeros_like(weight), weight)

    register_routing_rewrite(moe_layer, rewrite, hooks)


@contextlib.contextmanager
def intervene(moe: MoEModel, edits: Sequence[RoutingEdit | TopKRestriction | ExpertRemoval | ExpertActivation]
              ) -> Iterator[None]:
    """Apply routing edits during every forward pass inside the block (register before any `capture`)."""
    hooks = Hooks()
    batch_shape: dict = {}

    def model_pre_hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if isinstance(ids, torch.Tensor):
            batch_shape["shape"] = (ids.shape[0], ids.shape[1])
        batch_shape["cache_position"] = kwargs.get("cache_position")
        batch_shape["position_ids"] = kwargs.get("position_ids")
        for moe_layer in moe.layers:  # a previous forward's Llama4 edits must not leak into this one
            EDITED_LLAMA4_ROUTING.pop(moe_layer.router, None)

    try:
        hooks.add(moe.model.register_forward_pre_hook(model_pre_hook, with_kwargs=True, prepend=True))
        for edit in edits:
            moe_layer = moe.layer(edit.layer)
            if isinstance(edit, ExpertRemoval):
                if edit.shared:
                    for module in moe_layer.shared_experts:
                        hooks.add(module.register_forward_hook(lambda m, args, out: torch.zeros_like(out)))
                if not edit.experts:
                    continue
                if not all(0 <= e < moe_layer.num_experts for e in edit.experts):
                    raise InputError(f"layer {moe_layer.layer}: experts to remove must lie in 0..{moe_layer.num_experts - 1}")
                if edit.how == "drop" and moe_layer.num_choices - len(set(edit.experts)) < moe_layer.top_k:
                    raise InputError(f"layer {moe_layer.layer}: dropping {len(set(edit.experts))} of "
                                     f"{moe_layer.num_choices} experts leaves fewer than top-k = {moe_layer.top_k}")
                _register_removal(moe_layer, edit, hooks)
                continue
            if isinstance(edit, ExpertActivation):
                if not all(0 <= e < moe_layer.num_experts for e in edit.experts):
                    raise InputError(f"layer {moe_layer.layer}: experts to activate must lie in 0..{moe_layer.num_experts - 1}")
                if len(set(edit.experts)) > moe_layer.top_k:
                    raise InputError(f"layer {moe_layer.layer}: {len(set(edit.experts))} experts cannot all enter a "
                                     f"top-{moe_layer.top_k}")
                if edit.experts:
                    _register_activation(moe_layer, edit, hooks)
                continue
            if isinstance(edit, TopKRestriction):
                if edit.keep < 1:
                    raise InputError(f"top-k restriction: keep at least 1 expert (got {edit.keep})")
                keep, renormalize = edit.keep, edit.renormalize
                register_routing_rewrite(moe_layer, lambda i, w, n, d, k=keep, r=renormalize: restrict_topk(i, w, k, r), hooks)
                continue
            if not 0 <= edit.expert < moe_layer.num_choices:
                raise InputError(
                    f"expert {edit.expert} out of range: layer {moe_layer.layer} has experts 0..{moe_layer.num_experts - 1}"
                )
            _register_edit(moe_layer, edit, batch_shape, hooks)
        yield
    finally:
        hooks.remove()
        for moe_layer in moe.layers:
            EDITED_LLAMA4_ROUTING.pop(moe_layer.router, None)


def _register_edit(moe_layer: MoELayer, edit: RoutingEdit, batch_shape: dict, hooks: Hooks) -> None:
    def mask_for(num_tokens: int, device: torch.device) -> torch.Tensor | None:
        return _token_mask(edit, batch_shape, num_tokens, device)

    if edit.mode == "logit":
        def shift(out: torch.Tensor) -> torch.Tensor:
            flat = out.reshape(-1, moe_layer.num_choices)
            delta = torch.zeros(moe_layer.num_choices, dtype=out.dtype, device=out.device)
            delta[edit.expert] = float(edit.value or 0.0)
            mask = mask_for(flat.shape[0], out.device)
            rows = delta.expand_as(flat) if mask is None else delta * mask.view(-1, 1).to(out.dtype)
            return (flat + rows).reshape(out.shape)

        _rewrite_router_logits(moe_layer, shift, hooks)
        return

    def rewrite(index: torch.Tensor, weight: torch.Tensor, num_tokens: int, device: torch.device):
        return edit_routing(index, weight, edit, mask_for(num_tokens, device))

    register_routing_rewrite(moe_layer, rewrite, hooks)


def registered_hook_count(module: nn.Module) -> int:
    """Forward (pre-)hooks left on a module tree: tests assert it returns to its baseline after a context exits."""
    total = 0
    for sub in module.modules():
        total += len(sub._forward_hooks) + len(sub._forward_pre_hooks)
        total += int("forward" in sub.__dict__)
    return total
