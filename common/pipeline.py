"""The steps every data-driven script shares: validate input, load the model, pick layers, stream captured batches.

Cheap checks come first (data specs, then the model, then layers), so bad input is refused before a results folder
exists or a large model is loaded.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers.utils import logging as hf_logging

from common import distributed
from common.cli import model_spec
from common.data import Batch, Domain, TokenBatches, resolve_domains, token_batches
from common.errors import InputError
from common.hooks import Capturable, Capture, capture
from common.models import inspect_moe, load_moe
from common.moe import MoELayer, MoEModel
from common.runs import Run

DEFAULT_SEQ_LEN = 512


@dataclass
class Setup:
    moe: MoEModel
    layers: list[MoELayer]
    domains: list[Domain]
    seq_len: int


def model_context_length(moe: MoEModel) -> int | None:
    config = moe.config
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def setup(args: argparse.Namespace, *, data: bool = True) -> Setup:
    distributed.init_from_env()
    domains = resolve_domains(args.data, num_domains=args.num_domains, domains=args.domains) if data else []
    spec = model_spec(args)
    inspect_moe(spec).select(getattr(args, "layers", None))  # refuse dense models / bad layers before loading weights
    if not args.progress:
        hf_logging.disable_progress_bar()
    moe = load_moe(spec)
    layers = moe.select(getattr(args, "layers", None))
    context = model_context_length(moe)
    seq_len = getattr(args, "seq_len", None) or min(DEFAULT_SEQ_LEN, context or DEFAULT_SEQ_LEN)
    if context is not None and seq_len > context:
        raise InputError(f"--seq_len {seq_len} exceeds the model's context length {context}")
    return Setup(moe=moe, layers=layers, domains=domains, seq_len=seq_len)


def start_run(script: str, args: argparse.Namespace, s: Setup) -> Run:
    """The run folder of a script, with the model and data it will use recorded in run.json."""
    run = Run(script, vars(args), s.moe.name, args.out)
    run.record(model_info=s.moe.describe(), domains=[d.__dict__ for d in s.domains], seq_len=s.seq_len)
    return run


def batches(s: Setup, args: argparse.Namespace, split: str = "train") -> TokenBatches:
    return token_batches(
        s.domains,
        s.moe.tokenizer,
        num_tokens=args.num_tokens,
        seq_len=s.seq_len,
        batch_size=args.batch_size,
        seed=args.seed,
        keep_special=args.keep_special,
        pack=args.pack,
        split=split,
        progress=args.progress,
    )


def captured_batches(
    moe: MoEModel, stream: Iterator[Batch], layers: Sequence[MoELayer], what: Sequence[Capturable]
) -> Iterator[tuple[Capture, Batch, torch.Tensor]]:
    """Forward each batch with capture hooks on `layers`.

    Yields (records, batch on the model's device, the model's output logits [B, S, V]).
    """
    rank, world = distributed.rank(), distributed.world_size()
    with capture(moe, layers, what) as records:
        for number, batch in enumerate(stream):
            if number % world != rank:  # torchrun: every rank reads the same stream and takes its share
                continue
            batch = batch.to(moe.device)
            output = moe.forward(batch.input_ids, batch.attention_mask)
            yield records, batch, output.logits
            records.clear()


def token_domains(batch: Batch) -> torch.Tensor:
    """[T] domain index of every flattened token (row-major over [B, S])."""
    return batch.domain_ids.view(-1, 1).expand_as(batch.input_ids).reshape(-1)


def token_weights(batch: Batch) -> torch.Tensor:
    """[T] 1.0 on the tokens that count (real, non-special, inside the budget), 0.0 elsewhere."""
    return batch.count_mask.reshape(-1).to(torch.float32)


def accumulate_routing(acc, s: Setup, stream: Iterator[Batch]) -> None:
    """Stream every batch's router logits and top-k into a (layer, domain) accumulator, then all-reduce it."""
    for records, batch, _ in captured_batches(s.moe, stream, s.layers, ("logits", "topk")):
        acc.update(records, token_domains(batch), token_weights(batch))
    acc.all_reduce()
