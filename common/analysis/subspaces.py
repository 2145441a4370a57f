"""Linear algebra of weight matrices and subspaces, in float64 (docs/METRICS.md#router-and-expert-weights): row
cosines, numerical rank and row-space bases, spectra (variance shares, effective rank, participation ratio),
principal angles between subspaces, and the random-direction / random-subspace controls."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

VARIANCE_THRESHOLD = 0.01  # effective rank counts the components with σ_k² / Σσ² above this
DTYPE = torch.float64


def row_cosine(rows: torch.Tensor) -> torch.Tensor:
    """[n, n] cosine similarity of the rows of `rows` [n, d] (a zero row gives NaN)."""
    unit = rows / rows.norm(dim=1, keepdim=True)
    return unit @ unit.T


def cross_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n_a, n_b] cosine similarity of every row of a with every row of b."""
    return (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T


def numerical_rank(singular_values: torch.Tensor, shape: Sequence[int]) -> int:
    """#{σ_k > σ_1 · max(shape) · ε} (numpy's matrix_rank rule), for singular values sorted in descending order."""
    if singular_values.numel() == 0 or singular_values[0] == 0:
        return 0
    tol = singular_values[0] * max(shape) * torch.finfo(singular_values.dtype).eps
    return int((singular_values > tol).sum())


def row_space(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(singular values σ [m] descending, orthonormal basis Q [d, rank] of the row space of `matrix` [n, d])."""
    _, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return s, vh[: numerical_rank(s, matrix.shape)].T


def variance_shares(singular_values: torch.Tensor) -> torch.Tensor:
    squares = singular_values.square()
    return squares / squares.sum()


def effective_rank(singular_values: torch.Tensor, threshold: float = VARIANCE_THRESHOLD) -> int:
    """#{k : σ_k² / Σσ² > threshold}: the components above `threshold` of the (uncentred) variance."""
    return int((variance_shares(singular_values) > threshold).sum())


def participation_ratio(singular_values: torch.Tensor) -> float:
    """(Σσ²)² / Σσ⁴: 1 for one component, m for m equal ones."""
    squares = singular_values.square()
    return float(squares.sum().square() / squares.square().sum())


def principal_angles(qa: torch.Tensor, qb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos θ_k descending, θ_k in radians ascending) of the principal angles between span(qa) and span(qb).

    qa [d, ra], qb [d, rb] orthonormal columns; min(ra, rb) angles. Cosines are σ(qaᵀ qb); angles below 45° are
    taken from the sines σ((I − qa qaᵀ) qb) (Björck & Golub), which keeps small angles accurate.
    """
    if qa.shape[1] < qb.shape[1]:
        qa, qb = qb, qa  # project the smaller subspace onto the larger
    cos = torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)
    sin = torch.linalg.svdvals(qb - qa @ (qa.T @ qb)).clamp(max=1.0).flip(0)
    angles = torch.where(cos.square() > 0.5, torch.arcsin(sin), torch.arccos(cos))
    return cos, angles


def random_alignment(dim: int, rank_a: int, rank_b: int, draws: int, generator: torch.Generator) -> tuple[float, float]:
    """Mean and std over `draws` of the alignment of two random subspaces (Gaussian bases) of these ranks in ℝ^dim."""
    values = []
    for _ in range(draws):
        qa = torch.linalg.qr(torch.randn(dim, rank_a, generator=generator, dtype=DTYPE))[0]
        qb = torch.linalg.qr(torch.randn(dim, rank_b, generator=generator, dtype=DTYPE))[0]
        values.append(float(principal_angles(qa, qb)[0].mean()))
    return float(np.mean(values)), float(np.std(values, ddof=1)) if draws > 1 else math.nan


def random_abs_cosine(dim: int) -> float:
    """E|cos(u, v)| for independent uniformly random directions in ℝ^dim: Γ(d/2) / (√π Γ((d+1)/2))."""
    return math.exp(math.lgamma(dim / 2) - math.lgamma((dim + 1) / 2)) / math.sqrt(math.pi)


def random_unit_directions(dim: int, count: int, seed: int) -> torch.Tensor:
    """[dim, count] unit vectors uniform on the sphere (normalised Gaussians), reproducible from `seed`."""
    u = torch.randn(dim, count, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    return u / u.norm(dim=0, keepdim=True)


def offdiagonal(matrix: torch.Tensor) -> torch.Tensor:
    n = matrix.shape[0]
    return matrix[~torch.eye(n, dtype=torch.bool, device=matrix.device)]
