"""The `Accumulator` base class and the machinery every accumulator shares.

Index flattening and weight alignment (left-aligned broadcasting), host-sync-free device transfers, merge,
all-reduce (``torch.distributed``), move, reset, state dicts and `accumulator_from_state_dict`, which rebuilds
any registered accumulator kind. The conventions are described in the package docstring (`common.stats`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Self

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from common.stats.axes import Axes, AxesSpec

__all__ = ["STATE_VERSION", "Accumulator", "GroupsArg", "accumulator_from_state_dict"]

#: What `update` accepts as ``groups``: flat index tensor, per-axis indices, one group for all, or None.
GroupsArg = Tensor | int | Mapping[str, Tensor | int] | None

_F64 = torch.float64
STATE_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def _zeros(n: int, device: torch.device, fill: float = 0.0) -> Tensor:
    # Ordinary (non-inference) tensors even when constructed inside torch.inference_mode(), so that the
    # state can be updated in place both inside and outside inference mode.
    with torch.inference_mode(False):
        return torch.full((n,), fill, dtype=_F64, device=device)


def _align(t: Tensor, shape: torch.Size, what: str) -> Tensor:
    # Left alignment: a per-token [N] tensor applies to every column of [N, k] values.
    if t.dim() > len(shape):
        raise ValueError(f"{what} has shape {tuple(t.shape)}, more dims than values {tuple(shape)}")
    t = t.reshape(*t.shape, *([1] * (len(shape) - t.dim())))
    try:
        return t.expand(shape)
    except RuntimeError as err:
        raise ValueError(
            f"{what} of shape {tuple(t.shape)} does not broadcast to values {tuple(shape)}"
        ) from err


def _to(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device`` without a host sync: non-blocking, except into CPU memory, where a non-blocking
    copy from a GPU could be read before it has landed."""
    return t.detach().to(device, non_blocking=device.type != "cpu")


def _dist_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce_(t: Tensor, op: str, group: Any) -> None:
    """In-place all_reduce of a state tensor; NCCL needs CUDA tensors, so CPU state takes a round trip."""
    red = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
    if t.device.type == "cpu" and dist.get_backend(group) == "nccl":
        tmp = t.cuda()
        dist.all_reduce(tmp, op=red, group=group)
        t.copy_(tmp)
    else:
        dist.all_reduce(t, op=red, group=group)


# Kind name -> class, filled by Accumulator.__init_subclass__. The package __init__ imports every module that
# defines an accumulator, so `accumulator_from_state_dict` knows all kinds once `common.stats` is imported.
_REGISTRY: dict[str, type[Accumulator]] = {}


# --------------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------------
class Accumulator:
    """Base class: state is a dict of flat float64 tensors, each with a reduce op ("sum", "min", "max").

    Subclasses define `_reduce_ops` (state name -> op), `config()` (constructor kwargs as plain data),
    `_accumulate`, `result` and `frame`. The last element of every per-group state tensor is the spare
    slot that catches out-of-range indices (see the `common.stats` docstring).
    """

    _reduce_ops: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls

    def __init__(self, groups: AxesSpec, device: Any) -> None:
        self.groups = Axes.of(groups, "group")
        self.device = torch.device(device)
        self.reduced = False
        self._state: dict[str, Tensor] = {}

    # ---- to be provided by subclasses -------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments (plain data) that rebuild an empty accumulator of the same shape."""
        return {"groups": self.groups.to_config()}

    def _init_state(self) -> None:
        raise NotImplementedError

    # ---- shared machinery ------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return self.groups.size

    def _flat_groups(self, groups: GroupsArg, shape: torch.Size) -> Tensor:
        """Flat group index for every entry of a ``shape`` batch; out-of-range -> spare slot ``G``."""
        G = self.num_groups
        if isinstance(groups, Mapping):
            groups = self.groups.index(**groups)
        if groups is None:
            if G != 1:
                raise ValueError(f"groups=None needs a single group, this accumulator has {G}")
            groups = 0
        if isinstance(groups, int | np.integer):
            if not 0 <= int(groups) < G:
                raise IndexError(f"group {groups} out of range for {G} groups")
            return torch.full((math.prod(shape),), int(groups), dtype=torch.long, device=self.device)
        if groups.is_floating_point() or groups.dtype == torch.bool:
            raise TypeError(f"groups must be an integer tensor, got {groups.dtype}")
        g = _align(_to(groups, self.device), shape, "groups").long()
        return torch.where((g >= 0) & (g < G), g, G).reshape(-1)

    def _flat_weight(self, weight: Tensor | None, shape: torch.Size) -> Tensor:
        if weight is None:
            return torch.ones(math.prod(shape), dtype=_F64, device=self.device)
        w = _align(_to(weight, self.device), shape, "weight")
        return w.to(_F64).reshape(-1)

    def _prepare(
        self, values: Tensor, groups: GroupsArg, weight: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Flatten a batch to (float64 values, flat group index, float64 weight), all on our device."""
        if self.reduced:
            raise RuntimeError("update after all_reduce() would double-count; call reset() to start over")
        v = _to(values, self.device)
        return v.reshape(-1).to(_F64), self._flat_groups(groups, v.shape), self._flat_weight(weight, v.shape)

    def _check_compatible(self, other: Accumulator) -> None:
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        if other.config() != self.config():
            raise ValueError(f"cannot merge {type(self).__name__}s with different configs")

    @torch.no_grad()
    def merge(self, other: Self) -> Self:
        """Add ``other``'s data to this accumulator (same type and config); ``other`` is unchanged."""
        self._check_compatible(other)
        for name, op in self._reduce_ops.items():
            mine, theirs = self._state[name], other._state[name].to(self.device)
            if op == "sum":
                mine.add_(theirs)
            elif op == "min":
                torch.minimum(mine, theirs, out=mine)
            else:
                torch.maximum(mine, theirs, out=mine)
        return self

    @torch.no_grad()
    def all_reduce(self, group: Any = None) -> Self:
        """Combine the states of all ranks in place (no-op without torch.distributed); returns self."""
        if self.reduced:
            raise RuntimeError(f"{type(self).__name__}.all_reduce() called twice; that would double-count")
        if _dist_active():
            self._all_reduce_state(group)
        self.reduced = True
        return self

    def _all_reduce_state(self, group: Any) -> None:
        for name in sorted(self._reduce_ops):  # the same collective order on every rank
            _all_reduce_(self._state[name], self._reduce_ops[name], group)

    def to(self, device: Any) -> Self:
        """Move the state to ``device`` (in place); returns self."""
        self.device = torch.device(device)
        with torch.inference_mode(False):
            self._state = {k: v.to(self.device) for k, v in self._state.items()}
        return self

    def reset(self) -> Self:
        """Forget all data (and the all-reduced flag)."""
        self._init_state()
        self.reduced = False
        return self

    def state_dict(self) -> dict[str, Any]:
        """Plain-data snapshot ``{"kind", "version", "config", "reduced", "state"}`` (tensors cloned)."""
        return {
            "kind": type(self).__name__,
            "version": STATE_VERSION,
            "config": self.config(),
            "reduced": self.reduced,
            "state": {k: v.detach().clone() for k, v in self._state.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict` of the same kind and config (e.g. to resume a run)."""
        if state.get("kind") != type(self).__name__:
            raise ValueError(f"state dict is for {state.get('kind')!r}, not {type(self).__name__}")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported state dict version {state.get('version')!r}")
        if state["config"] != self.config():
            raise ValueError(f"state dict config differs from this {type(self).__name__}'s")
        if set(state["state"]) != set(self._state):
            raise ValueError("state dict has different state tensors")
        for k, v in state["state"].items():
            self._state[k].copy_(v)
        self.reduced = bool(state["reduced"])

    def copy(self) -> Self:
        """An independent copy on the same device."""
        new = type(self)(**self.config(), device=self.device)
        new.load_state_dict(self.state_dict())
        return new

    @property
    def invalid(self) -> float:
        """Weight of entries whose group/category index was out of range (host sync; end of run only)."""
        raise NotImplementedError

    def _check_valid(self) -> None:
        bad = self.invalid
        if bad:
            raise ValueError(
                f"{type(self).__name__}: entries with total weight {bad:g} had a group or category index "
                "out of range; fix the index computation (masked entries never count)"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config()}, device={self.device})"


def accumulator_from_state_dict(state: Mapping[str, Any], device: Any = "cpu") -> Accumulator:
    """Rebuild any accumulator from its `state_dict` (e.g. to merge saved shards offline)."""
    cls = _REGISTRY.get(state.get("kind", ""))
    if cls is None:
        raise ValueError(f"unknown accumulator kind {state.get('kind')!r}")
    acc = cls(**state["config"], device=device)
    acc.load_state_dict(state)
    return acc
