"""Similarity of expert outputs, all pairs of experts at once: mean cosine, linear CKA, debiased CKA, RBF CKA.

For n tokens x_a and experts e = 1..E (plus the shared experts as one extra row, where a layer has them),
Y_e = E_e(X) ∈ R^{n×d}. Each kernel method compares the Gram matrices K_e = k(Y_e, Y_e) of every pair of experts:

- HSIC (biased, centred):  tr(K H L H) = P − (2/N)·1ᵀKL1 + (1ᵀK1)(1ᵀL1)/N²   (H = I − 11ᵀ/N; the usual
  1/(N−1)² factor cancels in CKA), with P = tr(KL) = Σ_ab K_ab L_ab and 1ᵀKL1 = Σ_a r_K(a) r_L(a), r = row sums.
- HSIC (unbiased, Song et al. 2012, "Feature selection via dependence maximization", JMLR 13, eq. 5), with
  K̃ = K with its diagonal zeroed:
  [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((N−1)(N−2)) − (2/(N−2))·1ᵀK̃L̃1] / (N(N−3)); undefined (NaN) for N < 4.
- CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K)·HSIC(L, L)) (Kornblith et al. 2019, "Similarity of neural network
  representations revisited", ICML). Linear CKA (k = dot product) equals the feature-space form
  ‖YᵢᵀYⱼ‖²_F / (‖YᵢᵀYᵢ‖_F ‖YⱼᵀYⱼ‖_F) on column-centred Y. "cka-debiased" is linear CKA with the unbiased HSIC
  (Kornblith's debiased CKA); "cka-rbf" uses k(y, y') = exp(−‖y − y'‖² / (2σ_e²)) with the biased HSIC, σ_e per
  expert (default: the median pairwise distance of that expert's outputs, the median heuristic).
- cosine: (1/N) Σ_a cos(E_i(x_a), E_j(x_a)) on the same tokens (a zero output vector counts as cosine 0).

All pairs at once: the tokens are cut into blocks; for each pair of blocks (A, B ≥ A) the kernel blocks of all
experts K_e[A, B] ([E, |A|, |B|]) are built together and reduced with matrix products into [E, E] sums (P),
per-expert row sums [E, n] and diagonals [E, n]; HSIC and CKA of every pair follow from those. Nothing holds
E²·n² or even E·n² numbers, and there is no loop over pairs. Outputs are centred per expert (feature means over
all n tokens) before the linear Gram is formed: this changes neither HSIC estimator (both are invariant to a
shift of the features) but avoids catastrophic cancellation in float32.

Routed-only: each pair (i, j) is compared on S_ij = the tokens routed to both, i.e. tokens weighted by
w_ij(a) = m_i(a)·m_j(a) with m the routing mask. The same sums, with masked kernels K'_e = M_e K_e M_e: P_ij, and
per-pair row sums R[i, j, a] = Σ_b K'_i[a, b]·m_j(b) ([E, E, n], only in this mode), Q[i, j] = Σ_ab w_ij(a)w_ij(b)·
K_i[a, b]² for HSIC(K_i, K_i) on S_ij, N_ij = Σ_a w_ij(a). A pair with N_ij < `min_pair_tokens` is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.errors import InputError
from common.model import MoELayer, expert_output_chunks

METHODS = ("cosine", "cka", "cka-debiased", "cka-rbf")
KERNELS = {"cka": "linear", "cka-debiased": "linear", "cka-rbf": "rbf"}
METHOD_LABELS = {"cosine": "mean cosine", "cka": "linear CKA", "cka-debiased": "debiased linear CKA",
                 "cka-rbf": "RBF CKA"}
SHARED = "shared"  # the label of the shared-experts row/column


# ----------------------------------------------------------------------------------------------- outputs
class OutputSource(Protocol):
    """Expert outputs on the sample, by token block: `rows` experts (shared last), `n` tokens, width `width`."""

    rows: int
    n: int
    width: int

    def __call__(self, index: slice | torch.Tensor, rows: Sequence[int] | None = None) -> torch.Tensor:
        """[len(rows) or self.rows, tokens, width] outputs (compute dtype) of the tokens `index`, in a new tensor
        (the caller centres it in place)."""
        ...


class TensorOutputs:
    """Outputs already held: Y [rows, n, width]; each call returns a copy of the block asked for."""

    def __init__(self, outputs: torch.Tensor, dtype: torch.dtype = torch.float32):
        self.y = outputs.to(dtype)
        self.rows, self.n, self.width = self.y.shape

    def __call__(self, index, rows=None):
        y = self.y if rows is None else self.y[list(rows)]
        return y[:, index].clone() if isinstance(index, slice) else y[:, index]  # a copy the caller may modify


class ExpertOutputs:
    """Outputs recomputed from the layer's inputs x [n, H] on every call (shared-expert outputs, if any, are held)."""

    def __init__(self, moe_layer: MoELayer, x: torch.Tensor, shared: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32, max_elements: int = 2**24):
        self.layer, self.x, self.shared, self.dtype, self.max_elements = moe_layer, x, shared, dtype, max_elements
        self.num_experts = moe_layer.num_experts
        self.rows = self.num_experts + (shared is not None)
        self.n, self.width = x.shape

    @torch.no_grad()
    def __call__(self, index, rows=None):
        rows = list(range(self.rows)) if rows is None else list(rows)
        if rows != sorted(rows):
            raise ValueError("ExpertOutputs: rows must be in increasing order")
        x = self.x[index]
        out = torch.empty(len(rows), x.shape[0], self.width, dtype=self.dtype, device=x.device)
        routed = [r for r in rows if r < self.num_experts]
        if routed:  # chunks of all experts at once, written straight into `out` (no second copy)
            for part, block in expert_output_chunks(self.layer, x, routed, self.max_elements):
                out[: len(routed), part] = block
        if len(routed) < len(rows):  # the shared row, last
            out[-1] = self.shared[index]
        return out

    def all(self, block: int) -> TensorOutputs:
        """Every output at once (the cache), computed `block` tokens at a time."""
        cache = torch.empty(self.rows, self.n, self.width, dtype=self.dtype, device=self.x.device)
        for a in range(0, self.n, block):
            cache[:, a : a + block] = self(slice(a, a + block))
        return TensorOutputs(cache, self.dtype)


# ----------------------------------------------------------------------------------------------- memory plan
@dataclass(frozen=True)
class BlockPlan:
    block: int  # tokens per block of the kernel (Gram) loop
    token_block: int  # tokens per block of the per-token pass (cosine, means)
    cache: bool  # hold every output ([rows, n, width]) instead of recomputing it per block
    estimate_mb: float  # planned peak working memory of the similarity computation
    free_mb: float  # the budget left beside the fixed accumulators and the cache: what one step may use

    @property
    def sigma_tokens_max(self) -> int:
        """Largest token subset whose float64 pairwise-distance matrix (with its temporaries, ~4 copies) fits."""
        return max(2, math.isqrt(int(self.free_mb * 2**20) // (4 * 8)))


def _working_bytes(b: int, rows: int, width: int, masked: bool, rbf: bool, cached: bool, itemsize: int) -> int:
    """Peak bytes of one step of the kernel loop with token blocks of b (see `KernelStats.add`)."""
    outputs = (2 if cached else 3) * rows * b * width  # Y_A, Y_B (+ the expert chunk being written when recomputed)
    grams = (2 + (2 if rbf else 0) + (3 if masked else 0)) * rows * b * b  # G, row sums, RBF K & D², masked K', K'²
    pairs = (2 * rows * rows * b) if masked else 0  # [E, E, b] einsum results (R, Q updates)
    return itemsize * (outputs + grams + pairs)


def plan_blocks(rows: int, n: int, width: int, *, masked: bool, rbf: bool, budget_mb: float,
                cacheable: bool = True, itemsize: int = 4) -> BlockPlan:
    """Block sizes (and whether to cache all outputs) so the similarity computation stays within `budget_mb`.

    Fixed costs: per-expert row sums and diagonals [rows, n] (×2 kernels with RBF), and in routed-only mode the
    per-pair row sums [rows, rows, n] and the mask. Outputs are cached when they take at most half of what is left.
    The plan fills 90% of the budget: the rest is headroom for allocator slack and small temporaries.
    """
    budget = 0.9 * budget_mb * 2**20
    kernels = 2 if rbf else 1
    fixed = itemsize * kernels * (2 * rows * n + (rows * rows * n if masked else 0)) + itemsize * rows * n
    left = budget - fixed
    if left <= _working_bytes(1, rows, width, masked, rbf, False, itemsize):
        need = (fixed + _working_bytes(1, rows, width, masked, rbf, False, itemsize)) / 0.9 / 2**20
        raise InputError(f"--block_mb {budget_mb:g} is too small for {rows} experts × {n} tokens"
                         f"{' (routed-only)' if masked else ''}: at least {math.ceil(need)} MB needed")
    cache_bytes = itemsize * rows * n * width
    cache = cacheable and cache_bytes <= left / 2
    if cache:
        left -= cache_bytes
    lo, hi = 1, n
    while lo < hi:  # largest b that fits
        mid = (lo + hi + 1) // 2
        if _working_bytes(mid, rows, width, masked, rbf, cache, itemsize) <= left:
            lo = mid
        else:
            hi = mid - 1
    token_block = max(1, min(n, int(left // (3 * itemsize * rows * width))))
    estimate = fixed + (cache_bytes if cache else 0) + _working_bytes(lo, rows, width, masked, rbf, cache, itemsize)
    return BlockPlan(block=lo, token_block=token_block, cache=cache, estimate_mb=estimate / 2**20,
                     free_mb=left / 2**20)


# ----------------------------------------------------------------------------------------------- HSIC from sums
def hsic_from_sums(P, cross, s1, s2, dd, rd12, rd21, sd1, sd2, N, unbiased: bool) -> torch.Tensor:
    """HSIC of kernel pairs from their sums over token pairs (elementwise over any shape).

    P = tr(KL), cross = 1ᵀKL1 = Σ_a r_K(a) r_L(a), s = 1ᵀK1, dd = Σ_a K_aa L_aa, rd12 = Σ_a r_K(a) L_aa,
    rd21 = Σ_a K_aa r_L(a), sd = Σ_a K_aa, N = tokens. Biased: tr(KHLH). Unbiased: Song et al. (2012), with
    tr(K̃L̃) = P − dd, 1ᵀK̃1 = s − sd, 1ᵀK̃L̃1 = cross − rd12 − rd21 + dd.
    """
    if not unbiased:
        return P - 2.0 * cross / N + s1 * s2 / N**2
    trace = P - dd
    total1, total2 = s1 - sd1, s2 - sd2
    path = cross - rd12 - rd21 + dd
    return (trace + total1 * total2 / ((N - 1) * (N - 2)) - 2.0 * path / (N - 2)) / (N * (N - 3))


def cka_from_hsic(cross: torch.Tensor, self_: torch.Tensor) -> torch.Tensor:
    """CKA[i, j] = HSIC(K_i, K_j) / sqrt(HSIC(K_i, K_i)·HSIC(K_j, K_j)), with self_[i, j] = HSIC(K_i, K_i) on
    pair (i, j)'s tokens; NaN where the denominator is not positive (constant outputs, negative unbiased HSIC)."""
    denominator = self_ * self_.T
    positive = denominator > 0
    return torch.where(positive, cross / torch.sqrt(torch.where(positive, denominator, 1.0)), torch.nan)


class KernelStats:
    """The sums over token pairs that give HSIC and CKA of every pair of one kernel family, block by block.

    `add(K, a, b)` takes the kernel blocks of all experts K_e[a, b] ([rows, |a|, |b|]) for a pair of token blocks
    with b after a (or b == a); off-diagonal block pairs stand for their transposes too.
    """

    def __init__(self, rows: int, n: int, mask: torch.Tensor | None = None, device=None,
                 dtype: torch.dtype = torch.float32):
        self.rows, self.n, self.mask = rows, n, mask
        self.P = torch.zeros(rows, rows, dtype=torch.float64, device=device)
        self.diag = torch.zeros(rows, n, dtype=dtype, device=device)
        if mask is None:
            self.row_sums = torch.zeros(rows, n, dtype=dtype, device=device)
        else:
            self.mask = mask.to(device=device, dtype=dtype)
            self.R = torch.zeros(rows, rows, n, dtype=dtype, device=device)
            self.Q = torch.zeros(rows, rows, dtype=torch.float64, device=device)

    def add(self, K: torch.Tensor, a: slice, b: slice) -> None:
        same = a == b
        twice = 1.0 if same else 2.0
        if self.mask is not None:
            ma, mb = self.mask[:, a], self.mask[:, b]
            K = K * ma[:, :, None] * mb[:, None, :]
        flat = K.reshape(self.rows, -1)
        self.P += twice * (flat @ flat.T).double()
        if same:
            self.diag[:, a] = K.diagonal(dim1=1, dim2=2)
        if self.mask is None:
            self.row_sums[:, a] += K.sum(2)
            if not same:
                self.row_sums[:, b] += K.sum(1)
            return
        self.R[:, :, a] += torch.einsum("eab,fb->efa", K, mb)
        if not same:
            self.R[:, :, b] += torch.einsum("eab,fa->efb", K, ma)
        self.Q += twice * torch.einsum("efa,fa->ef", torch.einsum("eab,fb->efa", K * K, mb), ma).double()

    def tokens(self) -> torch.Tensor:
        """N[i, j]: tokens each pair is compared on."""
        if self.mask is None:
            return torch.full((self.rows, self.rows), float(self.n), dtype=torch.float64, device=self.P.device)
        m = self.mask.double()
        return m @ m.T

    def hsic(self, unbiased: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(HSIC(K_i, K_j), HSIC(K_i, K_i)) for every pair on its tokens, [rows, rows] float64 each."""
        N = self.tokens()
        d = self.diag.double()
        if self.mask is None:
            r = self.row_sums.double()
            s, sd = r.sum(1), d.sum(1)
            rd = r @ d.T
            cross = hsic_from_sums(self.P, r @ r.T, s[:, None], s[None, :], d @ d.T, rd, rd.T, sd[:, None],
                                   sd[None, :], N, unbiased)
            return cross, cross.diagonal()[:, None].expand_as(cross)
        m = self.mask.double()
        sums = self._masked_sums(m, d)
        dd, sd = d @ d.T, d @ m.T
        cross = hsic_from_sums(self.P, sums["cross"], sums["s"], sums["s"].T, dd, sums["rd"], sums["rd"].T,
                               sd, sd.T, N, unbiased)
        self_ = hsic_from_sums(self.Q, sums["self_cross"], sums["s"], sums["s"], (d * d) @ m.T, sums["self_rd"],
                               sums["self_rd"], sd, sd, N, unbiased)
        return cross, self_

    def _masked_sums(self, m: torch.Tensor, d: torch.Tensor, chunk: int = 256) -> dict[str, torch.Tensor]:
        """Reductions of the per-pair row sums R over tokens, in float64, a chunk of tokens at a time."""
        out = {k: torch.zeros_like(self.P) for k in ("cross", "s", "rd", "self_cross", "self_rd")}
        for start in range(0, self.n, chunk):
            part = slice(start, start + chunk)
            R, mc, dc = self.R[:, :, part].double(), m[:, part], d[:, part]
            out["cross"] += torch.einsum("ija,jia->ij", R, R)  # Σ_{a∈S_ij} r_i(a) r_j(a)
            out["s"] += torch.einsum("ija,ja->ij", R, mc)  # 1ᵀK_i1 on S_ij
            out["rd"] += torch.einsum("ija,ja->ij", R, dc)  # Σ_{a∈S_ij} r_i(a) K_j(a, a)
            out["self_cross"] += torch.einsum("ija,ija,ja->ij", R, R, mc)  # Σ_{a∈S_ij} r_i(a)²
            out["self_rd"] += torch.einsum("ija,ia,ja->ij", R, dc, mc)  # Σ_{a∈S_ij} r_i(a) K_i(a, a)
        return out


class CosineStats:
    """Σ_a w_ij(a)·cos(E_i(x_a), E_j(x_a)) for every pair, from normalised outputs, one token block at a time."""

    def __init__(self, rows: int, mask: torch.Tensor | None = None, device=None):
        self.mask = mask
        self.total = torch.zeros(rows, rows, dtype=torch.float64, device=device)

    def add(self, y: torch.Tensor, a: slice) -> None:
        unit = F.normalize(y, dim=-1)
        if self.mask is not None:
            unit = unit * self.mask[:, a, None].to(unit.dtype)
        flat = unit.reshape(unit.shape[0], -1)
        self.total += (flat @ flat.T).double()

    def result(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.total / tokens


# ----------------------------------------------------------------------------------------------- sigma
def median_distance(y: torch.Tensor) -> float:
    """Median of the pairwise Euclidean distances ‖y_a − y_b‖ over pairs a ≠ b of y [t, d] (mean of the two middle
    values for an even count). Every pair appears twice off the diagonal, which leaves the median unchanged."""
    t = y.shape[0]
    distances = torch.cdist(y.double(), y.double())
    off = distances[~torch.eye(t, dtype=torch.bool, device=y.device)]
    count = off.numel()
    low = off.kthvalue((count + 1) // 2).values
    high = off.kthvalue(count // 2 + 1).values
    return float((low + high) / 2)


def median_sigmas(outputs: OutputSource, tokens: int, seed: int = 0) -> tuple[torch.Tensor, int]:
    """Per-row median-heuristic σ on `tokens` tokens (all of them if there are no more; else a seeded subset)."""
    t = min(tokens, outputs.n)
    if t < outputs.n:
        generator = torch.Generator().manual_seed(seed)
        index = torch.randperm(outputs.n, generator=generator)[:t].sort().values
    else:
        index = slice(None)
    sigmas = [median_distance(outputs(index, rows=[r])[0]) for r in range(outputs.rows)]
    return torch.tensor(sigmas, dtype=torch.float64), t


# ----------------------------------------------------------------------------------------------- all pairs
@dataclass
class SimilarityResult:
    matrices: dict[str, torch.Tensor]  # method -> [rows, rows] float64 on the CPU, NaN where undefined
    tokens: torch.Tensor  # [rows, rows] tokens each pair was compared on
    sigmas: torch.Tensor | None  # [rows] RBF bandwidths (cka-rbf only)
    sigma_tokens: int  # tokens the median heuristic used (0: σ given)


def _blocks(n: int, size: int) -> list[slice]:
    return [slice(a, min(a + size, n)) for a in range(0, n, size)]


@torch.no_grad()
def expert_similarities(
    outputs: OutputSource,
    methods: Sequence[str],
    *,
    mask: torch.Tensor | None = None,
    min_pair_tokens: int = 1,
    sigma: float | None = None,
    sigma_tokens: int = 4096,
    block: int | None = None,
    token_block: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    desc: str = "token-block pairs",
) -> SimilarityResult:
    """Every method's [rows, rows] similarity matrix over all pairs of rows of `outputs`.

    mask: [rows, n] routing mask (1 = routed) for routed-only comparisons; None compares on every token.
    block / token_block: token block sizes of the kernel loop and of the per-token pass (default: all n at once).
    sigma: one RBF bandwidth for every expert; None = per-expert median heuristic on `sigma_tokens` tokens.
    """
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}")
    rows, n = outputs.rows, outputs.n
    block, token_block = block or n, token_block or n
    if mask is not None:
        mask = mask.to(device=device, dtype=dtype)
    kernels = sorted({KERNELS[m] for m in methods if m in KERNELS})

    # Pass 1, token by token: feature means (for centring) and cosine sums.
    cosine = CosineStats(rows, mask, device) if "cosine" in methods else None
    total = torch.zeros(rows, outputs.width, dtype=torch.float64, device=device)
    for a in _blocks(n, token_block):
        y = outputs(a)
        total += y.sum(1).double()
        if cosine is not None:
            cosine.add(y, a)
    mean = (total / n).to(dtype)

    sigmas, used = None, 0
    if "rbf" in kernels:
        if sigma is None:
            sigmas, used = median_sigmas(outputs, sigma_tokens, seed)
        else:
            sigmas = torch.full((rows,), float(sigma), dtype=torch.float64)
        scale = (1.0 / (2.0 * sigmas.clamp_min(1e-30) ** 2)).to(device=device, dtype=dtype)

    # Pass 2, pairs of token blocks: kernel blocks of all experts at once, reduced into pair sums.
    stats = {k: KernelStats(rows, n, mask, device, dtype) for k in kernels}
    spans = _blocks(n, block)
    bar = tqdm(total=len(spans) * (len(spans) + 1) // 2, disable=not progress or not kernels, desc=desc,
               leave=False)
    for i, a in enumerate(spans if kernels else []):
        ya = outputs(a).sub_(mean[:, None, :])
        for b in spans[i:]:
            yb = ya if b == a else outputs(b).sub_(mean[:, None, :])
            gram = torch.bmm(ya, yb.transpose(1, 2))  # [rows, |a|, |b|]
            if "linear" in stats:
                stats["linear"].add(gram, a, b)
            if "rbf" in stats:
                sq_a, sq_b = (ya * ya).sum(-1), (yb * yb).sum(-1)
                dist2 = (sq_a[:, :, None] + sq_b[:, None, :] - 2.0 * gram).clamp_min_(0.0)
                if b == a:
                    dist2.diagonal(dim1=1, dim2=2).zero_()
                stats["rbf"].add(torch.exp(-dist2 * scale[:, None, None]), a, b)
            bar.update(1)
    bar.close()

    tokens = (mask.double() @ mask.double().T) if mask is not None else torch.full(
        (rows, rows), float(n), dtype=torch.float64, device=device)
    too_few = tokens < min_pair_tokens
    matrices = {}
    for method in methods:
        if method == "cosine":
            value = cosine.result(tokens)
            value = torch.where(tokens > 0, value, torch.nan)
        else:
            unbiased = method == "cka-debiased"
            cross, self_ = stats[KERNELS[method]].hsic(unbiased)
            value = cka_from_hsic(cross, self_)
            if unbiased:
                value = torch.where(tokens < 4, torch.nan, value)
        matrices[method] = torch.where(too_few, torch.nan, value).cpu()
    return SimilarityResult(matrices, tokens.cpu(), sigmas, used)


# ----------------------------------------------------------------------------------------------- summaries
def cluster_order(matrix: np.ndarray) -> tuple[list[int], np.ndarray | None]:
    """Rows in hierarchical-clustering order (average linkage on 1 − similarity, leaves optimally ordered) and the
    linkage matrix; NaN similarities count as the least similar value present. One row: ([0], None)."""
    from scipy.cluster.hierarchy import leaves_list, linkage, optimal_leaf_ordering
    from scipy.spatial.distance import squareform

    k = matrix.shape[0]
    if k < 2:
        return list(range(k)), None
    sim = np.array(matrix, dtype=np.float64)
    finite = sim[np.isfinite(sim)]
    floor = finite.min() if finite.size else 0.0
    sim = np.where(np.isfinite(sim), sim, floor)
    sim = (sim + sim.T) / 2
    distance = np.clip(1.0 - sim, 0.0, None)
    np.fill_diagonal(distance, 0.0)
    condensed = squareform(distance, checks=False)
    tree = linkage(condensed, method="average")
    if k > 2:
        tree = optimal_leaf_ordering(tree, condensed)
    return [int(i) for i in leaves_list(tree)], tree


def pair_summary(matrix: np.ndarray, labels: Sequence[str], has_shared: bool, top: int = 3) -> dict:
    """Mean / std of the off-diagonal similarities between routed experts, most and least similar routed pairs,
    the shared experts' mean similarity to the routed ones, and NaN pair counts (over all pairs, shared included)."""
    k = matrix.shape[0]
    routed = k - 1 if has_shared else k
    iu = np.triu_indices(routed, 1)
    values = matrix[iu]
    finite = np.isfinite(values)
    all_iu = np.triu_indices(k, 1)
    row = {
        "pairs": len(all_iu[0]),
        "nan_pairs": int((~np.isfinite(matrix[all_iu])).sum()),
        "mean_offdiag": float(values[finite].mean()) if finite.any() else float("nan"),
        "std_offdiag": float(values[finite].std()) if finite.any() else float("nan"),
        "mean_vs_shared": float(np.nanmean(matrix[-1, :-1])) if has_shared and np.isfinite(matrix[-1, :-1]).any()
        else float("nan"),
    }
    order = np.argsort(np.where(finite, values, -np.inf))[::-1]
    ranked = [(int(iu[0][p]), int(iu[1][p]), float(values[p])) for p in order if finite[p]]
    best = ranked[0] if ranked else (None, None, float("nan"))
    worst = ranked[-1] if ranked else (None, None, float("nan"))
    for name, (i, j, v) in (("most_similar", best), ("least_similar", worst)):
        row[f"{name}_i"] = labels[i] if i is not None else ""
        row[f"{name}_j"] = labels[j] if j is not None else ""
        row[f"{name}_value"] = v
    row["top_pairs"] = "; ".join(f"{labels[i]}-{labels[j]} ({v:.3f})" for i, j, v in ranked[:top])
    return row
