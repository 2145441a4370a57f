"""What outliers.py (super experts): the peaks entering and leaving each expert, the residual stream's massive activations, the attention sink, and perplexity with the named experts removed writes, one `Output` per file (assembled into `common.run.outputs.REGISTRY`)."""

from __future__ import annotations

from common.figures.outputs.entry import Output

SCRIPT = ("outliers",)

# fmt: off
OUTPUTS: tuple[Output, ...] = (
)
# fmt: on
