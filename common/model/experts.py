"""Every expert of a layer applied to given hidden states, in token chunks so memory stays bounded.

`sim.py`, `dim_reduc.py` and probing need E_e(x) for all experts e on the same tokens x (not only the tokens routed
to e). `expert_output_chunks` yields [E, Tc, H] blocks, so a caller can build Gram matrices block by block without
ever holding [E, T, H]; `all_expert_outputs` concatenates them when the whole tensor is the point.
Each block costs one matmul per expert over all tokens of the chunk: the loop is over experts, never tokens or pairs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from common.model.adapter import MoELayer

# Elements of the per-chunk working set (E · Tc · max(H, I)) that chunking keeps below: 2^26 floats = 256 MiB fp32.
DEFAULT_MAX_ELEMENTS = 2**26


def chunk_size(num_experts: int, width: int, max_elements: int = DEFAULT_MAX_ELEMENTS) -> int:
    """Tokens per chunk so that num_experts × tokens × width stays under `max_elements` (at least 1)."""
    return max(1, max_elements // max(1, num_experts * width))


def _expert_width(moe_layer: MoELayer) -> int:
    return moe_layer.expert_params(0).width


@torch.no_grad()
def expert_output_chunks(
    moe_layer: MoELayer,
    x: torch.Tensor,
    experts: Sequence[int] | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(token slice, [E', Tc, H] unweighted outputs of `experts` (default: all) on x[slice]) for x [T, H]."""
    chosen = list(range(moe_layer.num_experts)) if experts is None else list(experts)
    x = x.reshape(-1, x.shape[-1])
    step = chunk_size(len(chosen), max(x.shape[-1], _expert_width(moe_layer)), max_elements)
    for start in range(0, x.shape[0], step):
        part = x[start : start + step]
        out = part.new_empty(len(chosen), part.shape[0], part.shape[1])
        for row, e in enumerate(chosen):
            out[row] = moe_layer.expert_output_from_neurons(e, moe_layer.expert_neurons(e, part))
        yield slice(start, start + part.shape[0]), out


def all_expert_outputs(
    moe_layer: MoELayer, x: torch.Tensor, experts: Sequence[int] | None = None, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> torch.Tensor:
    """[E', T, H] unweighted outputs of `experts` (default: all) on x [T, H]."""
    return torch.cat([block for _, block in expert_output_chunks(moe_layer, x, experts, max_elements)], dim=1)


@torch.no_grad()
def expert_neuron_chunks(
    moe_layer: MoELayer, expert: int, x: torch.Tensor, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(token slice, [Tc, I] intermediate neurons of one expert on x[slice]) for x [T, H]."""
    x = x.reshape(-1, x.shape[-1])
    step = chunk_size(1, _expert_width(moe_layer), max_elements)
    for start in range(0, x.shape[0], step):
        part = x[start : start + step]
        yield slice(start, start + part.shape[0]), moe_layer.expert_neurons(expert, part)
