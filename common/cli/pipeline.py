"""The steps every data-driven script shares: validate input, load the model, pick layers, stream captured batches.

Cheap checks come first (data specs, then the model's config, layers and tokenizer, then the script's own checks on
the weightless model: `inspect_run`), so bad input is refused before a results folder exists or a weight is read.
Everything here takes the typed specs of `common.config`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.config import Config, DataSpec
from common.errors import InputError
from common.model.config_facts import ConfigFacts, read_config_facts

# Importing this module costs nothing heavy: torch (with the data batches and torch.distributed), transformers, the
# run folder (pandas), the loader, the model views and the hooks (transformers' modelling code, seconds) are imported
# where they are used, so that the config's own checks (`check_config`) refuse a typo before any of them is paid for.
if TYPE_CHECKING:
    import torch

    from common.data import Batch, Domain, TokenBatches
    from common.hooks import Capturable, Capture
    from common.model import MoELayer, MoEModel
    from common.run import Run

DEFAULT_SEQ_LEN = 512


@dataclass
class Setup:
    config: Config
    moe: MoEModel
    layers: list[MoELayer]
    domains: list[Domain]
    seq_len: int


# A script's own checks on the weightless model (its tokenizer attached), its layers and domains: `--expert_id`
# ranges, prompt positions, memory plans. Raise `InputError` to refuse.
Preflight = Callable[["MoEModel", list["MoELayer"], list["Domain"]], None]
# A script's own checks on the model's config and tokenizer alone (`ConfigFacts`: layer, context and expert counts,
# the tokenizer), before any modelling code is imported: the definite refusals (`--expert_id` above the config's
# expert count, prompt positions beyond the tokenised prompt). Raise `InputError` to refuse.
EarlyCheck = Callable[[ConfigFacts], None]


@dataclass
class Inspection:
    """What a run is known to need before any weight is read."""

    skeleton: MoEModel  # built from the config on the meta device; `.tokenizer` is the model's tokenizer
    layers: list[MoELayer]  # the skeleton's layers named by --layers
    domains: list[Domain]
    seq_len: int


def setup(config: Config, preflight: Preflight | None = None, early: EarlyCheck | None = None) -> Setup:
    """Everything checkable from the data specs, the model's config and its tokenizer (`inspect_run`, with the
    script's `early` checks and `preflight`), then the model itself."""
    inspection = inspect_run(config, preflight, early)
    from transformers.utils import logging as hf_logging

    from common import distributed
    from common.model import load_moe

    distributed.init_from_env()
    if config.run.resume is not None and config.run.checkpoint_every is not None:  # refused before the model loads
        from common.run.checkpoint import check_resume_folder, fingerprint

        wanted = fingerprint(config.run.script, config.run.argument_dict, distributed.world_size())
        check_resume_folder(config.run.resume, wanted)

    if not config.run.progress:
        hf_logging.disable_progress_bar()
    moe = load_moe(config.model)
    layers = moe.select(config.layers)
    return Setup(config=config, moe=moe, layers=layers, domains=inspection.domains, seq_len=inspection.seq_len)


def inspect_run(config: Config, preflight: Preflight | None = None, early: EarlyCheck | None = None) -> Inspection:
    """Every check that needs no weight, so that a typo costs seconds, not a model load: first what the config and
    tokenizer say alone (`check_config`, with the script's `early` checks), then the model's structure from the
    weightless skeleton (a dense model or a dense `--layers` refused), `--seq_len` against its context, its
    tokenizer (the tokenizer's framing, `--pack`), the domains (the data specs were checked with the flags: here
    the demo corpus is surveyed and hub datasets get the hub probe, after the model's own checks, which cost less),
    then the script's own `preflight` on that weightless model."""
    check_config(config, early, need_moe=True)  # before torch, where config.json and tokenizer.json are read as files
    from common.data import check_batching, check_hub_sources, resolve_domains
    from common.model import inspect_moe
    from common.model.load import load_tokenizer

    data = config.data
    skeleton = inspect_moe(config.model)
    layers = skeleton.select(config.layers)
    seq_len = window_length(data, skeleton.context_length)
    skeleton.tokenizer = load_tokenizer(config.model)
    if data is not None:
        check_batching(skeleton.tokenizer, num_tokens=data.num_tokens, seq_len=seq_len, batch_size=data.batch_size,
                       pack=data.pack)
    domains = resolve_domains(list(data.sources), num_domains=data.num_domains, domains=data.domains) if data else []
    check_hub_sources(domains)
    if preflight is not None:
        preflight(skeleton, layers, domains)
    return Inspection(skeleton=skeleton, layers=layers, domains=domains, seq_len=seq_len)


def check_config(config: Config, early: EarlyCheck | None = None, *, need_moe: bool = False) -> ConfigFacts | None:
    """The definite refusals from the config and tokenizer alone, before torch is imported where the model is a
    local folder (its files read as files), else before transformers' modelling code is: with `need_moe`, a model
    whose architecture has no experts; `--layers` beyond the decoder-layer count, `--seq_len` above the context,
    then the script's `early` checks. Only what the skeleton's checks would refuse too (the same config fields, the same messages); None when
    the config cannot be read this way (the skeleton's path reads it and says why)."""
    facts = read_config_facts(config.model)
    if facts is None:
        return None
    if need_moe and facts.dense is not None:  # the adapter's words, for the class it would have built
        raise InputError(f"--model {config.model.model}: {facts.dense} has no MoE layers (a dense model?)")
    if config.layers is not None and not any(str(item).lower() == "all" for item in config.layers):
        for item in config.layers:
            facts.resolve_layer(item)
    window_length(config.data, facts.context_length)
    if early is not None:
        early(facts)
    return facts


def window_length(data: DataSpec | None, context: int | None) -> int:
    """`--seq_len`, or min(512, the model's context); refused when longer than the context."""
    seq_len = (data.seq_len if data else None) or min(DEFAULT_SEQ_LEN, context or DEFAULT_SEQ_LEN)
    if context is not None and seq_len > context:
        raise InputError(f"--seq_len {seq_len} exceeds the model's context length {context}")
    return seq_len


def data_label(config: Config, domains: Sequence[Domain]) -> str:
    """What the run read, for its folder name: the preset (with the domains kept, if fewer) or the domain names."""
    from common.data import PRESET_NAMES

    data = config.data
    if data is None:
        return "no-data"
    names = "+".join(d.name for d in domains)
    if len(data.sources) == 1 and data.sources[0] in PRESET_NAMES:
        restricted = data.domains is not None or data.num_domains is not None
        return f"{data.sources[0]}-{names}" if restricted else data.sources[0]
    return names


def start_run(s: Setup) -> Run:
    """The run folder of a script, with the model and data it will use recorded in run.json."""
    from common.run import Run

    run = Run(s.config.run, s.moe.name, data_label(s.config, s.domains))
    run.record(model_info=s.moe.describe(), domains=[d.__dict__ for d in s.domains], seq_len=s.seq_len)
    return run


def batches(s: Setup, split: str = "train", data: DataSpec | None = None) -> TokenBatches:
    """This process's share of the token stream (under torchrun every rank takes every world_size-th batch)."""
    from common import distributed
    from common.data import token_batches

    data = data or s.config.data
    if data is None:
        raise ValueError("batches: this run has no data spec")
    return token_batches(
        s.domains,
        s.moe.tokenizer,
        num_tokens=data.num_tokens,
        seq_len=s.seq_len,
        batch_size=data.batch_size,
        seed=data.seed,
        keep_special=data.keep_special,
        pack=data.pack,
        split=split,
        progress=s.config.run.progress,
        shard=(distributed.rank(), distributed.world_size()),
    )


def resumable(run: Run, s: Setup, stream: Iterator[Batch], /, *, name: str = "data", live: Sequence[tuple[str, object]] = (),
              **state: object) -> Iterator[Batch]:
    """`stream` with checkpoints (`Run.resumable`): `state` (what the batches update) is saved after whole batches and
    restored on resume; the model, its tokenizer, its MoE views and the run's setup are referred to, never saved
    (`live` adds other objects of this process the state may hold, such as a second model)."""
    known = [("setup", s), ("config", s.config), ("moe", s.moe), ("model", s.moe.model), ("tokenizer", s.moe.tokenizer),
             *((f"moe_layer{i}", layer) for i, layer in enumerate(s.moe.layers)), *live]
    return run.resumable(stream, name=name, live=known, **state)


def captured_batches(
    moe: MoEModel, stream: Iterator[Batch], layers: Sequence[MoELayer], what: Sequence[Capturable], *,
    split_on_oom: bool = False,
) -> Iterator[tuple[Capture, Batch, torch.Tensor]]:
    """Forward each batch with capture hooks on `layers`.

    Yields (records, batch on the model's device, the model's output logits [B, S, V]).

    `split_on_oom`: when a forward runs out of device memory, the batch is cut in halves (and every later batch into
    parts of that many rows) instead of failing, with one warning. Only for consumers whose statistics are sums
    over rows that do not key anything on (batch number, row): the parts keep their batch's number.
    """
    import torch

    from common.cli.oom import is_out_of_memory
    from common.hooks import capture

    max_rows: int | None = None
    with capture(moe, layers, what) as records:
        for batch in stream:
            pending = batch.to(moe.device).split(max_rows) if max_rows else [batch.to(moe.device)]
            while pending:
                part = pending.pop(0)
                try:
                    output = moe.forward(part.input_ids, part.attention_mask)
                except Exception as err:
                    rows = part.input_ids.shape[0]
                    if not (split_on_oom and rows > 1 and is_out_of_memory(err)):
                        raise
                    records.clear()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    max_rows = rows // 2
                    warnings.warn(f"out of memory at {rows} rows of {part.input_ids.shape[1]} tokens: forwarding "
                                  f"batches in parts of {max_rows} rows from here on", stacklevel=1)
                    pending = [piece for rest in (part, *pending) for piece in rest.split(max_rows)]
                    continue
                yield records, part, output.logits
                records.clear()
                del output  # the logits [B, S, V] go before the next forward allocates its own


def accumulate_routing(acc, s: Setup, stream: Iterator[Batch]) -> None:
    """Stream every batch's router logits and top-k into a (layer, domain) accumulator, then all-reduce it."""
    for records, batch, _ in captured_batches(s.moe, stream, s.layers, ("logits", "topk"), split_on_oom=True):
        acc.update(records, batch.token_domains(), batch.token_weights())
    acc.all_reduce()
