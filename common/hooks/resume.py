"""Resume a forward at a decoder layer: the residual stream entering layer ℓ is recorded once (`layer_input`), and
later forwards skip every layer below ℓ (each returns its input untouched) and feed the recorded states to ℓ
(`start_at`), so that variants that differ only from layer ℓ on (an expert ablated at ℓ) pay for the layers above
it alone. Embeddings, masks and position embeddings are still computed by the model's own forward (cheap), so
every layer from ℓ on gets exactly the arguments a full forward gives it.

Only where it is exact: `layer_input` reports whether every skipped layer returned a plain tensor (its output is
the next layer's input); a layer that returns a tuple (legacy caches, attention weights) leaves the caller on full
forwards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from common.hooks.routing import Hooks


def _hidden_argument(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def layer_input(layers: torch.nn.ModuleList, layer: int) -> Iterator[dict]:
    """Inside the block, `found["hidden"]` is the last forward's input to decoder layer `layer` and `found["plain"]`
    whether every layer below it returned a plain tensor."""
    hooks, found = Hooks(), {"hidden": None, "plain": True}

    def record(module, args, kwargs):
        found["hidden"] = _hidden_argument(args, kwargs).clone()  # a layer may add into its input in place

    def check(module, args, output):
        if not isinstance(output, torch.Tensor):
            found["plain"] = False

    try:
        hooks.add(layers[layer].register_forward_pre_hook(record, with_kwargs=True))
        for below in layers[:layer]:
            hooks.add(below.register_forward_hook(check))
        yield found
    finally:
        hooks.remove()


@contextlib.contextmanager
def start_at(layers: torch.nn.ModuleList, layer: int, hidden: torch.Tensor) -> Iterator[None]:
    """Forwards inside the block skip decoder layers below `layer` and give `layer` the input `hidden` (its batch
    size must be the forward's)."""
    hooks = Hooks()

    def feed(module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def passthrough(*args, **kwargs):
        return _hidden_argument(args, kwargs)

    try:
        for below in layers[:layer]:
            hooks.replace_forward(below, passthrough)
        hooks.add(layers[layer].register_forward_pre_hook(feed, with_kwargs=True))
        yield
    finally:
        hooks.remove()
