"""The `--data` source grammar: `hf:ID[:CONFIG][:SPLIT][#FIELD,...][?key=value&...]`, local paths/globs with
the same suffixes, `demo:<domain>`, and `name=SOURCE` (see the package docstring). Syntax only: nothing is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from common.errors import InputError

EXTENSIONS = (".txt", ".jsonl", ".json", ".parquet", ".csv")
DEFAULT_FIELD = "text"

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")
_HF_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_FILTERS_RE = re.compile(r"^[\w.-]+=[^&]*(&[\w.-]+=[^&]*)*$")


class DataWarning(UserWarning):
    """Something about the data the user should know: a domain ran out, demo domains were skipped."""


# ------------------------------------------------------------------------------------------------ source specs
@dataclass(frozen=True)
class HFSpec:
    """`hf:ID[:CONFIG][:SPLIT][#FIELD,...][?key=value&...]`."""

    dataset: str
    config: str | None = None
    split: str = "train"
    fields: tuple[str, ...] = (DEFAULT_FIELD,)
    filters: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class LocalSpec:
    """A file, folder or glob, with optional `#FIELD,...` and `?key=value&...`."""

    path: str
    fields: tuple[str, ...] = (DEFAULT_FIELD,)
    filters: tuple[tuple[str, str], ...] = ()
    explicit_fields: bool = False  # `#FIELD` was given (an error for .txt files, which have no fields)


@dataclass(frozen=True)
class DemoSpec:
    """`demo:<domain>`: one domain of the offline demo corpus."""

    name: str


SourceSpec = HFSpec | LocalSpec | DemoSpec


def _parse_fields(text: str | None, source: str) -> tuple[str, ...]:
    if text is None:
        return (DEFAULT_FIELD,)
    fields = tuple(f.strip() for f in text.split(","))
    if not all(fields):
        raise InputError(f"--data {source!r}: empty field name after '#' (write #FIELD or #FIELD1,FIELD2)")
    return fields


def _parse_filters(text: str | None, source: str) -> tuple[tuple[str, str], ...]:
    if text is None:
        return ()
    if "#" in text:
        raise InputError(f"--data {source!r}: put #FIELD before ?filters (hf:ID#text?key=value)")
    if not _FILTERS_RE.match(text):
        raise InputError(f"--data {source!r}: filters must read ?key=value&key2=value2")
    return tuple((k, unquote(v)) for k, v in (pair.split("=", 1) for pair in text.split("&")))


def _split_suffixes(text: str) -> tuple[str, str | None, str | None]:
    """'base#fields?filters' -> (base, fields, filters); either suffix may be absent (None)."""
    base, q, query = text.partition("?")
    base, h, fields = base.partition("#")
    return base, (fields if h else None), (query if q else None)


def parse_hf_spec(source: str) -> HFSpec:
    """Parse `hf:ID[:CONFIG][:SPLIT][#FIELD,...][?key=value&...]` (syntax only; nothing is loaded)."""
    if not source.startswith("hf:"):
        raise InputError(f"--data {source!r}: not an hf: spec")
    path, fields, query = _split_suffixes(source[3:])
    parts = path.split(":")
    if len(parts) > 3:
        raise InputError(f"--data {source!r}: too many ':' parts (hf:ID[:CONFIG][:SPLIT])")
    dataset, config, split = (parts + [""] * 3)[:3]
    if not dataset:
        raise InputError(f"--data {source!r}: missing dataset id (hf:ID[:CONFIG][:SPLIT], e.g. hf:openai/gsm8k:main)")
    if not _HF_ID_RE.match(dataset):
        raise InputError(f"--data {source!r}: {dataset!r} is not a Hugging Face dataset id (owner/name)")
    return HFSpec(
        dataset=dataset,
        config=config or None,  # `hf:ID::SPLIT` leaves the config at the dataset's default
        split=split or "train",
        fields=_parse_fields(fields, source),
        filters=_parse_filters(query, source),
    )


def _parse_local(source: str) -> LocalSpec:
    # An existing path is taken literally, so files whose names contain '#' or '?' still work.
    if Path(source).expanduser().exists():
        return LocalSpec(path=source)
    # '?' is also a glob wildcard: only a tail that reads `?key=value&...` is taken as filters.
    base, query = source, None
    for i, ch in enumerate(source):
        if ch == "?" and _FILTERS_RE.match(source[i + 1 :]):
            base, query = source[:i], source[i + 1 :]
            break
    base, hash_, fields = base.rpartition("#")
    if not hash_:
        base, fields = fields, None
    return LocalSpec(
        path=base,
        fields=_parse_fields(fields, source),
        filters=_parse_filters(query, source),
        explicit_fields=fields is not None,
    )


def parse_source(source: str) -> SourceSpec:
    """Classify and parse one source spec (syntax only; files are checked by `resolve_domains`)."""
    source = source.strip()
    if not source:
        raise InputError("--data: empty source")
    if source.startswith("hf:"):
        return parse_hf_spec(source)
    if source.startswith("demo:"):
        name = source[5:]
        if not name:
            raise InputError(f"--data {source!r}: missing demo domain name (demo:<domain>)")
        return DemoSpec(name)
    return _parse_local(source)


def split_name(item: str) -> tuple[str | None, str]:
    """'name=SOURCE' -> (name, SOURCE); anything else -> (None, item)."""
    name, eq, rest = item.partition("=")
    # A '=' inside a spec ('hf:x?k=v', 'dir/a=b.txt') is not a name: names hold no ':', '/', '?' or '#'.
    if not eq or not _NAME_RE.match(name) or Path(item).expanduser().exists():
        if item.startswith("="):
            raise InputError(f"--data {item!r}: missing domain name before '=' (name=SOURCE)")
        return None, item
    if not rest.strip():
        raise InputError(f"--data {item!r}: missing source after '{name}=' (name=SOURCE)")
    return name, rest.strip()


def _has_glob(path: str) -> bool:
    """Whether a local path spec holds a glob wildcard (an existing path is still taken literally)."""
    return any(ch in path for ch in "*?[")
