"""k-sparse probing of FFN neurons (Gurnee et al. 2023, "Finding Neurons in a Haystack"; applied to MoE experts by
Herbst et al. 2026, "The Expert Strikes Back", arXiv:2604.02178).

A *unit* is one expert of one MoE layer (its neurons act(gate·x)·(up·x), seen only on the tokens routed to it) or
one dense FFN layer (its neurons, on every token). For every unit and concept the streamed pass keeps a bounded,
seeded sample of positive and negative tokens with the unit's neurons on them (`ConceptSampler`); the probes then
run on those samples (`probe_units`):

* examples: the `max_examples` positives and the `max_examples` negatives with the smallest random keys (a uniform
  sample without replacement of what the unit saw); with `negatives="window"` a negative must come from a window
  holding at least one positive of the concept (so a probe cannot succeed by recognising the domain: the SPEC's
  "balanced per document");
* split: stratified, `test_fraction` of each class held out (round(f·n), at least 1, at most n − 1), by a second
  random key per token;
* ranking: neurons by |mean over train positives − mean over train negatives| (raw activations), largest first,
  ties by neuron index; `random`: a seeded random permutation of the neurons (the control);
* probe: L2-regularised logistic regression with balanced class weights on the top k neurons (standardised with
  the train split's mean and standard deviation), the objective of scikit-learn's
  `LogisticRegression(C=C, class_weight="balanced")`, solved for all cells at once by Newton's method
  (`fit_logistic`);
* score: binary F1 (positive class 1), precision and recall on the held-out split; a cell whose unit saw fewer than
  `min_examples` of either class is skipped (and counted).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.analysis.concepts import Concept, label_ids
from common.data import Batch
from common.hooks import capture
from common.model import DenseFFN, LanguageModel, MoELayer

K_VALUES = (1, 2, 4, 8, 16, 32, 64)
DENSE = "dense"  # the `expert` of a dense FFN unit
SELECTIONS = ("ranked", "random")
NEGATIVES = ("window", "all")
# Elements (float64) of one batch of probe cells: sizes the chunks of `probe_units`.
CELL_BUDGET = 2**23


# ------------------------------------------------------------------------------------------------ labels


class WindowLabeller:
    """[B, S, C] bool concept labels of a batch's windows (decoded text, token spans, overlap rule), on the CPU."""

    def __init__(self, tokenizer, concepts: Sequence[Concept]):
        self.tokenizer, self.concepts = tokenizer, list(concepts)
        self.special = sorted({i for i in tokenizer.all_special_ids if i is not None})

    def __call__(self, batch: Batch) -> torch.Tensor:
        ids = batch.input_ids.cpu()
        lengths = batch.attention_mask.cpu().sum(1).tolist()
        out = np.zeros((*ids.shape, len(self.concepts)), dtype=bool)
        for row, n in enumerate(lengths):
            out[row, :n] = label_ids(self.tokenizer, ids[row, :n].tolist(), self.concepts, self.special)
        return torch.from_numpy(out)


# ------------------------------------------------------------------------------------------------ sampling


@dataclass
class Pool:
    """The tokens one unit keeps, sorted by key: for each concept the smallest-key positives and negatives."""

    key: torch.Tensor  # [P] float64 selection key
    split: torch.Tensor  # [P] float64 split key
    pos: torch.Tensor  # [P, C] bool: positive for the concept
    neg: torch.Tensor  # [P, C] bool: an eligible negative for the concept
    acts: torch.Tensor  # [P, I] float32 neurons
    seen_pos: torch.Tensor  # [C] int64: positives the unit saw in the whole stream
    seen_neg: torch.Tensor  # [C] int64: eligible negatives it saw

    @property
    def width(self) -> int:
        return self.acts.shape[1]


def capped(members: torch.Tensor, cap: int) -> torch.Tensor:
    """[P, C] bool: the first `cap` True entries of each column (rows are in key order)."""
    return members & (members.cumsum(0, dtype=torch.int32) <= cap)


@dataclass
class _Buffer:
    """A unit's sample while streaming: the compacted part, then chunks appended since (compacted when large)."""

    parts: list[tuple[torch.Tensor, ...]]  # (key, split, pos, neg, acts) chunks
    size: int = 0
    compacted: int = 0  # rows of parts[0] after the last compaction
    limit_pos: torch.Tensor | None = None  # [C] key of the cap-th positive at the last compaction (inf if fewer)
    limit_neg: torch.Tensor | None = None


class ConceptSampler:
    """Streamed, bounded, seeded samples per unit: keeps for each concept the `max_examples` positives and the
    `max_examples` negatives with the smallest keys, and computes neurons only for tokens that may stay.

    Offered tokens are appended to the unit's buffer when their key beats the largest key kept for a class they
    belong to (as of the last compaction); the buffer is compacted (sorted by key, each column capped) when the
    appended rows outnumber the kept ones, so each token is sorted a bounded number of times. The result is
    exactly the smallest keys of every (concept, class), the same as keeping everything and choosing at the end."""

    def __init__(self, num_concepts: int, max_examples: int, device: torch.device):
        self.num_concepts, self.max_examples, self.device = num_concepts, max_examples, device
        self.buffers: dict[tuple, _Buffer] = {}
        self.seen: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, unit: tuple, key: torch.Tensor, split: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
               neurons: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Offer tokens (key [n], split [n], pos/neg [n, C]) to `unit`; `neurons(index)` gives the [m, I] neurons
        of the offered tokens at `index` (called once per update, for the tokens that may stay)."""
        if key.numel() == 0:
            return
        seen_pos, seen_neg = self.seen.get(unit, (0, 0))
        self.seen[unit] = (pos.sum(0) + seen_pos, neg.sum(0) + seen_neg)
        buffer = self.buffers.setdefault(unit, _Buffer(parts=[]))
        offered = (pos | neg).any(1)
        if buffer.limit_pos is not None:
            offered &= ((pos & (key[:, None] < buffer.limit_pos)) | (neg & (key[:, None] < buffer.limit_neg))).any(1)
        index = torch.nonzero(offered, as_tuple=True)[0]
        if index.numel() == 0:
            return
        acts = neurons(index).float().to(self.device)
        buffer.parts.append((key[index], split[index], pos[index], neg[index], acts))
        buffer.size += index.numel()
        if buffer.size - buffer.compacted > max(buffer.compacted, 4 * self.max_examples):
            self._compact(buffer)

    def _compact(self, buffer: _Buffer) -> None:
        key, split, pos, neg, acts = (torch.cat(column) for column in zip(*buffer.parts, strict=True))
        order = torch.argsort(key, stable=True)
        key, split, pos, neg = key[order], split[order], pos[order], neg[order]
        cap = self.max_examples
        pos_rank, neg_rank = pos.cumsum(0, dtype=torch.int32), neg.cumsum(0, dtype=torch.int32)
        keep = ((pos & (pos_rank <= cap)) | (neg & (neg_rank <= cap))).any(1)
        rows = order[keep]
        inf = torch.tensor(float("inf"), dtype=key.dtype, device=key.device)

        def limit(members: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
            at = members & (rank == cap)
            return torch.where(at.any(0), key[at.to(torch.uint8).argmax(0)], inf)

        buffer.limit_pos, buffer.limit_neg = limit(pos, pos_rank), limit(neg, neg_rank)
        buffer.parts = [(key[keep], split[keep], pos[keep], neg[keep], acts[rows])]
        buffer.size = buffer.compacted = int(keep.sum())

    def finish(self) -> dict[tuple, Pool]:
        """Each unit's final sample (sorted by key) with the counts of what it saw."""
        pools = {}
        for unit, buffer in self.buffers.items():
            if not buffer.parts:
                continue
            self._compact(buffer)
            key, split, pos, neg, acts = buffer.parts[0]
            pools[unit] = Pool(key, split, pos, neg, acts, *self.seen[unit])
        return pools


def token_keys(batch: Batch, seed: int) -> torch.Tensor:
    """[B·S, 2] float64 uniform keys (selection, split) for every position of the batch, from (seed, batch number):
    the same tokens get the same keys in every pass over the same batches (MoE and dense alike)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + batch.number)
    return torch.rand(batch.input_ids.numel(), 2, generator=generator, dtype=torch.float64)


def gather(model: LanguageModel, stream: Iterable[Batch], labeller: WindowLabeller, sampler: ConceptSampler, *,
           moe_layers: Sequence[MoELayer] = (), ffns: Sequence[DenseFFN] = (), seed: int, negatives: str,
           moe_tag: str = "moe", dense_tag: str = "dense") -> None:
    """One streamed pass: label every window, then offer each counted token to every unit that sees it (an expert:
    the tokens routed to it; a dense FFN: all). Units are keyed (tag, layer, expert | DENSE)."""
    what = (("input", "topk") if moe_layers else ()) + (("ffn_input",) if ffns else ())
    device = sampler.device
    with torch.inference_mode(), capture(model, list(moe_layers), what, decoder_layers=[f.layer for f in ffns]) as records:
        for batch in stream:
            labels = labeller(batch)  # before the forward pass: the CPU work of labelling
            model.forward(batch.input_ids, batch.attention_mask)
            seq = batch.input_ids.shape[1]
            counted = batch.count_mask.cpu().reshape(-1).nonzero().squeeze(1)
            pos = labels.reshape(-1, labels.shape[-1])[counted]
            if negatives == "window":
                row_has = (labels & batch.count_mask.cpu()[..., None]).any(1)  # [B, C]
                neg = ~pos & row_has[counted // seq]
            else:
                neg = ~pos
            useful = (pos | neg).any(1)
            counted, pos, neg = counted[useful], pos[useful].to(device), neg[useful].to(device)
            keys = token_keys(batch, seed)[counted].to(device)
            key, split = keys[:, 0].contiguous(), keys[:, 1].contiguous()
            for moe_layer in moe_layers:
                rec = records[moe_layer.layer]
                where = counted.to(rec.expert_input.device)
                x = rec.expert_input[where]
                index, weight = rec.topk_index[where], rec.topk_weight[where]
                # (token, expert) picks with a non-zero weight, grouped by expert: one sort for all experts
                token, slot = torch.nonzero((weight != 0) & (index < moe_layer.num_experts), as_tuple=True)
                expert = index[token, slot]
                order = torch.argsort(expert, stable=True)
                token, expert = token[order], expert[order]
                sizes = torch.bincount(expert, minlength=moe_layer.num_experts).tolist()
                for e, routed in enumerate(torch.split(token, sizes)):
                    if routed.numel() == 0:
                        continue
                    sub = routed.to(device)
                    sampler.update((moe_tag, moe_layer.layer, e), key[sub], split[sub], pos[sub], neg[sub],
                                   lambda i, e=e, routed=routed, m=moe_layer, x=x:
                                   m.expert_neurons(e, x[routed[i.to(routed.device)]]))
            for ffn in ffns:
                x = records[ffn.layer].ffn_input[counted.to(records[ffn.layer].ffn_input.device)]
                sampler.update((dense_tag, ffn.layer, DENSE), key, split, pos, neg,
                               lambda i, ffn=ffn, x=x: ffn.neurons(x[i.to(x.device)]))
            records.clear()


# ------------------------------------------------------------------------------------------------ probes


def stratified_test(members: torch.Tensor, split: torch.Tensor, fraction: float) -> torch.Tensor:
    """[P, C] bool: per column, the round(fraction·n) members (at least 1, at most n − 1) with the smallest
    split keys; n = members in the column."""
    n = members.sum(0)
    n_test = torch.clamp(torch.round(n.double() * fraction), min=1).long()
    n_test = torch.minimum(n_test, torch.clamp(n - 1, min=0))
    order = torch.argsort(split, stable=True)
    rank = members[order].cumsum(0)  # 1-based rank among the members, in split-key order
    test_sorted = members[order] & (rank <= n_test)
    test = torch.empty_like(test_sorted)
    test[order] = test_sorted
    return test


def rank_neurons(acts: torch.Tensor, pos_train: torch.Tensor, neg_train: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [U, C, I], score [U, C, I]): neurons by |mean(train positives) − mean(train negatives)|, largest
    first (ties: lower index first), for units stacked as acts [U, P, I] and masks [U, P, C]. Means from sums:
    one batched matrix product for all units, concepts and neurons."""
    a = acts.double()
    p, n = pos_train.double(), neg_train.double()
    mean_pos = p.transpose(1, 2) @ a / p.sum(1).clamp(min=1)[..., None]
    mean_neg = n.transpose(1, 2) @ a / n.sum(1).clamp(min=1)[..., None]
    score = (mean_pos - mean_neg).abs()
    order = torch.argsort(-score, dim=-1, stable=True)
    return order, score


def fit_logistic(X: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, C: float = 1.0, max_iter: int = 50,
                 tol: float | None = None, init: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(coef [B, k], intercept [B]) minimising, per cell b,
        ½‖w‖² + C Σ_i weight_i · (log(1 + exp(z_i)) − y_i z_i),   z = X w + c (intercept c unpenalised),
    scikit-learn's L2 LogisticRegression objective with sample weights. Newton's method from zero, all cells at
    once, from `init` [B, k' + 1] (coefficients of the first k' ≤ k features, intercept last; zeros when None);
    a step that raises the objective is halved until it does not (backtracking). A cell stops when its
    gradient's largest entry is below tol · (1 + C Σ weight) (tol: 1e-9 in float64, 1e-5 in float32) or after a
    step whose Newton decrement gᵀH⁻¹g / 2 (the objective still to gain, to second order) is below 1e-14 (float64)
    or 1e-6 (float32) of the objective: what rounding leaves. X [B, N, k], y [B, N] in {0, 1}, weight [B, N]
    (0 = not in the training set)."""
    B, N, k = X.shape
    dtype, device = X.dtype, X.device
    theta = torch.zeros(B, k + 1, dtype=dtype, device=device)
    if init is not None:
        theta[:, : init.shape[1] - 1] = init[:, :-1].to(dtype)
        theta[:, k] = init[:, -1].to(dtype)
    tol = tol if tol is not None else 1e-9 if dtype == torch.float64 else 1e-5
    decrement_tol = 1e-14 if dtype == torch.float64 else 1e-6
    reg = torch.ones(k + 1, dtype=dtype, device=device)
    reg[k] = 0.0
    ridge = torch.diag(reg + 1e-12)
    active = torch.arange(B, device=device)
    xs = torch.cat([X, torch.ones(B, N, 1, dtype=dtype, device=device)], dim=-1)
    xt = xs.transpose(1, 2).contiguous()  # [B, k + 1, N]: the layout the gradient and Hessian products want
    cs, ys = C * weight.to(dtype), y.to(dtype)
    limit = tol * (1 + cs.sum(1))
    th = theta.clone()
    z = torch.bmm(xs, th[..., None]).squeeze(-1)

    def objective(z, th, cs, ys):
        return (cs * (F.softplus(z) - ys * z)).sum(1) + 0.5 * (th[:, :k] ** 2).sum(1)

    f = objective(z, th, cs, ys)
    done = torch.zeros(B, dtype=torch.bool, device=device)  # converged, or took its last step
    for _ in range(max_iter):
        prob = torch.sigmoid(z)
        grad = torch.bmm(xt, (cs * (prob - ys))[..., None]).squeeze(-1) + reg * th
        done |= grad.abs().amax(1) < limit
        if bool(done.all()):
            break
        if 2 * int(done.sum()) > done.numel():  # drop finished cells once they are the majority (copies cost)
            theta[active[done]] = th[done]
            moving = ~done
            active, xs, xt, ys, cs, th, z, f, prob, grad, limit, done = (
                t[moving] for t in (active, xs, xt, ys, cs, th, z, f, prob, grad, limit, done))
        hess = torch.bmm(xt * (cs * prob * (1 - prob))[:, None, :], xs) + ridge
        step = torch.linalg.solve(hess, grad)
        step[done] = 0.0
        done |= (grad * step).sum(1) / 2 <= decrement_tol * (1 + f.abs())  # this step is its last
        dz = torch.bmm(xs, step[..., None]).squeeze(-1)
        new_th, new_z = th - step, z - dz
        new_f = objective(new_z, new_th, cs, ys)
        alpha = 1.0
        worse = new_f > f + 1e-12 * f.abs()
        while bool(worse.any()) and alpha > 1e-6:  # rare: backtrack the cells whose objective went up
            alpha /= 2
            sub = worse.nonzero().squeeze(1)
            new_th[sub] = th[sub] - alpha * step[sub]
            new_z[sub] = z[sub] - alpha * dz[sub]
            new_f[sub] = objective(new_z[sub], new_th[sub], cs[sub], ys[sub])
            worse[sub] = new_f[sub] > f[sub] + 1e-12 * f[sub].abs()
        th, z, f = new_th, new_z, new_f
    theta[active] = th
    return theta[:, :k], theta[:, k]


def binary_scores(y_true: torch.Tensor, y_pred: torch.Tensor, mask: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(f1, precision, recall) [B] of the positive class over the entries in `mask`; 0 where undefined (as
    scikit-learn's zero_division=0)."""
    t, p, m = y_true.bool(), y_pred.bool(), mask.bool()
    tp = (t & p & m).sum(1).double()
    fp = (~t & p & m).sum(1).double()
    fn = (t & ~p & m).sum(1).double()
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), 0.0)
    recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp(min=1), 0.0)
    f1 = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), 0.0)
    return f1, precision, recall


@dataclass
class Cells:
    """Probe cells of one k and selection: which unit, which examples, which features."""

    unit: torch.Tensor  # [B] index into the stacked units
    examples: torch.Tensor  # [B, N] index into the unit's pool (padding: 0, masked out)
    valid: torch.Tensor  # [B, N] bool
    y: torch.Tensor  # [B, N] {0, 1}
    test: torch.Tensor  # [B, N] bool
    features: torch.Tensor  # [B, k] neuron indices


def fit_cells(acts: torch.Tensor, cells: Cells, C: float, dtype: torch.dtype = torch.float32,
              init: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardise (train mean and standard deviation, float64) and fit a batch of cells.

    Returns (decision [B, N]: w·x + c on every example, > 0 = predicted positive; theta [B, k + 1]: coefficients
    on the standardised features, intercept last), for warm-starting the next k with nested features."""
    X = acts[cells.unit[:, None, None], cells.examples[:, :, None], cells.features[:, None, :]].double()
    train = cells.valid & ~cells.test
    tw = train.double()
    n_train = tw.sum(1)
    mean = (X * tw[..., None]).sum(1) / n_train[:, None]
    std = (((X - mean[:, None]) ** 2 * tw[..., None]).sum(1) / n_train[:, None]).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    X = ((X - mean[:, None]) / std[:, None]).to(dtype)
    n_pos = (cells.y.bool() & train).sum(1).double()
    n_neg = n_train - n_pos
    # scikit-learn's class_weight="balanced": n / (2 · n_class) on the training labels
    weight = torch.where(cells.y.bool(), n_train[:, None] / (2 * n_pos[:, None]), n_train[:, None] / (2 * n_neg[:, None]))
    coef, intercept = fit_logistic(X, cells.y, (weight * tw).to(dtype), C=C, init=init)
    decision = torch.bmm(X, coef[..., None]).squeeze(-1) + intercept[:, None]
    return decision, torch.cat([coef, intercept[:, None]], dim=1)


def _chunks(total: int, per_cell: int, budget: int = CELL_BUDGET) -> Iterable[slice]:
    step = max(1, budget // max(1, per_cell))
    for start in range(0, total, step):
        yield slice(start, min(total, start + step))


def probe_units(units: Sequence[tuple[tuple, Pool]], concepts: Sequence[Concept], *, k_values: Sequence[int],
                min_examples: int, max_examples: int, test_fraction: float, C: float, seed: int,
                dtype: torch.dtype = torch.float32, progress: bool = False, desc: str = "probes") -> tuple[list[dict], list[dict]]:
    """Probe every (unit, concept, k, selection) cell of units of one width (one layer's experts, or one dense
    layer). Returns (probe rows, example-count rows); units are keyed (tag, layer, expert)."""
    if not units:
        return [], []
    device = units[0][1].acts.device
    width = units[0][1].width
    num_c = len(concepts)
    p_max = max(pool.key.numel() for _, pool in units)
    U = len(units)
    acts = torch.zeros(U, p_max, width, dtype=torch.float32, device=device)
    pos = torch.zeros(U, p_max, num_c, dtype=torch.bool, device=device)
    neg = torch.zeros_like(pos)
    test = torch.zeros_like(pos)
    for u, (_, pool) in enumerate(units):
        n = pool.key.numel()
        acts[u, :n] = pool.acts
        pos[u, :n] = capped(pool.pos, max_examples)
        neg[u, :n] = capped(pool.neg, max_examples)
        # split keys are uniform and independent of the selection keys; padding never becomes a member
        split = pool.split
        test[u, :n] = stratified_test(pos[u, :n], split, test_fraction) | stratified_test(neg[u, :n], split, test_fraction)
    n_pos, n_neg = pos.sum(1), neg.sum(1)  # [U, C]
    probed = (n_pos >= min_examples) & (n_neg >= min_examples)
    order, _ = rank_neurons(acts, pos & ~test, neg & ~test)
    generator = torch.Generator().manual_seed(seed)
    random_order = torch.rand(U, num_c, width, generator=generator).argsort(-1).to(device)

    examples_rows = []
    for u, (unit, pool) in enumerate(units):
        for c, concept in enumerate(concepts):
            examples_rows.append({
                "concept": concept.name, "layer": unit[1], "expert": unit[2],
                "seen_positive": int(pool.seen_pos[c]), "seen_negative": int(pool.seen_neg[c]),
                "num_positive": int(n_pos[u, c]), "num_negative": int(n_neg[u, c]), "probed": int(probed[u, c]),
            })
    cell_u, cell_c = torch.nonzero(probed, as_tuple=True)
    rows: list[dict] = []
    if cell_u.numel() == 0:
        return rows, examples_rows
    members = (pos | neg)[cell_u, :, cell_c]  # [B0, P]
    n_members = members.sum(1)
    n_max = int(n_members.max())
    # each cell's examples, in pool (key) order, padded to n_max
    rank = members.cumsum(1) - 1
    examples = torch.zeros(cell_u.numel(), n_max, dtype=torch.long, device=device)
    valid = torch.zeros(cell_u.numel(), n_max, dtype=torch.bool, device=device)
    b_idx, p_idx = torch.nonzero(members, as_tuple=True)
    examples[b_idx, rank[b_idx, p_idx]] = p_idx
    valid[b_idx, rank[b_idx, p_idx]] = True
    y = pos[cell_u[:, None], examples, cell_c[:, None]] & valid
    is_test = test[cell_u[:, None], examples, cell_c[:, None]] & valid
    ks = sorted(k for k in set(k_values) if k <= width)  # ascending: each k starts from the previous k's fit
    total = len(ks) * len(SELECTIONS) * cell_u.numel()
    warm: dict[str, torch.Tensor] = {}
    with tqdm(total=total, desc=desc, unit="probe", disable=not progress, leave=False) as bar:
        for k in ks:
            for selection in SELECTIONS:
                ranking = order if selection == "ranked" else random_order
                features = ranking[cell_u, cell_c, :k]
                thetas = torch.zeros(cell_u.numel(), k + 1, dtype=dtype, device=device)
                for part in _chunks(cell_u.numel(), n_max * 4 * (k + 1)):
                    cells = Cells(cell_u[part], examples[part], valid[part], y[part], is_test[part], features[part])
                    init = warm[selection][part] if selection in warm else None
                    decision, thetas[part] = fit_cells(acts, cells, C, dtype, init)
                    f1, precision, recall = binary_scores(cells.y, decision > 0, cells.valid & cells.test)
                    probed_neurons = cells.features.tolist()  # [cells, k]: neuron ids within the unit, in rank order
                    for j, b in enumerate(range(part.start, part.stop)):
                        u, c = int(cell_u[b]), int(cell_c[b])
                        unit = units[u][0]
                        rows.append({
                            "concept": concepts[c].name, "layer": unit[1], "expert": unit[2], "k": k,
                            "selection": selection, "f1": float(f1[j]), "precision": float(precision[j]),
                            "recall": float(recall[j]), "num_positive": int(n_pos[u, c]),
                            "num_negative": int(n_neg[u, c]),
                            "neurons": " ".join(map(str, probed_neurons[j])),
                        })
                    bar.update(part.stop - part.start)
                warm[selection] = thetas  # the top-k sets are nested: the k solution starts the next k's
    return rows, examples_rows


def random_seed(seed: int, tag: str, layer: int) -> int:
    """The random-neuron control's seed of one layer's units: fixed by (--seed, model tag, layer)."""
    return (seed * 1_000_003 + (0 if tag == "moe" else 500_009) + layer * 7919) % (2**63 - 1)


def best_layer(table, concept_order: Sequence[str]):
    """Best-layer F1 per (concept, model, selection, k): max over experts, then over layers; with the layer,
    expert and probed neurons where it is reached (first in table order on ties). `table` needs a `model` column (moe | dense)."""
    import pandas as pd

    if table.empty:
        return pd.DataFrame(columns=["concept", "model", "selection", "k", "f1", "layer", "expert", "neurons",
                                     "units_probed"])
    idx = table.groupby(["concept", "model", "selection", "k"], sort=False)["f1"].idxmax()
    best = table.loc[idx, ["concept", "model", "selection", "k", "f1", "layer", "expert", "neurons"]].copy()
    counts = table.groupby(["concept", "model", "selection", "k"], sort=False).size().rename("units_probed")
    best = best.join(counts, on=["concept", "model", "selection", "k"])
    position = {name: i for i, name in enumerate(concept_order)}
    best["_c"] = best["concept"].map(position)
    best["_m"] = best["model"].map({"moe": 0, "dense": 1})
    best["_s"] = best["selection"].map({s: i for i, s in enumerate(SELECTIONS)})
    best = best.sort_values(["_c", "_m", "_s", "k"]).drop(columns=["_c", "_m", "_s"]).reset_index(drop=True)
    return best


def pool_bytes(pools: Iterable[Pool]) -> int:
    """Memory the kept samples hold (activations, keys and labels)."""
    total = 0
    for pool in pools:
        total += pool.acts.numel() * 4 + pool.key.numel() * 16 + pool.pos.numel() * 2
    return total


def chance_f1(num_positive: int, num_negative: int) -> float:
    """F1 of always answering 'positive' on a test split with this class balance (a reference, not a baseline
    the probes are compared against)."""
    total = num_positive + num_negative
    return 0.0 if total == 0 else 2 * num_positive / (num_positive + total)


__all__ = [
    "DENSE",
    "K_VALUES",
    "NEGATIVES",
    "SELECTIONS",
    "ConceptSampler",
    "Pool",
    "WindowLabeller",
    "best_layer",
    "binary_scores",
    "capped",
    "chance_f1",
    "fit_cells",
    "fit_logistic",
    "gather",
    "pool_bytes",
    "probe_units",
    "random_seed",
    "rank_neurons",
    "stratified_test",
    "token_keys",
]
