"""`StatSet`: named accumulators that merge, all-reduce, move, save and resume together."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import torch

from common.atomic import atomic_write
from common.stats.base import STATE_VERSION, Accumulator, accumulator_from_state_dict

__all__ = ["StatSet"]


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
        state = self.state_dict()
        atomic_write(path, lambda tmp: torch.save(state, tmp))

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: Any = "cpu") -> StatSet:
        """Read a file written by `save` (safe ``weights_only`` loading)."""
        return cls.from_state_dict(torch.load(path, map_location=device, weights_only=True), device)
