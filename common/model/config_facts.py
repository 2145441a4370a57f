"""What a model's config and tokenizer say, read without its modelling code: the early checks of a run.

Importing a model's modelling code (transformers' `modeling_utils` and the architecture's module) costs seconds
before the weightless skeleton (`load.inspect_moe`) can be built. The definite refusals need less: the decoder-layer
count, the context length and the expert count are config fields, prompt positions need the tokenizer. This module
reads them without torch where it can: a local folder's config.json as JSON (a field the file does not state is left
to the skeleton: no class default is guessed) and its tokenizer.json through `file_tokenizer.FileTokenizer` where
that is provably transformers' tokenizer; otherwise `AutoConfig` / `AutoTokenizer` (which import torch: seconds).

The config field names live here, and the dense view (`view.LanguageModel`) and the MoE adapter read the loaded
model's config through the same tables, so that an early check never refuses what the skeleton accepts. Anything the
config cannot say (dense layers of a MoE, per-layer expert counts) is left to the skeleton's checks.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from common import hub
from common.config import RANDOM_PREFIX, SHIPPED_MODELS, ModelSpec, shipped_revisions
from common.errors import InputError

LAYER_COUNT_NAMES = ("num_hidden_layers", "n_layers", "num_layers")
CONTEXT_NAMES = ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length")
# Routed experts per MoE layer, as configs spell it (not the experts per token: num_experts_per_tok and kin).
EXPERT_COUNT_NAMES = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def first_int(objects: Sequence[object], names: Sequence[str]) -> int | None:
    """The first positive int attribute among `names` on `objects` (config fields differ between architectures)."""
    for obj in objects:
        for name in names:
            value = getattr(obj, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def text_part(config: object) -> object:
    """A multimodal config's text model config (`text_config`), else the config itself."""
    return getattr(config, "text_config", None) or config


def missing_layer(value: int, count: int) -> InputError:
    """`--layers` names a layer the model does not have (the config's check and the skeleton's say it alike)."""
    return InputError(f"layer {value} does not exist: the model has {count} decoder layers (0..{count - 1})")


def _looks_like_path(name: str) -> bool:
    """Hub ids are exactly `org/name`; anything else with a separator, or anything on disk, is a path."""
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1


def model_source(spec: ModelSpec) -> str | Path:
    """Where `from_pretrained` reads the model: a shipped folder, a local folder, or a hub id."""
    name = spec.model
    if name in SHIPPED_MODELS:
        source = SHIPPED_MODELS[name]
        if spec.revision:
            revisions = shipped_revisions(name)
            if spec.revision not in revisions:
                raise InputError(f"--revision {spec.revision}: --model {name} ships the revisions "
                                 f"{', '.join(revisions)}")
            source = revisions[spec.revision]
        if not (source / "config.json").is_file():
            raise InputError(f"--model {name}: the shipped model is missing from {source}")
        return source
    if spec.revision and (name.startswith(RANDOM_PREFIX) or _looks_like_path(name)):
        raise InputError(f"--revision applies to hub ids and shipped models only; --model {name} is neither "
                         "(drop --revision)")
    if _looks_like_path(name):
        source = Path(name).expanduser()
        if not source.exists():
            raise InputError(f"--model {name}: no such directory")
        if not (source / "config.json").is_file():
            raise InputError(f"--model {name}: not a model directory (no config.json)")
        return source
    return name


def hub_kwargs(spec: ModelSpec, source: str | Path) -> dict:
    """`revision`, and `local_files_only` when the hub cannot be reached (the cache answers at once, no retries)."""
    if isinstance(source, Path):
        return {}
    kwargs: dict = {"revision": spec.revision} if spec.revision else {}
    if not hub.reachable():
        kwargs["local_files_only"] = True
    return kwargs


@dataclass(frozen=True)
class ConfigFacts:
    """The model's config and tokenizer, and what they say; None where they do not say (or could not be read)."""

    model: str  # the --model string, for messages
    config: object
    num_decoder_layers: int | None
    context_length: int | None
    num_experts: int | None  # routed experts per MoE layer, where the config names one count for every layer
    # The model's class name when its architecture has no experts at all (`dense_class`), else None.
    dense: str | None = None
    # Read on first use (a check that needs no tokenizer does not pay for it); None when it cannot be read.
    load_tokenizer: Callable[[], object | None] = field(default=lambda: None, repr=False, compare=False)

    @functools.cached_property
    def tokenizer(self) -> object | None:
        """The model's tokenizer (`tok(text, add_special_tokens=...)["input_ids"]`, `tok.decode`): a check may
        tokenise with it, not pad."""
        return self.load_tokenizer()

    def resolve_layer(self, index: int | str) -> int | None:
        """A 0-based decoder-layer index from a flag value, as `LanguageModel.resolve_layer` resolves it (same
        message); None when the config does not say how many layers there are or the value is not an index (the
        skeleton's check answers then)."""
        try:
            value = int(index)
        except (TypeError, ValueError):
            return None
        count = self.num_decoder_layers
        if count is None:
            return None
        resolved = value + count if value < 0 else value
        if not 0 <= resolved < count:
            raise missing_layer(value, count)
        return resolved

    def check_expert(self, flag: str, expert: int, layer: int | str) -> None:
        """`flag` names an expert at or above the config's expert count: the same message as the skeleton's check."""
        if self.num_experts is None or expert < self.num_experts:
            return
        resolved = self.resolve_layer(layer)
        where = resolved if resolved is not None else layer
        raise InputError(f"{flag} {expert} out of range: layer {where} has experts 0..{self.num_experts - 1}")


def read_config_facts(spec: ModelSpec) -> ConfigFacts | None:
    """The config and tokenizer of `spec.model`, no modelling code imported: a local folder's files as they are
    (`_file_facts`, no torch), a hub model through AutoConfig / AutoTokenizer.

    None where they cannot be read this way (a random model, a model_type registered by the loader, remote code that
    fails, a hub model not cached): the skeleton's path reads them then and says what is wrong. A bad --model or
    --revision is refused here already, in the loader's words."""
    if spec.model.startswith(RANDOM_PREFIX):
        return None  # built in memory from a tiny config: the skeleton costs little
    source = model_source(spec)
    if isinstance(source, Path):
        facts = _file_facts(spec, source)
        if facts is not None:
            return facts
    return _auto_facts(spec, source)


def dense_class(raw: dict) -> str | None:
    """The model's class name (config.json's `architectures`) when transformers' modelling code for its `model_type`
    never mentions an expert: no configuration of that architecture has an MoE layer, so the adapter would find
    none. Read as text from the installed package, without importing it; None when unsure (an unknown or
    registered-by-us model_type, remote code)."""
    import importlib.util

    model_type = raw.get("model_type")
    package = importlib.util.find_spec("transformers")
    if not isinstance(model_type, str) or package is None or package.origin is None or "auto_map" in raw:
        return None
    folder = Path(package.origin).parent / "models" / model_type.replace("-", "_")
    sources = sorted(folder.glob("modeling_*.py")) if folder.is_dir() else []
    if not sources or any("expert" in path.read_text(encoding="utf-8").lower() for path in sources):
        return None
    architectures = raw.get("architectures")
    return architectures[0] if isinstance(architectures, list) and architectures and isinstance(architectures[0], str) else model_type


def _facts(spec: ModelSpec, config: object, load_tokenizer: Callable[[], object | None],
           dense: str | None = None) -> ConfigFacts:
    objects = [text_part(config), config]
    return ConfigFacts(
        model=spec.model,
        config=config,
        num_decoder_layers=first_int(objects, LAYER_COUNT_NAMES),
        context_length=first_int(objects, CONTEXT_NAMES),
        num_experts=first_int(objects, EXPERT_COUNT_NAMES),
        dense=dense,
        load_tokenizer=load_tokenizer,
    )


def _namespace(value: object) -> object:
    """JSON objects as attribute namespaces, so that the config tables read a file like a config object."""
    if isinstance(value, dict):
        return SimpleNamespace(**{key: _namespace(item) for key, item in value.items()})
    return value


def _file_facts(spec: ModelSpec, folder: Path) -> ConfigFacts | None:
    """config.json as written (its fields are the config's attributes: `to_dict` wrote them) and the tokenizer from
    its files where `FileTokenizer` can stand for transformers' (else through AutoTokenizer, on first use). None when
    config.json is not a JSON object or relies on remote code (its class may rewrite fields)."""
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or "auto_map" in raw:
        return None
    from common.model.file_tokenizer import FileTokenizer

    def load_tokenizer() -> object | None:
        return FileTokenizer.load(folder) or _auto_tokenizer(spec, folder, {})

    return _facts(spec, _namespace(raw), load_tokenizer, dense_class(raw))


def _auto_tokenizer(spec: ModelSpec, source: str | Path, kwargs: dict) -> object | None:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=spec.trust_remote_code, **kwargs)
    except Exception:  # the loader's path reports it, with its hints
        return None


def _auto_facts(spec: ModelSpec, source: str | Path) -> ConfigFacts | None:
    """Through AutoConfig (which imports torch) and, on first use, AutoTokenizer."""
    kwargs = hub_kwargs(spec, source)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=spec.trust_remote_code, **kwargs)
    except Exception:  # the loader's path reports it, with its hints (not cached, remote code, ...)
        return None
    return _facts(spec, config, lambda: _auto_tokenizer(spec, source, kwargs))
