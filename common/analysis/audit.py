"""The causal audit (interv.py --data): does what we observe of an expert predict what removing it costs?

On the same counted tokens as the ablations, per document (for the bootstrap), per expert of the ablated layer:
ΔNLL (ablation importance) beside the observational metrics — selection frequency, mean weight, REAP saliency,
mean output norm, JSD specialization and token coverage — and, per metric, the Spearman and Kendall rank
correlations with ΔNLL over the experts, with percentile bootstrap intervals over documents, and the top-10 overlap.
Definitions: docs/METRICS.md#causal-audit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy import stats

from common.analysis.importance import nll_targets
from common.analysis.pruning import routed_output_norms
from common.analysis.specialization import jensen_shannon_bits
from common.data import Batch
from common.model import MoELayer

METRICS = ("frequency", "mean_weight", "saliency", "output_norm", "jsd_specialization", "token_coverage")
TOP = 10


class AuditAccumulator:
    """Per-document sums on the host: predictions and ΔNLL per ablated expert; counted tokens, routed tokens, Σ w,
    Σ w·‖E_e(x)‖ and Σ ‖E_e(x)‖ per expert; and, over all documents, the token ids routed to each expert."""

    def __init__(self, layer: MoELayer, experts: Sequence[int], vocab_size: int, device: torch.device) -> None:
        self.layer, self.experts = layer, list(experts)
        self.doc_index: dict[tuple[int, int], int] = {}
        self.doc_domain: list[int] = []
        E, X = layer.num_experts, len(self.experts)
        self._cols = 0
        self.predictions = np.zeros(0)
        self.delta = np.zeros((X, 0))
        self.counted = np.zeros(0)
        self.routed = np.zeros((E, 0))
        self.weight = np.zeros((E, 0))
        self.saliency = np.zeros((E, 0))
        self.norm = np.zeros((E, 0))
        self.token_routed = torch.zeros(E, vocab_size, dtype=torch.float64, device=device)
        self.token_seen = torch.zeros(vocab_size, dtype=torch.float64, device=device)

    def _documents(self, batch: Batch) -> np.ndarray:
        """[B, S] compact document index of every token (-1 on padding), new documents appended."""
        docs = batch.doc_ids.cpu().numpy()
        domains = batch.domain_ids.cpu().numpy()
        out = np.full(docs.shape, -1, dtype=np.int64)
        for row in range(docs.shape[0]):
            for doc in np.unique(docs[row][docs[row] >= 0]):
                key = (int(domains[row]), int(doc))
                if key not in self.doc_index:
                    self.doc_index[key] = len(self.doc_index)
                    self.doc_domain.append(int(domains[row]))
                out[row][docs[row] == doc] = self.doc_index[key]
        self._grow(len(self.doc_index))
        return out

    def _grow(self, n: int) -> None:
        if n <= self._cols:
            return
        extra = max(n, 2 * self._cols) - self._cols
        for name in ("predictions", "counted"):
            setattr(self, name, np.concatenate([getattr(self, name), np.zeros(extra)]))
        for name in ("delta", "routed", "weight", "saliency", "norm"):
            old = getattr(self, name)
            setattr(self, name, np.concatenate([old, np.zeros((old.shape[0], extra))], axis=1))
        self._cols += extra

    @torch.no_grad()
    def update_base(self, batch: Batch, record) -> None:
        """The unedited forward: the layer's routing and expert inputs of the batch's counted tokens."""
        docs = self._documents(batch)
        self._docs, self._targets = docs, nll_targets(batch).cpu().numpy()
        np.add.at(self.predictions, docs[:, 1:][self._targets], 1.0)
        counted = batch.count_mask.cpu().numpy()
        token_doc = docs.reshape(-1)
        np.add.at(self.counted, docs[counted], 1.0)
        layer = self.layer
        keep = batch.count_mask.reshape(-1).to(record.topk_index.device)
        index, weight = record.topk_index.long()[keep], record.topk_weight.float()[keep]
        x, ids = record.expert_input[keep], batch.input_ids.reshape(-1).to(keep.device)[keep]
        doc_of = torch.from_numpy(token_doc[keep.cpu().numpy()])
        self.token_seen.index_add_(0, ids.to(self.token_seen.device),
                                   torch.ones(ids.shape[0], dtype=torch.float64, device=self.token_seen.device))
        for e, t, w, norms in routed_output_norms(layer, index, weight, x):
            d = doc_of[t.cpu()].numpy()
            np.add.at(self.routed[e], d, 1.0)
            np.add.at(self.weight[e], d, w.cpu().numpy())
            np.add.at(self.saliency[e], d, (w * norms).cpu().numpy())
            np.add.at(self.norm[e], d, norms.cpu().numpy())
            self.token_routed[e].index_add_(0, ids[t].to(self.token_routed.device),
                                            torch.ones(t.shape[0], dtype=torch.float64, device=self.token_routed.device))

    def update_ablated(self, position: int, batch: Batch, nll: torch.Tensor, base_nll: torch.Tensor) -> None:
        change = (nll.double() - base_nll.double()).cpu().numpy()
        np.add.at(self.delta[position], self._docs[:, 1:][self._targets], change[self._targets])

    # -------------------------------------------------------------------------------------- results
    def _sums(self, multiplicity: np.ndarray | None = None) -> dict[str, np.ndarray]:
        n = len(self.doc_index)
        m = np.ones(n) if multiplicity is None else multiplicity

        def total(a: np.ndarray) -> np.ndarray:
            return a[..., :n] @ m

        sums = {name: total(getattr(self, name)) for name in ("predictions", "delta", "counted", "routed", "weight",
                                                             "saliency", "norm")}
        domains = np.array(self.doc_domain)
        by_domain = np.stack([self.routed[:, :n] @ (m * (domains == d)) for d in range(domains.max() + 1)], axis=1) \
            if n else np.zeros((self.routed.shape[0], 1))
        sums["routed_by_domain"] = by_domain
        return sums

    def metrics(self, multiplicity: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """ΔNLL and every observational metric of the ablated experts (documents weighted by `multiplicity`)."""
        s = self._sums(multiplicity)
        routed = np.maximum(s["routed"], 1)
        mix = s["routed_by_domain"].sum(0)
        jsd = np.array([float(jensen_shannon_bits(row / row.sum(), mix / mix.sum())) if row.sum() else 0.0
                        for row in s["routed_by_domain"]])
        coverage = ((self.token_routed > 0).sum(1).double() / max(float((self.token_seen > 0).sum()), 1.0)).cpu().numpy()
        every = {
            "frequency": s["routed"] / max(s["counted"], 1),
            "mean_weight": s["weight"] / max(s["counted"], 1),
            "saliency": np.where(s["routed"] > 0, s["saliency"] / routed, 0.0),
            "output_norm": np.where(s["routed"] > 0, s["norm"] / routed, 0.0),
            "jsd_specialization": jsd,
            "token_coverage": coverage,
        }
        chosen = {name: values[self.experts] for name, values in every.items()}
        chosen["delta_nll"] = s["delta"] / max(s["predictions"], 1)
        return chosen


def rank_correlations(metric: np.ndarray, delta: np.ndarray) -> tuple[float, float]:
    """(Spearman ρ, Kendall τ-b) of a metric against ΔNLL over the experts; NaN when either is constant."""
    if len(metric) < 3 or np.ptp(metric) == 0 or np.ptp(delta) == 0:
        return float("nan"), float("nan")
    return float(stats.spearmanr(metric, delta).statistic), float(stats.kendalltau(metric, delta).statistic)


def top_overlap(metric: np.ndarray, delta: np.ndarray, top: int = TOP) -> int:
    """How many of the `top` experts with the largest ΔNLL the metric also ranks among its `top` largest."""
    top = min(top, len(delta))
    return len(set(np.argsort(-delta, kind="stable")[:top]) & set(np.argsort(-metric, kind="stable")[:top]))


def correlations(acc: AuditAccumulator, draws: int = 200, seed: int = 0,
                 metrics: Mapping[str, np.ndarray] | None = None) -> list[dict]:
    """Per metric: ρ and τ with 95% percentile intervals from `draws` bootstrap resamples of the documents, and the
    top-10 overlap. Coverage is not resampled (its token sets are not kept per document): its interval is empty."""
    point = metrics or acc.metrics()
    rng = np.random.default_rng(seed)
    n = len(acc.doc_index)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in METRICS}
    for _ in range(draws if n > 1 else 0):
        multiplicity = np.bincount(rng.integers(0, n, n), minlength=n).astype(float)
        resampled = acc.metrics(multiplicity)
        for name in METRICS:
            if name != "token_coverage":
                samples[name].append(rank_correlations(resampled[name], resampled["delta_nll"]))
    rows = []
    for name in METRICS:
        rho, tau = rank_correlations(point[name], point["delta_nll"])
        drawn = np.array(samples[name]) if samples[name] else np.full((0, 2), np.nan)
        low, high = (np.nanpercentile(drawn, [2.5, 97.5], axis=0) if len(drawn) and np.isfinite(drawn).any()
                     else np.full((2, 2), np.nan))
        rows.append({"metric": name, "spearman": rho, "spearman_low": low[0], "spearman_high": high[0],
                     "kendall": tau, "kendall_low": low[1], "kendall_high": high[1],
                     "top10_overlap": top_overlap(point[name], point["delta_nll"]),
                     "experts": len(point["delta_nll"]), "documents": n, "bootstrap_draws": len(samples[name])})
    return rows
