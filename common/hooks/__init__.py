"""Capture and intervention on a model's layers, as context managers that always remove their hooks.

This package is the only place that knows where hooks go: `capture` (what layers see and produce), `intervene`
(routing edits and top-k restriction); `routing` holds the per-architecture routing encodings both rely on.
"""

from common.hooks.capture import Capturable, Capture, LayerRecord, capture
from common.hooks.intervene import (
    EditMode,
    RoutingEdit,
    TopKRestriction,
    edit_routing,
    intervene,
    registered_hook_count,
    restrict_topk,
)

__all__ = [
    "Capturable", "Capture", "EditMode", "LayerRecord", "RoutingEdit", "TopKRestriction", "capture", "edit_routing",
    "intervene", "registered_hook_count", "restrict_topk",
]
