"""Group axes: `Axes` (an ordered grid of named, labelled axes) and `flat_groups` (row-major flat indices).

The groups of every accumulator, and the bins of a `BinCount`, are an `Axes`; see the package docstring.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

__all__ = ["Axes", "AxesSpec", "Label", "flat_groups"]

Label = str | int | float


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
