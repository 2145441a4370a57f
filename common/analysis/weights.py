"""Router and expert weights (docs/METRICS.md#router-and-expert-weights): analyses of the parameters alone, no data.

Notation: a router's weight R ∈ ℝ^{C×H} with rows r_c (C routing choices, H hidden size; biases are recorded but
not analysed: every quantity here is about directions in the hidden space); E routed experts with
W_gate,e, W_up,e ∈ ℝ^{I×H} and W_down,e ∈ ℝ^{H×I} (textbook orientation, `common.model.view.FFNParams`).
Everything is computed in float64 on the model's device (on CPU for MPS, which has no float64).

- Router-row cosine: cos(r_a, r_b) for every pair of rows of a layer (C × C).
- Singular spectrum of R (uncentred): σ_1 ≥ … ≥ σ_m, m = min(C, H); variance share v_k = σ_k² / Σ_j σ_j²;
  **effective rank = #{k : v_k > 0.01}** (`VARIANCE_THRESHOLD`); participation ratio (Σσ²)² / Σσ⁴. The same for
  all chosen layers' routers stacked row-wise ([ΣC, H]).
- Numerical rank of a matrix: #{σ_k > σ_1 · max(rows, cols) · ε_float64} (numpy's `matrix_rank` rule); the
  orthonormal basis Q of its row space is the matching right singular vectors.
- Cross-layer router similarity of layers i, j: mean cos(r_i,a, r_j,b) over all row pairs (for i = j the pairs
  a ≠ b), the same of |cos|, the best-match mean ½(mean_a max_b |cos| + mean_b max_a |cos|), and the
  principal-angle alignment mean_k σ_k(Q_iᵀ Q_j) = mean_k cos θ_k over the min(rank_i, rank_j) principal
  angles θ_k of the two row spaces (Björck & Golub; small angles taken from their sines). Control: the alignment
  of Gaussian random matrices of the same ranks (`ALIGNMENT_DRAWS` seeded draws, mean and std).
- Expert weight cosine: cos(vec W_m,a, vec W_m,b) for m ∈ gate, up, down, all pairs as one Gram matrix
  (accumulated over row blocks of the stacked experts so that memory stays bounded).
- Router-expert alignment of routed expert e (router row r_e, unit r̂_e = r_e / ‖r_e‖), for W = W_gate,e and
  W_up,e: the norm ‖W r̂_e‖ and the share ‖P_W r_e‖² / ‖r_e‖² of r_e inside the row space of W (P_W = Q Qᵀ).
  Controls: the same for `num_random` random unit directions u (Gaussian, normalised, seeded; one set per run):
  mean, sample std, z = (value − mean) / std, percentile = 100 · (#{u < value} + ½ #{u = value}) / num_random;
  the exact expectations over random directions (share: rank(W) / H; norm: root mean square √(‖W‖²_F / H));
  and the mean over the other experts' router rows r̂_e', e' ≠ e (is the alignment specific to e's own row?).
  A share is exactly 1 when W has full column rank (I ≥ H): then the share says nothing and z is NaN.
Ungated experts have no W_gate: their gate quantities are NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from common.analysis.subspaces import (
    DTYPE,
    VARIANCE_THRESHOLD,
    cross_cosine,
    effective_rank,
    numerical_rank,
    offdiagonal,
    participation_ratio,
    principal_angles,
    random_abs_cosine,
    random_alignment,
    random_unit_directions,
    row_cosine,
    row_space,
    variance_shares,
)
from common.errors import InputError
from common.model import MoELayer
from common.model.view import FFNParams, first_int

MATRICES = ("gate", "up", "down")  # axis 1 of expert_weight_cosine.npy
ALIGNMENT_MATRICES = ("gate", "up")
ALIGNMENT_METRICS = ("gate_norm", "up_norm", "gate_rowspace_share", "up_rowspace_share")  # axis 2 of the npy
ALIGNMENT_STATS = ("value", "control_mean", "control_std", "control_z", "control_percentile", "other_rows_mean",
                   "expected")  # axis 3 of router_expert_alignment.npy
CROSS_LAYER_METRICS = ("mean_cosine", "mean_abs_cosine", "best_match_abs_cosine", "alignment")
ALIGNMENT_DRAWS = 32  # random-subspace draws of the cross-layer alignment control
BLOCK_BYTES = 256 * 2**20  # float64 working set per block of stacked expert weights


# ---------------------------------------------------------------------------------------------- router weights
@dataclass(frozen=True)
class RouterWeight:
    layer: int
    name: str  # parameter path inside the router module
    weight: torch.Tensor  # [C, H], a view of the model's parameter
    bias: torch.Tensor | None  # [C] or None


def find_router_weight(moe_layer: MoELayer, hidden_size: int) -> RouterWeight:
    """The router's [C, H] weight: its 2-D parameter whose shape is [C or E, H] (or the transpose).

    C = `num_choices` (E plus zero-compute choices such as LongCat's). Inkling appends its shared experts' gates
    as extra rows ([C + shared, H]); they are dropped. Parameters named `weight` win over others; among those the
    least nested. A router with no such parameter (an MLP router such as Zaya's) is an `InputError` naming its class.
    """
    router = moe_layer.router
    choices, experts = moe_layer.num_choices, moe_layer.num_experts
    rows_ok = {choices, experts}
    shared = first_int([router], ["n_shared_experts"])
    if shared:
        rows_ok.add(choices + shared)
    found: list[tuple[tuple[bool, int], str, torch.Tensor]] = []
    for name, param in router.named_parameters():
        if param.dim() != 2:
            continue
        if param.shape[1] == hidden_size and param.shape[0] in rows_ok:
            weight = param
        elif param.shape[0] == hidden_size and param.shape[1] in rows_ok:
            weight = param.T
        else:
            continue
        found.append(((name.rsplit(".", 1)[-1] != "weight", name.count(".")), name, weight))
    cls = type(router).__name__
    if not found:
        params = ", ".join(f"{n} {list(p.shape)}" for n, p in router.named_parameters()) or "none"
        raise InputError(f"layer {moe_layer.layer}: cannot find the weight of router {cls}: no 2-D parameter of "
                         f"shape [{choices}, {hidden_size}] (its parameters: {params})")
    found.sort(key=lambda item: item[0])
    if len(found) > 1 and found[0][0] == found[1][0]:
        names = ", ".join(name for _, name, _ in found)
        raise InputError(f"layer {moe_layer.layer}: router {cls} has several candidate weights ({names})")
    _, name, weight = found[0]
    weight = weight[:choices]
    prefix = name.rsplit(".", 1)[0] + "." if "." in name else ""
    bias = dict(router.named_parameters()).get(f"{prefix}bias")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] < choices):
        bias = None
    return RouterWeight(moe_layer.layer, name, weight, None if bias is None else bias[:choices])


def check_experts(moe_layer: MoELayer) -> list[FFNParams]:
    """Every routed expert's parameters, or an `InputError` naming the experts' class if they cannot be read."""
    cls = type(moe_layer.experts).__name__
    try:
        params = [moe_layer.expert_params(e) for e in range(moe_layer.num_experts)]
    except (AttributeError, IndexError, RuntimeError, TypeError, ValueError) as err:
        raise InputError(f"layer {moe_layer.layer}: cannot read the expert weights of {cls} ({err}); "
                         "--routers-only skips them") from None
    for tensor in (params[0].gate, params[0].up, params[0].down):
        if tensor is not None and not tensor.is_floating_point():
            raise InputError(f"layer {moe_layer.layer}: the expert weights of {cls} are stored as {tensor.dtype} "
                             "(quantised); load them dequantised or pass --routers-only")
    return params


# ---------------------------------------------------------------------------------------------- experts
def _block(count: int, per_item_bytes: int) -> int:
    return max(1, min(count, BLOCK_BYTES // max(1, per_item_bytes)))


def flat_cosine(matrices: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """[E, E] cosine of the flattened matrices (all of one shape [n, d]) as one Gram matrix F Fᵀ, F = [E, n·d].

    The Gram matrix is summed over blocks of rows (F's columns), each block one matrix product of all experts.
    """
    count, (rows, cols) = len(matrices), matrices[0].shape
    gram = torch.zeros(count, count, dtype=DTYPE, device=device)
    step = _block(rows, count * cols * 8)
    for start in range(0, rows, step):
        flat = torch.stack([m[start:start + step].to(device, DTYPE).reshape(-1) for m in matrices])
        gram += flat @ flat.T
    norms = gram.diagonal().sqrt()
    return gram / torch.outer(norms, norms)


def _percentile(control: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """100 · (#{control < value} + ½ #{control = value}) / n per row; control [b, n], value [b]."""
    below = (control < value[:, None]).sum(1)
    equal = (control == value[:, None]).sum(1)
    return 100.0 * (below + 0.5 * equal) / control.shape[1]


def _z(value: torch.Tensor, control: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mean, std = control.mean(1), control.std(1)
    z = torch.where(std > 0, (value - mean) / std, torch.full_like(value, math.nan))
    return mean, std, z


def alignment_stats(
    weights: Sequence[torch.Tensor], unit_rows: torch.Tensor, experts: Sequence[int], directions: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Router-expert alignment of experts `experts` whose matrices are `weights` (each [I, H]).

    unit_rows [E, H]: every routed expert's unit router row (r̂); directions [H, N]: random unit directions.
    Returns, per metric ('norm', 'rowspace_share'), a [len(experts), stat] tensor in `ALIGNMENT_STATS` order, plus
    'rank' [len(experts)].
    """
    device = unit_rows.device
    w = torch.stack([m.to(device, DTYPE) for m in weights])  # [b, I, H]
    hidden = w.shape[2]
    _, s, vh = torch.linalg.svd(w, full_matrices=False)  # s [b, m], vh [b, m, H]
    ranks = torch.tensor([numerical_rank(row, w.shape[1:]) for row in s], device=device)
    kept = torch.arange(s.shape[1], device=device)[None, :] < ranks[:, None]  # [b, m] row-space components
    full = ranks == hidden  # the row space is all of ℝ^H: every share is exactly 1

    def measure(coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """coords [b, m, n] = vh · directions -> (‖W u‖ [b, n], ‖P_W u‖² [b, n])."""
        norm = (s[:, :, None] * coords).norm(dim=1)
        share = (coords.square() * kept[:, :, None]).sum(1)
        return norm, torch.where(full[:, None], torch.ones_like(share), share)

    own = unit_rows[list(experts)]  # [b, H]
    norm_own, share_own = measure(torch.einsum("bmh,bh->bm", vh, own)[:, :, None])
    norm_rand, share_rand = measure(vh @ directions)
    norm_rows, share_rows = measure(vh @ unit_rows.T)  # [b, E]: every expert's router row
    others = torch.ones(len(experts), unit_rows.shape[0], dtype=torch.bool, device=device)
    others[torch.arange(len(experts)), torch.tensor(list(experts))] = False
    expected = {
        "norm": (w.square().sum((1, 2)) / hidden).sqrt(),
        "rowspace_share": ranks.to(DTYPE) / hidden,
    }
    out = {}
    for metric, value, control, rows in (("norm", norm_own[:, 0], norm_rand, norm_rows),
                                         ("rowspace_share", share_own[:, 0], share_rand, share_rows)):
        mean, std, z = _z(value, control)
        other = (rows * others).sum(1) / others.sum(1).clamp(min=1)
        if unit_rows.shape[0] < 2:
            other = torch.full_like(value, math.nan)
        out[metric] = torch.stack([value, mean, std, z, _percentile(control, value), other, expected[metric]], dim=1)
    out["rank"] = ranks
    return out


# ---------------------------------------------------------------------------------------------- the analysis
@dataclass
class WeightResults:
    """Tidy tables (name -> DataFrame) and arrays (name -> ndarray) of `analyze`, named as the files they become."""

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)


def _pairs(values: np.ndarray, layer: int, **keys) -> pd.DataFrame:
    """Each unordered pair (a < b) of a symmetric matrix once, as tidy rows."""
    a, b = np.triu_indices(values.shape[0], k=1)
    return pd.DataFrame({"layer": layer, **keys, "expert_a": a, "expert_b": b, "cosine": values[a, b]})


def _padded(blocks: Sequence[np.ndarray], shape: Sequence[int]) -> np.ndarray:
    """Stack arrays of possibly different shapes into one NaN-padded array of `shape` per item."""
    out = np.full((len(blocks), *shape), np.nan)
    for i, block in enumerate(blocks):
        out[(i, *(slice(0, n) for n in block.shape))] = block
    return out


def compute_device(device: torch.device) -> torch.device:
    return torch.device("cpu") if device.type == "mps" else device


def analyze(
    layers: Sequence[MoELayer],
    hidden_size: int,
    device: torch.device,
    *,
    experts: bool = True,
    num_random: int = 1000,
    seed: int = 0,
    progress: bool = True,
    routers: Sequence[RouterWeight] | None = None,
) -> WeightResults:
    """Every weight analysis of `layers` (in the given order). `experts=False` skips expert similarity and alignment."""
    device = compute_device(device)
    routers = list(routers) if routers is not None else [find_router_weight(m, hidden_size) for m in layers]
    params = [check_experts(m) for m in layers] if experts else []
    directions = random_unit_directions(hidden_size, num_random, seed).to(device) if experts else None
    res = WeightResults(layers=[m.layer for m in layers])

    weights: list[torch.Tensor] = []
    cosine_blocks, spectra_blocks, expert_cos_blocks, alignment_blocks = [], [], [], []
    cosine_rows, spectra_rows, summary_rows, expert_rows, expert_summary, align_rows = [], [], [], [], [], []
    for li, moe_layer in enumerate(tqdm(layers, desc="layers", unit="layer", disable=not progress)):
        router = routers[li]
        r = router.weight.detach().to(device, DTYPE)
        weights.append(r)
        cos = row_cosine(r)
        cosine_blocks.append(cos.cpu().numpy())
        cosine_rows.append(_pairs(cosine_blocks[-1], moe_layer.layer))
        s = torch.linalg.svdvals(r)
        spectra_blocks.append(s.cpu().numpy())
        spectra_rows.append(_spectrum_rows(s, "layer", moe_layer.layer))
        off = offdiagonal(cos)
        summary_rows.append({
            **_spectrum_summary(s, r.shape, "layer", moe_layer.layer),
            "mean_cosine": float(off.mean()) if off.numel() else math.nan,
            "mean_abs_cosine": float(off.abs().mean()) if off.numel() else math.nan,
            "max_abs_cosine": float(off.abs().max()) if off.numel() else math.nan,
            "abs_cosine_random": random_abs_cosine(hidden_size),
            "row_norm_mean": float(r.norm(dim=1).mean()),
            "has_bias": router.bias is not None,
            "router_class": type(moe_layer.router).__name__,
            "parameter": router.name,
        })
        if not experts:
            continue
        layer_params = params[li]
        block, block_rows, block_summary = _expert_cosines(layer_params, moe_layer.layer, device)
        expert_cos_blocks.append(block)
        expert_rows.extend(block_rows)
        expert_summary.extend(block_summary)
        values, rows = _alignment(layer_params, r[: moe_layer.num_experts], directions, moe_layer.layer, hidden_size)
        alignment_blocks.append(values)
        align_rows.extend(rows)

    stacked = torch.cat(weights)
    s_all = torch.linalg.svdvals(stacked)
    spectra_rows.append(_spectrum_rows(s_all, "stacked", None))
    summary_rows.append({**_spectrum_summary(s_all, stacked.shape, "stacked", None), "has_bias": None,
                         "router_class": None, "parameter": None})

    width = max(b.shape[0] for b in cosine_blocks)
    res.arrays["router_cosine"] = _padded(cosine_blocks, (width, width))
    res.arrays["router_singular_values"] = _padded(spectra_blocks, (max(b.shape[0] for b in spectra_blocks),))
    res.arrays["stacked_singular_values"] = s_all.cpu().numpy()
    res.tables["router_cosine"] = pd.concat(cosine_rows, ignore_index=True)
    res.tables["router_spectra"] = _with_layer(pd.concat(spectra_rows, ignore_index=True))
    res.tables["router_summary"] = _with_layer(pd.DataFrame(summary_rows))
    cross, angles, matrices = _cross_layer(weights, [m.layer for m in layers], hidden_size, seed)
    res.tables["cross_layer"] = cross
    res.tables["principal_angles"] = angles
    res.arrays["cross_layer"] = matrices
    if experts:
        e_max = max(b.shape[1] for b in expert_cos_blocks)
        res.arrays["expert_weight_cosine"] = _padded(expert_cos_blocks, (len(MATRICES), e_max, e_max))
        res.tables["expert_weight_cosine"] = pd.concat(expert_rows, ignore_index=True)
        res.tables["expert_weight_summary"] = pd.DataFrame(expert_summary)
        res.arrays["router_expert_alignment"] = _padded(
            alignment_blocks, (max(b.shape[0] for b in alignment_blocks), len(ALIGNMENT_METRICS), len(ALIGNMENT_STATS)))
        res.tables["router_expert_alignment"] = pd.DataFrame(align_rows)
    return res


def _with_layer(table: pd.DataFrame) -> pd.DataFrame:
    table["layer"] = table["layer"].astype("Int64")  # blank for the stacked rows
    return table


def _spectrum_rows(s: torch.Tensor, scope: str, layer: int | None) -> pd.DataFrame:
    shares = variance_shares(s)
    return pd.DataFrame({
        "scope": scope,
        "layer": layer,
        "component": np.arange(1, s.numel() + 1),
        "singular_value": s.cpu().numpy(),
        "variance_share": shares.cpu().numpy(),
        "cumulative_share": shares.cumsum(0).cpu().numpy(),
        "above_threshold": (shares > VARIANCE_THRESHOLD).cpu().numpy(),
    })


def _spectrum_summary(s: torch.Tensor, shape: Sequence[int], scope: str, layer: int | None) -> dict:
    return {
        "scope": scope,
        "layer": layer,
        "rows": int(shape[0]),
        "hidden_size": int(shape[1]),
        "rank": numerical_rank(s, shape),
        "effective_rank": effective_rank(s),
        "participation_ratio": participation_ratio(s),
        "top1_variance_share": float(variance_shares(s)[0]),
    }


def _expert_cosines(params: Sequence[FFNParams], layer: int, device: torch.device):
    count = len(params)
    block = np.full((len(MATRICES), count, count), np.nan)
    rows, summary = [], []
    random_abs = random_abs_cosine(params[0].up.numel())
    for mi, matrix in enumerate(MATRICES):
        tensors = [getattr(p, matrix) for p in params]
        if all(t is not None for t in tensors):
            block[mi] = flat_cosine([t.detach() for t in tensors], device).cpu().numpy()
        rows.append(_pairs(block[mi], layer, matrix=matrix))
        off = block[mi][~np.eye(count, dtype=bool)]
        if off.size and np.isfinite(off).all():
            a, b = divmod(int(np.argmax(np.where(np.eye(count, dtype=bool), -np.inf, block[mi]))), count)
            stats = {"mean_cosine": off.mean(), "mean_abs_cosine": np.abs(off).mean(), "max_cosine": off.max(),
                     "max_pair_a": a, "max_pair_b": b}
        else:
            stats = {"mean_cosine": math.nan, "mean_abs_cosine": math.nan, "max_cosine": math.nan,
                     "max_pair_a": math.nan, "max_pair_b": math.nan}
        summary.append({"layer": layer, "matrix": matrix, "experts": count, **stats, "abs_cosine_random": random_abs})
    return block, rows, summary


def _alignment(params: Sequence[FFNParams], rows: torch.Tensor, directions: torch.Tensor, layer: int, hidden: int):
    """[E, metric, stat] values and tidy rows of the router-expert alignment of one layer."""
    count = len(params)
    unit = rows / rows.norm(dim=1, keepdim=True)
    values = np.full((count, len(ALIGNMENT_METRICS), len(ALIGNMENT_STATS)), np.nan)
    ranks = np.full((count, len(ALIGNMENT_MATRICES)), -1)
    for mi, matrix in enumerate(ALIGNMENT_MATRICES):
        tensors: list[torch.Tensor | None] = [getattr(p, matrix) for p in params]
        if any(t is None for t in tensors):
            continue  # ungated experts: gate quantities stay NaN
        width = tensors[0].shape[0]
        step = _block(count, 8 * (width * hidden + max(width, hidden) * (directions.shape[1] + count)))
        for start in range(0, count, step):
            chosen = list(range(start, min(count, start + step)))
            stats = alignment_stats([tensors[e].detach() for e in chosen], unit, chosen, directions)
            values[chosen, ALIGNMENT_METRICS.index(f"{matrix}_norm")] = stats["norm"].cpu().numpy()
            values[chosen, ALIGNMENT_METRICS.index(f"{matrix}_rowspace_share")] = stats["rowspace_share"].cpu().numpy()
            ranks[chosen, mi] = stats["rank"].cpu().numpy()
    table = []
    for e in range(count):
        for k, metric in enumerate(ALIGNMENT_METRICS):
            matrix = metric.split("_", 1)[0]
            rank = ranks[e, ALIGNMENT_MATRICES.index(matrix)]
            table.append({"layer": layer, "expert": e, "metric": metric,
                          **dict(zip(ALIGNMENT_STATS, values[e, k].tolist(), strict=True)),
                          "rank": rank if rank >= 0 else math.nan, "hidden_size": hidden})
    return values, table


def _cross_layer(weights: Sequence[torch.Tensor], layers: Sequence[int], hidden: int, seed: int):
    """Tidy cross-layer table (every ordered pair), principal angles (pairs a < b) and [metric, L, L] array."""
    n = len(weights)
    bases = [row_space(w)[1] for w in weights]
    generator = torch.Generator().manual_seed(seed)
    controls: dict[tuple[int, int], tuple[float, float]] = {}
    matrices = np.full((len(CROSS_LAYER_METRICS), n, n), np.nan)
    rows, angle_rows = [], []
    for i in range(n):
        for j in range(n):
            cos = cross_cosine(weights[i], weights[j])
            if i == j:
                cos_pairs = offdiagonal(cos)
                best = math.nan
                if cos.shape[0] > 1:
                    masked = cos.abs() - 2 * torch.eye(cos.shape[0], dtype=DTYPE, device=cos.device)
                    best = float(masked.max(1).values.mean())
            else:
                cos_pairs = cos.reshape(-1)
                best = 0.5 * float(cos.abs().max(1).values.mean() + cos.abs().max(0).values.mean())
            cosines, angles = principal_angles(bases[i], bases[j])
            ranks = tuple(sorted((bases[i].shape[1], bases[j].shape[1])))
            if ranks not in controls:
                controls[ranks] = random_alignment(hidden, *ranks, ALIGNMENT_DRAWS, generator)
            ctrl_mean, ctrl_std = controls[ranks]
            alignment = float(cosines.mean()) if cosines.numel() else math.nan
            values = (float(cos_pairs.mean()) if cos_pairs.numel() else math.nan,
                      float(cos_pairs.abs().mean()) if cos_pairs.numel() else math.nan, best, alignment)
            matrices[:, i, j] = values
            rows.append({"layer_a": layers[i], "layer_b": layers[j], **dict(zip(CROSS_LAYER_METRICS, values, strict=True)),
                         "abs_cosine_random": random_abs_cosine(hidden), "rank_a": bases[i].shape[1],
                         "rank_b": bases[j].shape[1], "alignment_random_mean": ctrl_mean,
                         "alignment_random_std": ctrl_std,
                         "alignment_z": (alignment - ctrl_mean) / ctrl_std if ctrl_std > 0 and i != j else math.nan})
            if i < j:
                angle_rows.append(pd.DataFrame({
                    "layer_a": layers[i], "layer_b": layers[j], "component": np.arange(1, cosines.numel() + 1),
                    "cosine": cosines.cpu().numpy(), "angle_deg": np.degrees(angles.cpu().numpy()),
                }))
    columns = ["layer_a", "layer_b", "component", "cosine", "angle_deg"]
    angles_table = pd.concat(angle_rows, ignore_index=True) if angle_rows else pd.DataFrame(columns=columns)
    return pd.DataFrame(rows), angles_table, matrices


def validate(layers: Sequence[MoELayer], hidden_size: int, *, experts: bool) -> list[RouterWeight]:
    """Every check that can fail on the model's structure alone (works on a meta-device skeleton)."""
    routers = [find_router_weight(m, hidden_size) for m in layers]
    if experts:
        for moe_layer in layers:
            check_experts(moe_layer)
    return routers

