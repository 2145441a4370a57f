"""`Histogram`: per-group counts in fixed equal-width bins, and `histogram_quantiles` estimated from them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from common.stats.axes import AxesSpec
from common.stats.base import _F64, Accumulator, GroupsArg, _zeros

__all__ = ["Histogram", "HistogramResult", "histogram_quantiles"]


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
        """Add ``values`` (any shape) to their ``groups`` with ``weight``; see the `common.stats` docstring."""
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

    def _bin_index_rows(self, v: Tensor) -> Tensor:
        """`_bin_index`'s bins (np.histogram's, clamped), as whole float64 numbers. On the CPU the scaled value's
        floor, with the values within 1e-6 of a bin's width from an edge (and those out of range) placed again by a
        binary search on the edges; elsewhere the binary search for all (one op, no host sync)."""
        B = self.bins
        if v.device.type != "cpu":
            return (torch.bucketize(v, self._edges, right=True) - 1).clamp_(0, B - 1).to(_F64)
        x = (v - self.lo if self.lo else v) * (B / (self.hi - self.lo))
        floor = x.clamp(0, B - 1).floor_()
        unsure = x.sub_(floor).sub_(0.5).abs_() > 0.5 - 1e-6  # next to an edge (rounding may cross it) or clamped
        if bool(unsure.any()):
            where = unsure.nonzero(as_tuple=True)
            floor[where] = (torch.bucketize(v[where], self._edges, right=True) - 1).clamp_(0, B - 1).to(_F64)
        return floor

    def _prepare_rows(self, v: Tensor, w: Tensor, plain: bool) -> None:
        """Hook run before a rows update (the growing histogram widens its grid here)."""

    def _accumulate_rows(self, v: Tensor, g: Tensor, w: Tensor) -> None:
        """`_accumulate` for float64 values [R, C] whose C values of a row share its group g [R] and weight w [R],
        with the same counts (whole-number weights are counted, any order gives the same sums). On the CPU, rows of
        weight 0 are dropped first and unit weights are counted with one bincount."""
        G, B = self.num_groups, self.bins
        cpu = v.device.type == "cpu"
        if cpu:
            keep = w != 0
            if not bool(keep.all()):
                v, g, w = v[keep], g[keep], w[keep]
        plain = cpu and bool(torch.isfinite(v.sum()))  # a finite sum: no NaN (nor ±inf) among the values
        nan = None if plain else torch.isnan(v)
        self._prepare_rows(v, w, plain)
        bins, outside = self._row_bins(v if plain else v.masked_fill(nan, self.lo), plain)
        spare = g >= G  # an out-of-range group: all its values go to the one spare slot
        if not cpu or bool(spare.any()):
            bins.masked_fill_(spare.view(-1, 1), 0.0)
        # bin numbers are whole float64 numbers (exact far beyond any count of bins): offset by the group, then long
        flat = bins.add_(torch.where(spare, G * B, g * B).to(_F64).view(-1, 1)).long().reshape(-1)
        if plain and bool((w == 1).all()):
            self._state["counts"].add_(torch.bincount(flat, minlength=G * B + 1).to(_F64))
        else:
            weight = w.view(-1, 1).expand_as(v)
            self._state["counts"].index_add_(0, flat, (weight if plain else weight.masked_fill(nan, 0.0)).reshape(-1))
        if outside is None:  # known: nothing below, above or NaN
            return
        below, above = outside
        if nan is None:
            nan = torch.zeros_like(below)
        outside = below | above | nan
        if cpu and not bool(outside.any()):
            return
        kind = torch.where(nan, 2, torch.where(above, 1, 0))
        slot = (g.view(-1, 1) * 3 + kind).reshape(-1)
        self._state["extra"].index_add_(0, slot, w.view(-1, 1).expand_as(v).masked_fill(~outside, 0.0).reshape(-1))

    def _row_bins(self, v: Tensor, plain: bool) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """(bin of each value as a whole float64 number, (value below the range, value above it)), the second None
        where `plain` (all values finite, on the CPU) and every value is inside the range."""
        if plain and bool(v.amin() >= self.lo) and bool(v.amax() <= self.hi):
            return self._bin_index_rows(v), None
        return self._bin_index_rows(v), (v < self.lo, v > self.hi)

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
