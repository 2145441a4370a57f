"""One registry entry, `Output`, and the column texts several families share. A pattern is a file name relative
to the run folder (`{L}` a layer, `{E}` an expert, `{A}`/`{B}` two layers, `{ext}` pdf or png, `{level}` a quantile
level, any other name an integer); an entry gives a one-line description, the anchor of its definition in
docs/METRICS.md and, by file type, the CSV columns and those holding whole numbers (`Run.save_table` writes them as
integers), the npy axis order and dtype, or the JSON top-level keys."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

METRICS_PATH = "docs/METRICS.md"  # as named in READMEs and docstrings, relative to the repository

# What a {placeholder} of a pattern matches; any other name matches a (possibly negative) integer.
_PLACEHOLDERS = {"ext": r"(?:pdf|png)", "level": r"[0-9][0-9.e+-]*"}


def _regex(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", pattern)
    body = "".join(re.escape(p) if i % 2 == 0 else _PLACEHOLDERS.get(p, r"-?\d+") for i, p in enumerate(parts))
    return re.compile(body + r"\Z")


@dataclass(frozen=True)
class Output:
    pattern: str  # file name relative to the run folder, with {placeholders}
    description: str  # one line
    anchor: str | None  # section of docs/METRICS.md (None: run metadata)
    scripts: tuple[str, ...] = ()  # scripts that write it; () = every script
    columns: Mapping[str, str] = field(default_factory=dict)  # CSV: column (may hold {placeholders}) -> meaning
    integers: frozenset[str] = frozenset()  # CSV: columns whose values are whole numbers
    axes: str | None = None  # npy: axis order
    dtype: str | None = None  # npy: dtype and what the values are
    keys: Mapping[str, str] = field(default_factory=dict)  # JSON: top-level key -> meaning

    @cached_property
    def regex(self) -> re.Pattern[str]:
        return _regex(self.pattern)

    @cached_property
    def _column_regexes(self) -> list[tuple[re.Pattern[str], str]]:
        return [(_regex(name), text) for name, text in self.columns.items()]

    def matches(self, relative: str) -> bool:
        return self.regex.match(relative) is not None

    def column(self, name: str) -> str | None:
        """The description of a CSV column, or None if this entry does not describe it."""
        if name in self.columns:
            return self.columns[name]
        return next((text for regex, text in self._column_regexes if regex.match(name)), None)

    @property
    def link(self) -> str | None:
        return f"{METRICS_PATH}#{self.anchor}" if self.anchor else None


# ------------------------------------------------------------------------------------------ shared columns
LAYER = "decoder-layer index of the MoE layer (0-based, as in --layers)"
DOMAIN = "domain name from --data; 'all' pools the tokens of every domain"
EXPERT = "expert index within the layer (0-based)"
BIN_COLUMNS = {
    "bin": "histogram bin index (0-based)",
    "left": "left edge of the bin (the quantity's unit)",
    "right": "right edge of the bin (the quantity's unit)",
    "count": "values that fell in the bin (count; values outside the range are clamped into the first/last bin)",
}
HIST_DTYPE = "float64, whole-number counts"


def summary_columns(unit: str, count: str) -> dict[str, str]:
    """The columns of a summary table (count, exact moments and extremes, histogram quantiles), values in `unit`."""
    return {
        "count": count,
        "mean": f"exact mean ({unit})",
        "std": f"exact population standard deviation ({unit})",
        "min": f"exact minimum ({unit})",
        "max": f"exact maximum ({unit})",
        "q{level}": f"quantile at that level, e.g. q0.5 = median, estimated from the histogram ({unit})",
        "below": "values below the histogram range, counted in its first bin (count; 0 for bounded quantities)",
        "above": "values above the histogram range, counted in its last bin (count; 0 for bounded quantities)",
        "nonfinite": "NaN or infinite values, left out of every other column (count)",
    }
