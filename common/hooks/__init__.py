"""Capture and intervention on a model's layers, as context managers that always remove their hooks.

This package is the only place that knows where hooks go: `capture` (what layers see and produce), `intervene`
(routing edits and top-k restriction), `resume` (a forward started at a decoder layer from recorded states);
`routing` holds the per-architecture routing encodings both rely on.
"""

from common.hooks.capture import Capturable, Capture, LayerRecord, capture
from common.hooks.intervene import (
    EditMode,
    ExpertActivation,
    ExpertRemoval,
    RoutingEdit,
    TopKRestriction,
    edit_routing,
    intervene,
    registered_hook_count,
    restrict_topk,
)
from common.hooks.resume import layer_input, start_at

__all__ = [  # noqa: RUF022 (grouped by use, not sorted)
    "capture",  # with capture(model, layers, what) as records: records[layer] is the LayerRecord of the last forward
    "Capture",  # the records of one capture block, keyed by decoder-layer index
    "LayerRecord",  # one layer's tensors: logits, topk_index, topk_weight, expert_input, outputs, residual, neurons
    "Capturable",  # the names `what` accepts: logits, topk, input, moe_output, routed_output, residual, ffn_neurons...
    "intervene",  # with intervene(moe, edits): forwards inside the block run with the edits applied
    "RoutingEdit",  # scale / set / force / logit one expert's routing at one layer, optionally at some positions
    "EditMode",  # the modes of a RoutingEdit
    "TopKRestriction",  # keep only each token's `keep` highest-weighted experts at one layer
    "ExpertRemoval",  # remove experts of one layer: drop (router logits -inf before selection) or zero (weight 0)
    "ExpertActivation",  # force experts of one layer into every token's top-k (logit = the token's max + margin)
    "edit_routing",  # the RoutingEdit arithmetic on (index, weight) tensors, without hooks
    "restrict_topk",  # the TopKRestriction arithmetic on (index, weight) tensors, without hooks
    "registered_hook_count",  # hooks left on a module (0 after every block: tests use it)
    "layer_input",  # with layer_input(layers, l) as found: found["hidden"] = what decoder layer l received
    "start_at",  # with start_at(layers, l, hidden): forwards skip the layers below l and feed `hidden` to l
]
