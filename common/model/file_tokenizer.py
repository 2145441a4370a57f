"""A model folder's tokenizer read with the `tokenizers` library alone (no torch, no transformers): the early checks'
tokenizer where it is provably the one transformers would build.

transformers' generic backend (`tokenizer_class` "TokenizersBackend" / "PreTrainedTokenizerFast") uses tokenizer.json
as saved, post-processor and added tokens included, unless tokenizer_config.json asks it to rebuild the
post-processor (`add_bos_token` / `add_eos_token`), to change the pre-tokenizer (`add_prefix_space`) or to split
special tokens (`split_special_tokens`). Any of those, or a model-specific tokenizer class (which may build its own
pipeline from the vocabulary), and `FileTokenizer.load` answers None: the caller reads the tokenizer through
transformers then. tests/test_early_checks.py holds both to the same ids.
"""

from __future__ import annotations

import json
from pathlib import Path

GENERIC_CLASSES = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})
REBUILDING_KEYS = ("add_bos_token", "add_eos_token", "add_prefix_space", "split_special_tokens")


class FileTokenizer:
    """The slice of a transformers tokenizer the early checks call: `tok(text, add_special_tokens=...)["input_ids"]`
    and `tok.decode(ids)`."""

    def __init__(self, backend: object) -> None:
        self.backend = backend

    @classmethod
    def load(cls, folder: Path) -> FileTokenizer | None:
        tokenizer_file, config_file = folder / "tokenizer.json", folder / "tokenizer_config.json"
        if not (tokenizer_file.is_file() and config_file.is_file()):
            return None
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if (not isinstance(config, dict) or config.get("tokenizer_class") not in GENERIC_CLASSES
                or any(key in config for key in REBUILDING_KEYS)):
            return None
        from tokenizers import Tokenizer  # Rust, a few ms to import

        try:
            backend = Tokenizer.from_file(str(tokenizer_file))
        except Exception:  # a file the library cannot read: transformers' path says what is wrong
            return None
        backend.no_truncation()
        backend.no_padding()
        return cls(backend)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.backend.encode(text, add_special_tokens=add_special_tokens).ids}

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)
