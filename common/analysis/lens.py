"""MoE Lens: the logit lens over experts (one prompt) and top-k restriction (perplexity and hidden-state cosine).

Logit lens over experts (SPEC "Logit lens over experts", MoE Lens Figure 2). At one position of a prompt and each
chosen MoE layer ℓ, vectors of the residual stream are decoded through the model's own final norm and unembedding
(`LanguageModel.unembed`, logit scaling and soft-capping included):

    column          vector                                  meaning
    layer_output    r                                       the residual stream after the decoder layer
    before_moe      b = r − α·m                             the residual stream at the MoE block's input
    top<k′>         b + α·Σ_{j ≤ k′} c_j                    + the k′ highest-weighted experts' weighted outputs
    all_shared      b + α·(Σ_{j ≤ k} c_j + s)               + every routed expert and the shared experts (= r)
    alone<j>        b + α·c_j                               + the j-th expert alone (CSV only; alone1 = top1)

with m the MoE block's output (routed + shared, the capture item `moe_output`), c_j = w_j·E_{e_j}(x) the j-th
expert's weighted output on the block's input x (experts ranked by the weight w they receive, ties: the earlier
slot, as `TopKRestriction` ranks them) and s the shared experts' output (gates included). Without shared experts
top<k> is the layer output itself. Column top<k′> is exactly the layer's output had the layer kept only its top
k′ experts (weights unchanged, earlier layers untouched).

The identity behind it, r = b + α·m with b independent of the MoE, holds for pre-norm blocks whose MoE output is
added to the residual stream (α = 1: OLMoE, Mixtral, Qwen2-MoE, DeepSeek-V2/V3, ... and α = the residual
multiplier of Granite-style blocks). It fails where a norm or another operation sits between the MoE and the
residual add (post-feed-forward norms: FlexOlmo, Gemma4, AFMoE, Beam, Kolibri; short convolutions: Inkling), and
where the residual is several hyper-connection streams (DeepSeek-V4). `prompt_lens` checks it on the prompt
itself instead of trusting a list of architectures: it re-runs the prompt with the top expert's weight at the
lensed position scaled up twice (`RoutingEdit`, by g and 2g), and requires the change of r to be α times the change
of m both times, with one α (fitted: one scalar for H equations); it also requires Σ_j c_j + s to rebuild m, and the model's logits to be the unembedding
of the last residual. A model failing any check is refused with an `InputError` naming the layer and the reason.

Top-k restriction (SPEC "Top-k restriction", MoE Lens Figure 3). `TopkSweep` runs each batch once unchanged
(k′ = k) and once per k′ with every chosen MoE layer keeping only its k′ highest-weighted experts
(`TopKRestriction`; renormalised or not; shared experts kept). Per run and domain it streams the next-token NLL of
every counted token (`Moments`: the target token counts, and it needs a predecessor in its window); per run, decoder
layer and domain it streams the cosine between the residual stream after the layer in the restricted run and in the
full run at every counted token (`Distribution`: exact mean/std, histogram quantiles). Memory does not grow with
the number of tokens.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from common.analysis import ALL_DOMAINS
from common.data import Batch
from common.errors import InputError
from common.hooks import RoutingEdit, TopKRestriction, capture, intervene, layer_input, start_at
from common.model import LanguageModel, MoELayer, MoEModel
from common.stats import DEFAULT_QUANTILES, Distribution, Moments

IGNORE_INDEX = -100  # transformers' label for "no loss here"
LENS_ITEMS = ("topk", "input", "moe_output", "shared_output", "residual")
# How far the prompt's probe forward scales the top expert's weight: its change of the MoE output is made about
# this many times the residual's norm, so that rounding of the residual (bf16) stays small against it.
_PROBE_GAIN = 8.0


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the lens' exactness checks in a model dtype (16-bit floats round at ~2^-8)."""
    return 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2


# --------------------------------------------------------------------------------------------- prompt lens


@dataclass(frozen=True)
class Column:
    key: str  # column id in the CSV: layer_output, before_moe, top<k′>, all_shared, alone<j>
    label: str  # header in the figure
    in_figure: bool = True


@dataclass
class LensCell:
    """One decoded vector: its top tokens and probabilities, and the expert its column adds (if any)."""

    layer: int
    column: str
    token_ids: list[int]
    probs: list[float]
    expert: int | None = None  # the expert the column adds: top<k′> the k′-th ranked one, alone<j> the j-th
    weight: float | None = None  # that expert's routing weight (as the model applies it)
    vector: torch.Tensor | None = None  # [H] float32 on the CPU: the vector decoded


@dataclass(frozen=True)
class LayerCheck:
    """The exactness checks of one MoE layer on the prompt (see the module docstring)."""

    layer: int
    alpha: float  # r = b + α·m: the multiple of the MoE output the residual stream receives
    additivity_defect: float  # max of ‖Δr − α·Δm‖ / ‖α·Δm‖ over the two probe forwards and of their α's spread
    rebuild_error: float  # ‖Σ_j c_j + s − m‖ / ‖m‖


@dataclass
class LensGrid:
    position: int  # absolute position lensed (its prediction is the next token)
    input_ids: list[int]
    layers: list[int]  # rows: decoder-layer indices
    columns: list[Column]
    cells: list[LensCell]
    checks: list[LayerCheck] = field(default_factory=list)
    last_layer_error: float = 0.0  # max |unembed(last residual) − logits| / max |logits| at the position

    def cell(self, layer: int, column: str) -> LensCell:
        return next(c for c in self.cells if c.layer == layer and c.column == column)


def lens_columns(moe_layers: Sequence[MoELayer], max_k: int | None = None) -> list[Column]:
    """The grid's columns: layer output; for MoE rows, before-MoE, + top-1 … top-max_k, + all + shared, alone j."""
    columns = [Column("layer_output", "layer output")]
    if not moe_layers:
        return columns
    k = max(m.top_k for m in moe_layers)
    shown = min(max_k or k, k)
    columns.append(Column("before_moe", "before MoE"))
    shared = any(m.shared_experts for m in moe_layers)
    columns += [Column(f"top{j}", f"+ top-{j}" + (" (all)" if j == k and not shared else "")) for j in range(1, shown + 1)]
    if shared:
        columns.append(Column("all_shared", f"+ all {k} + shared"))
    columns += [Column(f"alone{j}", f"+ expert {j} alone", in_figure=False) for j in range(2, k + 1)]
    return columns


def expert_contribution(moe_layer: MoELayer, expert: int, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One selected expert's weighted output w·E_e(x) on the MoE input x [H], as the block adds it.

    Llama4 scales the experts' input by the score instead; LongCat's zero-compute choices (e ≥ E) return their
    input. A pick with weight 0 adds nothing.
    """
    if float(weight) == 0.0:
        return torch.zeros_like(x)
    if expert >= moe_layer.num_experts:
        return weight * x
    if moe_layer.kind == "llama4":
        return moe_layer.expert_fn(expert, weight * x)
    return weight * moe_layer.expert_fn(expert, x)


def ranked_contributions(
    moe_layer: MoELayer, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor
) -> tuple[list[int], list[float], torch.Tensor]:
    """(experts, weights, [k, H] float32 weighted outputs) of one token, by decreasing weight (ties: earlier slot)."""
    order = weight.float().argsort(descending=True, stable=True).tolist()
    experts = [int(index[slot]) for slot in order]
    outputs = torch.stack([expert_contribution(moe_layer, e, weight[slot], x) for e, slot in zip(experts, order, strict=True)])
    return experts, [float(weight[slot]) for slot in order], outputs.float()


def prompt_ids(tokenizer, text: str) -> list[int]:
    """The prompt's token ids, framed as the data pipeline frames documents (the tokenizer's leading specials, e.g.
    BOS; no trailing EOS, so the last position is the prompt's last token)."""
    from common.data.batches import _layout

    return [*_layout(tokenizer).prefix, *tokenizer(text, add_special_tokens=False)["input_ids"]]


def resolve_position(position: int, length: int) -> int:
    """An absolute position in a sequence of `length` tokens (negatives count from the end)."""
    if not -length <= position < length:
        raise InputError(
            f"--position {position} is beyond the prompt: it has {length} tokens (positions 0..{length - 1} or "
            f"-{length}..-1, counting the tokenizer's leading special tokens)"
        )
    return position % length


def _rel(diff: torch.Tensor, ref: torch.Tensor) -> float:
    return float(diff.norm() / ref.norm().clamp_min(torch.finfo(torch.float32).tiny))


def _additivity(
    model: MoEModel, moe_layer: MoELayer, ids: torch.Tensor, position: int, r: torch.Tensor, m: torch.Tensor,
    expert: int, contribution: torch.Tensor,
) -> tuple[float, float]:
    """(α, defect): re-run twice with the top expert's weight at `position` scaled up by g and by 2g; the change
    of r must be α times the change of m, with the same α both times.

    The edits are large (the MoE output moves by ~`_PROBE_GAIN` residual norms) so that rounding of the residual in
    16-bit dtypes stays small against the change; two sizes, because a norm after the MoE is nearly linear along one
    large edit but its slope halves when the edit doubles (norms are scale-invariant).
    """
    gain = 1.0 + _PROBE_GAIN * float(r.norm()) / max(float(contribution.norm()), 1e-30)
    gain = min(max(gain, 2.0), 1e4)
    alphas, defects = [], []
    for value in (gain, 2 * gain):
        edit = RoutingEdit(moe_layer.layer, expert, "scale", value, positions=[position])
        with intervene(model, [edit]), capture(model, [moe_layer], ("moe_output", "residual"), [moe_layer.layer]) as rec:
            model.forward(ids)
        record = rec[moe_layer.layer]
        dr = record.residual[position].float() - r
        dm = record.moe_output[position].float() - m
        if float(dm.norm()) == 0.0:
            raise InputError(f"layer {moe_layer.layer}: scaling expert {expert}'s weight leaves the MoE output unchanged; "
                             "cannot check that the layer adds its MoE output to the residual stream")
        alpha = float(dr @ dm) / float(dm @ dm)
        alphas.append(alpha)
        defects.append(_rel(dr - alpha * dm, alpha * dm) if alpha > 0 else math.inf)
    spread = abs(alphas[1] - alphas[0]) / abs(alphas[0]) if alphas[0] != 0 else math.inf
    return alphas[0], max(*defects, spread)


@torch.no_grad()
def prompt_lens(
    model: LanguageModel,
    input_ids: Sequence[int],
    position: int,
    moe_layers: Sequence[MoELayer] = (),
    dense_rows: Sequence[int] = (),
    top: int = 5,
    max_k: int | None = None,
) -> LensGrid:
    """The lens grid of one prompt at `position` (absolute): rows = `moe_layers` (or, for a dense model,
    `dense_rows` with the layer-output column only). Refuses (`InputError`) where the lens would not be exact."""
    ids = torch.tensor([list(input_ids)], device=model.device)
    tol = tolerance(model.dtype)
    what = LENS_ITEMS if moe_layers else ("residual",)
    with capture(model, list(moe_layers) or None, what) as records:
        logits = model.forward(ids).logits[0, position].float()
    last = records[model.num_decoder_layers - 1].residual
    if last.dim() != 2:
        raise InputError(f"{type(model.model).__name__}: its residual stream is {last.shape[1]} hyper-connection "
                         "streams, not one vector per token; the logit lens decodes a single residual vector")
    lensed_last = model.unembed(last[position : position + 1].to(model.dtype))[0].float()
    last_error = float((lensed_last - logits).abs().max() / logits.abs().max().clamp_min(1e-30))
    if last_error > tol:
        raise InputError(f"{type(model.model).__name__}: its logits are not the final norm + unembedding of the last "
                         f"residual (relative deviation {last_error:.2g}), so the logit lens would not be exact")

    columns = lens_columns(moe_layers, max_k)
    vectors: list[torch.Tensor] = []
    cells: list[LensCell] = []
    checks: list[LayerCheck] = []

    def add(layer: int, column: str, vector: torch.Tensor, expert: int | None = None, weight: float | None = None):
        vectors.append(vector)
        cells.append(LensCell(layer, column, [], [], expert, weight, vector.cpu()))

    for layer in dense_rows:
        add(layer, "layer_output", records[layer].residual[position].float())
    for moe_layer in moe_layers:
        rec = records[moe_layer.layer]
        if rec.residual.dim() != 2:
            raise InputError(f"layer {moe_layer.layer}: the residual stream is several hyper-connection streams; "
                             "the lens needs one vector per token")
        r, m = rec.residual[position].float(), rec.moe_output[position].float()
        shared = rec.shared_output[position].float() if rec.shared_output is not None else torch.zeros_like(m)
        experts, weights, contributions = ranked_contributions(
            moe_layer, rec.expert_input[position], rec.topk_index[position], rec.topk_weight[position]
        )
        rebuild = _rel(contributions.sum(0) + shared - m, m)
        if rebuild > tol:
            raise InputError(f"layer {moe_layer.layer}: the experts' weighted outputs (+ shared) do not add up to the "
                             f"MoE block's output (relative deviation {rebuild:.2g}); the lens cannot split it by expert")
        alpha, defect = _additivity(model, moe_layer, ids, position, r, m, experts[0], contributions[0])
        if defect > tol:
            raise InputError(
                f"layer {moe_layer.layer}: the residual stream after the layer is not the residual at the MoE input "
                f"plus a multiple of the MoE output (probe deviation {defect:.2g} of the change; a norm or mixing after "
                f"the MoE, e.g. a post-feed-forward norm), so the expert columns would not be exact; "
                f"{type(model.model).__name__} is not supported by the prompt lens"
            )
        alpha = 1.0 if abs(alpha - 1.0) <= tol else alpha
        checks.append(LayerCheck(moe_layer.layer, alpha, defect, rebuild))
        base = r - alpha * m
        cumulative = contributions.cumsum(0)
        k = len(experts)
        for column in columns:
            key = column.key
            if key == "layer_output":
                add(moe_layer.layer, key, r)
            elif key == "before_moe":
                add(moe_layer.layer, key, base)
            elif key.startswith("top"):
                j = min(int(key[3:]), k)
                add(moe_layer.layer, key, base + alpha * cumulative[j - 1], experts[j - 1], weights[j - 1])
            elif key == "all_shared":
                add(moe_layer.layer, key, base + alpha * (cumulative[-1] + shared))
            elif key.startswith("alone") and int(key[5:]) <= k:
                j = int(key[5:])
                add(moe_layer.layer, key, base + alpha * contributions[j - 1], experts[j - 1], weights[j - 1])

    stacked = torch.stack(vectors).to(model.dtype)
    for start in range(0, len(cells), 64):  # bounded [64, V] logits at a time
        probs = model.unembed(stacked[start : start + 64]).float().softmax(-1)
        values, index = probs.topk(min(top, probs.shape[-1]), dim=-1)
        for cell, v, i in zip(cells[start : start + 64], values.tolist(), index.tolist(), strict=True):
            cell.probs, cell.token_ids = v, i
    rows = [m.layer for m in moe_layers] if moe_layers else list(dense_rows)
    return LensGrid(position, list(input_ids), rows, columns, cells, checks, last_error)


def display_token(tokenizer, token_id: int) -> str:
    """A token as text with its whitespace made visible (space ␣, newline \\n, tab \\t); a token that is not
    text on its own (a partial UTF-8 byte sequence) as #<id>."""
    text = tokenizer.decode([token_id])
    if "\ufffd" in text:
        return f"#{token_id}"
    return text.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r") or "∅"


def grid_table(grid: LensGrid, tokenizer) -> pd.DataFrame:
    """Tidy table: one row per (layer, column, rank) with the token, its id and probability, and the column's expert."""
    order = {c.key: i for i, c in enumerate(grid.columns)}
    rows = []
    for cell in grid.cells:
        for rank, (token_id, prob) in enumerate(zip(cell.token_ids, cell.probs, strict=True), start=1):
            rows.append({
                "layer": cell.layer, "column": cell.column, "column_index": order[cell.column], "rank": rank,
                "token": tokenizer.decode([token_id]), "token_id": token_id, "probability": prob,
                "expert": cell.expert, "weight": cell.weight, "position": grid.position,
            })
    table = pd.DataFrame(rows)
    table["expert"] = table["expert"].astype("Int64")
    return table.sort_values(["layer", "column_index", "rank"], kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------------------------- top-k restriction


def next_token_labels(batch: Batch) -> torch.Tensor:
    """[B, S] labels for transformers' loss: the token where it counts, -100 elsewhere (padding, specials, beyond
    the budget). transformers shifts them: position t is predicted from positions < t."""
    return torch.where(batch.count_mask, batch.input_ids, torch.full_like(batch.input_ids, IGNORE_INDEX))


def next_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, S-1] NLL in nats of each target token, [B, S-1] bool: it counts), row by row in float32 (one row's
    [S, V] float32 logits at a time)."""
    targets = labels[:, 1:]
    nll = torch.stack([
        F.cross_entropy(logits[b, :-1].float(), targets[b], ignore_index=IGNORE_INDEX, reduction="none")
        for b in range(logits.shape[0])
    ])
    return nll, targets != IGNORE_INDEX


def add_domain_nll(nll_sum: np.ndarray, count: np.ndarray, logits: torch.Tensor, batch: Batch) -> None:
    """Add a batch's next-token NLL (nats, summed over its counted predictions) and its prediction count into
    per-domain totals [domain] (float64), each row to its domain."""
    nll, counts = next_token_nll(logits, next_token_labels(batch))
    domains = batch.domain_ids.cpu().numpy()
    np.add.at(nll_sum, domains, (nll.double() * counts).sum(1).cpu().numpy())
    np.add.at(count, domains, counts.sum(1).cpu().numpy())


DEFAULT_LOGITS_MB = 256.0


def _skips_head(moe: MoEModel) -> bool:
    """Whether the model's forward takes `logits_to_keep` (its head then runs on the last position only)."""
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(moe.model.forward).parameters
    except (TypeError, ValueError):
        return False


def chunked_next_token_nll(moe: MoEModel, residual: torch.Tensor, labels: torch.Tensor,
                           chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`next_token_nll` from the residual entering the final norm [B, S, H], through the model's final norm and head
    (`unembed`) on at most `chunk_rows` positions at a time: memory bounded by chunk_rows × vocabulary floats."""
    targets = labels[:, 1:]
    hidden = residual[:, :-1].reshape(-1, residual.shape[-1])
    flat = targets.reshape(-1)
    nll = torch.empty(flat.shape, dtype=torch.float32, device=residual.device)
    for start in range(0, hidden.shape[0], chunk_rows):
        stop = min(start + chunk_rows, hidden.shape[0])
        logits = moe.unembed(hidden[start:stop]).float()
        nll[start:stop] = F.cross_entropy(logits, flat[start:stop], ignore_index=IGNORE_INDEX, reduction="none")
    return nll.view(targets.shape), targets != IGNORE_INDEX


class TopkSweep:
    """Streamed next-token NLL and residual cosines of the full model and of its top-k′-restricted versions.

    `ks`: the k′ of the restricted runs (any of 1..k; k itself is bit-identical to the full run, which is always
    run and reported as k′ = k). Cosines compare each restricted run with the full run, at every decoder layer.
    With `resume`, a restricted run starts at the first restricted layer from the full run's residual there (the
    layers below it are the full run's, bit for bit, and so are their cosines); where that is not exact (a layer
    below returns a tuple) every run is a whole forward.
    """

    def __init__(
        self,
        moe: MoEModel,
        layers: Sequence[MoELayer],
        domains: Sequence[str],
        ks: Sequence[int],
        renormalize: bool = False,
        bins: int = 400,
        resume: bool = True,
        logits_mb: float | None = DEFAULT_LOGITS_MB,
    ) -> None:
        self.moe, self.layers, self.domains = moe, list(layers), list(domains)
        # the head applied to at most this many positions at a time (float32 logits of ≤ logits_mb MiB), from the
        # residual entering the final norm; None or a model whose forward cannot skip its head: whole logits
        self.chunk_rows = (max(1, int(logits_mb * 2**20 // (4 * moe.vocab_size)))
                           if logits_mb is not None and _skips_head(moe) else None)
        self.first = min(m.layer for m in self.layers)
        self.resumed = resume and self.first > 0  # becomes False if a layer below returns a tuple
        self.k = max(m.top_k for m in self.layers)
        self.ks, self.renormalize = list(ks), renormalize
        self.decoder_layers = list(range(moe.num_decoder_layers))
        device = moe.device
        self.nll = Moments({"run": len(self.ks) + 1, "domain": self.domains}, device=device)  # run len(ks) = full
        groups = {"run": len(self.ks), "layer": self.decoder_layers, "domain": self.domains}
        self.cosine = Distribution(groups, bins=bins, lo=-1.0, hi=1.0, device=device) if self.ks else None

    @property
    def k_primes(self) -> list[int]:
        """k′ of each run, the full run last."""
        return [*self.ks, self.k]

    def _residuals(self):
        return capture(self.moe, self.layers, ("residual",))

    @torch.no_grad()
    def update(self, batch: Batch) -> None:
        batch = batch.to(self.moe.device)
        labels = next_token_labels(batch)
        row_domain = batch.domain_ids.view(-1, 1)
        decoder = self.moe.decoder_layers()
        with self._residuals() as full, layer_input(decoder, self.first) as entering:
            self._forward_nll(len(self.ks), batch, labels, row_domain)
        self.resumed = self.resumed and entering["plain"]
        token_domain = batch.token_domains().view(1, -1)
        counted = batch.token_weights().view(1, -1)
        for run, keep in enumerate(self.ks):
            restriction = [TopKRestriction(m.layer, keep, self.renormalize) for m in self.layers]
            start_here = start_at(decoder, self.first, entering["hidden"]) if self.resumed else contextlib.nullcontext()
            with intervene(self.moe, restriction), start_here, self._residuals() as restricted:
                self._forward_nll(run, batch, labels, row_domain)
            # Below the first restricted layer a resumed run did not run the layers: their residuals are the full
            # run's, bit for bit, as a whole forward would have computed them.
            same = self.first if self.resumed else 0
            cosines = torch.stack([
                F.cosine_similarity(
                    (full if i < same else restricted)[i].residual.flatten(1).float(),
                    full[i].residual.flatten(1).float(), dim=-1, eps=1e-12,
                )
                for i in self.decoder_layers
            ])  # [L, T]
            layer = torch.arange(len(self.decoder_layers), device=cosines.device).view(-1, 1)
            self.cosine.update(cosines, {"run": run, "layer": layer, "domain": token_domain}, counted)
            restricted.clear()
        full.clear()

    def _forward_nll(self, run: int, batch: Batch, labels: torch.Tensor, row_domain: torch.Tensor) -> None:
        """One forward of the batch and its next-token NLL into run `run`: the head applied in chunks of
        `chunk_rows` positions to the residual entering the final norm (the model's own head on its last position
        only), or the model's whole logits."""
        if self.chunk_rows is None:
            logits = self.moe.forward(batch.input_ids, batch.attention_mask).logits
            nll, counts = next_token_nll(logits, labels)
            del logits
        else:
            entering: list[torch.Tensor] = []
            norm = self.moe.final_norm()
            handle = norm.register_forward_pre_hook(lambda module, args: entering.append(args[0]))
            try:
                self.moe.forward(batch.input_ids, batch.attention_mask, logits_to_keep=1)
            finally:
                handle.remove()
            nll, counts = chunked_next_token_nll(self.moe, entering[-1], labels, self.chunk_rows)
        self.nll.update(nll, {"run": run, "domain": row_domain}, counts)

    def all_reduce(self) -> None:
        self.nll.all_reduce()
        if self.cosine is not None:
            self.cosine.all_reduce()

    # -- results
    def nll_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean NLL [run, domain + all], tokens [run, domain + all]); runs as `k_primes`."""
        per_domain, pooled = self.nll.result(), self.nll.marginalize("domain").result()
        mean = np.concatenate([per_domain.mean, pooled.mean[:, None]], axis=1)
        count = np.concatenate([per_domain.count, pooled.count[:, None]], axis=1)
        return mean, count

    def perplexity_table(self) -> pd.DataFrame:
        """One row per (domain, k′): tokens, mean NLL (nats), perplexity, normalised log-perplexity nll(k′)/nll(k)."""
        mean, count = self.nll_arrays()
        rows = []
        for d, domain in enumerate([*self.domains, ALL_DOMAINS]):
            full = mean[-1, d]
            for run in sorted(range(len(self.k_primes)), key=lambda r: self.k_primes[r]):
                nll = mean[run, d]
                rows.append({
                    "domain": domain, "k_prime": self.k_primes[run], "renormalize": self.renormalize,
                    "tokens": int(count[run, d]), "nll": nll, "ppl": math.exp(nll) if np.isfinite(nll) else np.nan,
                    "normalized_log_ppl": nll / full if full > 0 else np.nan,
                })
        return pd.DataFrame(rows)

    def cosine_table(self, quantiles: Sequence[float] = DEFAULT_QUANTILES) -> pd.DataFrame:
        """One row per (k′, decoder layer, domain + all): count, mean, std, min, max and quantiles of the cosine."""
        if self.cosine is None:
            return pd.DataFrame()
        per_domain = self.cosine.frame(quantiles)
        pooled = self.cosine.marginalize("domain").frame(quantiles)
        pooled.insert(list(per_domain.columns).index("domain"), "domain", ALL_DOMAINS)
        table = pd.concat([per_domain, pooled[per_domain.columns]], ignore_index=True)
        table.insert(0, "k_prime", table.pop("run").map(dict(enumerate(self.ks))))
        restricted = {m.layer for m in self.layers}
        table.insert(2, "restricted", table["layer"].isin(restricted))
        table["count"] = table["count"].astype("int64")
        order = {d: i for i, d in enumerate([*self.domains, ALL_DOMAINS])}
        table = table.sort_values(["k_prime", "layer", "domain"], key=lambda s: s.map(order) if s.name == "domain" else s)
        return table.reset_index(drop=True)

    def cosine_histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """(counts [k′ run, decoder layer, domain (+ all last), bin], edges [bins + 1])."""
        result = self.cosine.histogram.result()
        pooled = self.cosine.histogram.marginalize("domain").result()
        counts = np.concatenate([result.counts, pooled.counts[:, :, None, :]], axis=2)
        return counts, result.edges
