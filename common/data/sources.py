"""The `--data` source grammar: `hf:ID[:CONFIG][:SPLIT][#FIELD,...][?key=value&...]`, local paths/globs and
`https://` URLs with the same suffixes, each optionally ending in `[START:STOP]` (the records kept), `#squad` (the
SQuAD layout), `demo:<domain>`, and `name=SOURCE` (see the package docstring). Syntax only: nothing is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from common.errors import InputError

EXTENSIONS = (".txt", ".jsonl", ".json", ".parquet", ".csv")
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")  # of the text formats (parquet compresses itself)
DEFAULT_FIELD = "text"
SQUAD = "squad"  # `#squad`: the SQuAD layout, each context followed by its questions (answers dropped)
_ROWS_RE = re.compile(r"\[(\d*):(\d*)\]$")

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")
_HF_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_FILTERS_RE = re.compile(r"^[\w.-]+=[^&]*(&[\w.-]+=[^&]*)*$")


class DataWarning(UserWarning):
    """Something about the data the user should know: a domain ran out, demo domains were skipped."""


# ------------------------------------------------------------------------------------------------ source specs
Rows = tuple[int | None, int | None] | None  # `[START:STOP]`: the records kept, in file order (None: all)


@dataclass(frozen=True)
class HFSpec:
    """`hf:ID[:CONFIG][:SPLIT][#FIELD,...][?key=value&...][[START:STOP]]`."""

    dataset: str
    config: str | None = None
    split: str = "train"
    fields: tuple[str, ...] = (DEFAULT_FIELD,)
    filters: tuple[tuple[str, str], ...] = ()
    rows: Rows = None


@dataclass(frozen=True)
class LocalSpec:
    """A file, folder or glob, with optional `#FIELD,...`, `?key=value&...` and `[START:STOP]`."""

    path: str
    fields: tuple[str, ...] = (DEFAULT_FIELD,)
    filters: tuple[tuple[str, str], ...] = ()
    explicit_fields: bool = False  # `#FIELD` was given (an error for .txt files, which have no fields)
    rows: Rows = None


@dataclass(frozen=True)
class URLSpec:
    """`https://…/FILE[#FIELD,...[?key=value&...]][[START:STOP]]`: a file downloaded once into the cache
    (`common.data.urls`). The URL keeps its own query; `#` (a fragment, never sent) starts the fields."""

    url: str
    fields: tuple[str, ...] = (DEFAULT_FIELD,)
    filters: tuple[tuple[str, str], ...] = ()
    explicit_fields: bool = False
    rows: Rows = None


@dataclass(frozen=True)
class DemoSpec:
    """`demo:<domain>`: one domain of the offline demo corpus."""

    name: str


SourceSpec = HFSpec | LocalSpec | URLSpec | DemoSpec


def supported_name(name: str) -> bool:
    """Whether a file name has a readable format: a text format, optionally compressed, or parquet."""
    lower = name.lower()
    for compression in ("", *COMPRESSIONS):
        if lower.endswith(compression) and any(
            lower[: len(lower) - len(compression)].endswith(ext) for ext in EXTENSIONS
            if not (compression and ext == ".parquet")
        ):
            return True
    return False


def _split_rows(text: str, source: str) -> tuple[str, Rows]:
    """'spec[START:STOP]' -> ('spec', (START, STOP)); no slice -> (text, None)."""
    match = _ROWS_RE.search(text)
    if not match:
        return text, None
    start, stop = (int(x) if x else None for x in match.groups())
    if start is not None and stop is not None and stop <= start:
        raise InputError(f"--data {source!r}: empty row range [{start}:{stop}]")
    return text[: match.start()], (start, stop)


def parse_url_spec(source: str) -> URLSpec:
    """Parse a URL source (syntax only: nothing is downloaded)."""
    base, rows = _split_rows(source, source)
    url, hash_, rest = base.partition("#")
    fields, query = (rest.partition("?")[0], rest.partition("?")[2] or None) if hash_ else (None, None)
    from common.data.urls import file_name

    if not urlparse(url).netloc:
        raise InputError(f"--data {source!r}: not a URL (https://HOST/PATH/FILE)")
    if not supported_name(file_name(url)):
        raise InputError(f"--data {source!r}: the URL's file {file_name(url)!r} is not a supported format "
                         f"({', '.join(EXTENSIONS)}, the text ones optionally {', '.join(COMPRESSIONS)})")
    return URLSpec(url=url, fields=_parse_fields(fields, source), filters=_parse_filters(query, source),
                   explicit_fields=fields is not None, rows=rows)


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
    body, rows = _split_rows(source[3:], source)
    path, fields, query = _split_suffixes(body)
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
        rows=rows,
    )


def _parse_local(source: str) -> LocalSpec:
    # An existing path is taken literally, so files whose names contain '#' or '?' still work.
    if Path(source).expanduser().exists():
        return LocalSpec(path=source)
    whole, rows = source, None
    if _ROWS_RE.search(source):
        source, rows = _split_rows(source, whole)
        if Path(source).expanduser().exists():
            return LocalSpec(path=source, rows=rows)
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
        rows=rows,
    )


def parse_source(source: str) -> SourceSpec:
    """Classify and parse one source spec (syntax only; files are checked by `resolve_domains`)."""
    source = source.strip()
    if not source:
        raise InputError("--data: empty source")
    if source.startswith("hf:"):
        return parse_hf_spec(source)
    if source.startswith(("https://", "http://")):
        return parse_url_spec(source)
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
