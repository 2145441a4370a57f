"""Behaviour experts (contrast.py): which experts fire more for text A than for text B, and does switching them
off / on steer generation (SteerMoE, arXiv 2509.09660)? Definitions: docs/METRICS.md#behaviour-experts.

- `ContrastCounts` streams, per MoE layer and routed expert, the counted tokens of A and of B routed to it (w ≠ 0),
  also per document (for the document bootstrap), and the token-id counts of A and B (the bag-of-tokens classifier).
- `rate_table`: p_A, p_B, Δ = p_A − p_B with Newcombe's hybrid score interval and a document-level bootstrap
  interval, the pooled two-proportion z-test, Benjamini–Hochberg q-values and Bonferroni p-values.
- `steering_sets` picks the top-N A-experts (Δ > 0) and B-experts (Δ < 0) over all layers; `random_like` draws
  controls with the same number of experts per layer.
- `steered` switches experts off (router logit −inf before selection: `ExpertRemoval(how="drop")`) and on (router
  logit lifted to the token's largest logit + ε, SteerMoE's activation) during the forwards inside the block.
- `generate` samples continuations with common random numbers (the same uniform per prompt and step in every
  condition), `teacher_forced` gives the next-token NLL and KL(unsteered ‖ steered) on held-out windows, and
  `NaiveBayes` scores token sequences as A or B.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from common.data import Batch, Domain
from common.hooks import ExpertActivation, ExpertRemoval, intervene
from common.model import MoELayer, MoEModel

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: 95% two-sided intervals

# ------------------------------------------------------------------------------------------------ counting


class ContrastCounts:
    """Streamed on the model's device, for domain d ∈ {0 = A, 1 = B}: counted tokens n_d, tokens routed to each
    (layer, expert) x_d [L, W] (W = the widest layer's routed experts), the same per document (rows = the document
    index of `Batch.doc_ids`), and the counted tokens of every token id [V]."""

    def __init__(self, layers: Sequence[MoELayer], vocab_size: int, device: torch.device) -> None:
        self.layers = list(layers)
        self.width = max(m.num_experts for m in self.layers)
        self.tokens = torch.zeros(2, dtype=torch.float64, device=device)
        self.routed = torch.zeros(2, len(self.layers), self.width, dtype=torch.float64, device=device)
        self.doc_routed = [torch.zeros(0, len(self.layers), self.width, dtype=torch.float64, device=device)
                           for _ in range(2)]
        self.doc_tokens = [torch.zeros(0, dtype=torch.float64, device=device) for _ in range(2)]
        self.vocab = torch.zeros(2, vocab_size, dtype=torch.float64, device=device)

    def _grow(self, d: int, docs: int) -> None:
        have = self.doc_tokens[d].shape[0]
        if docs > have:
            extra = docs - have
            self.doc_tokens[d] = torch.cat([self.doc_tokens[d], self.doc_tokens[d].new_zeros(extra)])
            self.doc_routed[d] = torch.cat([self.doc_routed[d], self.doc_routed[d].new_zeros(extra, *self.doc_routed[d].shape[1:])])

    @torch.no_grad()
    def update(self, records, batch: Batch) -> None:
        device = self.routed.device
        counted = batch.count_mask.reshape(-1).to(device)
        domains = batch.token_domains().to(device)
        ids, docs = batch.input_ids.reshape(-1).to(device), batch.doc_ids.reshape(-1).to(device)
        if int(ids.max()) >= self.vocab.shape[1]:
            self.vocab = torch.cat([self.vocab, self.vocab.new_zeros(2, int(ids.max()) + 1 - self.vocab.shape[1])], 1)
        per_layer = self.width * len(self.layers)
        for d in (0, 1):
            keep = counted & (domains == d)
            if not bool(keep.any()):
                continue
            doc = docs[keep]
            self._grow(d, int(doc.max()) + 1)
            ones = torch.ones(int(keep.sum()), dtype=torch.float64, device=device)
            self.tokens[d] += ones.sum()
            self.vocab[d].index_add_(0, ids[keep], ones)
            self.doc_tokens[d].index_add_(0, doc, ones)
            for i, layer in enumerate(self.layers):
                record = records[layer.layer]
                index = record.topk_index.to(device)[keep].long()
                weight = record.topk_weight.to(device)[keep]
                routed = (weight != 0) & (index < layer.num_experts)  # zero-compute choices (LongCat) are not experts
                token, _ = routed.nonzero(as_tuple=True)
                expert = index[routed]
                hits = torch.ones_like(expert, dtype=torch.float64)
                self.routed[d, i].index_add_(0, expert, hits)
                self.doc_routed[d].view(-1).index_add_(0, doc[token] * per_layer + i * self.width + expert, hits)


# ------------------------------------------------------------------------------------------------ statistics


def wilson(x: np.ndarray, n: np.ndarray, z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson's score interval of a proportion x / n (Wilson 1927)."""
    x, n = np.asarray(x, dtype=np.float64), np.asarray(n, dtype=np.float64)
    p = x / n
    centre = (x + z * z / 2) / (n + z * z)
    half = z / (n + z * z) * np.sqrt(x * (n - x) / n + z * z / 4)
    return np.clip(centre - half, 0, p), np.clip(centre + half, p, 1)


def newcombe(x1, n1, x2, n2, z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
    """Newcombe's hybrid score interval of p1 − p2 (Newcombe 1998, method 10), from the two Wilson intervals."""
    p1, p2 = np.asarray(x1, dtype=np.float64) / n1, np.asarray(x2, dtype=np.float64) / n2
    l1, u1 = wilson(x1, n1, z)
    l2, u2 = wilson(x2, n2, z)
    delta = p1 - p2
    return delta - np.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), delta + np.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def two_proportion_z(x1, n1, x2, n2) -> tuple[np.ndarray, np.ndarray]:
    """(z, two-sided p) of the pooled two-proportion z-test; z = 0 and p = 1 where the pooled variance is 0 (an
    expert chosen by no token, or by every token, of both sets)."""
    from scipy.special import ndtr

    x1, x2 = np.asarray(x1, dtype=np.float64), np.asarray(x2, dtype=np.float64)
    pooled = (x1 + x2) / (n1 + n2)
    se = np.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, (x1 / n1 - x2 / n2) / np.where(se > 0, se, 1), 0.0)
    return z, 2 * ndtr(-np.abs(z))


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """BH-adjusted p-values (q-values): q_(i) = min_{j ≥ i} m p_(j) / j, capped at 1 (Benjamini & Hochberg 1995)."""
    p = np.asarray(p, dtype=np.float64)
    m = p.size
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(scaled[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(q, 1.0)
    return out


def bootstrap_delta(doc_routed: Sequence[np.ndarray], doc_tokens: Sequence[np.ndarray], draws: int, seed: int,
                    level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of Δ = p_A − p_B over `draws` document-level bootstrap resamples: each resample draws
    each set's documents with replacement (as many as it has) and pools their counts (p* = Σ x* / Σ n*).
    doc_routed[d]: [documents, cells], doc_tokens[d]: [documents]. NaN where a set has fewer than 2 documents."""
    cells = doc_routed[0].shape[1]
    if draws < 1 or min(len(t) for t in doc_tokens) < 2:
        return np.full(cells, np.nan), np.full(cells, np.nan)
    rng = np.random.default_rng([seed, 0xC0])
    rates = []
    for routed, tokens in zip(doc_routed, doc_tokens, strict=True):
        docs = len(tokens)
        weights = rng.multinomial(docs, np.full(docs, 1 / docs), size=draws).astype(np.float64)  # [draws, docs]
        rates.append((weights @ routed) / np.maximum(weights @ tokens, 1)[:, None])
    delta = rates[0] - rates[1]
    tail = 100 * (1 - level) / 2
    return np.percentile(delta, tail, axis=0), np.percentile(delta, 100 - tail, axis=0)


def rate_table(counts: ContrastCounts, alpha: float, bootstrap: int, seed: int):
    """One row per (layer, expert): counts, rates, Δ with its intervals, z-test, q-values, which side it is a
    candidate for (q ≤ alpha and the bootstrap interval excluding 0 with the same sign, where there is one)."""
    import pandas as pd

    n = counts.tokens.cpu().numpy()
    x = counts.routed.cpu().numpy()  # [2, L, W]
    valid = np.zeros(x.shape[1:], dtype=bool)
    for i, layer in enumerate(counts.layers):
        valid[i, : layer.num_experts] = True
    xa, xb = x[0][valid], x[1][valid]
    z, p = two_proportion_z(xa, n[0], xb, n[1])
    low, high = newcombe(xa, n[0], xb, n[1])
    boot = bootstrap_delta([r.cpu().numpy().reshape(len(t), -1)[:, valid.reshape(-1)] for r, t in
                            zip(counts.doc_routed, counts.doc_tokens, strict=True)],
                           [t.cpu().numpy() for t in counts.doc_tokens], bootstrap, seed)
    q = benjamini_hochberg(p)
    layer_index, expert = np.nonzero(valid)
    table = pd.DataFrame({
        "layer": [counts.layers[i].layer for i in layer_index], "expert": expert,
        "tokens_a": n[0], "tokens_b": n[1], "routed_a": xa, "routed_b": xb,
        "p_a": xa / n[0], "p_b": xb / n[1], "delta": xa / n[0] - xb / n[1],
        "ci_low": low, "ci_high": high, "boot_low": boot[0], "boot_high": boot[1],
        "log_odds_ratio": np.log((xa + 0.5) / (n[0] - xa + 0.5)) - np.log((xb + 0.5) / (n[1] - xb + 0.5)),
        "z": z, "p_value": p, "q_value": q, "p_bonferroni": np.minimum(p * p.size, 1.0),
    })
    table["significant"] = table.q_value <= alpha
    no_boot = table.boot_low.isna()
    a_side = table.significant & (table.delta > 0) & (no_boot | (table.boot_low > 0))
    b_side = table.significant & (table.delta < 0) & (no_boot | (table.boot_high < 0))
    table["candidate"] = np.where(a_side, "A", np.where(b_side, "B", ""))
    return table


# ------------------------------------------------------------------------------------------------ steering sets

ExpertSet = dict[int, tuple[int, ...]]  # decoder layer -> experts


def steering_sets(table, layers: Sequence[MoELayer], top: int) -> tuple[ExpertSet, ExpertSet, list[tuple]]:
    """The top-`top` A-experts (candidates with Δ > 0, largest Δ first) and B-experts (Δ < 0, most negative first)
    over all layers (ties: the smaller q, then layer and expert order). A layer gives at most E − k A-experts (the
    router keeps k to choose from) and at most k B-experts (no more fit in a top-k); the next expert is taken
    instead. Returns (A set, B set, [(side, rank, layer, expert)])."""
    caps = {m.layer: (m.num_experts - m.top_k, m.top_k) for m in layers}
    sets: tuple[ExpertSet, ExpertSet] = ({}, {})
    chosen = []
    for side, (name, sign) in enumerate((("A", -1.0), ("B", 1.0))):
        rows = table[table.candidate == name].assign(key=lambda t, s=sign: s * t.delta)
        rows = rows.sort_values(["key", "q_value", "layer", "expert"], kind="stable")
        for row in rows.itertuples():
            picked = sets[side].setdefault(int(row.layer), ())
            if len(picked) >= caps[int(row.layer)][side] or sum(map(len, sets[side].values())) >= top:
                continue
            sets[side][int(row.layer)] = (*picked, int(row.expert))
            chosen.append((name, sum(map(len, sets[side].values())), int(row.layer), int(row.expert)))
    return ({k: v for k, v in sets[0].items() if v}, {k: v for k, v in sets[1].items() if v}, chosen)


def random_like(like: ExpertSet, layers: Sequence[MoELayer], avoid: Sequence[ExpertSet], rng: np.random.Generator
                ) -> ExpertSet:
    """As many experts per layer as `like`, drawn uniformly without replacement from the layer's experts outside
    every set of `avoid` (outside `like` alone where too few are left)."""
    by_layer = {m.layer: m for m in layers}
    drawn: ExpertSet = {}
    for layer in sorted(like):
        count = len(like[layer])
        pool = [e for e in range(by_layer[layer].num_experts) if all(e not in s.get(layer, ()) for s in avoid)]
        if len(pool) < count:
            pool = [e for e in range(by_layer[layer].num_experts) if e not in like[layer]]
        drawn[layer] = tuple(sorted(int(e) for e in rng.choice(pool, size=count, replace=False)))
    return drawn


def set_text(experts: ExpertSet) -> str:
    """'L1:E3 L1:E7 L2:E0' (layer-major), '' for none."""
    return " ".join(f"L{layer}:E{e}" for layer in sorted(experts) for e in experts[layer])


@dataclass(frozen=True)
class Condition:
    name: str  # none, A off, B on, A off + B on, random off, random on, random off + on
    draw: int  # random draw (0 for the others)
    off: ExpertSet = field(default_factory=dict)
    on: ExpertSet = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ steering


@contextlib.contextmanager
def steered(moe: MoEModel, off: Mapping[int, Sequence[int]], on: Mapping[int, Sequence[int]]) -> Iterator[None]:
    """Inside the block the `off` experts cannot be chosen (z_e = −inf before selection, `ExpertRemoval` drop) and
    the `on` experts are always chosen (z_e = max_j z_j + ε before selection, `ExpertActivation`); the router's own
    selection and normalisation do the rest. Hooks removed on exit."""
    edits = [*(ExpertRemoval(layer, tuple(experts), "drop") for layer, experts in off.items() if experts),
             *(ExpertActivation(layer, tuple(experts)) for layer, experts in on.items() if experts)]
    with intervene(moe, edits):
        yield


@torch.inference_mode()
def generate(moe: MoEModel, prompts: torch.Tensor, max_new_tokens: int, uniforms: np.ndarray, *, greedy: bool,
             temperature: float, eos_id: int | None, batch_size: int) -> list[list[int]]:
    """Continuations of the prompts [P, S] (no padding), under whatever edits are active, with the KV cache. Step
    t of prompt p takes the token whose cumulative probability (token-id order) first exceeds uniforms[p, t] of
    softmax(logits / temperature) (inverse-CDF sampling: the same uniforms in every condition couple the samples),
    or the argmax with `greedy`. A continuation stops after EOS."""
    found: list[list[int]] = []
    for start in range(0, prompts.shape[0], batch_size):
        ids = prompts[start: start + batch_size].to(moe.device)
        rows = ids.shape[0]
        out = moe.model(input_ids=ids, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
        tokens = torch.zeros(rows, max_new_tokens, dtype=torch.long)
        for step in range(max_new_tokens):
            if greedy:
                token = logits.float().argmax(-1)
            else:
                cdf = torch.softmax(logits.double() / temperature, dim=-1).cumsum(-1)
                u = torch.as_tensor(uniforms[start: start + rows, step], dtype=torch.float64, device=cdf.device)
                token = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
            tokens[:, step] = token.cpu()
            if step < max_new_tokens - 1:
                out = moe.model(input_ids=token.view(-1, 1), past_key_values=cache, use_cache=True)
                cache, logits = out.past_key_values, out.logits[:, -1]
        for row in tokens.tolist():
            end = row.index(eos_id) + 1 if eos_id is not None and eos_id in row else len(row)
            found.append(row[:end])
    return found


@torch.inference_mode()
def teacher_forced(moe: MoEModel, windows: torch.Tensor, conditions: Sequence[Condition], batch_size: int,
                   progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Per condition and window [C, N]: the mean next-token NLL (nats) over the window's predictions (position t
    predicts token t + 1) and the mean KL(p_none ‖ p_condition) (nats) of the next-token distributions there,
    p_none being the unsteered model's."""
    nll = np.zeros((len(conditions), windows.shape[0]))
    kl = np.zeros_like(nll)
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start: start + batch_size].to(moe.device)
        targets = ids[:, 1:].unsqueeze(-1)
        base = torch.log_softmax(moe.model(input_ids=ids, use_cache=False).logits[:, :-1].float(), dim=-1)
        for c, condition in enumerate(conditions):
            if condition.off or condition.on:
                with steered(moe, condition.off, condition.on):
                    logp = torch.log_softmax(moe.model(input_ids=ids, use_cache=False).logits[:, :-1].float(), dim=-1)
            else:
                logp = base
            rows = slice(start, start + ids.shape[0])
            nll[c, rows] = (-logp.gather(-1, targets).squeeze(-1)).double().mean(-1).cpu().numpy()
            kl[c, rows] = (base.exp() * (base - logp)).sum(-1).clamp(min=0).double().mean(-1).cpu().numpy()
            if progress is not None:
                progress.update(ids.shape[0])
    return nll, kl


# ------------------------------------------------------------------------------------------------ classifier


class NaiveBayes:
    """Multinomial naive Bayes over token ids with add-one smoothing, fitted on the counted tokens of A and B:
    λ(v) = ln P(v | B) − ln P(v | A), P(v | d) = (c_d(v) + 1) / (N_d + V); equal priors. `ignore`: ids never
    scored (special tokens)."""

    def __init__(self, vocab_counts: np.ndarray, ignore: Sequence[int] = ()) -> None:
        counts = np.asarray(vocab_counts, dtype=np.float64)
        size = counts.shape[1]
        logp = np.log(counts + 1) - np.log(counts.sum(1, keepdims=True) + size)
        self.log_odds = logp[1] - logp[0]
        self.ignore = {int(i) for i in ignore}

    def scored(self, tokens: Sequence[int]) -> list[int]:
        return [int(t) for t in tokens if int(t) not in self.ignore and 0 <= int(t) < self.log_odds.size]

    def b_share(self, tokens: Sequence[int]) -> tuple[int, int]:
        """(tokens whose log-odds favour B (λ > 0), tokens scored)."""
        kept = self.scored(tokens)
        return int(sum(self.log_odds[t] > 0 for t in kept)), len(kept)

    def log_odds_b(self, tokens: Sequence[int]) -> float:
        """ln P(B | tokens) − ln P(A | tokens) = Σ λ(v_t) (equal priors)."""
        return float(sum(self.log_odds[t] for t in self.scored(tokens)))


def posterior_b(log_odds: float) -> float:
    """P(B | text) = σ(log-odds)."""
    return 1 / (1 + math.exp(-log_odds)) if log_odds > -700 else 0.0


# ------------------------------------------------------------------------------------------------ held-out text


def heldout_windows(domain: Domain, tokenizer, *, split: str, skip: int, seed: int, length: int, count: int
                    ) -> torch.Tensor:
    """Up to `count` windows of exactly `length` tokens ([count', length] long) from documents the measurement did
    not read: the demo corpus' held-out split (`split="heldout"`), or the source's documents after the first `skip`
    non-empty ones (the measurement's, in the same seeded order). Each window is the tokenizer's leading specials
    (BOS) + consecutive text tokens of one document; windows are taken round-robin over documents (the first window
    of each document, then the second, ...) from at most 4·count documents."""
    from common.data.documents import iter_documents
    from common.data.framing import special_frame

    prefix = list(special_frame(tokenizer)[0])
    room = length - len(prefix)
    per_doc: list[list[list[int]]] = []
    seen = 0
    for text in iter_documents(domain, split, seed):
        body = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if not body:
            continue
        seen += 1
        if seen <= skip:
            continue
        chunks = [prefix + body[i: i + room] for i in range(0, len(body) - room + 1, room)] if room > 0 else []
        if chunks:
            per_doc.append(chunks)
        if len(per_doc) >= 4 * count or sum(map(len, per_doc)) >= 64 * count:
            break
    picked: list[list[int]] = []
    depth = 0
    while len(picked) < count and any(len(c) > depth for c in per_doc):
        picked += [c[depth] for c in per_doc if len(c) > depth][: count - len(picked)]
        depth += 1
    return torch.tensor(picked, dtype=torch.long).view(-1, length)
