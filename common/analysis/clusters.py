"""Token-cluster specialization (docs/METRICS.md#token-cluster-specialization): spherical k-means of the
unembedding, and how far the cluster mix of an expert's input and output tokens departs from its layer's.

1. The rows u_t of the output embedding (one per token id t) are centred, u_t − ū, and scaled to unit length.
   Spherical k-means (Dhillon & Modha 2001) with k-means++ seeding (Arthur & Vassilvitskii 2007; D² = the squared
   Euclidean distance 2 − 2 cos between unit vectors, greedy variant) groups them into k clusters: each row goes to the centroid of
   largest cosine, each centroid is its members' mean scaled to unit length, until no assignment changes or
   `max_iter` rounds have run. Everything is one matmul + argmax per round on the model's device, in row chunks.
2. Input tokens: the (token id × expert) count table of `RoutingCounts` (counted tokens, picks with a non-zero
   weight) summed over the ids of each cluster gives N_{e,c}, the expert's cluster counts.
   Output tokens: for each such pick, the top-1 token of the expert's weighted output w_e·E_e(x) alone passed
   through the model's final norm and unembedding (the logit lens of the expert's own contribution, not of the
   residual stream plus it); `ExpertOutputTokens` streams those (token id × expert) counts.
3. Per expert: JSD (bits) between its cluster distribution π_e = N_{e,·}/n_e and the layer's μ = Σ_e N_{e,·} / Σ N,
   minus the expected JSD of n_e tokens drawn from μ (multinomial, estimated from seeded draws): the score is ≈ 0
   for an expert that receives a random sample of the layer's tokens, whatever n_e, and grows with specialization.
   The subtraction matters because the JSD of a finite sample from μ itself is > 0 and shrinks with n_e (about
   (k − 1) / (8 n_e ln 2) bits), which would otherwise rank rarely chosen experts as specialised.

Origin: the clustering and specialization score of "The Expert Strikes Back" (Herbst, Lee, Wermter 2026,
arXiv:2604.02178, section 6.2); the code here is moescope's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from common.analysis.specialization import jensen_shannon_bits
from common.data import Batch
from common.hooks import Capture
from common.model import MoELayer, MoEModel
from common.stats import BinCount, StatSet

# Cells of a [rows, k] similarity block or a [rows, vocab] logit block computed at once (2^24 fp32 = 64 MiB).
MAX_BLOCK_ELEMENTS = 2**24
SIDES = ("input", "output")


# ------------------------------------------------------------------------------------------------ k-means


@dataclass
class KMeansResult:
    assignment: torch.Tensor  # [V] int64 cluster of each row
    centroids: torch.Tensor  # [k, d] unit rows (an empty cluster keeps its last centroid)
    similarity: torch.Tensor  # [V] cosine of each row with its own centroid
    iterations: int  # assignment rounds after seeding
    converged: bool  # True: the last round changed no assignment

    @property
    def sizes(self) -> torch.Tensor:
        return torch.bincount(self.assignment, minlength=self.centroids.shape[0])

    def summary(self) -> dict:
        return {"k": int(self.centroids.shape[0]), "iterations": self.iterations, "converged": self.converged,
                "mean_cosine": float(self.similarity.mean()), "empty_clusters": int((self.sizes == 0).sum())}


def centred_unit_rows(matrix: torch.Tensor) -> torch.Tensor:
    """Rows minus their mean row, scaled to unit length (float32; a row that is all zero after centring stays 0)."""
    x = matrix.detach().float()
    x = x - x.mean(dim=0, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, cosine) of the most similar centroid for every row of x (unit rows), in row chunks."""
    step = max(1, MAX_BLOCK_ELEMENTS // max(1, centroids.shape[0]))
    index = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    best = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], step):
        best[start : start + step], index[start : start + step] = (x[start : start + step] @ centroids.T).max(dim=1)
    return index, best


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k seed centroids from unit rows x [V, d] by greedy D² sampling (D² = 2 − 2 cos to the nearest seed so far).

    The first seed is uniform; each further one is the best of 2 + ⌊ln k⌋ candidates drawn with probability ∝ D²:
    the one leaving the smallest total D² (the greedy variant of k-means++, Arthur & Vassilvitskii 2007; it rarely
    puts two seeds in one well-separated group, which plain D² sampling does often enough to matter). Rows
    identical to a chosen seed have D² = 0 and are never drawn again; once every row is at distance 0 (fewer
    distinct rows than k), the rest are drawn uniformly among the rows not chosen.
    """
    V = x.shape[0]
    trials = 2 + int(np.log(k))
    chosen = torch.empty(k, dtype=torch.long, device=x.device)
    chosen[0] = torch.randint(V, (1,), generator=generator, device=x.device)
    best = x @ x[chosen[0]]
    for j in range(1, k):
        weight = (2.0 - 2.0 * best).clamp_min(0.0)
        if not bool(weight.sum() > 0):
            weight = torch.ones_like(weight)
            weight[chosen[:j]] = 0.0
        candidates = torch.multinomial(weight, trials, replacement=True, generator=generator)
        closest = torch.maximum(best.unsqueeze(1), x @ x[candidates].T)  # [V, trials]
        pick = int((2.0 - 2.0 * closest).clamp_min(0.0).sum(dim=0).argmin())
        chosen[j] = candidates[pick]
        best = closest[:, pick].contiguous()
    return x[chosen].clone()


def _normalized_means(x: torch.Tensor, assignment: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, assignment, x)
    sizes = torch.bincount(assignment, minlength=k)
    norms = sums.norm(dim=1, keepdim=True)
    return sums / norms.clamp_min(torch.finfo(x.dtype).tiny), sizes


def spherical_kmeans(x: torch.Tensor, k: int, *, seed: int = 0, max_iter: int = 100,
                     progress: bool = False, desc: str | None = None) -> KMeansResult:
    """Spherical k-means of the unit rows x [V, d] (on x's device), k-means++ seeded from `seed`.

    Each round assigns every row to its centroid of largest cosine, then moves each centroid to its members' mean
    scaled to unit length; an emptied cluster is re-seeded at the row that is worst served (lowest cosine to its
    centroid). Stops when a round changes no assignment (converged) or after `max_iter` rounds. On return every
    row is assigned to its most similar returned centroid (ties: the lower cluster index).
    """
    V = x.shape[0]
    if not 1 <= k <= V:
        raise ValueError(f"spherical_kmeans: k = {k} must be between 1 and the {V} rows")
    generator = torch.Generator(device=x.device).manual_seed(int(seed))
    centroids = kmeans_plus_plus(x, k, generator)
    assignment, similarity = nearest_centroid(x, centroids)
    converged, rounds = False, 0
    with tqdm(total=max_iter, desc=desc or f"k-means k={k}", unit="round", disable=not progress, leave=False) as bar:
        while rounds < max_iter:
            centroids, sizes = _normalized_means(x, assignment, k)
            empty = torch.nonzero(sizes == 0).flatten()
            if len(empty):
                worst = similarity.argsort()[: len(empty)]
                centroids[empty] = x[worst]
            new_assignment, similarity = nearest_centroid(x, centroids)
            rounds += 1
            bar.update(1)
            changed = int((new_assignment != assignment).sum())
            assignment = new_assignment
            bar.set_postfix(changed=changed)
            if changed == 0:
                converged = True
                break
    return KMeansResult(assignment, centroids, similarity, rounds, converged)


def unembedding_rows(moe: MoEModel) -> torch.Tensor:
    """The output embedding W_U [V, H] (its rows are the token directions the logits are dot products with)."""
    head = moe.model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is None:
        raise ValueError(f"{type(moe.model).__name__}: the output head has no weight matrix")
    return weight.detach()


def token_strings(tokenizer, vocab_size: int) -> list[str]:
    """Each id as text (tokenizer.decode of the id alone); a piece that is no text on its own (partial UTF-8)
    as the tokenizer's raw token string; rows beyond the tokenizer (padded heads) as '#<id>'."""
    known = min(vocab_size, len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in range(known)], clean_up_tokenization_spaces=False)
    raw = tokenizer.convert_ids_to_tokens(list(range(known)))
    out = [text if "\ufffd" not in text else (piece if piece is not None else text) for text, piece in zip(texts, raw, strict=True)]
    return out + [f"#{i}" for i in range(known, vocab_size)]


def cluster_members(result: KMeansResult, strings: Sequence[str]) -> dict[str, list[str]]:
    """{cluster id: its tokens' strings}, most central (largest cosine to the centroid) first."""
    assignment = result.assignment.cpu().numpy()
    similarity = result.similarity.cpu().numpy()
    order = np.lexsort((-similarity, assignment))  # by cluster, then by decreasing cosine
    bounds = np.searchsorted(assignment[order], np.arange(result.centroids.shape[0] + 1))
    return {str(c): [strings[t] for t in order[bounds[c] : bounds[c + 1]]] for c in range(result.centroids.shape[0])}


# ------------------------------------------------------------------------------------------------ output tokens


def weighted_contributions(moe_layer: MoELayer, expert: int, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w · E_e(x) for rows x [n, H] and weights [n], as the block adds it: Llama4 scales the experts' input
    instead, a zero-compute choice (e ≥ E, LongCat) passes w · x on."""
    w = weight.to(x.dtype).unsqueeze(1)
    if expert >= moe_layer.num_experts:
        return w * x

    def apply(h: torch.Tensor) -> torch.Tensor:  # the expert's own weights (faster than a call of the fused module)
        return moe_layer.expert_output_from_neurons(expert, moe_layer.expert_neurons(expert, h))

    if moe_layer.kind == "llama4":
        return apply(w * x)
    return w * apply(x)


def lens_top1(moe: MoEModel, vectors: torch.Tensor) -> torch.Tensor:
    """Top-1 token id of each vector [n, H] through the model's final norm and unembedding, in row chunks."""
    step = max(1, MAX_BLOCK_ELEMENTS // max(1, moe.vocab_size))
    out = torch.empty(vectors.shape[0], dtype=torch.long, device=vectors.device)
    for start in range(0, vectors.shape[0], step):
        out[start : start + step] = moe.unembed(vectors[start : start + step]).argmax(dim=-1)
    return out


class ExpertOutputTokens:
    """Streamed (layer, token id, expert) counts of the logit-lens top-1 token of each pick's weighted output.

    A pick counts where the token counts and its weight is non-zero, as in `RoutingCounts`; one token per pick,
    so an expert's total equals its input total n_e. Memory: layers × vocab × choices int32 cells.
    """

    def __init__(self, moe: MoEModel, layers: Sequence[MoELayer], device: torch.device | None = None) -> None:
        self.moe, self.layers = moe, list(layers)
        self.choices = max(m.num_choices for m in self.layers)
        self.device = device if device is not None else moe.device
        self.stats = StatSet({"tokens": BinCount({"layer": [m.layer for m in self.layers], "token": moe.vocab_size},
                                                 {"expert": self.choices}, device=self.device, dtype="int32")})

    @torch.no_grad()
    def update(self, records: Capture, batch: Batch) -> None:
        counted = batch.count_mask.reshape(-1)
        for li, moe_layer in enumerate(self.layers):
            rec = records[moe_layer.layer]
            x = rec.expert_input
            index, weight = rec.topk_index.to(x.device).long(), rec.topk_weight.to(x.device)
            picked = (weight != 0) & counted.to(x.device).view(-1, 1)
            rows, slots = picked.nonzero(as_tuple=True)
            experts = index[rows, slots]
            order = experts.argsort(stable=True)
            rows, slots, experts = rows[order], slots[order], experts[order]
            values, counts = torch.unique_consecutive(experts, return_counts=True)
            tokens = torch.empty_like(experts)
            start = 0
            for e, n in zip(values.tolist(), counts.tolist(), strict=True):
                span = slice(start, start + n)
                vectors = weighted_contributions(moe_layer, e, weight[rows[span], slots[span]], x[rows[span]])
                tokens[span] = lens_top1(self.moe, vectors)
                start += n
            self.stats["tokens"].update(experts.to(self.device),
                                        {"layer": torch.full_like(experts, li).to(self.device), "token": tokens.to(self.device)})

    def all_reduce(self) -> ExpertOutputTokens:
        self.stats.all_reduce()
        return self

    def table(self) -> np.ndarray:
        """[layer, token id, expert] counts."""
        return self.stats["tokens"].result().reshape(len(self.layers), self.moe.vocab_size, self.choices)


# ------------------------------------------------------------------------------------------------ scores


def cluster_counts(token_table: np.ndarray, assignment: np.ndarray, k: int) -> np.ndarray:
    """[experts, k] counts N_{e,c} = Σ_{t in cluster c} table[t, e] from a token × expert table [V, experts]."""
    table = torch.as_tensor(np.asarray(token_table, dtype=np.float64))
    index = torch.as_tensor(np.asarray(assignment, dtype=np.int64))
    return torch.zeros(k, table.shape[1], dtype=torch.float64).index_add_(0, index, table).T.numpy()


def jsd_bits(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence in bits along the last axis (0 … 1); NaN where p or q holds a NaN."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    undefined = np.isnan(p).any(axis=-1) | np.isnan(q).any(axis=-1)
    return np.where(undefined, np.nan, jensen_shannon_bits(p, q))


def multinomial_jsd_baseline(q: np.ndarray, n: np.ndarray, draws: int, rng: np.random.Generator) -> np.ndarray:
    """[len(n)] expected JSD (bits) between the empirical distribution of n_i draws from q and q itself, estimated
    as the mean over `draws` multinomial samples (all experts and draws in one call); NaN where n_i = 0."""
    q = np.asarray(q, dtype=np.float64)
    q = q / q.sum()
    n = np.asarray(n, dtype=np.int64)
    sizes = np.broadcast_to(n[:, None], (len(n), draws))
    samples = rng.multinomial(sizes, q)  # [experts, draws, k]
    with np.errstate(invalid="ignore", divide="ignore"):
        p = samples / n[:, None, None]
    out = jsd_bits(p, q).mean(axis=1)
    return np.where(n > 0, out, np.nan)


def baseline_rng(seed: int, layer: int, k: int, side: int) -> np.random.Generator:
    """The seeded generator of one (layer, k, input/output) baseline: independent of the order of --clusters."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(layer) & 0xFFFFFFFF, int(k), int(side)])


def specialization_scores(counts: np.ndarray, draws: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """From an expert × cluster count table [E, k]: per expert `tokens` n_e, `jsd` JSD(π_e ‖ μ), `baseline` the
    expected JSD of n_e draws from μ, and `score` = jsd − baseline (bits; NaN for experts without tokens).
    μ is the layer's overall cluster distribution, Σ_e N_{e,·} / Σ N."""
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.sum(axis=1)
    total = counts.sum(axis=0)
    if total.sum() <= 0:
        nan = np.full(len(n), np.nan)
        return {"tokens": n, "jsd": nan, "baseline": nan.copy(), "score": nan.copy()}
    mu = total / total.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        pi = counts / n[:, None]
    jsd = np.where(n > 0, jsd_bits(pi, mu[None, :]), np.nan)
    baseline = multinomial_jsd_baseline(mu, n.round().astype(np.int64), draws, rng)
    return {"tokens": n, "jsd": jsd, "baseline": baseline, "score": jsd - baseline}
