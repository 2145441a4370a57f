"""`Distribution`: `Moments` and `Histogram` of the same values, updated in one pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from common.stats.axes import AxesSpec
from common.stats.base import Accumulator, GroupsArg
from common.stats.histogram import Histogram, HistogramResult
from common.stats.moments import Moments, MomentsResult

__all__ = ["DEFAULT_QUANTILES", "Distribution"]

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
        """Add ``values`` (any shape) to their ``groups`` with ``weight``; see the `common.stats` docstring."""
        v, g, w = self._prepare(values, groups, weight)
        self.moments._accumulate(v, g, w)
        self.histogram._accumulate(v, g, w)

    @torch.no_grad()
    def update_rows(self, values: Tensor, groups: GroupsArg, weight: Tensor) -> None:
        """`update` for values [R, C] whose C values of a row share the row's groups and weight ([R] each): the
        same histogram, count, min and max, mean and std to float64 rounding, in a fraction of the time (the
        statistics are reduced per row before they are grouped)."""
        if self.reduced:
            raise RuntimeError("update after all_reduce() would double-count; call reset() to start over")
        v = values.to(self.device).to(torch.float64)
        rows = torch.Size([v.shape[0]])
        g, w = self._flat_groups(groups, rows), self._flat_weight(weight, rows)
        self.moments._accumulate_rows(v, g, w)
        self.histogram._accumulate_rows(v, g, w)

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
