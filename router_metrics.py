"""Where do tokens go? Selection frequency, domain specialization, token overlap and token-id specialization,
co-activation, cross-layer routing, load balance and router saturation across checkpoints.

    uv run router_metrics.py                                          # shipped demo model, offline domains
    uv run router_metrics.py --model allenai/OLMoE-1B-7B-0924 --data pile --num_domains 22 \\
        --layers 1 7 15 --num_experts 64 --topk 8 --num_tokens 10000
    uv run router_metrics.py --model allenai/OLMoE-1B-7B-0924 --revisions step5000-tokens20B main

Definitions: SPEC "Routing". Everything is streamed (counts on the model's device; token-id tables are vocab ×
experts per layer), so memory does not grow with --num_tokens.

Outputs: frequency.csv (per layer/domain/expert: counts and f_e top-k and top-1 with uniform baselines; per
domain this is the domain specialization N_{D,e}/N_D), expert_specialization.csv (JSD of each expert's domain mix
vs the overall mix), coverage50.csv (fewest experts covering 50% of a domain), token_overlap.csv + npy,
token_specialization.csv (current / next / predicted token), coactivation.csv + npy, transitions.csv + npy,
indicator_correlation npy (+ shuffled control) and summary CSV, load_balance.csv, saturation.csv (with
--revisions); figures for each.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.ticker import MaxNLocator

from common import cli, pipeline
from common.analysis import ALL_DOMAINS
from common.analysis.specialization import (
    TOKEN_TABLES,
    RoutingCounts,
    coactivation_table,
    coverage,
    expert_specialization,
    load_balance,
    selection_frequency,
    token_overlap,
    token_specialization,
    top1_index,
    transition_probabilities,
)
from common.cli import base_parser, run_main
from common.config import ModelSpec
from common.errors import InputError
from common.hooks import capture
from common.models import inspect_moe, load_moe
from common.moe import MoEModel
from common.plots import grid, plt
from common.runs import Run
from common.stats import Moments

SCRIPT = "router_metrics"


def build_parser():
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--num_experts", type=int, default=None, help="expected routed experts per layer (checked)")
    parser.add_argument("--topk", type=int, default=None, help="expected experts per token (checked)")
    parser.add_argument("--min_count", type=int, default=1, help="token ids seen fewer times are left out of overlap and id specialization")
    parser.add_argument("--olmoe-compat", dest="olmoe_compat", action="store_true",
                        help="co-activation over rank-adjacent pairs only, as the OLMoE analysis script counted")
    parser.add_argument("--no-token-tables", dest="token_tables", action="store_false",
                        help="skip the vocab × experts tables (token overlap and id specialization)")
    parser.add_argument("--revisions", nargs="+", default=None, metavar="REV",
                        help="router saturation: checkpoints (hub revisions of --model, or checkpoint folders) "
                        "compared with the last one on identical tokens; a single one is compared with --model")
    return parser


def check_expectations(args: argparse.Namespace, moe: MoEModel, layers) -> None:
    for moe_layer in layers:
        if args.num_experts is not None and moe_layer.num_experts != args.num_experts:
            raise InputError(f"--num_experts {args.num_experts}: layer {moe_layer.layer} has {moe_layer.num_experts} experts")
        if args.topk is not None and moe_layer.top_k != args.topk:
            raise InputError(f"--topk {args.topk}: layer {moe_layer.layer} routes to {moe_layer.top_k} experts")


def revision_specs(args: argparse.Namespace, base: ModelSpec) -> list[ModelSpec]:
    """One ModelSpec per --revisions item (a folder if it exists, else a hub revision of --model); the last is final."""
    specs = []
    for item in args.revisions:
        path = Path(item).expanduser()
        if path.exists() or item.startswith((".", "/", "~")):
            specs.append(ModelSpec(**{**base.__dict__, "model": str(path), "revision": None}))
        else:
            specs.append(ModelSpec(**{**base.__dict__, "revision": item}))
    if len(specs) == 1:
        specs.append(base)
    return specs


# ---------------------------------------------------------------------------------------------- saturation


@torch.no_grad()
def saturation(specs: Sequence[ModelSpec], setup: pipeline.Setup) -> pd.DataFrame:
    """Per revision and layer: mean |K_r ∩ K_final| / k and top-1 agreement on identical tokens (OLMoE Fig. 'router
    saturation'). The final model stays loaded; the others are loaded one at a time."""
    final = load_moe(specs[-1])
    final_layers = final.select([m.layer for m in setup.layers])
    rows = []
    for position, spec in enumerate(specs[:-1]):
        other = load_moe(spec)
        other_layers = other.select([m.layer for m in setup.layers])
        overlap = Moments({"layer": [m.layer for m in final_layers]}, device=final.device)
        agree = Moments({"layer": [m.layer for m in final_layers]}, device=final.device)
        stream = pipeline.batches(setup)  # this rank's share: every token is counted once across ranks
        with capture(final, final_layers, ("topk",)) as ref, capture(other, other_layers, ("topk",)) as cur:
            for batch in stream:
                batch = batch.to(final.device)
                final.forward(batch.input_ids, batch.attention_mask)
                other.forward(batch.input_ids.to(other.device), batch.attention_mask.to(other.device))
                weight = batch.token_weights()
                for li, moe_layer in enumerate(final_layers):
                    a, b = ref[moe_layer.layer], cur[moe_layer.layer]
                    ia, ib = a.topk_index.long(), b.topk_index.to(a.topk_index.device).long()
                    shared = (ia.unsqueeze(2) == ib.unsqueeze(1)).any(2).sum(1).float() / moe_layer.top_k
                    same_top1 = (top1_index(ia, a.topk_weight) == top1_index(ib, b.topk_weight.to(ia.device))).float()
                    overlap.update(shared, li, weight)
                    agree.update(same_top1, li, weight)
        overlap.all_reduce()
        agree.all_reduce()
        for li, moe_layer in enumerate(final_layers):
            rows.append({
                "position": position, "revision": spec.revision or spec.model, "final": specs[-1].revision or specs[-1].model,
                "layer": moe_layer.layer, "topk_overlap": overlap.result().mean[li], "top1_agreement": agree.result().mean[li],
                "tokens": overlap.result().count[li],
            })
        del other
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- figures


def plot_frequency(freq: pd.DataFrame, layer: int, domains: Sequence[str]) -> plt.Figure:
    """Per-expert top-k selection frequency with the uniform line k/E, one panel per domain (MoE Lens Fig. 1 form)."""
    names = [*domains, ALL_DOMAINS]
    fig, axes = grid(len(names), ncols=3, panel_size=(3.6, 2.3))
    rows = freq[freq.layer == layer]
    for ax, domain in zip(axes, names, strict=True):
        d = rows[rows.domain == domain]
        ax.bar(d.expert, 100 * d.freq_topk, color="C0" if domain != ALL_DOMAINS else "black", width=0.8)
        ax.axhline(100 * d.uniform_topk.iloc[0], color="C3", linestyle="--", linewidth=1, label="uniform k/E")
        ax.set_title(domain)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("expert")
        ax.set_ylabel("% of tokens")
    axes[0].legend(fontsize=7, frameon=False)
    fig.suptitle(f"Expert selection frequency (top-k), layer {layer}")
    return fig


def plot_domain_heatmap(freq: pd.DataFrame, layer: int, domains: Sequence[str]) -> plt.Figure:
    """Domain × expert share of each domain's tokens routed to each expert (OLMoE Fig. 22 form)."""
    rows = freq[(freq.layer == layer) & (freq.domain != ALL_DOMAINS)]
    matrix = rows.pivot(index="domain", columns="expert", values="freq_topk").loc[list(domains)]
    fig, ax = plt.subplots(figsize=(max(4, 0.3 * matrix.shape[1] + 2), 0.35 * len(domains) + 1.5))
    image = ax.imshow(100 * matrix.to_numpy(), aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(domains)), domains)
    ax.set_xticks(range(matrix.shape[1]), matrix.columns, fontsize=6)
    ax.set_xlabel("expert")
    fig.colorbar(image, ax=ax, label="% of domain tokens (top-k)")
    ax.set_title(f"Domain specialization, layer {layer} (uniform = {100 * rows.uniform_topk.iloc[0]:.1f}%)")
    return fig


def plot_matrix(matrix: np.ndarray, title: str, xlabel: str, ylabel: str, label: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(4.6, 3.9))
    image = ax.imshow(matrix, cmap="magma", aspect="auto")
    fig.colorbar(image, ax=ax, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return fig


def plot_saturation(table: pd.DataFrame) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5, 3))
    for layer, part in table.groupby("layer"):
        ax.plot(part.position, 100 * part.topk_overlap, marker="o", label=f"layer {layer}")
    ax.set_xticks(sorted(table.position.unique()), table.drop_duplicates("position").revision, rotation=30, fontsize=7)
    ax.set_ylabel("% top-k shared with final")
    ax.set_ylim(0, 101)
    ax.legend(fontsize=7, frameon=False)
    ax.set_title("Router saturation")
    return fig


# ---------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> None:
    config = cli.config(args, SCRIPT)
    specs = revision_specs(args, config.model) if args.revisions else []
    for spec in specs:  # a revision that does not exist is refused before any work
        inspect_moe(spec)
    s = pipeline.setup(config)
    check_expectations(args, s.moe, s.layers)
    domains = [d.name for d in s.domains]
    stream = pipeline.batches(s)
    with pipeline.start_run(s) as out:
        counts_acc = RoutingCounts(s.layers, domains, s.moe.vocab_size, s.moe.device, olmoe_compat=args.olmoe_compat,
                                   token_tables=args.token_tables, seed=args.seed)
        for records, batch, logits in pipeline.captured_batches(s.moe, stream, s.layers, ("logits", "topk")):
            counts_acc.update(records, batch, predicted=logits.argmax(-1))
        counts_acc.all_reduce()
        out.record(tokens=stream.report.to_dict())
        counts = counts_acc.arrays()
        write_outputs(out, counts, s, args)
        if specs:
            table = saturation(specs, s)
            out.save_table(table, "saturation")
            out.save_figure(plot_saturation(table), "saturation")


def write_outputs(out: Run, counts: dict[str, np.ndarray], s: pipeline.Setup, args: argparse.Namespace) -> None:
    layers, domains = s.layers, [d.name for d in s.domains]
    layer_ids = [m.layer for m in layers]
    freq = selection_frequency(counts, layers, domains)
    out.save_table(freq, "frequency")
    out.save_array(counts["topk"], "counts_topk")
    out.save_array(counts["top1"], "counts_top1")
    out.save_table(expert_specialization(counts, layers, domains), "expert_specialization")
    out.save_table(coverage(counts, layers, domains), "coverage50")
    out.save_table(load_balance(counts, layers), "load_balance")

    coact_tables = []
    for li, moe_layer in enumerate(layers):
        selected = counts["topk"][li].sum(0)
        coact_tables.append(coactivation_table(counts["coactivation"][li], selected, counts["tokens"].sum(), moe_layer.layer))
    out.save_table(pd.concat(coact_tables, ignore_index=True), "coactivation")
    out.save_array(counts["coactivation"], "coactivation_counts")

    if "transitions" in counts:
        transition_rows, probabilities = [], []
        for pair, (a, b) in enumerate(itertools.pairwise(layers)):
            probs = transition_probabilities(counts["transitions"][pair], counts["topk"][pair].sum(0))
            probabilities.append(probs)
            i, j = np.meshgrid(np.arange(probs.shape[0]), np.arange(probs.shape[1]), indexing="ij")
            transition_rows.append(pd.DataFrame({"layer_from": a.layer, "layer_to": b.layer, "expert_from": i.ravel(),
                                                 "expert_to": j.ravel(), "count": counts["transitions"][pair].ravel(),
                                                 "probability": probs.ravel()}))
        out.save_table(pd.concat(transition_rows, ignore_index=True), "transitions")
        out.save_array(np.stack(probabilities), "transition_probabilities")

    correlation, shuffled = counts["correlation"], counts["correlation_shuffled"]
    out.save_array(correlation, "indicator_correlation")
    out.save_array(shuffled, "indicator_correlation_shuffled")
    C = correlation.shape[0] // len(layers)
    summary = []
    for a, la in enumerate(layer_ids):
        for b, lb in enumerate(layer_ids):
            block = np.s_[a * C : (a + 1) * C, b * C : (b + 1) * C]
            off_diagonal = ~np.eye(C, dtype=bool) if a == b else np.ones((C, C), dtype=bool)
            summary.append({"layer_a": la, "layer_b": lb,
                            "mean_abs_pearson": np.nanmean(np.abs(correlation[block][off_diagonal])),
                            "mean_abs_pearson_shuffled": np.nanmean(np.abs(shuffled[block][off_diagonal]))})
    out.save_table(pd.DataFrame(summary), "indicator_correlation_summary")

    if args.token_tables:
        overlap_rows, spec_rows, jaccards = [], [], []
        for li, moe_layer in enumerate(layers):
            jaccard, weighted = token_overlap(counts["token_current"][li][:, : moe_layer.num_choices], args.min_count)
            jaccards.append(np.stack([jaccard, weighted]))
            i, j = np.meshgrid(np.arange(jaccard.shape[0]), np.arange(jaccard.shape[0]), indexing="ij")
            keep = (i != j).ravel()
            overlap_rows.append(pd.DataFrame({"layer": moe_layer.layer, "expert_i": i.ravel()[keep], "expert_j": j.ravel()[keep],
                                              "jaccard": jaccard.ravel()[keep], "weighted_overlap": weighted.ravel()[keep]}))
            for table in TOKEN_TABLES:
                spec = token_specialization(counts[f"token_{table}"][li], counts[f"occurrences_{table}"], moe_layer.top_k, args.min_count)
                spec_rows.append({"layer": moe_layer.layer, "token": table, **spec})
        out.save_table(pd.concat(overlap_rows, ignore_index=True), "token_overlap")
        out.save_array(np.stack(jaccards), "token_overlap")  # [layer, (jaccard, weighted), E, E]
        out.save_table(pd.DataFrame(spec_rows), "token_specialization")

    for li, moe_layer in enumerate(layers):
        out.save_figure(plot_frequency(freq, moe_layer.layer, domains), f"frequency_layer{moe_layer.layer}")
        out.save_figure(plot_domain_heatmap(freq, moe_layer.layer, domains), f"domain_heatmap_layer{moe_layer.layer}")
        selected = counts["topk"][li].sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            conditional = counts["coactivation"][li] / selected.reshape(-1, 1)
        out.save_figure(plot_matrix(conditional, f"Co-activation P(j | i), layer {moe_layer.layer}", "expert j", "expert i",
                                    "P(j in top-k | i in top-k)"), f"coactivation_layer{moe_layer.layer}")
    if "transitions" in counts:
        for pair, (a, b) in enumerate(itertools.pairwise(layers)):
            probs = probabilities[pair]
            out.save_figure(plot_matrix(probs, f"Routing transitions, layer {a.layer} → {b.layer}", f"expert at layer {b.layer}",
                                        f"expert at layer {a.layer}", "P(e' | e)"), f"transitions_{a.layer}_{b.layer}")
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, (matrix, title) in zip(axes, ((correlation, "top-k indicators"), (shuffled, "tokens shuffled per layer")), strict=True):
        image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_title(f"Pearson correlation, {title}")
        ax.set_xlabel("layer × expert")
    fig.colorbar(image, ax=axes, shrink=0.8)
    out.save_figure(fig, "indicator_correlation")


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
