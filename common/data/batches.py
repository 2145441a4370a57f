"""Token batches: `token_batches` tokenises each domain's documents, frames them as the tokenizer does, cuts
them into windows and collates `Batch`es with exactly `num_tokens` counted tokens per domain (`TokenReport`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from common.data.documents import _SPLITS, DEFAULT_SHUFFLE_BUFFER, iter_documents
from common.data.domains import Domain
from common.data.framing import special_frame
from common.data.sources import DataWarning
from common.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_ENCODE_CHUNK = 32  # documents per tokenizer call: the fast tokenizer batches them in Rust


@dataclass
class Batch:
    """Rows of token windows from one domain, right-padded to the longest row."""

    input_ids: torch.Tensor  # [B, S] long, padded with the tokenizer's pad id (else EOS, else 0)
    attention_mask: torch.Tensor  # [B, S] long, 1 on real tokens
    count_mask: torch.Tensor  # [B, S] bool: the tokens that count (real, not special unless kept, within budget)
    domain_ids: torch.Tensor  # [B] long, index into the domains list
    doc_ids: torch.Tensor  # [B, S] long, document index within its domain (order of use); -1 on padding
    number: int = 0  # position in the whole stream, the same on every torchrun rank (seeds per-batch randomness)

    def to(self, device: torch.device | str) -> Batch:
        moved = {k: v.to(device, non_blocking=True) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return Batch(**moved, number=self.number)

    def rows(self, start: int, stop: int) -> Batch:
        """Rows start..stop-1 as a batch of their own, with the same stream number (same padding width)."""
        part = {k: v[start:stop] for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return Batch(**part, number=self.number)

    def split(self, max_rows: int) -> list[Batch]:
        """This batch cut into consecutive parts of at most `max_rows` rows (itself when it is small enough)."""
        size = self.input_ids.shape[0]
        if size <= max_rows:
            return [self]
        return [self.rows(start, min(start + max_rows, size)) for start in range(0, size, max_rows)]

    def token_domains(self) -> torch.Tensor:
        """[T] domain index of every flattened token (row-major over [B, S])."""
        return self.domain_ids.view(-1, 1).expand_as(self.input_ids).reshape(-1)

    def token_weights(self) -> torch.Tensor:
        """[T] 1.0 on the tokens that count (real, non-special, inside the budget), 0.0 elsewhere."""
        return self.count_mask.reshape(-1).to(torch.float32)

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
    # Every window of a long document is framed the way the model saw sequences in training (BOS first).
    prefix, suffix = special_frame(tokenizer)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos if eos is not None else 0
    # UNK stands for real text the vocabulary cannot spell, so it counts like any text token.
    special = sorted({i for i in tokenizer.all_special_ids if i is not None} - {tokenizer.unk_token_id})
    return _Layout(tuple(prefix), tuple(suffix), eos, pad, torch.tensor(special, dtype=torch.long))


def check_batching(
    tokenizer: PreTrainedTokenizerBase, *, num_tokens: int, seq_len: int, batch_size: int, pack: bool,
    split: str = "train",
) -> _Layout:
    """The batching flags against the tokenizer alone (no text is read): what `token_batches` refuses at the call.
    Run before the model's weights are read; returns the tokenizer's framing."""
    if num_tokens <= 0:
        raise InputError(f"--num_tokens must be positive, got {num_tokens}")
    if batch_size < 1:
        raise InputError(f"--batch_size must be at least 1, got {batch_size}")
    if split not in _SPLITS:
        raise InputError(f"split must be one of {', '.join(_SPLITS)}, got {split!r}")
    layout = _layout(tokenizer)
    if seq_len < 1 or (not pack and seq_len <= len(layout.prefix)):
        raise InputError(
            f"--seq_len {seq_len} leaves no room for text after the tokenizer's "
            f"{len(layout.prefix)} leading special tokens"
        )
    if pack and layout.eos is None:
        raise InputError("--pack separates documents with EOS, but the tokenizer has no EOS token")
    return layout


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
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        # Validate now, not at the first next(): errors must surface before any model work.
        if not domains:
            raise InputError("no domains to read")
        self.layout = check_batching(tokenizer, num_tokens=num_tokens, seq_len=seq_len, batch_size=batch_size,
                                     pack=pack, split=split)
        self.domains, self.tokenizer = domains, tokenizer
        self.num_tokens, self.seq_len, self.batch_size = num_tokens, seq_len, batch_size
        self.seed, self.keep_special, self.pack, self.split = seed, keep_special, pack, split
        self.progress, self.shuffle_buffer = progress, shuffle_buffer
        self.rank, self.world_size = shard
        self.report = TokenReport(num_tokens, seq_len, pack, keep_special, seed, split)
        self._gen = self._sharded()

    def __iter__(self) -> TokenBatches:
        return self

    def __next__(self) -> Batch:
        return next(self._gen)

    def _sharded(self) -> Iterator[Batch]:
        """Every rank reads the whole stream (so token reports agree) and keeps every world_size-th batch."""
        for number, batch in enumerate(self._all_batches()):
            if number % self.world_size == self.rank:
                batch.number = number
                yield batch

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

    def _all_batches(self) -> Iterator[Batch]:
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
                if count.counted == 0:
                    # Nothing to measure: a run would publish empty tables and figures (and a sweep record it as
                    # done). Refused here, where every script's stream ends, so its staging folder is removed.
                    raise InputError(
                        f"--data: domain {domain.name!r} ({domain.source}) has no token to count: its "
                        f"{'held-out ' if self.split == 'heldout' else ''}documents are empty or hold only whitespace"
                        f"{'' if self.keep_special else ' and special tokens'}; give it text or leave it out"
                    )
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
    shard: tuple[int, int] = (0, 1),
) -> TokenBatches:
    """Deterministic batches of token windows with exactly `num_tokens` counted tokens per domain.

    - Each document is framed by the tokenizer's own convention (e.g. BOS first); special tokens never count
      unless `keep_special`, padding never counts.
    - Without `pack`, windows of at most `seq_len` tokens never cross documents; every window of a long document
      starts with the tokenizer's leading specials (BOS), so each looks like a fresh sequence to the model.
      With `pack`, documents are joined by EOS and cut into full `seq_len` windows (the last may be shorter).
    - Each domain stops exactly at `num_tokens` counted tokens: the last window is cut after the last token that
      fits. A domain that runs out yields fewer, with a `DataWarning`; `.report` of the returned iterator records
      every domain's totals (for run.json). A domain that gives no counted token at all raises `InputError` when
      the stream reaches its end (an analysis of nothing is refused, not published).
    - A batch holds rows of one domain (domains in order), padded on the right to its longest row (<= seq_len);
      a domain's last batch may hold fewer than `batch_size` rows.
    - Document order: `iter_documents(domain, split, seed, shuffle_buffer)`.
    - `shard=(rank, world_size)`: this process gets batches number ≡ rank (mod world_size) of the same stream
      (torchrun); each batch carries its stream `number`.
    """
    return TokenBatches(
        domains, tokenizer, num_tokens=num_tokens, seq_len=seq_len, batch_size=batch_size, seed=seed,
        keep_special=keep_special, pack=pack, split=split, progress=progress, shuffle_buffer=shuffle_buffer,
        shard=shard,
    )
