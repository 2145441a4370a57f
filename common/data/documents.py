"""Documents: `iter_documents` reads a domain's documents (local files, Hugging Face streams, demo corpus) in a
deterministic order: source order, then a seeded bounded-buffer shuffle (see the package docstring)."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from pathlib import Path

from common.data.domains import Domain, _demo_documents
from common.data.readers import _file_records, _texts, local_files
from common.data.sources import DemoSpec, HFSpec, LocalSpec, SourceSpec, URLSpec, parse_source
from common.data.urls import fetch
from common.errors import InputError

DEFAULT_SHUFFLE_BUFFER = 1000  # documents; big enough to mix a source, small enough for books (see the char cap)
_SHUFFLE_BUFFER_CHARS = 32 * 2**20  # keeps a buffer of long documents (PG-19 books) to tens of MB
FILTER_SCAN_LIMIT = 100_000  # consecutive non-matching hub records before a filtered stream is given up
_SPLITS = ("train", "heldout")


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
    yield from _texts(stream, spec.fields, spec.filters, source, scan_limit=FILTER_SCAN_LIMIT, rows=spec.rows)


def _source_documents(spec: SourceSpec, source: str, split: str) -> Iterator[str]:
    if isinstance(spec, DemoSpec):
        yield from _demo_documents(spec.name, split)
    elif isinstance(spec, HFSpec):
        yield from _hf_documents(spec, source)
    elif isinstance(spec, URLSpec):
        path = fetch(spec.url)
        yield from _texts(_file_records(path), spec.fields, spec.filters, spec.url, rows=spec.rows)
    elif spec.rows is not None:  # the row range counts the records of all the source's files, in sorted order
        records = (record for path in local_files(spec) for record in _file_records(path))
        yield from _texts(records, spec.fields, spec.filters, spec.path, rows=spec.rows)
    else:
        for path in local_files(spec):
            yield from _texts(_file_records(path), spec.fields, spec.filters, str(path))


def _order_key(spec: SourceSpec, source: str) -> str:
    """What seeds a domain's document order: its source, not its name (renaming a domain keeps its order), with a
    local path cut to its last component, so that the same files give the same order wherever they are mounted
    (another machine, another user's home, a test's temporary folder)."""
    if isinstance(spec, LocalSpec):
        return source.replace(spec.path, Path(spec.path).name, 1)
    return source


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
    rng = random.Random(f"moescope:{seed}:{_order_key(spec, domain.source)}")  # str seeds hash stably (sha512)
    return _shuffled(_source_documents(spec, domain.source, split), rng, shuffle_buffer)
