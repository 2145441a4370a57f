"""Causal effects of routing edits (SPEC "Intervention", "Expert importance").

Prompt mode (interv.py `--prompt`): `run_prompt` runs one prompt under routing edits and returns the routing the
experts of one layer really received, the next-token log-probabilities at the last position, and a greedy or
sampled continuation generated under the edit. `next_token_summary` compares two such distributions: top tokens,
KL(before‖after) and entropies in nats, the probability of a target token.

Dataset mode (interv.py `--data`): `ImportanceAccumulator` streams, per batch, one unedited forward and one forward
per ablated expert (w_e = 0 at every token) into running sums on the model's device: the next-token NLL of the
counted tokens, the per-token NLL change of each ablation, and each expert's selection counts. Memory depends on
experts × domains, never on the number of tokens. `importance_tables` turns the sums into tidy tables.

Every edit goes through `common.hooks.intervene`; nothing here registers hooks of its own.

Next-token NLL accounting: position t predicts token t+1 of the same window; a prediction counts when its *target*
is a counted token (`Batch.count_mask`: real, not special unless `--keep-special`, inside the budget). So the first
token of a window is never a target, padding never is, and the numbers equal transformers' own causal-LM loss with
labels = input_ids where counted, -100 elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from common import distributed
from common.analysis import ALL_DOMAINS
from common.data import Batch
from common.hooks import RoutingEdit, capture, intervene, layer_input, start_at
from common.model import MoELayer, MoEModel

# -------------------------------------------------------------------------------------- next-token distributions


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log softmax over the vocabulary, in float64 (KL of two identical distributions is then exactly 0)."""
    return torch.log_softmax(logits.detach().to("cpu", torch.float64), dim=-1)


def entropy(logp: torch.Tensor) -> float:
    """H(p) = -Σ p ln p in nats."""
    p = logp.exp()
    return float(-(torch.where(p > 0, p * logp, 0.0)).sum())


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> float:
    """KL(p‖q) = Σ p (ln p - ln q) in nats (inf if q = 0 where p > 0)."""
    p = logp.exp()
    return float(torch.where(p > 0, p * (logp - logq), 0.0).sum())


def decode(tokenizer, token_id: int) -> str:
    return tokenizer.decode([int(token_id)])


def top_tokens(logp: torch.Tensor, tokenizer, n: int) -> list[dict]:
    """The n most probable next tokens: rank (1 = most probable), id, decoded text, probability."""
    values, ids = logp.topk(min(n, logp.shape[-1]))
    return [
        {"rank": r + 1, "token_id": int(i), "token": decode(tokenizer, int(i)), "prob": float(v.exp())}
        for r, (v, i) in enumerate(zip(values, ids, strict=True))
    ]


def next_token_summary(logp: torch.Tensor, tokenizer, top: int, target_id: int | None) -> dict:
    """Top tokens, entropy (nats) and the target token's probability of one next-token distribution."""
    return {
        "top": top_tokens(logp, tokenizer, top),
        "entropy": entropy(logp),
        "target_prob": float(logp[target_id].exp()) if target_id is not None else None,
    }


# ------------------------------------------------------------------------------------------------ prompt mode


@dataclass
class PromptRun:
    """One prompt under some routing edits."""

    logp: torch.Tensor  # [V] float64 next-token log-probabilities at the prompt's last position (CPU)
    topk_index: torch.Tensor  # [S, k] experts each prompt token was sent to at the layer (CPU)
    topk_weight: torch.Tensor  # [S, k] the weights they received (CPU)
    continuation: list[int]  # generated token ids (stops after EOS)

    def expert_weight(self, expert: int) -> torch.Tensor:
        """[S] w_e at every prompt position (0 where the expert is not among the token's experts)."""
        hit = self.topk_index == expert
        return torch.where(hit, self.topk_weight.float(), 0.0).sum(dim=1)

    def selected(self, expert: int) -> torch.Tensor:
        """[S] bool: the expert is among the token's experts with a non-zero weight."""
        return ((self.topk_index == expert) & (self.topk_weight != 0)).any(dim=1)


def _pick(logits: torch.Tensor, generator: torch.Generator | None, temperature: float) -> int:
    if generator is None:
        return int(logits.argmax())
    probs = torch.softmax(logits.detach().to("cpu", torch.float64) / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def run_prompt(
    moe: MoEModel,
    ids: torch.Tensor,
    layer: MoELayer,
    prefill_edits: Sequence[RoutingEdit],
    decode_edits: Sequence[RoutingEdit],
    max_new_tokens: int,
    *,
    sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
    kv_cache: bool = True,
) -> PromptRun:
    """Forward the prompt `ids` [1, S] under `prefill_edits`, then generate `max_new_tokens` with the KV cache.

    Each generation step forwards only the new token, under `decode_edits`: the edits of the prompt positions live
    on in the cache (their keys and values were computed under the edit), so an edit of chosen prompt positions
    passes `decode_edits=[]`, and an edit of every position passes the same edits again. Sampling draws from a
    generator seeded with `seed`, so runs with and without an edit share their random numbers.
    `kv_cache=False` (or a model that returns no cache) re-forwards the whole sequence at every step under
    `prefill_edits`, whose positions then stay absolute: slower, same tokens.
    """
    ids = ids.to(moe.device)
    use_cache = kv_cache and max_new_tokens > 1
    with intervene(moe, prefill_edits), capture(moe, [layer], ("topk",)) as records:
        out = moe.model(input_ids=ids, use_cache=use_cache)
        record = records[layer.layer]
        index, weight = record.topk_index.cpu(), record.topk_weight.cpu()
    logits = out.logits[0, -1]
    logp = log_probs(logits)
    generator = torch.Generator().manual_seed(seed) if sample else None
    cache = out.past_key_values if use_cache else None
    continuation: list[int] = []
    for step in range(max_new_tokens):
        token = _pick(logits, generator, temperature)
        continuation.append(token)
        if token == eos_id or step == max_new_tokens - 1:
            break
        if cache is None:  # no KV cache: re-forward everything, positions are absolute again
            with intervene(moe, prefill_edits):
                sequence = torch.cat([ids, torch.tensor([continuation], device=ids.device)], dim=1)
                out = moe.model(input_ids=sequence, use_cache=False)
        else:
            with intervene(moe, decode_edits):
                out = moe.model(input_ids=torch.tensor([[token]], device=ids.device), past_key_values=cache,
                                use_cache=True)
            cache = out.past_key_values
        logits = out.logits[0, -1]
    return PromptRun(logp=logp, topk_index=index, topk_weight=weight, continuation=continuation)


# ----------------------------------------------------------------------------------------------- dataset mode


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, S-1] float32: -ln p(token t+1 | tokens ≤ t) at every position t (row by row: bounded float32 copies)."""
    rows = [
        F.cross_entropy(logits[b, :-1].float(), input_ids[b, 1:], reduction="none") for b in range(logits.shape[0])
    ]
    return torch.stack(rows)


def nll_targets(batch: Batch) -> torch.Tensor:
    """[B, S-1] bool: the predictions that count (their target token is counted)."""
    return batch.count_mask[:, 1:]


def _sum_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


class ImportanceAccumulator:
    """Running sums, on one device, of the base NLL and of each ablation's per-token NLL change, per domain.

    - `tokens[D]`: counted predictions; `nll_base[D]`: Σ NLL of the unedited model over them;
      `delta[X, D]`: Σ (NLL with expert experts[x] ablated − NLL unedited) over the same predictions.
    - `routed[D]`: counted tokens; `selected[C, D]`: counted tokens sent to each expert with w ≠ 0 (the unedited
      routing of the layer, the counting rule of `common.analysis.specialization`).
    """

    def __init__(self, layer: MoELayer, experts: Sequence[int], domains: Sequence[str], device: torch.device) -> None:
        self.layer, self.experts, self.domains = layer, list(experts), list(domains)
        dtype = _sum_dtype(device)
        D, X, C = len(self.domains), len(self.experts), layer.num_choices
        self.tokens = torch.zeros(D, dtype=dtype, device=device)
        self.nll_base = torch.zeros(D, dtype=dtype, device=device)
        self.delta = torch.zeros(X, D, dtype=dtype, device=device)
        self.routed = torch.zeros(D, dtype=dtype, device=device)
        self.selected = torch.zeros(C, D, dtype=dtype, device=device)

    @torch.no_grad()
    def update_base(self, batch: Batch, nll: torch.Tensor, topk_index: torch.Tensor, topk_weight: torch.Tensor) -> None:
        """The unedited forward of a batch: its per-token NLL [B, S-1] and the layer's routing [B·S, k]."""
        dtype, device = self.tokens.dtype, self.tokens.device
        domains = batch.domain_ids.to(device)
        targets = nll_targets(batch).to(device, dtype)
        self.tokens.index_add_(0, domains, targets.sum(1))
        self.nll_base.index_add_(0, domains, (nll.to(device, dtype) * targets).sum(1))
        counted = batch.count_mask.to(device).reshape(-1)
        token_domain = batch.token_domains().to(device)
        self.routed.index_add_(0, domains, batch.count_mask.to(device, dtype).sum(1))
        index = topk_index.to(device).long()
        picked = (topk_weight.to(device) != 0) & counted.view(-1, 1)
        cells = index * len(self.domains) + token_domain.view(-1, 1)
        flat = self.selected.view(-1)
        flat.index_add_(0, cells[picked], torch.ones(int(picked.sum()), dtype=dtype, device=device))

    @torch.no_grad()
    def update_ablated(self, position: int, batch: Batch, nll: torch.Tensor, base_nll: torch.Tensor) -> None:
        """The forward with experts[position] ablated: Σ of its per-token NLL change over the counted predictions."""
        dtype, device = self.tokens.dtype, self.tokens.device
        targets = nll_targets(batch).to(device, dtype)
        change = (nll.to(device, dtype) - base_nll.to(device, dtype)) * targets
        self.delta[position].index_add_(0, batch.domain_ids.to(device), change.sum(1))

    def all_reduce(self) -> ImportanceAccumulator:
        for t in (self.tokens, self.nll_base, self.delta, self.routed, self.selected):
            distributed.all_reduce_sum_(t)
        return self

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name).double().cpu().numpy()
                for name in ("tokens", "nll_base", "delta", "routed", "selected")}


def ablation_edit(layer: MoELayer, expert: int, renormalize: bool) -> RoutingEdit:
    """w_e = 0 at every token of `layer` (renormalised to the original weight sum if asked)."""
    return RoutingEdit(layer.layer, expert, "scale", 0.0, positions=None, renormalize=renormalize)


ABLATION_LOGITS_BUDGET = 1 << 30  # bytes of float32 logits [variants · B, S, V] one batched ablation forward may hold


def ablations_per_forward(rows: int, seq_len: int, vocab: int, experts: int, budget: int = ABLATION_LOGITS_BUDGET) -> int:
    """How many ablation variants of a batch one forward carries side by side: as many as the experts, within a
    memory bound on their float32 logits (the largest tensor a forward makes); at least 1."""
    per_variant = max(1, rows * seq_len * vocab * 4)
    return max(1, min(experts, budget // per_variant))


@torch.inference_mode()
def accumulate_importance(
    moe: MoEModel, acc: ImportanceAccumulator, batches, renormalize: bool, progress=None, *,
    variants: int = 1, resume: bool = True, audit=None,
) -> dict:
    """For every batch: the unedited forward (NLL, routing, and the residual entering the ablated layer), then the
    ablations, `variants` of them per forward (the batch repeated, each copy with its own expert ablated: rows
    [j·B, (j+1)·B)). With `resume`, an ablation forward starts at the ablated layer from the recorded residual
    (the layers below it are the same in every variant); where that is not exact (a layer below returns a tuple) the
    forwards run whole. Returns how the work was done: {"variants_per_forward", "resumed"}.

    `progress`: a tqdm bar advanced by the counted tokens of each variant ((E+1) per batch).
    """
    layer = acc.layer
    layers = moe.decoder_layers()
    resumed = resume and layer.layer > 0
    for batch in batches:
        batch = batch.to(moe.device)
        what = ("topk", "input") if audit is not None else ("topk",)
        with capture(moe, [layer], what) as records, layer_input(layers, layer.layer) as entering:
            logits = moe.forward(batch.input_ids, batch.attention_mask).logits
            record = records[layer.layer]
            base_nll = next_token_nll(logits, batch.input_ids)
            acc.update_base(batch, base_nll, record.topk_index, record.topk_weight)
            if audit is not None:  # the observations of the same experts on the same tokens (common.analysis.audit)
                audit.update_base(batch, record)
        del logits
        resumed = resumed and entering["plain"]
        counted, rows = batch.num_counted, batch.input_ids.shape[0]
        if progress is not None:
            progress.update(counted)
        jobs = list(enumerate(acc.experts))
        for start in range(0, len(jobs), variants):
            group = jobs[start : start + variants]
            if progress is not None:
                names = ", ".join(str(expert) for _, expert in group)
                progress.set_postfix_str(f"{acc.domains[int(batch.domain_ids[0])]}, expert {names}", refresh=False)
            edits = [dataclasses.replace(ablation_edit(layer, expert, renormalize), rows=(j * rows, (j + 1) * rows))
                     for j, (_, expert) in enumerate(group)]
            repeat = len(group)
            hidden = entering["hidden"]
            start_here = (start_at(layers, layer.layer, hidden.repeat(repeat, *[1] * (hidden.dim() - 1)))
                          if resumed else contextlib.nullcontext())
            with intervene(moe, edits), start_here:
                logits = moe.forward(batch.input_ids.repeat(repeat, 1), batch.attention_mask.repeat(repeat, 1)).logits
            for j, (position, _) in enumerate(group):
                part = logits[j * rows : (j + 1) * rows]
                nll = next_token_nll(part, batch.input_ids)
                acc.update_ablated(position, batch, nll, base_nll)
                if audit is not None:
                    audit.update_ablated(position, batch, nll, base_nll)
            del logits
            if progress is not None:
                progress.update(counted * repeat)
    return {"variants_per_forward": variants, "resumed": bool(resumed)}


def _ranks(values: np.ndarray) -> np.ndarray:
    """1 = largest; ties share the smallest rank."""
    return pd.Series(values).rank(ascending=False, method="min").to_numpy().astype(int)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN with fewer than 3 points or a constant input."""
    if len(x) < 3:
        return float("nan")
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def importance_tables(
    arrays: dict[str, np.ndarray], layer: MoELayer, experts: Sequence[int], domains: Sequence[str], top: int = 3
) -> dict[str, object]:
    """Tidy tables and [expert, domain] matrices from the accumulated sums.

    Returns `table` (one row per expert and domain, plus domain 'all' pooling every domain's tokens), `summary`
    (one row per domain: the expert whose ablation costs most, whether it is among the `top` most-selected
    experts of the domain, Spearman ρ between ΔNLL and selection frequency), `delta` and `frequency` [X, D].
    """
    E = layer.num_experts
    experts = list(experts)
    tokens, nll_base, delta_sum = arrays["tokens"], arrays["nll_base"], arrays["delta"]
    routed, selected = arrays["routed"], arrays["selected"][:E]
    names = [*domains, ALL_DOMAINS]
    # Pooled 'all' column: sums over domains.
    tokens_all = np.append(tokens, tokens.sum())
    base_all = np.append(nll_base, nll_base.sum())
    delta_all = np.concatenate([delta_sum, delta_sum.sum(1, keepdims=True)], axis=1)
    routed_all = np.append(routed, routed.sum())
    selected_all = np.concatenate([selected, selected.sum(1, keepdims=True)], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        base_mean = np.where(tokens_all > 0, base_all / tokens_all, np.nan)
        delta = np.where(tokens_all > 0, delta_all / tokens_all, np.nan)  # [X, D+1]
        frequency = np.where(routed_all > 0, selected_all / routed_all, np.nan)  # [E, D+1]
    rows, summary = [], []
    for d, name in enumerate(names):
        freq_rank_all = _ranks(frequency[:, d])
        delta_rank = _ranks(delta[:, d])
        for x, e in enumerate(experts):
            rows.append({
                "layer": layer.layer, "expert": e, "domain": name, "delta_nll": delta[x, d],
                "nll_base": base_mean[d], "nll_ablated": base_mean[d] + delta[x, d], "tokens": int(tokens_all[d]),
                "freq_topk": frequency[e, d], "selected": int(selected_all[e, d]), "freq_rank": int(freq_rank_all[e]),
                "delta_rank": int(delta_rank[x]),
            })
        best = int(np.nanargmax(delta[:, d])) if np.isfinite(delta[:, d]).any() else 0
        most_selected = [int(e) for e in np.argsort(-frequency[:, d], kind="stable")[:top]]
        summary.append({
            "layer": layer.layer, "domain": name, "tokens": int(tokens_all[d]), "nll_base": base_mean[d],
            "most_important_expert": experts[best], "delta_nll_max": delta[best, d],
            "its_freq_topk": frequency[experts[best], d], "its_freq_rank": int(freq_rank_all[experts[best]]),
            f"top{top}_selected": " ".join(map(str, most_selected)),
            f"important_in_top{top}_selected": experts[best] in most_selected,
            "spearman_delta_vs_freq": spearman(delta[:, d], frequency[experts, d]),
        })
    D = len(domains)
    return {
        "table": pd.DataFrame(rows),
        "summary": pd.DataFrame(summary),
        "delta": delta[:, :D],
        "frequency": frequency[experts, :D],
        "uniform": layer.top_k / layer.num_choices,
    }
