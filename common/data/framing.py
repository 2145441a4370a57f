"""How a tokenizer frames a text: the special tokens `add_special_tokens=True` puts before and after it (BOS first,
EOS last for T5-style tokenizers). Torch-free, so that the early checks can count a prompt's positions before torch
is imported; `batches._layout` frames every window with it."""

from __future__ import annotations


def special_frame(tokenizer: object) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(prefix, suffix): what add_special_tokens=True adds around a probe text, whatever the tokenizer's convention."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return tuple(full[:start]), tuple(full[start + len(plain) :])
    return (), ()
