"""What contrast.py (behaviour experts): experts whose activation rates separate two data specs A and B, and the SteerMoE check of forcing them off / on writes, one `Output` per file (assembled into `common.run.outputs.REGISTRY`)."""

from __future__ import annotations

from common.figures.outputs.entry import Output

SCRIPT = ("contrast",)

# fmt: off
OUTPUTS: tuple[Output, ...] = (
)
# fmt: on
