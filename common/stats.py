"""Streaming, mergeable statistics that live on the model's device.

Every routing metric in moescope is built from three accumulators and one container:

* `Moments`      per-group weighted count, mean, population std, min, max of a scalar value.
* `Histogram`    per-group counts in fixed, equal-width bins, plus quantiles estimated from them.
* `BinCount`     per-group weighted counts of integer categories (expert ids, flattened expert pairs, ...).
* `Distribution` `Moments` and `Histogram` of the same values, updated in one pass ("mean, std, quantiles
                 and a histogram", the SPEC's per-layer summary).
* `StatSet`      named accumulators that merge, all-reduce, move and save/resume together.

Conventions shared by all accumulators
--------------------------------------
Groups. An accumulator keeps one statistic per *group*. Groups form a grid of named axes (`Axes`), e.g.
``{"layer": [1, 7, 15], "domain": ["arxiv", "github"], "rank": 2}``; an int ``G`` means one axis named
``"group"`` with labels ``0..G-1``, and ``None`` means a single group. `update` takes the *flat* row-major
group index (`Axes.index` / `flat_groups` compute it from per-axis indices with broadcasting), a mapping
of per-axis indices, a Python int (the whole batch in one group), or ``None`` (only for a single group).

Shapes. ``values`` may have any shape (``[N]`` tokens, ``[N, k]`` ranks, ...). ``groups`` and ``weight`` are
aligned to ``values`` *from the left* (a ``[N]`` tensor is read as ``[N, 1, ...]``, i.e. one group/weight
per token, shared by its ``k`` columns) and then broadcast; pass a ``[1, k]`` tensor for a per-column index.

Weights. ``weight`` is a 0/1 mask (bool or float) or a float weight; ``None`` means 1. A masked entry
(weight 0) contributes nothing, whatever its value or group index, so padding needs no boolean indexing.
"count" is the sum of weights; with 0/1 weights it is the number of entries.

Exactness. State is float64 whatever the input dtype (bf16/fp16/fp32 values convert to float64 exactly).
Integer-valued counts are exact up to 2**53 and therefore independent of summation order, so they do not
depend on batching, merging order, process count or GPU atomics.

Index errors. A group (or category) index outside its range cannot be checked per batch without a host
sync, so such entries are diverted into a spare slot instead of silently landing in a neighbouring group;
`result()`/`frame()` raise `ValueError` if that slot holds any weight. (Masked entries never count.)

No host sync. `update` uses only device-side ops (``index_add_``, ``scatter_reduce_``, gathers, ``where``);
it never calls ``.item()``, ``.cpu()``, ``.tolist()`` or ``bool(tensor)``, never loops in Python over
tokens or experts and never uses boolean-mask indexing (which needs the mask's count on the host).
Inputs on another device (e.g. layers spread by ``device_map="auto"``) are copied to the accumulator's
device with ``non_blocking=True`` (blocking into CPU memory, where it would be unsafe). Results leave the
device once, in `result()` / `frame()`.

Distributed. `all_reduce` combines the states of all ranks of a ``torch.distributed`` group in place
(SUM / MIN / MAX; for `Moments` the exact parallel-variance combination), so every rank ends with the
statistics of the concatenated data. It is a no-op (apart from bookkeeping) when ``torch.distributed``
is not initialised. It may be called once: afterwards the accumulator refuses further `update` and
`all_reduce` calls, because either would double-count (`reset` clears the flag).

Inference mode. State tensors are always ordinary tensors (created with inference mode disabled) and are
only ever modified in place, so accumulators work inside and outside ``torch.inference_mode()`` alike.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "Accumulator",
    "Axes",
    "BinCount",
    "Distribution",
    "Histogram",
    "HistogramResult",
    "Moments",
    "MomentsResult",
    "StatSet",
    "accumulator_from_state_dict",
    "flat_groups",
    "histogram_quantiles",
]

Label = str | int | float
#: What `update` accepts as ``groups``: flat index tensor, per-axis indices, one group for all, or None.
GroupsArg = Tensor | int | Mapping[str, Tensor | int] | None

_F64 = torch.float64
STATE_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Group axes
# --------------------------------------------------------------------------------------------------
def flat_groups(indices: Sequence[Tensor | int], sizes: Sequence[int]) -> Tensor | int:
    """Row-major flat index ``((i0 * s1 + i1) * s2 + i2) ...`` of per-axis indices, with broadcasting.

    ``indices[a]`` is an int or an integer tensor of indices into axis ``a`` of size ``sizes[a]``; tensors
    broadcast with the usual (right-aligned) torch rules, e.g. ``(layer_pos, domain[:, None], arange(k))``
    gives ``[N, k]``. Tensor entries outside ``[0, size)`` make the flat index -1 (checked on the device,
    no sync; accumulators count -1 as an index error). Out-of-range ints raise `IndexError` at once.
    Returns an int if every index is an int.
    """
    if len(indices) != len(sizes):
        raise ValueError(f"got {len(indices)} indices for {len(sizes)} axes")
    flat: Tensor | int = 0
    ok: Tensor | None = None
    for a, (idx, size) in enumerate(zip(indices, sizes, strict=True)):
        if isinstance(idx, Tensor):
            if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
                raise TypeError(f"index for axis {a} must be an integer tensor, got {idx.dtype}")
            idx = idx.long()
            in_range = (idx >= 0) & (idx < size)
            ok = in_range if ok is None else ok & in_range
        elif not 0 <= int(idx) < size:
            raise IndexError(f"index {idx} out of range for axis {a} of size {size}")
        flat = flat * size + idx
    if ok is None:
        return int(flat)
    assert isinstance(flat, Tensor)
    return torch.where(ok, flat, -1)


def _check_label(label: Any) -> Label:
    # Labels end up in state dicts loaded with torch.load(weights_only=True) and in DataFrames, so only
    # plain scalars are allowed (numpy scalars are unwrapped).
    if isinstance(label, np.generic):
        label = label.item()
    if isinstance(label, bool) or not isinstance(label, str | int | float):
        raise TypeError(f"axis labels must be str, int or float, got {label!r}")
    return label


@dataclass(frozen=True)
class Axes:
    """An ordered grid of named axes, each with its labels; the groups (or bins) of an accumulator.

    ``Axes.of({"layer": [1, 7, 15], "domain": ["a", "b"], "rank": 2})`` has shape ``(3, 2, 2)``; an int
    size means labels ``0..size-1``. Flat indices are row-major over ``names``.
    """

    names: tuple[str, ...]
    labels: tuple[tuple[Label, ...], ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.labels):
            raise ValueError("names and labels differ in length")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"axis names must be unique, got {self.names}")
        for name, labels in zip(self.names, self.labels, strict=True):
            if not labels:
                raise ValueError(f"axis {name!r} is empty")

    @classmethod
    def of(cls, spec: AxesSpec, default_name: str) -> Axes:
        """Normalise an axes spec: `Axes`, int ``n`` (one axis ``default_name``), mapping, or ``None`` (no axes)."""
        if isinstance(spec, Axes):
            return spec
        if spec is None:
            return cls((), ())
        if isinstance(spec, int | np.integer):
            spec = {default_name: int(spec)}
        if not isinstance(spec, Mapping):
            raise TypeError(f"expected an int, a mapping name -> size or labels, or Axes; got {spec!r}")
        names, labels = [], []
        for name, entry in spec.items():
            if isinstance(entry, int | np.integer):
                if int(entry) < 1:
                    raise ValueError(f"axis {name!r} must have size >= 1, got {entry}")
                entry = range(int(entry))
            names.append(str(name))
            labels.append(tuple(_check_label(x) for x in entry))
        return cls(tuple(names), tuple(labels))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(x) for x in self.labels)

    @property
    def size(self) -> int:
        """Number of flat groups (1 for no axes)."""
        return math.prod(self.shape)

    def index(self, **indices: Tensor | int) -> Tensor | int:
        """Flat index from per-axis *positional* indices (not labels), one keyword per axis; see `flat_groups`."""
        if set(indices) != set(self.names):
            raise ValueError(f"index() needs exactly the axes {list(self.names)}, got {sorted(indices)}")
        return flat_groups([indices[n] for n in self.names], self.shape)

    def position(self, name: str, label: Label) -> int:
        """Positional index of ``label`` on axis ``name`` (to build `index` arguments from labels)."""
        return self.labels[self.names.index(name)].index(label)

    def drop(self, names: Sequence[str]) -> Axes:
        """These axes without ``names``."""
        unknown = set(names) - set(self.names)
        if unknown:
            raise ValueError(f"unknown axes {sorted(unknown)}; axes are {list(self.names)}")
        keep = [i for i, n in enumerate(self.names) if n not in names]
        return Axes(tuple(self.names[i] for i in keep), tuple(self.labels[i] for i in keep))

    def frame(self) -> pd.DataFrame:
        """One row per flat index (row-major), one column of labels per axis."""
        if not self.names:
            return pd.DataFrame(index=range(1))
        grid = np.indices(self.shape).reshape(len(self.shape), -1)
        return pd.DataFrame(
            {
                n: pd.Series(list(lab)).to_numpy()[g]  # int labels stay int64, str labels object
                for n, lab, g in zip(self.names, self.labels, grid, strict=True)
            }
        )

    def to_config(self) -> dict[str, list[Label]]:
        """Plain-data form (loadable with ``weights_only=True``); `Axes.of` accepts it back."""
        return {n: list(lab) for n, lab in zip(self.names, self.labels, strict=True)}


#: An `Axes`, an int ``n`` (one axis of size n), a mapping name -> size or labels, or None (one group).
AxesSpec = Axes | int | Mapping[str, int | Sequence[Label]] | None


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


_REGISTRY: dict[str, type[Accumulator]] = {}


# --------------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------------
class Accumulator:
    """Base class: state is a dict of flat float64 tensors, each with a reduce op ("sum", "min", "max").

    Subclasses define `_reduce_ops` (state name -> op), `config()` (constructor kwargs as plain data),
    `_accumulate`, `result` and `frame`. The last element of every per-group state tensor is the spare
    slot that catches out-of-range indices (see the module docstring).
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


# --------------------------------------------------------------------------------------------------
# Moments
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MomentsResult:
    """Per-group arrays shaped like the groups' axes. Empty groups have count 0 and NaN elsewhere."""

    count: np.ndarray  # sum of weights of finite values
    mean: np.ndarray  # Σ w·x / Σ w
    std: np.ndarray  # population (weighted) std: sqrt(Σ w·(x − mean)² / Σ w)
    min: np.ndarray  # over finite entries with weight > 0
    max: np.ndarray
    nonfinite: np.ndarray  # weight of NaN/±inf values, which are excluded from everything above


class Moments(Accumulator):
    """Per-group weighted count, mean, population std, min and max of a scalar value.

    State per group: count n = Σw, mean, M2 = Σ w (x − mean)², min, max, and the weight of non-finite
    values (excluded). Each batch is reduced to per-group (n, mean, M2) and folded in with the exact
    pairwise formula of Chan et al. (1979): this avoids the cancellation of Σx² − n·mean² and is exactly
    what `merge` and `all_reduce` use too, so one pass, merged halves and all-reduced shards agree to
    float64 rounding.
    """

    # count/mean/m2 are combined with Chan's formula (see merge / _all_reduce_state), not summed.
    _reduce_ops: ClassVar[dict[str, str]] = {"min": "min", "max": "max", "nonfinite": "sum"}

    def __init__(
        self,
        groups: AxesSpec = None,
        *,
        device: Any = "cpu",
    ) -> None:
        super().__init__(groups, device)
        self._init_state()

    def _init_state(self) -> None:
        n = self.num_groups + 1  # + spare slot for out-of-range group indices
        d = self.device
        self._state = {
            "count": _zeros(n, d),
            "mean": _zeros(n, d),
            "m2": _zeros(n, d),
            "min": _zeros(n, d, math.inf),
            "max": _zeros(n, d, -math.inf),
            "nonfinite": _zeros(n, d),
        }

    @torch.no_grad()
    def update(self, values: Tensor, groups: GroupsArg = None, weight: Tensor | None = None) -> None:
        """Add ``values`` (any shape) to their ``groups`` with ``weight``; see the module docstring."""
        self._accumulate(*self._prepare(values, groups, weight))

    def _accumulate(self, v: Tensor, g: Tensor, w: Tensor) -> None:
        n = self.num_groups + 1
        s = self._state
        finite = torch.isfinite(v)
        s["nonfinite"].index_add_(0, g, w.masked_fill(finite, 0.0))
        w = w.masked_fill(~finite, 0.0)
        v = v.masked_fill(~finite, 0.0)  # 0·NaN would poison the sums even with weight 0
        nb = torch.zeros(n, dtype=_F64, device=self.device).index_add_(0, g, w)
        sb = torch.zeros(n, dtype=_F64, device=self.device).index_add_(0, g, w * v)
        mb = torch.where(nb > 0, sb / nb, 0.0)
        d = v - mb.index_select(0, g)
        m2b = torch.zeros(n, dtype=_F64, device=self.device).index_add_(0, g, w * d * d)
        self._combine(nb, mb, m2b)
        live = w > 0
        s["min"].scatter_reduce_(0, g, v.masked_fill(~live, math.inf), "amin")
        s["max"].scatter_reduce_(0, g, v.masked_fill(~live, -math.inf), "amax")

    def _combine(self, nb: Tensor, mb: Tensor, m2b: Tensor) -> None:
        """Fold per-group (count, mean, M2) of another sample into the state (Chan et al.)."""
        s = self._state
        na = s["count"]
        n = na + nb
        frac = torch.where(n > 0, nb / n, 0.0)  # nb / n, 0 for groups still empty
        delta = mb - s["mean"]
        s["m2"].add_(m2b + delta * delta * na * frac)  # + δ² na nb / n
        s["mean"].add_(delta * frac)
        na.copy_(n)

    @torch.no_grad()
    def merge(self, other: Moments) -> Moments:
        self._check_compatible(other)
        o = {k: v.to(self.device) for k, v in other._state.items()}
        self._combine(o["count"], o["mean"], o["m2"])
        return super().merge(other)

    def _all_reduce_state(self, group: Any) -> None:
        s = self._state
        # Parallel variance: n = Σ n_r, mean = Σ n_r·mean_r / n, M2 = Σ [M2_r + n_r (mean_r − mean)²].
        n = s["count"].clone()
        _all_reduce_(n, "sum", group)
        mean = s["count"] * s["mean"]
        _all_reduce_(mean, "sum", group)
        mean = torch.where(n > 0, mean / n, 0.0)
        m2 = s["m2"] + s["count"] * (s["mean"] - mean) ** 2
        _all_reduce_(m2, "sum", group)
        s["count"].copy_(n)
        s["mean"].copy_(mean)
        s["m2"].copy_(m2)
        super()._all_reduce_state(group)

    def result(self) -> MomentsResult:
        """Per-group statistics as numpy arrays shaped like ``groups.shape``."""
        self._check_valid()
        s = {k: v[: self.num_groups].cpu().numpy().reshape(self.groups.shape) for k, v in self._state.items()}
        n = s["count"]
        empty = n <= 0
        with np.errstate(invalid="ignore", divide="ignore"):
            std = np.sqrt(np.maximum(s["m2"], 0.0) / n)
        nan = np.where(empty, np.nan, 0.0)
        return MomentsResult(
            count=n,
            mean=s["mean"] + nan,
            std=std + nan,
            min=np.where(empty, np.nan, s["min"]),
            max=np.where(empty, np.nan, s["max"]),
            nonfinite=s["nonfinite"],
        )

    def frame(self) -> pd.DataFrame:
        """Tidy table: one row per group; axis columns + count, mean, std, min, max, nonfinite."""
        r = self.result()
        df = self.groups.frame()
        for col in ("count", "mean", "std", "min", "max", "nonfinite"):
            df[col] = getattr(r, col).reshape(-1)
        return df

    @property
    def invalid(self) -> float:
        return float((self._state["count"][-1] + self._state["nonfinite"][-1]).item())

    @torch.no_grad()
    def marginalize(self, *axes: str) -> Moments:
        """A new `Moments` over the remaining axes, pooling the data of the named ``axes`` (exactly)."""
        if not axes:  # torch's sum(dim=()) would reduce every dim
            return self.copy()
        out = Moments(self.groups.drop(axes), device=self.device)
        dims = tuple(self.groups.names.index(a) for a in axes)
        G, shape = self.num_groups, self.groups.shape
        s = {k: v[:G].reshape(shape) for k, v in self._state.items()}
        n = s["count"].sum(dims)
        mean = torch.where(n > 0, (s["count"] * s["mean"]).sum(dims) / n, 0.0)
        m2 = (s["m2"] + s["count"] * (s["mean"] - mean.reshape(_keep(shape, dims))) ** 2).sum(dims)
        new = {
            "count": n,
            "mean": mean,
            "m2": m2,
            "min": s["min"].amin(dims) if dims else s["min"],
            "max": s["max"].amax(dims) if dims else s["max"],
            "nonfinite": s["nonfinite"].sum(dims),
        }
        for k, v in new.items():
            out._state[k][:-1].copy_(v.reshape(-1))
            out._state[k][-1:].copy_(self._state[k][-1:])  # the spare (index error) slot
        out.reduced = self.reduced
        return out


def _keep(shape: tuple[int, ...], dims: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` with the reduced ``dims`` set to 1 (keepdim shape)."""
    return tuple(1 if i in dims else s for i, s in enumerate(shape))


# --------------------------------------------------------------------------------------------------
# Histogram
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HistogramResult:
    """Per-group histogram; arrays shaped like the groups' axes (+ the bin axis for ``counts``)."""

    counts: np.ndarray  # [*groups, bins] weight per bin, out-of-range values clamped into the edge bins
    edges: np.ndarray  # [bins + 1] bin edges (float64)
    below: np.ndarray  # weight of values < lo (counted in the first bin)
    above: np.ndarray  # weight of values > hi (counted in the last bin)
    nan: np.ndarray  # weight of NaN values (not counted anywhere else)


class Histogram(Accumulator):
    """Per-group weighted counts in ``bins`` equal-width bins over ``[lo, hi]``.

    Bins follow `numpy.histogram`: ``[e_i, e_{i+1})`` with the last bin closed, ``e = np.linspace(lo, hi,
    bins + 1)`` (float64), and the bin of a value is corrected against these edges, so counts equal
    ``np.histogram(x, bins=e, weights=w)`` exactly, even for values on or one ulp off an edge. Values outside ``[lo, hi]`` (±inf
    included) are *clamped into the edge bins* — so no mass is lost and totals stay consistent — and
    their weight is also reported as ``below`` / ``above``; NaN values are only counted in ``nan``.
    Choose ``[lo, hi]`` to cover the data (e.g. ``[0, ln E]`` for entropies, ``[0, 1]`` for
    probabilities) and check ``below``/``above``.
    """

    _reduce_ops: ClassVar[dict[str, str]] = {"counts": "sum", "extra": "sum"}

    def __init__(
        self,
        groups: AxesSpec = None,
        bins: int = 100,
        lo: float = 0.0,
        hi: float = 1.0,
        *,
        device: Any = "cpu",
    ) -> None:
        super().__init__(groups, device)
        if int(bins) < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(f"need finite lo < hi, got lo={lo}, hi={hi}")
        self.bins, self.lo, self.hi = int(bins), float(lo), float(hi)
        self._init_state()

    def config(self) -> dict[str, Any]:
        return {**super().config(), "bins": self.bins, "lo": self.lo, "hi": self.hi}

    def _init_state(self) -> None:
        G, B = self.num_groups, self.bins
        with torch.inference_mode(False):
            # numpy's linspace, not torch's (they differ in the last ulp), so that the reported edges are
            # exactly np.linspace(lo, hi, bins + 1) and users can rebuild them.
            self._edges = torch.from_numpy(np.linspace(self.lo, self.hi, B + 1)).to(self.device)
        self._state = {
            "counts": _zeros(G * B + 1, self.device),  # + spare slot for out-of-range group indices
            "extra": _zeros((G + 1) * 3, self.device),  # per group: below, above, nan
        }

    def to(self, device: Any) -> Histogram:
        super().to(device)
        self._edges = self._edges.to(self.device)
        return self

    @property
    def edges(self) -> np.ndarray:
        return self._edges.cpu().numpy()

    @torch.no_grad()
    def update(self, values: Tensor, groups: GroupsArg = None, weight: Tensor | None = None) -> None:
        """Add ``values`` (any shape) to their ``groups`` with ``weight``; see the module docstring."""
        self._accumulate(*self._prepare(values, groups, weight))

    def _bin_index(self, v: Tensor) -> Tensor:
        """np.histogram's bin for each (non-NaN) value, clamped into ``[0, bins)``."""
        B, e = self.bins, self._edges
        x = (v - self.lo) * (B / (self.hi - self.lo))
        idx = x.clamp(0, B - 1).floor().long()  # clamp in float first: ±inf has no long value
        # The division can be off by one ulp next to an edge; fix up against the stored edges (as numpy
        # does) so that bin membership is exactly that of the edges we report.
        idx = idx - ((v < e.index_select(0, idx)) & (idx > 0)).long()
        idx = idx + ((v >= e.index_select(0, idx + 1)) & (idx < B - 1)).long()
        return idx

    def _accumulate(self, v: Tensor, g: Tensor, w: Tensor) -> None:
        G, B = self.num_groups, self.bins
        nan = torch.isnan(v)
        v = v.masked_fill(nan, self.lo)
        below, above = v < self.lo, v > self.hi
        flat = torch.where(g < G, g * B + self._bin_index(v), G * B)  # g == G is the spare group
        self._state["counts"].index_add_(0, flat, w.masked_fill(nan, 0.0))
        kind = torch.where(nan, 2, torch.where(above, 1, 0))
        self._state["extra"].index_add_(0, g * 3 + kind, w.masked_fill(~(nan | below | above), 0.0))

    @property
    def invalid(self) -> float:
        # spare count slot + NaNs of the spare group (which are not in any count)
        G = self.num_groups
        return float((self._state["counts"][-1] + self._state["extra"][3 * G + 2]).item())

    def result(self) -> HistogramResult:
        """Counts ``[*groups, bins]``, edges ``[bins + 1]`` and per-group below/above/nan weights."""
        self._check_valid()
        G, B = self.num_groups, self.bins
        counts = self._state["counts"][: G * B].cpu().numpy().reshape(*self.groups.shape, B)
        extra = self._state["extra"][: G * 3].cpu().numpy().reshape(*self.groups.shape, 3)
        return HistogramResult(counts, self.edges, extra[..., 0], extra[..., 1], extra[..., 2])

    def quantiles(self, qs: Sequence[float] | np.ndarray) -> np.ndarray:
        """Quantiles ``[*groups, len(qs)]`` estimated from the histogram; see `histogram_quantiles`."""
        r = self.result()
        return histogram_quantiles(r.counts, r.edges, qs)

    def frame(self) -> pd.DataFrame:
        """Tidy table: one row per (group, bin); axis columns + bin, left, right, count."""
        r = self.result()
        G, B = self.num_groups, self.bins
        df = self.groups.frame().loc[np.repeat(np.arange(G), B)].reset_index(drop=True)
        df["bin"] = np.tile(np.arange(B), G)
        df["left"] = np.tile(r.edges[:-1], G)
        df["right"] = np.tile(r.edges[1:], G)
        df["count"] = r.counts.reshape(-1)
        return df

    @torch.no_grad()
    def marginalize(self, *axes: str) -> Histogram:
        """A new `Histogram` over the remaining axes, summing over the named ``axes``."""
        if not axes:  # torch's sum(dim=()) would reduce every dim
            return self.copy()
        out = Histogram(self.groups.drop(axes), self.bins, self.lo, self.hi, device=self.device)
        dims = tuple(self.groups.names.index(a) for a in axes)
        G, B, shape = self.num_groups, self.bins, self.groups.shape
        out._state["counts"][:-1].copy_(
            self._state["counts"][: G * B].reshape(*shape, B).sum(dims).reshape(-1)
        )
        out._state["counts"][-1:].copy_(self._state["counts"][-1:])
        extra = self._state["extra"][: G * 3].reshape(*shape, 3).sum(dims).reshape(-1)
        out._state["extra"][: extra.numel()].copy_(extra)
        out._state["extra"][-3:].copy_(self._state["extra"][-3:])
        out.reduced = self.reduced
        return out


def histogram_quantiles(
    counts: np.ndarray, edges: np.ndarray, qs: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Quantiles of the data behind a histogram, shape ``[*counts.shape[:-1], len(qs)]``.

    Model: the c_i entries of bin i are spread evenly inside it, the j-th (0-based) at
    ``e_i + (j + 0.5)/c_i · width``; the q-quantile is then taken exactly as ``np.quantile(..., method=
    "linear")`` takes it from a sorted sample: interpolation between ranks ⌊q(n−1)⌋ and ⌈q(n−1)⌉.

    Error bound: with unit weights and no values outside ``[lo, hi]`` (``below == above == 0``), every
    sorted entry and its stand-in lie in the same bin, so the estimate differs from ``np.quantile`` of the
    raw data by *less than one bin width*, for every q and any data. Values clamped into an edge bin void
    the bound for quantiles that fall among them. Fractional weights are treated as fractional counts
    (no bound is claimed). Empty groups give NaN.
    """
    counts = np.asarray(counts, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    q = np.asarray(qs, dtype=np.float64)
    if np.any((q < 0) | (q > 1)):
        raise ValueError(f"quantiles must lie in [0, 1], got {qs}")
    lead, B = counts.shape[:-1], counts.shape[-1]
    c = counts.reshape(-1, B)
    cum = np.cumsum(c, axis=1)
    total = cum[:, -1:]  # [G, 1]
    before = cum - c
    width = np.diff(edges)

    def position(rank: np.ndarray) -> np.ndarray:
        # Stand-in value of the entry with 0-based rank `rank` ([G, Q]); u = rank + 0.5 is its midpoint
        # on the cumulative-count axis, which falls inside exactly one non-empty bin.
        u = np.clip(rank + 0.5, 1e-12, np.maximum(total, 1e-12))
        i = np.minimum((cum[:, None, :] < u[:, :, None]).sum(-1), B - 1)  # first bin with cum >= u
        ci = np.take_along_axis(c, i, 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.clip((u - np.take_along_axis(before, i, 1)) / ci, 0.0, 1.0)
        return edges[i] + frac * width[i]

    rho = q[None, :] * np.maximum(total - 1.0, 0.0)  # [G, Q]
    r1 = np.floor(rho)
    t = rho - r1
    r2 = np.minimum(r1 + 1.0, np.maximum(total - 1.0, 0.0))
    est = (1.0 - t) * position(r1) + t * position(r2)
    est = np.where(total > 0, est, np.nan)
    return est.reshape(*lead, len(q))


# --------------------------------------------------------------------------------------------------
# BinCount
# --------------------------------------------------------------------------------------------------
class BinCount(Accumulator):
    """Per-group weighted counts of integer categories: ``counts[g, b] = Σ w · [group = g, category = b]``.

    Examples: expert selection counts per domain (groups = domains, bins = experts, categories = the
    ``[N, k]`` top-k indices, groups = ``[N]`` domain ids); a co-occurrence matrix (bins =
    ``{"i": E, "j": E}``, categories = ``i * E + j`` or ``bins_axes.index(i=..., j=...)``).
    Categories outside ``[0, num_bins)`` (like out-of-range groups) are an index error (see module doc).
    """

    _reduce_ops: ClassVar[dict[str, str]] = {"counts": "sum"}

    def __init__(
        self,
        groups: AxesSpec = None,
        bins: AxesSpec = 1,
        *,
        device: Any = "cpu",
    ) -> None:
        super().__init__(groups, device)
        self.bins = Axes.of(bins, "bin")
        if not self.bins.names:
            raise ValueError("BinCount needs at least one bin axis")
        self._init_state()

    @property
    def num_bins(self) -> int:
        return self.bins.size

    def config(self) -> dict[str, Any]:
        return {**super().config(), "bins": self.bins.to_config()}

    def _init_state(self) -> None:
        # + spare slot for out-of-range group or category indices
        self._state = {"counts": _zeros(self.num_groups * self.num_bins + 1, self.device)}

    @torch.no_grad()
    def update(self, categories: Tensor, groups: GroupsArg = None, weight: Tensor | None = None) -> None:
        """Count integer ``categories`` (any shape) into their ``groups`` with ``weight``."""
        if self.reduced:
            raise RuntimeError("update after all_reduce() would double-count; call reset() to start over")
        if categories.is_floating_point() or categories.dtype == torch.bool:
            raise TypeError(f"categories must be an integer tensor, got {categories.dtype}")
        c = _to(categories, self.device)
        g = self._flat_groups(groups, c.shape)
        w = self._flat_weight(weight, c.shape)
        c = c.reshape(-1).long()
        G, B = self.num_groups, self.num_bins
        ok = (c >= 0) & (c < B) & (g < G)
        self._state["counts"].index_add_(0, torch.where(ok, g * B + c, G * B), w)

    @property
    def invalid(self) -> float:
        return float(self._state["counts"][-1].item())

    def result(self) -> np.ndarray:
        """Counts shaped ``[*groups.shape, *bins.shape]``."""
        self._check_valid()
        flat = self._state["counts"][: self.num_groups * self.num_bins].cpu().numpy()
        return flat.reshape(*self.groups.shape, *self.bins.shape)

    def frame(self) -> pd.DataFrame:
        """Tidy table: one row per (group, bin); group axis columns, bin axis columns, count."""
        counts = self.result().reshape(-1)
        G, B = self.num_groups, self.num_bins
        left = self.groups.frame().loc[np.repeat(np.arange(G), B)].reset_index(drop=True)
        right = self.bins.frame().loc[np.tile(np.arange(B), G)].reset_index(drop=True)
        clash = set(left.columns) & set(right.columns)
        if clash:
            raise ValueError(f"group and bin axes share names {sorted(clash)}")
        df = pd.concat([left, right], axis=1)
        df["count"] = counts
        return df

    @torch.no_grad()
    def marginalize(self, *axes: str) -> BinCount:
        """A new `BinCount` over the remaining group axes, summing over the named group ``axes``."""
        if not axes:  # torch's sum(dim=()) would reduce every dim
            return self.copy()
        out = BinCount(self.groups.drop(axes), self.bins, device=self.device)
        dims = tuple(self.groups.names.index(a) for a in axes)
        G, B = self.num_groups, self.num_bins
        summed = self._state["counts"][: G * B].reshape(*self.groups.shape, B).sum(dims).reshape(-1)
        out._state["counts"][:-1].copy_(summed)
        out._state["counts"][-1:].copy_(self._state["counts"][-1:])
        out.reduced = self.reduced
        return out


# --------------------------------------------------------------------------------------------------
# Distribution = Moments + Histogram
# --------------------------------------------------------------------------------------------------
DEFAULT_QUANTILES: tuple[float, ...] = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


class Distribution(Accumulator):
    """`Moments` and `Histogram` of the same values, filled in one pass (inputs are prepared once).

    ``count``/``mean``/``std``/``min``/``max`` are exact over the finite values; quantiles come from the
    histogram (error < one bin width, see `histogram_quantiles`), which clamps ±inf into its edge bins.
    """

    def __init__(
        self,
        groups: AxesSpec = None,
        bins: int = 100,
        lo: float = 0.0,
        hi: float = 1.0,
        *,
        device: Any = "cpu",
    ) -> None:
        super().__init__(groups, device)
        self.moments = Moments(self.groups, device=device)
        self.histogram = Histogram(self.groups, bins, lo, hi, device=device)
        self._init_state()

    def config(self) -> dict[str, Any]:
        return self.histogram.config()

    def _init_state(self) -> None:
        self.moments.reset()
        self.histogram.reset()
        self._sync_state()

    def _sync_state(self) -> None:
        # A flat view of both parts' tensors, so state_dict/load_state_dict/copy work unchanged.
        self._state = {
            **{f"moments.{k}": v for k, v in self.moments._state.items()},
            **{f"histogram.{k}": v for k, v in self.histogram._state.items()},
        }

    @torch.no_grad()
    def update(self, values: Tensor, groups: GroupsArg = None, weight: Tensor | None = None) -> None:
        """Add ``values`` (any shape) to their ``groups`` with ``weight``; see the module docstring."""
        v, g, w = self._prepare(values, groups, weight)
        self.moments._accumulate(v, g, w)
        self.histogram._accumulate(v, g, w)

    @torch.no_grad()
    def merge(self, other: Distribution) -> Distribution:
        self._check_compatible(other)
        self.moments.merge(other.moments)
        self.histogram.merge(other.histogram)
        return self

    def _all_reduce_state(self, group: Any) -> None:
        self.moments._all_reduce_state(group)
        self.histogram._all_reduce_state(group)

    def to(self, device: Any) -> Distribution:
        self.device = torch.device(device)
        self.moments.to(device)
        self.histogram.to(device)
        self._sync_state()
        return self

    @property
    def invalid(self) -> float:
        return self.moments.invalid

    def result(self) -> tuple[MomentsResult, HistogramResult]:
        return self.moments.result(), self.histogram.result()

    def quantiles(self, qs: Sequence[float] | np.ndarray = DEFAULT_QUANTILES) -> np.ndarray:
        return self.histogram.quantiles(qs)

    def frame(self, qs: Sequence[float] = DEFAULT_QUANTILES) -> pd.DataFrame:
        """Tidy table, one row per group: axis columns + count, mean, std, min, max, ``q<q>`` quantile
        columns (e.g. ``q0.5``), below, above (histogram clamping), nonfinite."""
        df = self.moments.frame()
        nonfinite = df.pop("nonfinite")
        h = self.histogram.result()
        quant = self.quantiles(qs).reshape(self.num_groups, len(qs))
        for j, q in enumerate(qs):
            df[f"q{q:g}"] = quant[:, j]
        df["below"] = h.below.reshape(-1)
        df["above"] = h.above.reshape(-1)
        df["nonfinite"] = nonfinite
        return df

    def marginalize(self, *axes: str) -> Distribution:
        """A new `Distribution` over the remaining axes, pooling the named ``axes``."""
        if not axes:
            return self.copy()
        h = self.histogram
        out = Distribution(self.groups.drop(axes), h.bins, h.lo, h.hi, device=self.device)
        out.moments = self.moments.marginalize(*axes)
        out.histogram = h.marginalize(*axes)
        out._sync_state()
        out.reduced = self.reduced
        return out


# --------------------------------------------------------------------------------------------------
# StatSet
# --------------------------------------------------------------------------------------------------
class StatSet(MutableMapping[str, Accumulator]):
    """Named accumulators that merge, all-reduce, move, save and resume together.

    ``stats = StatSet(entropy=Distribution(...), counts=BinCount(...))``; ``stats["counts"].update(...)``.
    """

    def __init__(self, accumulators: Mapping[str, Accumulator] | None = None, **named: Accumulator) -> None:
        self._accs: dict[str, Accumulator] = {}
        for name, acc in {**(accumulators or {}), **named}.items():
            self[name] = acc

    def __getitem__(self, name: str) -> Accumulator:
        return self._accs[name]

    def __setitem__(self, name: str, acc: Accumulator) -> None:
        if not isinstance(acc, Accumulator):
            raise TypeError(f"{name!r}: expected an Accumulator, got {type(acc).__name__}")
        self._accs[name] = acc

    def __delitem__(self, name: str) -> None:
        del self._accs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._accs)

    def __len__(self) -> int:
        return len(self._accs)

    def __repr__(self) -> str:
        return f"StatSet({self._accs!r})"

    def merge(self, other: StatSet) -> StatSet:
        """Merge ``other``'s accumulators into the same-named ones (the names must match)."""
        if set(other) != set(self):
            raise ValueError(f"StatSets differ in names: {sorted(set(self) ^ set(other))}")
        for name, acc in self._accs.items():
            acc.merge(other[name])
        return self

    def all_reduce(self, group: Any = None) -> StatSet:
        """All-reduce every accumulator (in sorted name order, identical on every rank); returns self."""
        for name in sorted(self._accs):
            self._accs[name].all_reduce(group)
        return self

    def to(self, device: Any) -> StatSet:
        for acc in self._accs.values():
            acc.to(device)
        return self

    def reset(self) -> StatSet:
        for acc in self._accs.values():
            acc.reset()
        return self

    def state_dict(self) -> dict[str, Any]:
        """``{"version", "accumulators": {name: Accumulator.state_dict()}}`` (plain data + tensors)."""
        return {"version": STATE_VERSION, "accumulators": {k: v.state_dict() for k, v in self._accs.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore into existing accumulators (same names, kinds and configs)."""
        saved = state["accumulators"]
        if set(saved) != set(self):
            raise ValueError(f"saved StatSet differs in names: {sorted(set(self) ^ set(saved))}")
        for name, acc in self._accs.items():
            acc.load_state_dict(saved[name])

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], device: Any = "cpu") -> StatSet:
        """Rebuild a StatSet (kinds and configs included) from a `state_dict`."""
        return cls({k: accumulator_from_state_dict(v, device) for k, v in state["accumulators"].items()})

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the state to ``path`` atomically (write a temporary file, then rename)."""
        tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: Any = "cpu") -> StatSet:
        """Read a file written by `save` (safe ``weights_only`` loading)."""
        return cls.from_state_dict(torch.load(path, map_location=device, weights_only=True), device)


class Gram(Accumulator):
    """Streamed second moments of a vector: ``gram = Σ w x xᵀ``, ``sum = Σ w x``, ``count = Σ w`` (no groups).

    Enough for the Pearson correlation (or covariance) between all coordinates, e.g. the binary top-k indicators
    of every (layer, expert), without keeping the tokens. Products are formed in float64.
    """

    _reduce_ops: ClassVar[dict[str, str]] = {"gram": "sum", "sum": "sum", "count": "sum"}

    def __init__(self, size: int, *, device: Any = "cpu") -> None:
        super().__init__(None, device)
        self.size = size
        self._init_state()

    def config(self) -> dict[str, Any]:
        return {"size": self.size}

    def _init_state(self) -> None:
        self._state = {
            "gram": _zeros(self.size * self.size, self.device),
            "sum": _zeros(self.size, self.device),
            "count": _zeros(1, self.device),
        }

    @torch.no_grad()
    def update(self, vectors: Tensor, weight: Tensor | None = None) -> None:
        """Add rows of ``vectors`` [N, size] with per-row ``weight`` [N] (None = 1)."""
        if self.reduced:
            raise RuntimeError("update after all_reduce() would double-count; call reset() to start over")
        x = _to(vectors, self.device).to(_F64)
        w = torch.ones(x.shape[0], dtype=_F64, device=self.device) if weight is None else _to(weight, self.device).to(_F64)
        weighted = x * w.unsqueeze(1)
        self._state["gram"].add_((weighted.T @ x).reshape(-1))
        self._state["sum"].add_(weighted.sum(0))
        self._state["count"].add_(w.sum().reshape(1))

    @property
    def invalid(self) -> float:
        return 0.0

    def result(self) -> dict[str, np.ndarray]:
        return {
            "gram": self._state["gram"].cpu().numpy().reshape(self.size, self.size),
            "sum": self._state["sum"].cpu().numpy(),
            "count": float(self._state["count"].cpu()),
        }

    def correlation(self) -> np.ndarray:
        """Pearson correlation matrix; NaN for coordinates that never vary."""
        r = self.result()
        n = r["count"]
        mean = r["sum"] / n
        cov = r["gram"] / n - np.outer(mean, mean)
        std = np.sqrt(np.clip(np.diag(cov), 0, None))
        with np.errstate(invalid="ignore", divide="ignore"):
            return cov / np.outer(std, std)

    def frame(self) -> pd.DataFrame:
        corr = self.correlation()
        i, j = np.meshgrid(np.arange(self.size), np.arange(self.size), indexing="ij")
        return pd.DataFrame({"i": i.ravel(), "j": j.ravel(), "pearson": corr.ravel()})
