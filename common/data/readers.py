"""Local sources -> documents: the files of a path/folder/glob, their records (.txt, .jsonl, .json, .parquet,
.csv), and the documents of a record stream (filters, `#FIELD` selection, empty documents dropped).
"""

from __future__ import annotations

import csv
import glob
import itertools
import json
import sys
import warnings
from collections.abc import Iterable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

from common.data.presets import PRESET_NAMES
from common.data.sources import (
    COMPRESSIONS,
    EXTENSIONS,
    SQUAD,
    DataWarning,
    LocalSpec,
    _has_glob,
    supported_name,
)
from common.errors import InputError


# ------------------------------------------------------------------------------------------------ local files
def _supported(path: Path) -> bool:
    return supported_name(path.name)


def _format(path: Path) -> tuple[str, str]:
    """(format suffix, compression suffix or '') of a supported file: 'a.jsonl.zst' -> ('.jsonl', '.zst')."""
    suffixes = [x.lower() for x in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        return (suffixes[-2] if len(suffixes) > 1 else ""), suffixes[-1]
    return path.suffix.lower(), ""


def open_binary(path: Path):
    """The file's bytes, decompressed (.gz, .bz2, .xz, .zst)."""
    compression = _format(path)[1]
    if compression == ".gz":
        import gzip

        return gzip.open(path, "rb")
    if compression == ".bz2":
        import bz2

        return bz2.open(path, "rb")
    if compression == ".xz":
        import lzma

        return lzma.open(path, "rb")
    if compression == ".zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb")


def open_text(path: Path):
    import io

    return io.TextIOWrapper(open_binary(path), encoding="utf-8", newline="")


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
        raise InputError(f"--data {raw!r}: unsupported file type {path.suffix or '(none)'!r} (use {', '.join(EXTENSIONS)}; "
                         f"the text ones optionally compressed: {', '.join(COMPRESSIONS)})")
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
        with open_text(path) as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def _jsonl_records(path: Path) -> Iterator[Any]:
    with open_text(path) as f:
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
    with open_text(path) as f:
        yield from csv.DictReader(f)


def _file_records(path: Path) -> Iterator[Any]:
    """Records of one file: a str (whole .txt file), or JSON/parquet/CSV rows."""
    suffix = _format(path)[0]
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


def _squad_records(records: Iterable[Any], where: str) -> Iterator[str]:
    """The SQuAD layout as documents: each context followed by its questions, one per line (answers dropped).

    Nested SQuAD JSON ({"data": [{"paragraphs": [{"context", "qas": [{"question"}]}]}]}, as FQuAD and SQuAD ship)
    gives one document per paragraph; flat records with `context` and `question` (one row per question, as the hub
    copies hold them) are grouped by consecutive equal contexts."""
    context, questions = None, []
    for record in records:
        if isinstance(record, dict) and isinstance(record.get("data"), list):  # nested: a whole file
            for article in record["data"]:
                for paragraph in article.get("paragraphs", []) if isinstance(article, dict) else []:
                    asked = [qa.get("question", "").strip() for qa in paragraph.get("qas", []) if isinstance(qa, dict)]
                    yield "\n".join([paragraph.get("context", "").strip(), *(q for q in asked if q)])
            continue
        if not (isinstance(record, dict) and "context" in record and "question" in record):
            fields = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
            raise InputError(f"{where}: #squad needs SQuAD records (a 'data' list, or 'context' and 'question' "
                             f"fields); found {fields}")
        if record["context"] != context:
            if context is not None:
                yield "\n".join([context.strip(), *questions])
            context, questions = record["context"], []
        if str(record["question"]).strip():
            questions.append(str(record["question"]).strip())
    if context is not None:
        yield "\n".join([context.strip(), *questions])


def _texts(
    records: Iterable[Any],
    fields: tuple[str, ...],
    filters: tuple[tuple[str, str], ...],
    where: str,
    scan_limit: int | None = None,
    rows: tuple[int | None, int | None] | None = None,
) -> Iterator[str]:
    """Documents of a record stream: the rows kept (`[START:STOP]`, in record order), filtered, field-selected (or
    the SQuAD layout), empty ones dropped."""
    if rows is not None:
        records = itertools.islice(records, rows[0], rows[1])
    if fields == (SQUAD,):
        if filters:
            records = (r for r in records if isinstance(r, dict) and _matches(r, filters, where))
        yield from (text for text in _squad_records(records, where) if text.strip())
        return
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


def _check_text_file(path: Path, source: str) -> None:
    """A text-format file must start as UTF-8 text: a binary file is refused before any model work."""
    with open_binary(path) as f:
        head = f.read(8192)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 4:  # not just a multi-byte character cut by the 8 KiB window
            raise InputError(f"--data {source!r}: {path} is not UTF-8 text (byte {err.start}); is it a binary file?") from None
    if b"\x00" in head:
        raise InputError(f"--data {source!r}: {path} is not text (it contains NUL bytes); is it a binary file?")


def _check_local(spec: LocalSpec, source: str) -> None:
    """Eager checks of a local source: files exist, are non-empty, and the first one has the fields asked for."""
    check_files(local_files(spec), spec, source)


def check_files(files: list[Path], spec: Any, source: str) -> None:
    """The checks of `_check_local` on given files (a local source's, or a URL's cached copy)."""
    for path in files:
        if _format(path)[0] != ".parquet":
            _check_text_file(path, source)
    records = [p for p in files if _format(p)[0] != ".txt"]
    if not records:
        if spec.explicit_fields or spec.filters:
            raise InputError(f"--data {source!r}: .txt files hold one plain document each: no #FIELD or ?filters")
        return
    first = records[0]
    record = next(iter(_file_records(first)), None)
    if record is None:
        raise InputError(f"--data {source!r}: {first} holds no records")
    if spec.fields == (SQUAD,):
        next(_squad_records([record], str(first)), None)  # raises unless the layout is SQuAD's
        return
    if isinstance(record, dict):
        for key, _ in spec.filters:
            _matches(record, ((key, ""),), str(first))  # raises if the key is not a field
        for name in spec.fields:
            _field_text(record, name, str(first))
