"""Domains: `resolve_domains` turns `--data` values (presets and source specs) into named `Domain`s, checked
eagerly (local files, demo corpus; hub specs by syntax only), before any model work. Also the bridge to the
offline demo corpus (`common.corpus`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from common import hub
from common.data import urls
from common.data.presets import PIAF, PILE_ABSENT, PILE_DATASET, PRESET_NAMES, PRESETS, STAND_INS
from common.data.readers import _check_local, check_files
from common.data.sources import (
    EXTENSIONS,
    DataWarning,
    DemoSpec,
    HFSpec,
    LocalSpec,
    SourceSpec,
    URLSpec,
    _has_glob,
    parse_hf_spec,
    parse_source,
    split_name,
)
from common.errors import InputError


@dataclass(frozen=True)
class Domain:
    """A named text source."""

    name: str
    source: str  # the spec it was built from (without the `name=` prefix)


# ------------------------------------------------------------------------------------------------ demo corpus
def _corpus() -> ModuleType:
    """The offline demo corpus, imported lazily (it pulls in its own text sources)."""
    try:
        from common import corpus
    except ImportError as e:
        raise InputError(f"the offline demo corpus is unavailable ({e})") from e
    return corpus


def _demo_documents(name: str, split: str) -> Iterator[str]:
    # Kept next to `_corpus` (and used by `common.data.documents`), so that every use of the corpus goes through
    # this module's `_corpus`: one place to fake it in tests.
    return _corpus().demo_documents(name, split)


# Which demo domains this installation has, per `available_demo_domains` function: finding the licence texts scans
# every installed package's file list (~1-2 s), and a run asks twice (its flags are checked before torch is imported,
# then the pipeline resolves the domains). Keyed by the function, so a faked corpus (tests) is asked afresh.
_AVAILABLE: dict[Callable[[], tuple[list[str], dict[str, str]]], tuple[list[str], dict[str, str]]] = {}


def _available_demo_domains() -> tuple[list[str], dict[str, str]]:
    """(available demo domains, {skipped domain: reason}), found once per process."""
    find = _corpus().available_demo_domains
    if find not in _AVAILABLE:
        _AVAILABLE[find] = find()
    available, skipped = _AVAILABLE[find]
    return list(available), dict(skipped)


def _demo_preset() -> list[Domain]:
    available, skipped = _available_demo_domains()
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
    _, skipped = _available_demo_domains()
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
    if isinstance(spec, URLSpec):
        return _slug(urls.file_name(spec.url).split(".")[0])
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
    """Checks of local files and the demo corpus, and of a URL's file once it is in the download cache (hub specs,
    and URLs not cached yet, are checked by syntax only here: `check_hub_sources` fetches them before any weight)."""
    if isinstance(spec, LocalSpec):
        _check_local(spec, source)
    elif isinstance(spec, DemoSpec):
        _check_demo(spec, source)
    elif isinstance(spec, URLSpec) and (path := urls.cached(spec.url)) is not None:
        check_files([path], spec, source)


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


def _expand(item: str, layouts: dict[str, str] | None = None) -> list[Domain]:
    """One --data value -> its domains (a preset gives several). `layouts`: domain name -> the layout suffix a
    `name=PATH` replacing that preset domain is read in (FQuAD's valid.json for moe-lens' french-qa: `#squad`)."""
    if item == "demo":
        return _demo_preset()
    if item in PRESETS:
        return [Domain(name, source) for name, source in PRESETS[item]]
    name, source = split_name(item)
    if source in PRESET_NAMES:
        raise InputError(f"--data {item!r}: a preset cannot be renamed; pick its domains with --domains")
    if name and layouts and name in layouts and "#" not in source:
        source += layouts[name]
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
    items = [item.strip() for item in ([data] if isinstance(data, str) else list(data))]
    if not items:
        raise InputError("--data: give a preset or at least one source")
    # A preset's stand-in domain may be given its study's own file: `--data moe-lens french-qa=PATH/valid.json`.
    replaceable = {domain: layout for preset in items if preset in PRESETS
                   for (name, domain), layout in STAND_INS.items() if name == preset}
    found = [d for item in items for d in _expand(item, replaceable)]
    given = {d.name: d for d in found if d.name in replaceable and d.source not in _stand_in_sources()}
    found = [given.get(d.name, d) if d.source in _stand_in_sources() else d for d in found]  # in the preset's place
    found = [d for i, d in enumerate(found) if d.name not in given or found.index(d) == i]
    seen: dict[str, str] = {}
    for d in found:
        if d.name in seen:
            raise InputError(
                f"--data: two domains named {d.name!r} ({seen[d.name]!r} and {d.source!r}); name them with name=SOURCE"
            )
        seen[d.name] = d.source
    chosen = _select(found, domains, num_domains)
    _warn_absent_pile_components(chosen)
    if any(d.source == PIAF for d in chosen):
        warnings.warn("french-qa: PIAF stands in for MoE Lens' FQuAD (its validation set needs a manual download; "
                      "give it with --data moe-lens french-qa=PATH/valid.json)", DataWarning, stacklevel=2)
    return chosen


def _stand_in_sources() -> set[str]:
    return {source for (preset, name) in STAND_INS for domain, source in PRESETS[preset] if domain == name}


def check_data(data: str | Sequence[str], num_domains: int | None = None, domains: Sequence[str] | None = None) -> None:
    """`resolve_domains`' checks alone (files, presets, domain names, --num_domains), quietly: for the flag stage,
    before torch is imported. Its warnings (skipped demo domains, absent Pile components) come once, when the run
    resolves its domains. Hub datasets are checked by syntax only here: the hub probe comes with the run."""
    if data in ("demo", ["demo"], ("demo",)) and num_domains is None and not domains:
        # The default: nothing to check but that some demo domain is available, which takes a survey of the
        # installed packages (1-2 s): left to the run, after the model's checks, so that a typo does not pay it.
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        resolve_domains(data, num_domains=num_domains, domains=domains)


def check_hub_sources(domains: Sequence[Domain]) -> None:
    """Refuse hub sources at once when the hub cannot be reached (one quick probe instead of minutes of retries).

    With HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, the datasets cache is used as is.
    """
    for domain in domains:  # URL files: downloaded into the cache now (or found there), then checked as files
        spec = parse_source(domain.source)
        if isinstance(spec, URLSpec):
            check_files([urls.fetch(spec.url)], spec, domain.source)
    remote = [d for d in domains if d.source.startswith("hf:")]
    if remote and not hub.offline_requested() and not hub.reachable():
        names = ", ".join(d.name for d in remote)
        raise InputError(
            f"--data: {hub.unreachable_reason()} and {names} come from it; use local files (.txt/.jsonl/.json/"
            ".parquet/.csv, a glob or a folder), or set HF_HUB_OFFLINE=1 to read copies already in the datasets cache"
        )
