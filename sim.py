"""How similar are the experts' outputs? All-pairs cosine and CKA of every expert applied to the same tokens.

    uv run sim.py                                                        # demo model and data, cosine + linear CKA
    uv run sim.py --model allenai/OLMoE-1B-7B-0924 --data olmoe --num_tokens 10000 --layers 1 --method CKA
    uv run sim.py --method all --routed-only                             # each pair on the tokens routed to both

A seeded sample of n = --num_tokens tokens (split evenly over the domains) is drawn from the stream; at each MoE
layer every expert is applied to every sampled token's MoE input, Y_e = E_e(X) [n, d], and every pair of experts
is compared (SPEC "Expert output similarity"): mean cosine (1/n) Σ cos(E_i(x), E_j(x)); linear CKA (Kornblith et
al. 2019); debiased linear CKA (unbiased HSIC, Song et al. 2012); RBF CKA (σ: --sigma, or per expert the median
pairwise distance of its outputs). Layers with shared experts get one more row/column, `shared`: the shared
experts' (gated) output. All pairs are computed at once from kernel blocks of all experts (common/analysis/similarity.py);
--block_mb bounds the memory of that computation. --routed-only compares each pair on the tokens routed to both
(pairs with fewer than --min_pair_tokens such tokens are NaN).

Outputs: similarity.csv (tidy: layer, expert_i, expert_j, method, value, tokens), similarity_<method>.npy
[layer, expert_i, expert_j] (layers in --layers order; rows 0..E-1 the routed experts, row E `shared` where the
layer has shared experts; NaN-padded to the widest layer), similarity_tokens.npy (same axes: tokens per pair),
similarity_summary.csv (per layer and method: mean off-diagonal similarity, most / least similar pairs, NaN pairs),
cluster_order.csv (the heatmaps' hierarchical-clustering order), rbf_sigma.csv (with cka-rbf), and figures
similarity_<method>_layer<L> (clustered heatmap with dendrogram).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from common import cli
from common.cli import at_least, base_parser, positive_float, run_main
from common.errors import InputError

SCRIPT = "sim"
# common.analysis.similarity.METHODS, repeated so that --help and flag errors need no torch (a test keeps them equal).
METHODS = ("cosine", "cka", "cka-debiased", "cka-rbf")


def build_parser():
    parser = base_parser(__doc__.split("\n\n")[0])
    for action in parser._actions:  # this script's --num_tokens is the whole sample, not a per-domain count
        if action.dest == "num_tokens":
            action.type = at_least(2)
            action.help = ("size n of the token sample, split evenly over the domains (the stream reads just "
                           "enough tokens to fill it); every expert is applied to all n tokens")
    parser.add_argument("--method", dest="method", nargs="+", type=str.lower, default=["cosine", "cka"],
                        choices=(*METHODS, "all"), metavar="METHOD",
                        help=f"similarity measures, case-insensitive: {', '.join(METHODS)} or all")
    parser.add_argument("--routed-only", dest="routed_only", action="store_true",
                        help="compare each pair of experts only on the tokens routed to both")
    parser.add_argument("--min_pair_tokens", type=at_least(1), default=20,
                        help="with --routed-only: a pair sharing fewer tokens is NaN (debiased CKA needs at least 4)")
    parser.add_argument("--sigma", type=positive_float, default=None,
                        help="RBF bandwidth for cka-rbf; default: per expert, the median pairwise distance of its outputs")
    parser.add_argument("--sigma_tokens", type=at_least(2), default=4096,
                        help="tokens the median heuristic uses (a seeded subset of the sample when it is larger)")
    parser.add_argument("--block_mb", type=at_least(1), default=512,
                        help="memory bound (MiB) of the similarity computation; sizes its token blocks, and outputs "
                        "are cached rather than recomputed when they fit")
    return parser


def chosen_methods(asked: Sequence[str]) -> list[str]:
    """--method values in canonical order, 'all' expanded, duplicates dropped."""
    wanted = set(METHODS) if "all" in asked else set(asked)
    return [m for m in METHODS if m in wanted]


def domain_quotas(total: int, domains: int) -> list[int]:
    """n split evenly over the domains; the first n mod D domains take one token more."""
    base, extra = divmod(total, domains)
    return [base + (d < extra) for d in range(domains)]


def _with_shared(records, layers):
    """Records whose expert input carries the shared experts' output as extra columns [T, 2H] (layers with shared
    experts), so that TokenSample keeps both for the same tokens; split again by `_split_shared`."""
    import torch

    from common.hooks import Capture, LayerRecord

    view = Capture()
    for m in layers:
        rec = records[m.layer]
        x = rec.expert_input
        if m.shared_experts and rec.shared_output is not None:
            x = torch.cat([x, rec.shared_output.to(x.dtype)], dim=-1)
        view.records[m.layer] = LayerRecord(topk_index=rec.topk_index, topk_weight=rec.topk_weight, expert_input=x)
    return view


def _trim(kept: dict, quotas: list[int]):
    """The first quota[d] tokens (smallest keys) of each domain of TokenSample.result()."""
    import torch

    chosen = [torch.nonzero(kept["domain"] == d, as_tuple=True)[0][:q] for d, q in enumerate(quotas)]
    order = torch.cat(chosen)
    return {k: v[order] for k, v in kept.items()}


def routed_mask(topk_index, num_experts: int, rows: int, dtype):
    """[rows, n] 1 where the token was routed to the expert; the shared row (if any) is all ones."""
    import torch

    n = topk_index.shape[0]
    mask = torch.zeros(rows, n, dtype=dtype, device=topk_index.device)
    valid = topk_index < num_experts  # LongCat's zero-compute experts sit past E
    tokens = torch.arange(n, device=topk_index.device)[:, None].expand_as(topk_index)
    mask[topk_index[valid], tokens[valid]] = 1
    if rows > num_experts:
        mask[num_experts:] = 1
    return mask


def run(args: argparse.Namespace) -> None:
    methods = chosen_methods(args.method)
    if args.sigma is not None and "cka-rbf" not in methods:
        warnings.warn("--sigma is only used by cka-rbf", stacklevel=1)

    config = cli.config(args, SCRIPT)  # the flags and data specs, checked before torch is imported
    from common.cli import pipeline

    s = pipeline.setup(config)
    # imported once the input is known to be good: a refused run does not pay for them
    import dataclasses

    import numpy as np
    import pandas as pd
    import torch

    from common.analysis.sample import TokenSample
    from common.analysis.similarity import (
        SHARED,
        ExpertOutputs,
        cluster_order,
        expert_similarities,
        pair_summary,
        plan_blocks,
    )
    from common.figures.similarity import plot_similarity, plot_similarity_by_layer

    domains = [d.name for d in s.domains]
    quotas = domain_quotas(args.num_tokens, len(domains))
    per_domain = max(quotas)
    stream = pipeline.batches(s, data=dataclasses.replace(s.config.data, num_tokens=per_domain))
    with_shared = [m for m in s.layers if m.shared_experts]
    what = ("input", "topk", "shared_output") if with_shared else ("input", "topk")
    with pipeline.start_run(s) as out:
        sample = TokenSample(s.layers, len(domains), per_domain, args.seed, s.moe.device)
        batches = pipeline.resumable(out, s, stream, sample=sample)
        for records, batch, _ in pipeline.captured_batches(s.moe, batches, s.layers, what):
            sample.update(_with_shared(records, s.layers), batch)
        kept = _trim(sample.all_reduce().result(), quotas)
        n = int(kept["domain"].numel())
        if n < 2:
            raise InputError(f"the data gave only {n} token(s); the similarities need at least 2")
        per_domain_kept = {name: int((kept["domain"] == d).sum()) for d, name in enumerate(domains)}
        if n < args.num_tokens:
            warnings.warn(f"the sample holds {n} of --num_tokens {args.num_tokens} tokens (the data ran out)",
                          stacklevel=1)
        out.record(tokens=stream.report.to_dict(),
                   sample={"num_tokens_requested": args.num_tokens, "num_tokens": n, "per_domain": per_domain_kept},
                   methods=methods)

        rows_out, summaries, orders, sigma_rows, plans = [], [], [], [], {}
        matrices: dict[str, list[np.ndarray]] = {m: [] for m in methods}
        token_matrices, labels_per_layer = [], []
        dtype = torch.float32
        for moe_layer in s.layers:
            x = kept[f"input_{moe_layer.layer}"]
            hidden = s.moe.hidden_size
            shared = x[:, hidden:] if x.shape[1] > hidden else None
            x = x[:, :hidden].contiguous()
            E = moe_layer.num_experts
            labels = [str(e) for e in range(E)] + ([SHARED] if shared is not None else [])
            mask = routed_mask(kept[f"topk_index_{moe_layer.layer}"], E, len(labels), dtype) if args.routed_only \
                else None
            plan = plan_blocks(len(labels), n, hidden, masked=mask is not None, rbf="cka-rbf" in methods,
                               budget_mb=args.block_mb)
            # one expert chunk (E · tokens · max(H, I) elements) is at most one block of outputs
            source = ExpertOutputs(moe_layer, x, shared, dtype, max_elements=len(labels) * plan.block * hidden)
            if plan.cache:
                source = source.all(plan.token_block)
            plans[moe_layer.layer] = {"block_tokens": plan.block, "token_block": plan.token_block,
                                      "outputs_cached": plan.cache, "planned_peak_mb": round(plan.estimate_mb, 1)}
            with torch.inference_mode():
                result = expert_similarities(
                    source, methods, mask=mask, min_pair_tokens=args.min_pair_tokens if args.routed_only else 1,
                    sigma=args.sigma, sigma_tokens=min(args.sigma_tokens, plan.sigma_tokens_max), block=plan.block,
                    token_block=plan.token_block, seed=args.seed, device=s.moe.device, dtype=dtype,
                    progress=s.config.run.progress, desc=f"layer {moe_layer.layer}: token-block pairs",
                )
            tokens = result.tokens.numpy()
            token_matrices.append(tokens)
            labels_per_layer.append(labels)
            if result.sigmas is not None:
                how = "given (--sigma)" if args.sigma is not None else f"median on {result.sigma_tokens} tokens"
                sigma_rows += [{"layer": moe_layer.layer, "expert": labels[r], "sigma": float(result.sigmas[r]),
                                "source": how} for r in range(len(labels))]
            ii, jj = np.meshgrid(np.arange(len(labels)), np.arange(len(labels)), indexing="ij")
            for method in methods:
                matrix = result.matrices[method].numpy()
                matrices[method].append(matrix)
                rows_out.append(pd.DataFrame({
                    "layer": moe_layer.layer, "expert_i": np.array(labels)[ii.ravel()],
                    "expert_j": np.array(labels)[jj.ravel()], "method": method, "value": matrix.ravel(),
                    "tokens": tokens.ravel().astype(np.int64),
                }))
                order, tree = cluster_order(matrix)
                orders += [{"layer": moe_layer.layer, "method": method, "position": p, "expert": labels[e]}
                           for p, e in enumerate(order)]
                summaries.append({"layer": moe_layer.layer, "method": method, "experts": len(labels),
                                  "tokens": n, **pair_summary(matrix, labels, shared is not None)})
                note = (f"{n} tokens; each pair on the tokens routed to both (fewer than {args.min_pair_tokens}: grey)"
                        if args.routed_only else f"{n} tokens; every expert applied to every token")
                fig = plot_similarity(matrix, labels, order, tree, layer=moe_layer.layer, method=method, note=note)
                out.save_figure(fig, f"similarity_{method}_layer{moe_layer.layer}")

        out.record(blocks=plans)
        out.save_table(pd.concat(rows_out, ignore_index=True), "similarity")
        summary = pd.DataFrame(summaries)
        out.save_table(summary, "similarity_summary")
        out.save_figure(plot_similarity_by_layer(summary), "similarity_by_layer")
        out.save_table(pd.DataFrame(orders), "cluster_order")
        if sigma_rows:
            out.save_table(pd.DataFrame(sigma_rows), "rbf_sigma")
        width = max(len(labels) for labels in labels_per_layer)

        def stacked(items: list[np.ndarray]) -> np.ndarray:
            array = np.full((len(items), width, width), np.nan)
            for i, item in enumerate(items):
                array[i, : item.shape[0], : item.shape[1]] = item
            return array

        for method in methods:
            out.save_array(stacked(matrices[method]), f"similarity_{method}")
        out.save_array(stacked(token_matrices), "similarity_tokens")


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
