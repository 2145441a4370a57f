"""`Moments`: per-group weighted count, mean, population std, min and max (exact parallel combination)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from common.stats.axes import AxesSpec
from common.stats.base import _F64, Accumulator, GroupsArg, _all_reduce_, _zeros

__all__ = ["Moments", "MomentsResult"]


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
        """Add ``values`` (any shape) to their ``groups`` with ``weight``; see the `common.stats` docstring."""
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

    def _accumulate_rows(self, v: Tensor, g: Tensor, w: Tensor) -> None:
        """`_accumulate` for float64 values [R, C] whose C values of a row share its group g [R] and weight w [R]:
        each row is reduced to (count, mean, M2, min, max) first (one pass over the values where they are all
        finite, on the CPU), then the rows to their groups with the same pairwise formula. Counts, min, max and
        non-finite weights are those of `_accumulate`; mean and M2 agree with it to float64 rounding (the sums run
        in another order)."""
        n, C = self.num_groups + 1, v.shape[1]
        s = self._state
        # all finite, the common case: checked where a check costs no host sync (a finite sum has no NaN or ±inf)
        if v.device.type == "cpu" and bool(torch.isfinite(v.sum())):
            mean = v.sum(1) / C
            d = v - mean[:, None]
            m2 = torch.einsum("rc,rc->r", d, d)  # Σ (x − mean)² per row: a dot product, faster than var_mean
            count = torch.full_like(w, C)
            row_min, row_max = v.amin(1), v.amax(1)
        else:
            finite = torch.isfinite(v)
            count = finite.sum(1).to(_F64)
            s["nonfinite"].index_add_(0, g, w * (C - count))
            zeroed = v.masked_fill(~finite, 0.0)
            mean = torch.where(count > 0, zeroed.sum(1) / count.clamp_min(1), 0.0)
            d = (zeroed - mean[:, None]).masked_fill(~finite, 0.0)
            m2 = (d * d).sum(1)
            row_min = v.masked_fill(~finite, math.inf).amin(1)
            row_max = v.masked_fill(~finite, -math.inf).amax(1)
        weight = w * count
        nb = torch.zeros(n, dtype=_F64, device=self.device).index_add_(0, g, weight)
        sb = torch.zeros(n, dtype=_F64, device=self.device).index_add_(0, g, weight * mean)
        mb = torch.where(nb > 0, sb / nb, 0.0)
        shift = mean - mb.index_select(0, g)
        m2b = torch.zeros(n, dtype=_F64, device=self.device).index_add_(0, g, w * (m2 + count * shift * shift))
        self._combine(nb, mb, m2b)
        live = (w > 0) & (count > 0)
        s["min"].scatter_reduce_(0, g, row_min.masked_fill(~live, math.inf), "amin")
        s["max"].scatter_reduce_(0, g, row_max.masked_fill(~live, -math.inf), "amax")

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
