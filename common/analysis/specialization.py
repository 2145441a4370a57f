"""Who goes where: streamed routing counts and the specialization metrics of docs/METRICS.md computed from them.

`RoutingCounts` accumulates, in one pass and on the model's device, every count the metrics need:
selection counts (top-k and top-1) per (layer, domain), summed router probabilities, co-activation counts over all
pairs of a token's experts, token-id × expert tables (current, next and predicted token; bounded: vocab × experts
per layer), transition counts between consecutive selected layers, and the Gram matrix of the binary top-k
indicators of all (layer, expert) with its token-shuffled control. Memory depends on vocab, experts and layers,
never on the number of tokens.

The metric functions below are pure numpy maps from those counts to tidy tables.

Counting rule: a top-k pick counts only where its weight is non-zero (Zaya rewrites its skip-expert picks to
index 0 with weight 0; an ablated expert is not "selected").
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from common.analysis import ALL_DOMAINS
from common.data import Batch
from common.hooks import Capture
from common.model import MoELayer
from common.stats import BinCount, Gram, StatSet

TOKEN_TABLES = ("current", "next", "predicted")


def top1_index(topk_index: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
    """[T] the expert with the largest weight (slot order is not always sorted, e.g. LongCat)."""
    return topk_index.gather(1, topk_weight.argmax(dim=1, keepdim=True)).squeeze(1)


def slot_pairs(k: int, olmoe_compat: bool) -> list[tuple[int, int]]:
    """Ordered slot pairs counted as co-activations: all a != b, or (OLMoE script) only rank-adjacent pairs."""
    if olmoe_compat:
        return [p for r in range(k - 1) for p in ((r, r + 1), (r + 1, r))]
    return [(a, b) for a, b in itertools.permutations(range(k), 2)]


def expert_frequency(topk_index: torch.Tensor, num_experts: int, topk_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k selection frequency f_e = n_e / N of every expert over captured tokens (docs/METRICS.md#selection-frequency).

    `topk_index` [T, k] (and optionally `topk_weight` [T, k]) as a capture records them; a pick of weight 0 does not
    count, as in `RoutingCounts`. Returns [E] float64 on the CPU; Σ_e f_e = k when every pick counts. For a stream of
    batches and per-domain tables use `RoutingCounts` and `selection_frequency` (what router_metrics.py writes).
    """
    picks = topk_index.reshape(-1).long()
    if topk_weight is not None:
        picks = picks[topk_weight.reshape(-1) != 0]
    counts = torch.bincount(picks, minlength=num_experts)[:num_experts]
    return counts.double().cpu() / topk_index.shape[0]


def shuffled_rows(x: torch.Tensor, counted: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x [L, T, n] with each layer's rows reordered by its own random permutation of the counted tokens (uncounted
    rows stay last).

    Independent per layer within one batch, and a batch holds one domain: the control removes token-level coupling
    between layers but keeps what the domain alone explains. (A shuffle over all tokens would give r = 0 in
    expectation, which needs no measurement.)
    """
    keys = torch.rand(x.shape[0], x.shape[1], generator=generator, device=x.device)
    keys = torch.where(counted.view(1, -1) > 0, keys, 2.0)
    order = keys.argsort(dim=1)
    return x.gather(1, order.unsqueeze(2).expand_as(x))


class RoutingCounts:
    """All routing counts the metrics of docs/METRICS.md need, for some MoE layers and domains, streamed on one device."""

    def __init__(
        self,
        layers: Sequence[MoELayer],
        domains: Sequence[str],
        vocab_size: int,
        device: torch.device,
        *,
        olmoe_compat: bool = False,
        token_tables: bool = True,
        seed: int = 0,
        table_device: torch.device | None = None,
        table_dtype: str = "int32",
    ) -> None:
        self.layers = list(layers)
        self.domains = list(domains)
        self.vocab_size = vocab_size
        self.device = device
        self.olmoe_compat = olmoe_compat
        self.token_tables = token_tables
        self.choices = max(m.num_choices for m in self.layers)
        C, L = self.choices, len(self.layers)
        layer_domain = {"layer": [m.layer for m in self.layers], "domain": self.domains}
        pairs = [f"{a.layer}->{b.layer}" for a, b in itertools.pairwise(self.layers)]
        stats = {
            "tokens": BinCount(None, {"domain": self.domains}, device=device),
            "topk": BinCount(layer_domain, {"expert": C}, device=device),
            "top1": BinCount(layer_domain, {"expert": C}, device=device),
            "prob_sum": BinCount(layer_domain, {"expert": C}, device=device),
            "coactivation": BinCount({"layer": layer_domain["layer"]}, {"i": C, "j": C}, device=device),
            "indicators": Gram(L * C, device=device),
            "indicators_shuffled": Gram(L * C, device=device),
        }
        if pairs:
            stats["transitions"] = BinCount({"pair": pairs}, {"from": C, "to": C}, device=device)
        if token_tables:
            # Vocabulary × expert tables are the big ones (vocab · E · layers cells, three of them): integer counts
            # (exact: every weight is 0 or 1), and on the host when the statistics budget says so (see memory_plan).
            where = table_device if table_device is not None else device
            for table in TOKEN_TABLES:
                stats[f"token_{table}"] = BinCount({"layer": layer_domain["layer"], "token": vocab_size}, {"expert": C},
                                                   device=where, dtype=table_dtype)
                stats[f"occurrences_{table}"] = BinCount(None, {"token": vocab_size}, device=where, dtype=table_dtype)
        self.stats = StatSet(stats)
        self.seed = seed

    def nbytes(self) -> dict[str, int]:
        """Bytes each accumulator holds (build with device="meta" to size a run from its config alone)."""
        return {name: acc.nbytes for name, acc in self.stats.items()}

    def all_reduce(self) -> RoutingCounts:
        self.stats.all_reduce()
        return self

    def _stacked(self, records: Capture) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every selected layer's top-k index, weight [L, T, k] and router logits [L, T, C] on this device.

        Layers with fewer slots or choices are padded (weight 0: never counted; logit -inf: probability 0), so one
        update covers all layers: on a GPU each op is a kernel launch, and a loop over layers multiplied them.
        """
        k = max(records[m.layer].topk_index.shape[1] for m in self.layers)
        C = self.choices
        index, weight, logits = [], [], []
        for m in self.layers:  # layers may sit on other GPUs under --device_map auto
            rec = records[m.layer]
            i, w, z = rec.topk_index.to(self.device).long(), rec.topk_weight.to(self.device), rec.logits.to(self.device)
            if i.shape[1] < k:
                i, w = F.pad(i, (0, k - i.shape[1])), F.pad(w, (0, k - w.shape[1]))
            if z.shape[1] < C:
                z = F.pad(z.float(), (0, C - z.shape[1]), value=float("-inf"))
            index.append(i)
            weight.append(w)
            logits.append(z.float())
        return torch.stack(index), torch.stack(weight).float(), torch.stack(logits)

    @torch.no_grad()
    def update(self, records: Capture, batch: Batch, predicted: torch.Tensor | None = None) -> None:
        """One batch: records of every selected layer, the batch, and the model's predicted ids [B, S]."""
        input_ids, count_mask = batch.input_ids.to(self.device), batch.count_mask.to(self.device)
        C, L = self.choices, len(self.layers)
        counted = count_mask.reshape(-1).to(torch.float32)
        token_domain = batch.domain_ids.to(self.device).view(-1, 1).expand_as(input_ids).reshape(-1)
        self.stats["tokens"].update(token_domain, None, counted)
        ids = input_ids.reshape(-1)
        # The next token exists where the following position of the same window is a real (non-padding) token.
        next_ids = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1).reshape(-1)
        real = batch.attention_mask.to(self.device).bool()
        has_next = torch.cat([real[:, 1:], torch.zeros_like(real[:, :1])], dim=1).reshape(-1).to(counted.dtype)
        next_counted = counted * has_next

        index, weight, logits = self._stacked(records)  # [L, T, k], [L, T, k], [L, T, C]
        T = index.shape[1]
        layer = torch.arange(L, device=self.device)
        selected = (weight != 0).to(torch.float32)
        picked = counted.view(1, -1, 1) * selected
        by_layer_domain = {"layer": layer.view(L, 1, 1), "domain": token_domain.view(1, T, 1)}
        self.stats["topk"].update(index, by_layer_domain, picked)
        top1 = index.gather(2, weight.argmax(dim=2, keepdim=True)).squeeze(2)
        self.stats["top1"].update(top1, {"layer": layer.view(L, 1), "domain": token_domain.view(1, T)}, counted.expand(L, T))
        probs = torch.softmax(logits, dim=-1) * counted.view(1, -1, 1)
        experts = torch.arange(C, device=self.device).view(1, 1, C).expand(L, T, C)
        self.stats["prob_sum"].update(experts, by_layer_domain, probs)

        pairs = slot_pairs(index.shape[2], self.olmoe_compat)
        if pairs:
            pair_index, pair_picked = index, picked
            if self.olmoe_compat:  # rank-adjacent means adjacent by weight, whatever the slot order
                order = weight.argsort(dim=2, descending=True)
                pair_index, pair_picked = index.gather(2, order), picked.gather(2, order)
            first = torch.tensor([a for a, _ in pairs], device=self.device)
            second = torch.tensor([b for _, b in pairs], device=self.device)
            categories = pair_index[:, :, first] * C + pair_index[:, :, second]
            self.stats["coactivation"].update(categories, {"layer": layer.view(L, 1, 1)},
                                              pair_picked[:, :, first] * pair_picked[:, :, second])
        if self.token_tables:
            for table, token, weights in (("current", ids, picked), ("next", next_ids, picked * has_next.view(1, -1, 1)),
                                          ("predicted", predicted, picked)):
                if token is None:
                    continue
                token = token.to(self.device).reshape(-1)
                self.stats[f"token_{table}"].update(index, {"layer": layer.view(L, 1, 1), "token": token.view(1, T, 1)}, weights)
            self.stats["occurrences_current"].update(ids, None, counted)
            self.stats["occurrences_next"].update(next_ids, None, next_counted)
            if predicted is not None:
                self.stats["occurrences_predicted"].update(predicted.to(self.device).reshape(-1), None, counted)
        if L > 1:  # consecutive selected layers: (e at layer a, e' at layer b) for every pair of their choices
            categories = index[:-1].unsqueeze(3) * C + index[1:].unsqueeze(2)
            weights = picked[:-1].unsqueeze(3) * selected[1:].unsqueeze(2)
            self.stats["transitions"].update(categories, layer[:-1].view(L - 1, 1, 1, 1), weights)

        onehot = torch.zeros(L, T, C, device=self.device).scatter_add_(2, index, selected)  # padding adds 0
        self.stats["indicators"].update(onehot.permute(1, 0, 2).reshape(T, L * C), counted)
        # Drawn from the batch's stream number, not the process: a torchrun run shuffles exactly like one process.
        generator = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + batch.number)
        shuffled = shuffled_rows(onehot, counted, generator)
        counted_sorted = counted.sort(descending=True).values  # shuffled rows put counted tokens first
        self.stats["indicators_shuffled"].update(shuffled.permute(1, 0, 2).reshape(T, L * C), counted_sorted)

    # ------------------------------------------------------------------------------------ results as arrays
    def arrays(self) -> dict[str, np.ndarray]:
        """Counts as numpy arrays: topk/top1/prob_sum [L, D, C], coactivation [L, C, C], tokens [D], ..."""
        L, D, C = len(self.layers), len(self.domains), self.choices
        out = {
            "tokens": self.stats["tokens"].result().reshape(D),
            "topk": self.stats["topk"].result().reshape(L, D, C),
            "top1": self.stats["top1"].result().reshape(L, D, C),
            "prob_sum": self.stats["prob_sum"].result().reshape(L, D, C),
            "coactivation": self.stats["coactivation"].result().reshape(L, C, C),
            "correlation": self.stats["indicators"].correlation(),
            "correlation_shuffled": self.stats["indicators_shuffled"].correlation(),
        }
        if "transitions" in self.stats:
            out["transitions"] = self.stats["transitions"].result().reshape(L - 1, C, C)
        if self.token_tables:
            for table in TOKEN_TABLES:
                out[f"token_{table}"] = self.stats[f"token_{table}"].result().reshape(L, self.vocab_size, C)
                out[f"occurrences_{table}"] = self.stats[f"occurrences_{table}"].result().reshape(self.vocab_size)
        return out


# ----------------------------------------------------------------------------------------------- metrics


def _entropy_bits(p: np.ndarray, axis: int = -1) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(np.where(p > 0, p, 1)), 0.0)
    return terms.sum(axis=axis)


def jensen_shannon_bits(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """JSD(p || q) in bits along the last axis (0 = identical, 1 = disjoint supports)."""
    m = 0.5 * (p + q)
    return _entropy_bits(m) - 0.5 * (_entropy_bits(p) + _entropy_bits(q))


def selection_frequency(counts: dict[str, np.ndarray], layers: Sequence[MoELayer], domains: Sequence[str]) -> pd.DataFrame:
    """Per (layer, domain incl. 'all', expert): counts and frequencies f_e = N_{D,e}/N_D, top-k and top-1, with the
    uniform baselines k/E and 1/E. Per domain this is also the domain specialization spec(e, D) of the OLMoE paper."""
    rows = []
    tokens = counts["tokens"]
    for li, moe_layer in enumerate(layers):
        E, k = moe_layer.num_choices, moe_layer.top_k
        for d, domain in enumerate([*domains, ALL_DOMAINS]):
            if domain == ALL_DOMAINS:
                topk, top1, n = counts["topk"][li].sum(0), counts["top1"][li].sum(0), tokens.sum()
            else:
                topk, top1, n = counts["topk"][li, d], counts["top1"][li, d], tokens[d]
            for e in range(E):
                rows.append({
                    "layer": moe_layer.layer, "domain": domain, "expert": e,
                    "count_topk": topk[e], "freq_topk": topk[e] / n if n else np.nan,
                    "count_top1": top1[e], "freq_top1": top1[e] / n if n else np.nan,
                    "uniform_topk": k / E, "uniform_top1": 1 / E, "tokens": n,
                })
    return pd.DataFrame(rows)


def expert_specialization(counts: dict[str, np.ndarray], layers: Sequence[MoELayer], domains: Sequence[str]) -> pd.DataFrame:
    """Per (layer, expert): its domain distribution vs the overall domain mix (JSD, bits) and its top domain.

    The expert's distribution is N_{D,e} / Σ_D N_{D,e}; the mix is each domain's share of all assignments.
    """
    rows = []
    for li, moe_layer in enumerate(layers):
        per_domain = counts["topk"][li][:, : moe_layer.num_choices]  # [D, E]
        mix = per_domain.sum(1) / per_domain.sum()
        for e in range(moe_layer.num_choices):
            column = per_domain[:, e]
            total = column.sum()
            dist = column / total if total else np.full_like(column, np.nan)
            top = int(np.argmax(column)) if total else -1
            rows.append({
                "layer": moe_layer.layer, "expert": e, "assignments": total,
                "jsd_bits": float(jensen_shannon_bits(dist, mix)) if total else np.nan,
                "top_domain": domains[top] if top >= 0 else "", "top_domain_share": dist[top] if total else np.nan,
            })
    return pd.DataFrame(rows)


def coverage(counts: dict[str, np.ndarray], layers: Sequence[MoELayer], domains: Sequence[str], share: float = 0.5) -> pd.DataFrame:
    """Per (layer, domain): the fewest experts that handle `share` of the domain's top-k assignments."""
    rows = []
    for li, moe_layer in enumerate(layers):
        for d, domain in enumerate([*domains, ALL_DOMAINS]):
            column = counts["topk"][li].sum(0) if domain == ALL_DOMAINS else counts["topk"][li, d]
            column = column[: moe_layer.num_choices]
            total = column.sum()
            ranked = np.sort(column)[::-1]
            needed = int(np.searchsorted(np.cumsum(ranked) / total, share - 1e-12) + 1) if total else 0
            rows.append({
                "layer": moe_layer.layer, "domain": domain, "share": share, "experts_needed": needed,
                "fraction_of_experts": needed / moe_layer.num_choices,
                "share_handled": ranked[:needed].sum() / total if total else np.nan,
            })
    return pd.DataFrame(rows)


def token_overlap(table: np.ndarray, min_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """From a token × expert count table [V, E]: Jaccard of the id sets (ids seen ≥ min_count times by each expert)
    and the weighted overlap Σ_t min(c_i, c_j) / Σ_t max(c_i, c_j); both [E, E]."""
    present = (table >= min_count).astype(np.float64)
    inter = present.T @ present
    sizes = present.sum(0)
    union = sizes[:, None] + sizes[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        jaccard = np.where(union > 0, inter / np.where(union > 0, union, 1), np.nan)
    E = table.shape[1]
    low, high = np.zeros((E, E)), np.zeros((E, E))
    for i in range(E):  # E passes over the vocabulary (vectorised over j): fine for E ≤ a few hundred
        low[i] = np.minimum(table[:, i : i + 1], table).sum(0)
        high[i] = np.maximum(table[:, i : i + 1], table).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        weighted = np.where(high > 0, low / np.where(high > 0, high, 1), np.nan)
    return jaccard, weighted


def token_specialization(table: np.ndarray, occurrences: np.ndarray, top_k: int, min_count: int = 1) -> dict[str, float]:
    """OLMoE's vocabulary specialization: for id t, max_e N_{t,e} / n_t (1 = always the same expert; k-way
    routing gives at most 1 per expert); mean over ids seen ≥ min_count times, unweighted and weighted by n_t."""
    seen = occurrences >= max(min_count, 1)
    if not seen.any():
        return {"ids": 0, "unweighted": np.nan, "weighted": np.nan, "uniform": np.nan}
    spec = table[seen].max(axis=1) / occurrences[seen]
    weights = occurrences[seen]
    return {
        "ids": int(seen.sum()),
        "unweighted": float(spec.mean()),
        "weighted": float((spec * weights).sum() / weights.sum()),
        "uniform": top_k / table.shape[1],
    }


def coactivation_table(matrix: np.ndarray, selected: np.ndarray, tokens: float, layer: int) -> pd.DataFrame:
    """Tidy co-activation for one layer: C_ij, P(j ∈ K | i ∈ K) = C_ij / n_i, Jaccard C_ij / (n_i + n_j - C_ij)
    and the independence baseline p_i p_j / (p_i + p_j - p_i p_j) with p_i = n_i / N."""
    E = matrix.shape[0]
    i, j = np.meshgrid(np.arange(E), np.arange(E), indexing="ij")
    n_i, n_j, c = selected[i], selected[j], matrix
    p_i, p_j = n_i / tokens, n_j / tokens
    with np.errstate(invalid="ignore", divide="ignore"):
        table = pd.DataFrame({
            "layer": layer, "i": i.ravel(), "j": j.ravel(), "count": c.ravel(),
            "p_j_given_i": (c / n_i).ravel(),
            "jaccard": (c / (n_i + n_j - c)).ravel(),
            "jaccard_independent": (p_i * p_j / (p_i + p_j - p_i * p_j)).ravel(),
        })
    return table[table.i != table.j].reset_index(drop=True)


def load_balance(counts: dict[str, np.ndarray], layers: Sequence[MoELayer]) -> pd.DataFrame:
    """Per layer, all domains pooled: CV and max/mean of f_e, dead experts, and the switch auxiliary loss
    E · Σ_e f_e · P̄_e (f_e = share of tokens with e in their top-k, P̄_e = mean router probability)."""
    rows = []
    tokens = counts["tokens"].sum()
    for li, moe_layer in enumerate(layers):
        E = moe_layer.num_choices
        freq = counts["topk"][li].sum(0)[:E] / tokens
        mean_prob = counts["prob_sum"][li].sum(0)[:E] / tokens
        rows.append({
            "layer": moe_layer.layer, "experts": E, "top_k": moe_layer.top_k, "tokens": tokens,
            "cv": freq.std() / freq.mean(), "max_over_mean": freq.max() / freq.mean(),
            "dead_experts": int((counts["topk"][li].sum(0)[:E] == 0).sum()),
            "min_over_mean": freq.min() / freq.mean(),
            "aux_loss": E * float((freq * mean_prob).sum()),
        })
    return pd.DataFrame(rows)


def transition_probabilities(transitions: np.ndarray, selected_from: np.ndarray) -> np.ndarray:
    """P(e' ∈ K_b | e ∈ K_a) = #{tokens with e ∈ K_a and e' ∈ K_b} / #{tokens with e ∈ K_a}; [C, C]."""
    n = selected_from.reshape(-1, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, transitions / np.where(n > 0, n, 1), np.nan)
