"""Streaming, mergeable statistics that live on the model's device.

Every routing metric in moescope is built from these accumulators and one container:

* `Moments`      per-group weighted count, mean, population std, min, max of a scalar value.
* `Histogram`    per-group counts in fixed, equal-width bins, plus quantiles estimated from them.
* `BinCount`     per-group weighted counts of integer categories (expert ids, flattened expert pairs, ...).
* `Distribution` `Moments` and `Histogram` of the same values, updated in one pass ("mean, std, quantiles
                 and a histogram", the per-layer summary of docs/METRICS.md#summaries-and-histograms).
* `Gram`         streamed second moments of a vector (Pearson correlations between coordinates).
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

Layout of the package
---------------------
``axes``          `Axes`, `flat_groups`: the named group grid and flat row-major indices.
``base``          `Accumulator` (shared update/merge/all-reduce/state-dict machinery), device helpers,
                  `accumulator_from_state_dict`.
``moments``       `Moments`, `MomentsResult`.
``histogram``     `Histogram`, `HistogramResult`, `histogram_quantiles`.
``counts``        `BinCount`, `Gram`.
``distribution``  `Distribution` (`Moments` + `Histogram` in one pass).
``statset``       `StatSet`.
"""

from __future__ import annotations

from common.stats.axes import Axes, AxesSpec, Label, flat_groups
from common.stats.base import STATE_VERSION, Accumulator, GroupsArg, accumulator_from_state_dict
from common.stats.counts import BinCount, Gram
from common.stats.distribution import DEFAULT_QUANTILES, Distribution
from common.stats.histogram import Histogram, HistogramResult, histogram_quantiles
from common.stats.moments import Moments, MomentsResult
from common.stats.statset import StatSet

__all__ = [
    "DEFAULT_QUANTILES",
    "STATE_VERSION",
    "Accumulator",
    "Axes",
    "AxesSpec",
    "BinCount",
    "Distribution",
    "Gram",
    "GroupsArg",
    "Histogram",
    "HistogramResult",
    "Label",
    "Moments",
    "MomentsResult",
    "StatSet",
    "accumulator_from_state_dict",
    "flat_groups",
    "histogram_quantiles",
]
