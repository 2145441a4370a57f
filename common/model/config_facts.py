"""What a model's config and tokenizer say, read without its modelling code: the early checks of a run.

Importing a model's modelling code (transformers' `modeling_utils` and the architecture's module) costs seconds
before the weightless skeleton (`load.inspect_moe`) can be built. The definite refusals need less: the decoder-layer
count, the context length and the expert count are config fields, prompt positions need the tokenizer. This module
reads them with `AutoConfig` / `AutoTokenizer` alone and imports neither torch nor transformers at import time.

The config field names live here, and the dense view (`view.LanguageModel`) and the MoE adapter read the loaded
model's config through the same tables, so that an early check never refuses what the skeleton accepts. Anything the
config cannot say (dense layers of a MoE, per-layer expert counts) is left to the skeleton's checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common import hub
from common.config import RANDOM_PREFIX, SHIPPED_MODELS, ModelSpec
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
    if spec.revision and (name in SHIPPED_MODELS or name.startswith(RANDOM_PREFIX) or _looks_like_path(name)):
        raise InputError(f"--revision applies to hub ids only; --model {name} is not one (drop --revision)")
    if name in SHIPPED_MODELS:
        source = SHIPPED_MODELS[name]
        if not (source / "config.json").is_file():
            raise InputError(f"--model {name}: the shipped model is missing from {source}")
        return source
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
    tokenizer: object | None  # prepared for no batching: a check may tokenise with it, not pad
    num_decoder_layers: int | None
    context_length: int | None
    num_experts: int | None  # routed experts per MoE layer, where the config names one count for every layer

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
    """The config and tokenizer of `spec.model` through AutoConfig / AutoTokenizer, no modelling code imported.

    None where they cannot be read this way (a random model, a model_type registered by the loader, remote code that
    fails, a hub model not cached): the skeleton's path reads them then and says what is wrong. A bad --model or
    --revision is refused here already, in the loader's words."""
    if spec.model.startswith(RANDOM_PREFIX):
        return None  # built in memory from a tiny config: the skeleton costs little
    source = model_source(spec)
    kwargs = hub_kwargs(spec, source)
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=spec.trust_remote_code, **kwargs)
    except Exception:  # the loader's path reports it, with its hints (not cached, remote code, ...)
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=spec.trust_remote_code, **kwargs)
    except Exception:
        tokenizer = None
    objects = [text_part(config), config]
    return ConfigFacts(
        model=spec.model,
        config=config,
        tokenizer=tokenizer,
        num_decoder_layers=first_int(objects, LAYER_COUNT_NAMES),
        context_length=first_int(objects, CONTEXT_NAMES),
        num_experts=first_int(objects, EXPERT_COUNT_NAMES),
    )
