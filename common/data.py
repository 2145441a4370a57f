"""Domains and presets -> deterministic token batches.

A *domain* is a named text source. `--data` takes a preset name or one or more sources, each optionally named
`name=SOURCE`:

    hf:ID[:CONFIG][:SPLIT][#FIELD[,FIELD...]][?key=value&...]   a Hugging Face dataset, streamed (needs hub access)
    path/to/file.{txt,jsonl,json,parquet,csv}[#FIELD...][?key=value&...]
    path/to/folder            every supported file below it (recursive, sorted, hidden entries skipped)
    'path/*.jsonl'            a glob (sorted; `**` recurses)
    demo:<domain>             one domain of the offline demo corpus (`common.corpus`)

Documents:
- `.txt`: one document per file. A text file is usually one coherent text (a book, a source file, an article);
  splitting on blank lines would cut code and prose into context-free fragments. Use `.jsonl` for many small
  documents.
- `.jsonl` / `.json` (a list of records, or of strings) / `.parquet` / `.csv`: one document per record, field
  "text" unless `#FIELD` says otherwise; `#a,b` joins several fields with newlines (e.g. question + answer); a
  field holding a list of strings is joined with newlines too. Dotted fields reach into nested records
  (`meta.pile_set_name`); a filter key missing from a record is also looked up in its `meta` dict (the Pile's
  layout).
- Filters `?key=value&key2=value2` keep the records whose fields equal the values (compared as strings, values
  percent-decoded). Several filters must all match.
- Empty and whitespace-only documents are skipped.

Order: sources are read in a fixed order (files sorted, datasets in stream order), then shuffled with the seed in
a bounded buffer (`shuffle_buffer` documents, at most 32 Mi characters), the way streaming datasets are shuffled:
the same seed gives the same documents in the same order; a source smaller than the buffer is fully shuffled.

Token accounting (SPEC "Token accounting"): see `token_batches`. Batches hold rows of one domain at a time, domains
in the order given, so each domain's data is read only once and stops being read as soon as its budget is met.
"""

from __future__ import annotations

import csv
import glob
import importlib
import json
import random
import re
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import torch
from tqdm import tqdm

from common.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

EXTENSIONS = (".txt", ".jsonl", ".json", ".parquet", ".csv")
DEFAULT_FIELD = "text"
DEFAULT_SHUFFLE_BUFFER = 1000  # documents; big enough to mix a source, small enough for books (see the char cap)
_SHUFFLE_BUFFER_CHARS = 32 * 2**20  # keeps a buffer of long documents (PG-19 books) to tens of MB
FILTER_SCAN_LIMIT = 100_000  # consecutive non-matching hub records before a filtered stream is given up
_ENCODE_CHUNK = 32  # documents per tokenizer call: the fast tokenizer batches them in Rust

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")
_HF_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_FILTERS_RE = re.compile(r"^[\w.-]+=[^&]*(&[\w.-]+=[^&]*)*$")
_SPLITS = ("train", "heldout")


class DataWarning(UserWarning):
    """Something about the data the user should know: a domain ran out, demo domains were skipped."""


@dataclass(frozen=True)
class Domain:
    """A named text source."""

    name: str
    source: str  # the spec it was built from (without the `name=` prefix)


# ------------------------------------------------------------------------------------------------ presets
# Hub-backed presets need Hugging Face Hub access at run time; resolving them (here) never touches the network.
# All of them stream, so only the documents actually tokenised are downloaded.

# A Pile copy whose records carry `meta.pile_set_name`. The uncopyrighted copy lacks five components (below):
# point PILE_DATASET at a full copy of the Pile to get them, or leave them out with --domains / --num_domains.
PILE_DATASET = "monology/pile-uncopyrighted"
PILE_ABSENT = frozenset({"Books3", "BookCorpus2", "OpenSubtitles", "YoutubeSubtitles", "OpenWebText2"})

# The 22 components, in the Pile paper's Table 1 order (largest first), except that the five absent from
# PILE_DATASET come last, so that `--num_domains N` picks components that have data.
PILE_COMPONENTS: tuple[tuple[str, str], ...] = (
    ("pile-cc", "Pile-CC"),
    ("pubmed-central", "PubMed Central"),
    ("arxiv", "ArXiv"),
    ("github", "Github"),
    ("freelaw", "FreeLaw"),
    ("stackexchange", "StackExchange"),
    ("uspto-backgrounds", "USPTO Backgrounds"),
    ("pubmed-abstracts", "PubMed Abstracts"),
    ("gutenberg-pg19", "Gutenberg (PG-19)"),
    ("wikipedia-en", "Wikipedia (en)"),
    ("dm-mathematics", "DM Mathematics"),
    ("ubuntu-irc", "Ubuntu IRC"),
    ("europarl", "EuroParl"),
    ("hackernews", "HackerNews"),
    ("philpapers", "PhilPapers"),
    ("nih-exporter", "NIH ExPorter"),
    ("enron-emails", "Enron Emails"),
    ("books3", "Books3"),
    ("openwebtext2", "OpenWebText2"),
    ("opensubtitles", "OpenSubtitles"),
    ("bookcorpus2", "BookCorpus2"),
    ("youtubesubtitles", "YoutubeSubtitles"),
)


def _pile(set_name: str) -> str:
    return f"hf:{PILE_DATASET}?pile_set_name={set_name}"


# name -> ((domain name, source spec), ...). "demo" is not listed: it depends on what the offline corpus finds.
PRESETS: dict[str, tuple[tuple[str, str], ...]] = {
    # The OLMoE paper's domain-specialization domains; the Pile supplies arXiv, GitHub and books (PG-19).
    "olmoe": (
        ("arxiv", _pile("ArXiv")),
        ("github", _pile("Github")),
        ("wikipedia", "hf:wikimedia/wikipedia:20231101.en"),
        ("books", _pile("Gutenberg (PG-19)")),
        ("c4", "hf:allenai/c4:en:validation"),
    ),
    "pile": tuple((name, _pile(set_name)) for name, set_name in PILE_COMPONENTS),
    # MoE Lens (DeepSeekMoE): English text, French question answering, grade-school math.
    "moe-lens": (
        ("english", "hf:wikimedia/wikipedia:20231101.en"),
        ("french-qa", "hf:AgentPublic/piaf:plain_text:train#context,question"),
        ("gsm8k", "hf:openai/gsm8k:main:train#question,answer"),
    ),
    # moe-router-study: pretraining web text, math and code.
    "router-study": (
        ("fineweb", "hf:HuggingFaceFW/fineweb:sample-10BT"),
        ("gsm8k", "hf:openai/gsm8k:main:train#question,answer"),
        ("math", "hf:DigitalLearningGmbH/MATH-lighteval#problem,solution"),
        ("aqua-rat", "hf:deepmind/aqua_rat:raw#question,options,rationale"),
        ("github-code", "hf:codeparrot/codeparrot-clean#content"),
        ("humaneval", "hf:openai/openai_humaneval::test#prompt,canonical_solution"),
    ),
}
PRESET_NAMES: tuple[str, ...] = ("demo", *PRESETS)


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


# ------------------------------------------------------------------------------------------------ local files
def _has_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _supported(path: Path) -> bool:
    return path.suffix.lower() in EXTENSIONS


def local_files(spec: LocalSpec) -> list[Path]:
    """The files of a local spec, sorted; InputError when there are none or one is unusable."""
    raw = spec.path
    path = Path(raw).expanduser()
    if _has_glob(raw) and not path.exists():
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        files = [p for p in matches if p.is_file() and _supported(p)]
        if not files:
            raise InputError(f"--data {raw!r}: the glob matches no {'/'.join(EXTENSIONS)} files")
        return _non_empty(files, raw)
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and _supported(p) and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise InputError(f"--data {raw!r}: the folder holds no {'/'.join(EXTENSIONS)} files")
        return _non_empty(files, raw)
    if not path.exists():
        raise InputError(f"--data {raw!r}: no such file or folder, and not a preset ({', '.join(PRESET_NAMES)})")
    if not _supported(path):
        raise InputError(f"--data {raw!r}: unsupported file type {path.suffix or '(none)'!r} (use {', '.join(EXTENSIONS)})")
    if path.stat().st_size == 0:
        raise InputError(f"--data {raw!r}: the file is empty")
    return [path]


def _non_empty(files: list[Path], raw: str) -> list[Path]:
    """Folders and globs may hold stray empty files: skip them, but not all of them."""
    kept = [p for p in files if p.stat().st_size > 0]
    if not kept:
        raise InputError(f"--data {raw!r}: all {len(files)} matching files are empty")
    return kept


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def _jsonl_records(path: Path) -> Iterator[Any]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e


def _json_records(path: Path) -> Iterator[Any]:
    try:
        value = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        hint = " (one JSON value per line? name the file .jsonl)" if e.msg == "Extra data" else ""
        raise InputError(f"{path}: invalid JSON ({e.msg}, line {e.lineno}){hint}") from e
    if isinstance(value, dict):
        yield value  # a single record
    elif isinstance(value, list):
        yield from value
    else:
        raise InputError(f"{path}: expected a JSON list of records or strings, got {type(value).__name__}")


def _parquet_records(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq  # lazy: only parquet users pay for it

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError variants for non-parquet bytes
        raise InputError(f"{path}: not a readable parquet file ({e})") from e
    with closing(pf):
        for batch in pf.iter_batches(batch_size=256):  # streamed: memory stays flat for large files
            yield from batch.to_pylist()


def _csv_records(path: Path) -> Iterator[dict[str, str]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # documents are long; the default limit is 128 KiB
    with path.open(encoding="utf-8", newline="") as f:
        yield from csv.DictReader(f)


def _file_records(path: Path) -> Iterator[Any]:
    """Records of one file: a str (whole .txt file), or JSON/parquet/CSV rows."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            yield _read_text(path)
        elif suffix == ".jsonl":
            yield from _jsonl_records(path)
        elif suffix == ".json":
            yield from _json_records(path)
        elif suffix == ".parquet":
            yield from _parquet_records(path)
        else:
            yield from _csv_records(path)
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e


# ------------------------------------------------------------------------------------------------ records -> text
_MISSING = object()


def _lookup(record: dict[str, Any], key: str) -> Any:
    """record[key], a dotted path ('meta.pile_set_name'), or record['meta'][key] (the Pile's layout)."""
    if key in record:
        return record[key]
    value: Any = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            value = _MISSING
            break
        value = value[part]
    if value is _MISSING and isinstance(record.get("meta"), dict):
        value = record["meta"].get(key, _MISSING)
    return value


def _field_text(record: dict[str, Any], name: str, where: str) -> str:
    value = _lookup(record, name)
    if value is _MISSING:
        raise InputError(f"{where}: no field {name!r} (fields: {', '.join(map(str, record))}); choose one with #FIELD")
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    raise InputError(f"{where}: field {name!r} holds {type(value).__name__}, not text; choose another with #FIELD")


def _matches(record: dict[str, Any], filters: tuple[tuple[str, str], ...], where: str) -> bool:
    for key, wanted in filters:
        value = _lookup(record, key)
        if value is _MISSING:
            raise InputError(f"{where}: filter key {key!r} is not a field (fields: {', '.join(map(str, record))})")
        if str(value) != wanted:
            return False
    return True


def _record_text(record: Any, fields: tuple[str, ...], where: str) -> str:
    if isinstance(record, str):  # a .txt file, or a JSON list of strings: the record is the document
        return record
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected records (objects) or strings, got {type(record).__name__}")
    return "\n".join(t for t in (_field_text(record, f, where) for f in fields) if t)


def _texts(
    records: Iterable[Any],
    fields: tuple[str, ...],
    filters: tuple[tuple[str, str], ...],
    where: str,
    scan_limit: int | None = None,
) -> Iterator[str]:
    """Documents of a record stream: filtered, field-selected, empty ones dropped."""
    misses = 0
    for record in records:
        if filters and not (isinstance(record, dict) and _matches(record, filters, where)):
            misses += 1
            if scan_limit is not None and misses >= scan_limit:
                warnings.warn(
                    f"{where}: {misses} records in a row failed the filters; giving up on this source",
                    DataWarning, stacklevel=2,
                )
                return
            continue
        misses = 0
        text = _record_text(record, fields, where)
        if text.strip():
            yield text


def _check_local(spec: LocalSpec, source: str) -> None:
    """Eager checks of a local source: files exist, are non-empty, and the first one has the fields asked for."""
    files = local_files(spec)
    records = [p for p in files if p.suffix.lower() != ".txt"]
    if not records:
        if spec.explicit_fields or spec.filters:
            raise InputError(f"--data {source!r}: .txt files hold one plain document each: no #FIELD or ?filters")
        return
    first = records[0]
    record = next(iter(_file_records(first)), None)
    if record is None:
        raise InputError(f"--data {source!r}: {first} holds no records")
    if isinstance(record, dict):
        for key, _ in spec.filters:
            _matches(record, ((key, ""),), str(first))  # raises if the key is not a field
        for name in spec.fields:
            _field_text(record, name, str(first))


# ------------------------------------------------------------------------------------------------ demo corpus
def _corpus() -> ModuleType:
    """The offline demo corpus, imported lazily (it pulls in its own text sources)."""
    try:
        return importlib.import_module("common.corpus")
    except ImportError as e:
        raise InputError(f"the offline demo corpus is unavailable ({e})") from e


def _demo_preset() -> list[Domain]:
    available, skipped = _corpus().available_demo_domains()
    if skipped:
        reasons = "; ".join(f"{name}: {why}" for name, why in skipped.items())
        warnings.warn(f"demo domains skipped: {reasons}", DataWarning, stacklevel=3)
    if not available:
        raise InputError("no demo domain is available (see the warning for why)")
    return [Domain(name, f"demo:{name}") for name in available]


def _check_demo(spec: DemoSpec, source: str) -> None:
    corpus = _corpus()
    if spec.name not in corpus.DEMO_DOMAINS:
        raise InputError(f"--data {source!r}: unknown demo domain (available: {', '.join(corpus.DEMO_DOMAINS)})")
    _, skipped = corpus.available_demo_domains()
    if spec.name in skipped:
        raise InputError(f"--data {source!r}: demo domain unavailable here: {skipped[spec.name]}")


# ------------------------------------------------------------------------------------------------ resolve_domains
def _slug(text: str) -> str:
    return re.sub(r"[^\w.+-]+", "-", text).strip("-._") or "data"


def _default_name(spec: SourceSpec) -> str:
    """A label for an unnamed source: the filter values, the dataset name, the file stem or the folder name."""
    if isinstance(spec, DemoSpec):
        return spec.name
    if spec.filters:
        return _slug("+".join(value for _, value in spec.filters))
    if isinstance(spec, HFSpec):
        return _slug(spec.dataset.rsplit("/", 1)[-1])
    path = Path(spec.path.rstrip("/\\"))
    if _has_glob(spec.path):
        stem = re.sub(r"[*?\[\]]", "", path.stem).strip("-._")
        return _slug(stem or _non_glob_parent(path).name)
    return _slug(path.stem if path.suffix.lower() in EXTENSIONS else path.name)


def _non_glob_parent(path: Path) -> Path:
    while _has_glob(str(path)) and path != path.parent:
        path = path.parent
    return path


def _check_source(spec: SourceSpec, source: str) -> None:
    """Checks that need no network: local files and the demo corpus (hub specs are checked by syntax only)."""
    if isinstance(spec, LocalSpec):
        _check_local(spec, source)
    elif isinstance(spec, DemoSpec):
        _check_demo(spec, source)


def _warn_absent_pile_components(domains: list[Domain]) -> None:
    for d in domains:
        if not d.source.startswith("hf:"):
            continue
        spec = parse_hf_spec(d.source)
        if spec.dataset == PILE_DATASET and any(k == "pile_set_name" and v in PILE_ABSENT for k, v in spec.filters):
            warnings.warn(
                f"domain {d.name!r}: {PILE_DATASET} lacks this Pile component, so it will get no text "
                "(point PILE_DATASET at a full copy of the Pile, or leave it out with --domains / --num_domains)",
                DataWarning, stacklevel=3,
            )


def _expand(item: str) -> list[Domain]:
    """One --data value -> its domains (a preset gives several)."""
    if item == "demo":
        return _demo_preset()
    if item in PRESETS:
        return [Domain(name, source) for name, source in PRESETS[item]]
    name, source = split_name(item)
    if source in PRESET_NAMES:
        raise InputError(f"--data {item!r}: a preset cannot be renamed; pick its domains with --domains")
    spec = parse_source(source)
    if isinstance(spec, LocalSpec) and re.fullmatch(r"[\w-]+", source) and not Path(source).exists():
        # A bare word is most likely a mistyped preset, so say that rather than "no such file".
        raise InputError(f"--data {item!r}: unknown preset (presets: {', '.join(PRESET_NAMES)}) and no such file")
    _check_source(spec, source)
    return [Domain(name or _default_name(spec), source)]


def _select(found: list[Domain], domains: Sequence[str] | None, num_domains: int | None) -> list[Domain]:
    if domains:
        by_name = {d.name: d for d in found}
        unknown = [n for n in domains if n not in by_name]
        if unknown:
            raise InputError(f"--domains: unknown {', '.join(unknown)} (available: {', '.join(by_name)})")
        found = [by_name[n] for n in dict.fromkeys(domains)]  # the user's order, duplicates dropped
    if num_domains is not None:
        if num_domains < 1:
            raise InputError(f"--num_domains must be at least 1, got {num_domains}")
        if num_domains > len(found):
            raise InputError(
                f"--num_domains {num_domains}: only {len(found)} domains available ({', '.join(d.name for d in found)})"
            )
        found = found[:num_domains]
    return found


def resolve_domains(
    data: str | Sequence[str],
    num_domains: int | None = None,
    domains: Sequence[str] | None = None,
) -> list[Domain]:
    """Turn `--data` values into named domains, checked eagerly (before any model work).

    Each value is a preset name (`demo`, `olmoe`, `pile`, `moe-lens`, `router-study`) or a source spec, optionally
    `name=SOURCE`; presets and sources may be mixed. `domains` keeps only the named domains (in that order),
    then `num_domains` keeps the first N. Domain names must be unique.
    """
    items = [data] if isinstance(data, str) else list(data)
    if not items:
        raise InputError("--data: give a preset or at least one source")
    found = [d for item in items for d in _expand(item.strip())]
    seen: dict[str, str] = {}
    for d in found:
        if d.name in seen:
            raise InputError(
                f"--data: two domains named {d.name!r} ({seen[d.name]!r} and {d.source!r}); name them with name=SOURCE"
            )
        seen[d.name] = d.source
    chosen = _select(found, domains, num_domains)
    _warn_absent_pile_components(chosen)
    return chosen


# ------------------------------------------------------------------------------------------------ documents
def _shuffled(items: Iterable[str], rng: random.Random, size: int) -> Iterator[str]:
    """Bounded-buffer shuffle (as for streaming datasets): memory holds at most `size` documents / 32 Mi chars."""
    if size <= 1:
        yield from items
        return
    buffer: list[str] = []
    chars = 0
    for item in items:
        buffer.append(item)
        chars += len(item)
        while len(buffer) > size or chars > _SHUFFLE_BUFFER_CHARS:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            out = buffer.pop()
            chars -= len(out)
            yield out
    rng.shuffle(buffer)
    yield from buffer


def _hf_documents(spec: HFSpec, source: str) -> Iterator[str]:
    import datasets  # lazy: slow to import, and only hub sources need it

    try:
        stream = datasets.load_dataset(spec.dataset, spec.config, split=spec.split, streaming=True)
    except (ConnectionError, FileNotFoundError, ValueError, RuntimeError, datasets.exceptions.DatasetNotFoundError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"--data {source!r}: cannot load from the Hugging Face Hub: {first_line}") from e
    yield from _texts(stream, spec.fields, spec.filters, source, scan_limit=FILTER_SCAN_LIMIT)


def _source_documents(spec: SourceSpec, source: str, split: str) -> Iterator[str]:
    if isinstance(spec, DemoSpec):
        yield from _corpus().demo_documents(spec.name, split)
    elif isinstance(spec, HFSpec):
        yield from _hf_documents(spec, source)
    else:
        for path in local_files(spec):
            yield from _texts(_file_records(path), spec.fields, spec.filters, str(path))


def iter_documents(
    domain: Domain,
    split: str = "train",
    seed: int = 0,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
) -> Iterator[str]:
    """The documents of a domain, in a deterministic order for `seed` (bounded-buffer shuffle; 0 = source order).

    `split` ("train" | "heldout") selects the demo corpus' part. Other sources have no held-out part of their
    own: an hf: source reads the split its spec names (default "train"), a local source all its documents.
    """
    if split not in _SPLITS:
        raise InputError(f"split must be one of {', '.join(_SPLITS)}, got {split!r}")
    spec = parse_source(domain.source)
    # Seeded by the source, not the name: renaming a domain keeps its order. str seeds hash stably (sha512).
    rng = random.Random(f"moescope:{seed}:{domain.source}")
    return _shuffled(_source_documents(spec, domain.source, split), rng, shuffle_buffer)


# ------------------------------------------------------------------------------------------------ batches
@dataclass
class Batch:
    """Rows of token windows from one domain, right-padded to the longest row."""

    input_ids: torch.Tensor  # [B, S] long, padded with the tokenizer's pad id (else EOS, else 0)
    attention_mask: torch.Tensor  # [B, S] long, 1 on real tokens
    count_mask: torch.Tensor  # [B, S] bool: the tokens that count (real, not special unless kept, within budget)
    domain_ids: torch.Tensor  # [B] long, index into the domains list
    doc_ids: torch.Tensor  # [B, S] long, document index within its domain (order of use); -1 on padding

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{k: v.to(device, non_blocking=True) for k, v in vars(self).items()})

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """What the model's forward takes."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    @property
    def num_counted(self) -> int:
        return int(self.count_mask.sum())


@dataclass
class DomainCount:
    """What one domain delivered."""

    counted: int = 0  # tokens inside count_mask
    documents: int = 0  # documents (at least partly) used
    windows: int = 0  # rows emitted
    complete: bool = False  # reached the requested num_tokens


@dataclass
class TokenReport:
    """Per-domain token totals, filled while batches are produced; `to_dict()` goes into run.json."""

    num_tokens: int
    seq_len: int
    pack: bool
    keep_special: bool
    seed: int
    split: str
    domains: dict[str, DomainCount] = field(default_factory=dict)

    @property
    def counted(self) -> dict[str, int]:
        return {name: c.counted for name, c in self.domains.items()}

    @property
    def incomplete(self) -> list[str]:
        """Domains that ran out of data before num_tokens."""
        return [name for name, c in self.domains.items() if not c.complete]

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_tokens_requested": self.num_tokens,
            "seq_len": self.seq_len,
            "pack": self.pack,
            "keep_special": self.keep_special,
            "seed": self.seed,
            "split": self.split,
            "domains": {name: vars(c).copy() for name, c in self.domains.items()},
        }


@dataclass(frozen=True)
class _Layout:
    """How the tokenizer frames a document, and which ids never count."""

    prefix: tuple[int, ...]  # prepended by the tokenizer's convention (e.g. BOS)
    suffix: tuple[int, ...]  # appended by it (e.g. EOS for T5-style tokenizers)
    eos: int | None
    pad: int
    special: torch.Tensor  # ids excluded from counts unless keep_special


def _layout(tokenizer: PreTrainedTokenizerBase) -> _Layout:
    # Find what add_special_tokens=True adds around a probe text, so that every window of a long document can be
    # framed the way the model saw sequences in training (BOS first), whatever the tokenizer's convention.
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    prefix: list[int] = []
    suffix: list[int] = []
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            prefix, suffix = full[:start], full[start + len(plain) :]
            break
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos if eos is not None else 0
    # UNK stands for real text the vocabulary cannot spell, so it counts like any text token.
    special = sorted({i for i in tokenizer.all_special_ids if i is not None} - {tokenizer.unk_token_id})
    return _Layout(tuple(prefix), tuple(suffix), eos, pad, torch.tensor(special, dtype=torch.long))


@dataclass
class _Row:
    ids: torch.Tensor
    count: torch.Tensor
    docs: torch.Tensor


class TokenBatches(Iterator[Batch]):
    """The iterator `token_batches` returns; `.report` holds the per-domain totals so far (final once exhausted)."""

    def __init__(
        self,
        domains: list[Domain],
        tokenizer: PreTrainedTokenizerBase,
        *,
        num_tokens: int,
        seq_len: int,
        batch_size: int,
        seed: int,
        keep_special: bool,
        pack: bool,
        split: str,
        progress: bool,
        shuffle_buffer: int,
    ) -> None:
        # Validate now, not at the first next(): errors must surface before any model work.
        if not domains:
            raise InputError("no domains to read")
        if num_tokens <= 0:
            raise InputError(f"--num_tokens must be positive, got {num_tokens}")
        if batch_size < 1:
            raise InputError(f"--batch_size must be at least 1, got {batch_size}")
        if split not in _SPLITS:
            raise InputError(f"split must be one of {', '.join(_SPLITS)}, got {split!r}")
        self.layout = _layout(tokenizer)
        if seq_len < 1 or (not pack and seq_len <= len(self.layout.prefix)):
            raise InputError(
                f"--seq_len {seq_len} leaves no room for text after the tokenizer's "
                f"{len(self.layout.prefix)} leading special tokens"
            )
        if pack and self.layout.eos is None:
            raise InputError("--pack separates documents with EOS, but the tokenizer has no EOS token")
        self.domains, self.tokenizer = domains, tokenizer
        self.num_tokens, self.seq_len, self.batch_size = num_tokens, seq_len, batch_size
        self.seed, self.keep_special, self.pack, self.split = seed, keep_special, pack, split
        self.progress, self.shuffle_buffer = progress, shuffle_buffer
        self.report = TokenReport(num_tokens, seq_len, pack, keep_special, seed, split)
        self._gen = self._generate()

    def __iter__(self) -> TokenBatches:
        return self

    def __next__(self) -> Batch:
        return next(self._gen)

    # -- documents -> token lists
    def _encoded(self, domain: Domain) -> Iterator[list[int]]:
        """Token ids of each document, without special tokens (the layout adds them)."""
        docs = iter_documents(domain, self.split, self.seed, self.shuffle_buffer)
        while chunk := [doc for _, doc in zip(range(_ENCODE_CHUNK), docs, strict=False)]:
            encoded = self.tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
            yield from (list(ids) for ids in encoded if len(ids))

    # -- token lists -> windows (ids, document index per token)
    def _windows(self, domain: Domain) -> Iterator[tuple[list[int], list[int]]]:
        prefix, suffix = list(self.layout.prefix), list(self.layout.suffix)
        if self.pack:
            yield from self._packed(domain, prefix, suffix)
            return
        room = self.seq_len - len(prefix)
        for doc, body in enumerate(self._encoded(domain)):
            tokens = body + suffix
            for start in range(0, len(body), room):  # starts inside the body: no window of suffix tokens alone
                chunk = prefix + tokens[start : start + room]
                yield chunk, [doc] * len(chunk)

    def _packed(self, domain: Domain, prefix: list[int], suffix: list[int]) -> Iterator[tuple[list[int], list[int]]]:
        """Documents framed as the tokenizer would, joined by EOS, cut into full windows (the last may be short)."""
        separator = [] if suffix[-1:] == [self.layout.eos] else [self.layout.eos]
        ids: list[int] = []
        docs: list[int] = []
        for doc, body in enumerate(self._encoded(domain)):
            piece = prefix + body + suffix + separator
            ids += piece
            docs += [doc] * len(piece)
            while len(ids) >= self.seq_len:
                yield ids[: self.seq_len], docs[: self.seq_len]
                del ids[: self.seq_len], docs[: self.seq_len]
        if ids:
            yield ids, docs

    # -- windows -> rows with the exact budget
    def _rows(self, domain: Domain, count: DomainCount, bar: tqdm) -> Iterator[_Row]:
        with closing(self._windows(domain)) as windows:
            for window, doc_index in windows:
                ids = torch.tensor(window, dtype=torch.long)
                counts = torch.ones_like(ids, dtype=torch.bool)
                if not self.keep_special:
                    counts &= ~torch.isin(ids, self.layout.special)
                n = int(counts.sum())
                if n == 0:
                    continue
                remaining = self.num_tokens - count.counted
                if n >= remaining:
                    # Cut the window right after the last token that fits: the total is exact, and the
                    # cut-off tail (never counted) costs no compute.
                    end = int(counts.nonzero()[remaining - 1]) + 1
                    ids, counts, doc_index, n = ids[:end], counts[:end], doc_index[:end], remaining
                count.counted += n
                count.windows += 1
                count.documents = max(count.documents, doc_index[-1] + 1)
                bar.update(n)
                yield _Row(ids, counts, torch.tensor(doc_index, dtype=torch.long))
                if count.counted == self.num_tokens:
                    count.complete = True
                    return

    def _collate(self, rows: list[_Row], domain_index: int) -> Batch:
        width = max(len(r.ids) for r in rows)
        shape = (len(rows), width)
        batch = Batch(
            input_ids=torch.full(shape, self.layout.pad, dtype=torch.long),
            attention_mask=torch.zeros(shape, dtype=torch.long),
            count_mask=torch.zeros(shape, dtype=torch.bool),
            domain_ids=torch.full((len(rows),), domain_index, dtype=torch.long),
            doc_ids=torch.full(shape, -1, dtype=torch.long),
        )
        for i, r in enumerate(rows):
            n = len(r.ids)
            batch.input_ids[i, :n] = r.ids
            batch.attention_mask[i, :n] = 1
            batch.count_mask[i, :n] = r.count
            batch.doc_ids[i, :n] = r.docs
        return batch

    def _generate(self) -> Iterator[Batch]:
        total = self.num_tokens * len(self.domains)
        with tqdm(total=total, unit="tok", unit_scale=True, disable=not self.progress, desc="tokens") as bar:
            for d, domain in enumerate(self.domains):
                bar.set_postfix_str(domain.name)
                count = self.report.domains[domain.name] = DomainCount()
                rows: list[_Row] = []
                for row in self._rows(domain, count, bar):
                    rows.append(row)
                    if len(rows) == self.batch_size:
                        yield self._collate(rows, d)
                        rows = []
                if rows:
                    yield self._collate(rows, d)
                if not count.complete:
                    warnings.warn(
                        f"domain {domain.name!r} ran out of data: {count.counted} of {self.num_tokens} tokens "
                        f"({count.documents} documents)",
                        DataWarning, stacklevel=2,
                    )


def token_batches(
    domains: list[Domain],
    tokenizer: PreTrainedTokenizerBase,
    *,
    num_tokens: int,
    seq_len: int = 512,
    batch_size: int = 8,
    seed: int = 0,
    keep_special: bool = False,
    pack: bool = False,
    split: str = "train",
    progress: bool = True,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
) -> TokenBatches:
    """Deterministic batches of token windows with exactly `num_tokens` counted tokens per domain.

    - Each document is framed by the tokenizer's own convention (e.g. BOS first); special tokens never count
      unless `keep_special`, padding never counts.
    - Without `pack`, windows of at most `seq_len` tokens never cross documents; every window of a long document
      starts with the tokenizer's leading specials (BOS), so each looks like a fresh sequence to the model.
      With `pack`, documents are joined by EOS and cut into full `seq_len` windows (the last may be shorter).
    - Each domain stops exactly at `num_tokens` counted tokens: the last window is cut after the last token that
      fits. A domain that runs out yields fewer, with a `DataWarning`; `.report` of the returned iterator records
      every domain's totals (for run.json).
    - A batch holds rows of one domain (domains in order), padded on the right to its longest row (<= seq_len);
      a domain's last batch may hold fewer than `batch_size` rows.
    - Document order: `iter_documents(domain, split, seed, shuffle_buffer)`.
    """
    return TokenBatches(
        domains, tokenizer, num_tokens=num_tokens, seq_len=seq_len, batch_size=batch_size, seed=seed,
        keep_special=keep_special, pack=pack, split=split, progress=progress, shuffle_buffer=shuffle_buffer,
    )
