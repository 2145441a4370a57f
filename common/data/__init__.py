"""Domains and presets -> deterministic token batches.

A *domain* is a named text source. `--data` takes a preset name or one or more sources, each optionally named
`name=SOURCE`:

    hf:ID[:CONFIG][:SPLIT][#FIELD[,FIELD...]][?key=value&...]   a Hugging Face dataset, streamed (needs hub access)
    path/to/file.{txt,jsonl,json,parquet,csv}[#FIELD...][?key=value&...]
    path/to/folder            every supported file below it (recursive, sorted, hidden entries skipped)
    'path/*.jsonl'            a glob (sorted; `**` recurses)
    https://HOST/PATH/FILE.jsonl.gz[#FIELD...[?key=value&...]]   a file downloaded once into a checksummed cache
                              (`common.data.urls`; the URL keeps its own query, `#` starts the fields)
    demo:<domain>             one domain of the offline demo corpus (`common.corpus`)

Any file or hub source may end in `[START:STOP]`: only those records, in file order (the first five books of a
shard: `...parquet#TEXT[:5]`). The text formats may be compressed (`.gz`, `.bz2`, `.xz`, `.zst`). `#squad` reads
the SQuAD layout: each context followed by its questions (answers dropped), from nested SQuAD JSON (FQuAD's
valid.json) or from flat records with `context` and `question` (the hub's copies, consecutive rows grouped).

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
the same seed gives the same documents in the same order; a source smaller than the buffer is fully shuffled. The
order is seeded by the source (a local path by its last component only, so moving the files keeps the order).

Token accounting (docs/METRICS.md#conventions, "Counted tokens"): see `token_batches`. Batches hold rows of one domain at a time, domains
in the order given, so each domain's data is read only once and stops being read as soon as its budget is met.

Layout of the package (each module imports only those listed above it):
    sources.py    the source spec grammar (`parse_source`, `HFSpec`/`LocalSpec`/`URLSpec`/`DemoSpec`, `split_name`),
                  `DataWarning`
    urls.py       URL sources: the download cache (`fetch`, `cached`)
    presets.py    the named presets (`PRESETS`, the Pile components, `PROVENANCE`: exact or stand-in)
    readers.py    local files -> records -> documents (file formats, fields, filters)
    domains.py    `Domain`, `resolve_domains` (eager checks; `check_data`: the same, quietly, for the flag stage),
                  the offline demo corpus
    documents.py  `iter_documents`: a domain's documents in a seeded, bounded-buffer shuffled order
    framing.py    `special_frame`: the special tokens a tokenizer puts around a text (torch-free, for early checks)
    batches.py    `token_batches`: documents -> token windows -> `Batch`es with exact budgets (`TokenReport`);
                  `check_batching`: its flags against the tokenizer alone

Tests that patch a module-level name (`FILTER_SCAN_LIMIT`, `_corpus`) must patch it in the module that
defines it (`common.data.documents`, `common.data.domains`): the names re-exported here are copies.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Each name is imported from its module on first use (PEP 562): every module here but `batches` is free of torch, so
# the data specs are checked at the flag stage (`common.cli.flags.data_spec`, through `domains`) before torch is
# loaded; only a name of `batches` (Batch, token_batches, ...) brings torch in.
_WHERE = {
    "batches": ("Batch", "DomainCount", "TokenBatches", "TokenReport", "check_batching", "token_batches"),
    "documents": ("DEFAULT_SHUFFLE_BUFFER", "FILTER_SCAN_LIMIT", "iter_documents"),
    "domains": ("Domain", "check_data", "check_hub_sources", "resolve_domains"),
    "presets": ("PILE_ABSENT", "PILE_COMPONENTS", "PILE_DATASET", "PRESET_NAMES", "PRESETS"),
    "readers": ("local_files",),
    "sources": ("DEFAULT_FIELD", "EXTENSIONS", "DataWarning", "DemoSpec", "HFSpec", "LocalSpec", "SourceSpec",
                "parse_hf_spec", "parse_source", "split_name"),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}

if TYPE_CHECKING:
    from common.data.batches import (
        Batch,
        DomainCount,
        TokenBatches,
        TokenReport,
        check_batching,
        token_batches,
    )
    from common.data.documents import DEFAULT_SHUFFLE_BUFFER, FILTER_SCAN_LIMIT, iter_documents
    from common.data.domains import Domain, check_data, check_hub_sources, resolve_domains
    from common.data.presets import PILE_ABSENT, PILE_COMPONENTS, PILE_DATASET, PRESET_NAMES, PRESETS
    from common.data.readers import local_files
    from common.data.sources import (
        DEFAULT_FIELD,
        EXTENSIONS,
        DataWarning,
        DemoSpec,
        HFSpec,
        LocalSpec,
        SourceSpec,
        parse_hf_spec,
        parse_source,
        split_name,
    )


def __getattr__(name: str) -> object:
    """A public name, imported from its module on first use (then cached in this package's namespace)."""
    module = _MODULE_OF.get(name)
    if module is None:  # AttributeError lets `from common.data import documents` import the submodule instead
        raise AttributeError(f"module 'common.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"common.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "DEFAULT_FIELD",
    "DEFAULT_SHUFFLE_BUFFER",
    "EXTENSIONS",
    "FILTER_SCAN_LIMIT",
    "PILE_ABSENT",
    "PILE_COMPONENTS",
    "PILE_DATASET",
    "PRESETS",
    "PRESET_NAMES",
    "Batch",
    "DataWarning",
    "DemoSpec",
    "Domain",
    "DomainCount",
    "HFSpec",
    "LocalSpec",
    "SourceSpec",
    "TokenBatches",
    "TokenReport",
    "check_batching",
    "check_data",
    "check_hub_sources",
    "iter_documents",
    "local_files",
    "parse_hf_spec",
    "parse_source",
    "resolve_domains",
    "split_name",
    "token_batches",
]
