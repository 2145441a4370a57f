"""What stability.py (routing stability): how much the top-k choices change across dtypes, batch composition, padding side and contexts writes, one `Output` per file (assembled into `common.run.outputs.REGISTRY`)."""

from __future__ import annotations

from common.figures.outputs.entry import Output

SCRIPT = ("stability",)

# fmt: off
OUTPUTS: tuple[Output, ...] = (
)
# fmt: on
