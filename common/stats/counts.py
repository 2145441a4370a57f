"""Count-like accumulators: `BinCount` (weighted counts of integer categories per group) and `Gram`
(streamed second moments of a vector, for correlations)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from common.stats.axes import Axes, AxesSpec
from common.stats.base import _F64, Accumulator, GroupsArg, _to, _zeros

__all__ = ["BinCount", "Gram"]

_DTYPES = {"float64": torch.float64, "int64": torch.int64, "int32": torch.int32}


# --------------------------------------------------------------------------------------------------
# BinCount
# --------------------------------------------------------------------------------------------------
class BinCount(Accumulator):
    """Per-group weighted counts of integer categories: ``counts[g, b] = Σ w · [group = g, category = b]``.

    Examples: expert selection counts per domain (groups = domains, bins = experts, categories = the
    ``[N, k]`` top-k indices, groups = ``[N]`` domain ids); a co-occurrence matrix (bins =
    ``{"i": E, "j": E}``, categories = ``i * E + j`` or ``bins_axes.index(i=..., j=...)``).
    Categories outside ``[0, num_bins)`` (like out-of-range groups) are an index error (see the
    `common.stats` docstring).
    """

    _reduce_ops: ClassVar[dict[str, str]] = {"counts": "sum"}

    def __init__(
        self,
        groups: AxesSpec = None,
        bins: AxesSpec = 1,
        *,
        device: Any = "cpu",
        dtype: str = "float64",
    ) -> None:
        super().__init__(groups, device)
        self.bins = Axes.of(bins, "bin")
        if not self.bins.names:
            raise ValueError("BinCount needs at least one bin axis")
        # Integer counts ("int32": 4 bytes a cell instead of 8) are exact where every weight is 0 or 1, which is what
        # makes vocabulary × expert tables fit beside a large model; fractional weights need float64.
        if dtype not in _DTYPES:
            raise ValueError(f"BinCount dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        self._init_state()

    @property
    def num_bins(self) -> int:
        return self.bins.size

    def config(self) -> dict[str, Any]:
        return {**super().config(), "bins": self.bins.to_config(), "dtype": self.dtype}

    @property
    def nbytes(self) -> int:
        return (self.num_groups * self.num_bins + 1) * _DTYPES[self.dtype].itemsize

    def _init_state(self) -> None:
        # + spare slot for out-of-range group or category indices
        counts = _zeros(self.num_groups * self.num_bins + 1, self.device)
        self._state = {"counts": counts if self.dtype == "float64" else counts.to(_DTYPES[self.dtype])}

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
        counts = self._state["counts"]
        self._state["counts"].index_add_(0, torch.where(ok, g * B + c, G * B), w.to(counts.dtype))

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
        out = BinCount(self.groups.drop(axes), self.bins, device=self.device, dtype=self.dtype)
        dims = tuple(self.groups.names.index(a) for a in axes)
        G, B = self.num_groups, self.num_bins
        summed = self._state["counts"][: G * B].reshape(*self.groups.shape, B).sum(dims).reshape(-1)
        out._state["counts"][:-1].copy_(summed)
        out._state["counts"][-1:].copy_(self._state["counts"][-1:])
        out.reduced = self.reduced
        return out


# --------------------------------------------------------------------------------------------------
# Gram
# --------------------------------------------------------------------------------------------------
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

    @property
    def nbytes(self) -> int:
        return (self.size * self.size + self.size + 1) * 8

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
