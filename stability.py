"""How stable is routing? The same tokens' top-k choices across precisions, batch composition, padding side and contexts.

    uv run stability.py                                                  # demo model and domains, every MoE layer
    uv run stability.py --model allenai/OLMoE-1B-7B-0924 --data olmoe --num_tokens 5000 --dtypes bfloat16 float16
    uv run stability.py --dtype bfloat16 --dtypes float32 --compare batch padding    # batch/padding at serving precision

Every comparison runs the same counted tokens twice and reads, per MoE layer and token, whether the top-k set of
experts changed (order ignored), whether the top-1 expert changed and |Δw| = Σ_e |w_e − w′_e| over the dense vector
of the weights the experts really receive (docs/METRICS.md#routing-stability). The reference is the model in
--dtype (default float32 here), its windows batched --batch_size at a time and right-padded; the variants:
dtype (the same checkpoint loaded again in each of --dtypes, after the reference is released), router (each router
alone rerun in each of --dtypes on the reference's own router input: its own precision, no upstream drift), batch
(each window forwarded alone, unpadded) and padding (the windows cut to seeded random lengths, right- vs
left-padded; position ids from the attention mask as `generate` sets them, or --left_positions index). A change at
layer ℓ includes what earlier layers' changes did to its input (except router). Route consistency (context): per
token id seen at least --min_count times, the weighted Jaccard of its routes in different windows against pairs
of different ids of the same frequency (log2 bins), from a seeded sample of --sample occurrences per id.

Outputs: stability_summary.csv (per comparison, layer and domain: tokens, top-k and top-1 changed fractions, mean
and max |Δw|), stability_margin.csv (tokens and top-k changes by the reference's k-th minus (k+1)-th router logit
gap), stability_consistency.csv (per layer: same-id and baseline mean weighted Jaccard, their difference
± s.e.m.), stability_tokens.csv (per layer and token id: count, pairs, consistency, baseline), figures
stability_by_layer (changed fractions and mean |Δw| against layer, a line per comparison), stability_margin (the
changed share against that gap: near ties change first), stability_consistency
(same id vs baseline by layer and their distributions over token ids) and stability_consistency_tokens
(consistency against token frequency, the most and least consistent ids named).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from common import cli
from common.cli import at_least, base_parser, run_main
from common.config import DTYPE_NAMES
from common.errors import InputError

SCRIPT = "stability"
COMPARISONS = ("dtype", "router", "batch", "padding", "context")


def _dtype(text: str) -> str:
    if text not in DTYPE_NAMES:
        raise argparse.ArgumentTypeError(f"unknown dtype '{text}': choose float32, bfloat16 or float16 "
                                         "(or fp32, bf16, fp16)")
    return DTYPE_NAMES[text]


def build_parser():
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.set_defaults(dtype="float32")
    for action in parser._actions:
        if action.dest == "dtype":
            action.help = ("the reference precision: every comparison is made against the model in this dtype, and "
                           "the batch and padding comparisons run in it (auto = bfloat16 on CUDA, float32 on CPU)")
    group = parser.add_argument_group("stability")
    group.add_argument("--compare", nargs="+", choices=COMPARISONS, default=None,
                       help="which comparisons: dtype (the model loaded in each of --dtypes), router (each router "
                       "alone in each of --dtypes on the reference's router input), batch (each window alone vs in its "
                       "batch), padding (left vs right padding), context (route consistency of token ids across "
                       "windows). Default: all (dtype and router only when --dtypes names a dtype)")
    group.add_argument("--dtypes", nargs="*", type=_dtype, default=None, metavar="DTYPE",
                       help="precisions compared with the reference (float32, bfloat16, float16). Default: bfloat16, "
                       "plus float16 on CUDA; --dtypes with none skips the dtype comparisons")
    group.add_argument("--left_positions", choices=("mask", "index"), default="mask",
                       help="position ids of the left-padded windows: mask = each window's real tokens count from 0 "
                       "(as generate sets them from the attention mask); index = 0..W−1 over the padded row (a "
                       "forward without position ids), so the real tokens start past 0")
    group.add_argument("--min_count", type=at_least(2), default=5,
                       help="route consistency: token ids seen at least this many times (counted tokens)")
    group.add_argument("--sample", type=at_least(2), default=32,
                       help="route consistency: occurrences of each token id kept (a seeded uniform sample)")
    group.add_argument("--max_pairs", type=at_least(1), default=100,
                       help="route consistency: pairs of occurrences per token id (all cross-window pairs when "
                       "fewer, else drawn); as many baseline pairs")
    return parser


def _comparisons(args: argparse.Namespace) -> list[str]:
    wanted = list(dict.fromkeys(args.compare or COMPARISONS))
    no_dtypes = args.dtypes is not None and not args.dtypes
    if no_dtypes and args.compare and {"dtype", "router"} & set(args.compare):
        raise InputError("--compare dtype/router needs a precision: give --dtypes (e.g. --dtypes bfloat16)")
    if no_dtypes:
        wanted = [c for c in wanted if c not in ("dtype", "router")]
    if not wanted:
        raise InputError("nothing to compare: --dtypes is empty and --compare names only dtype/router")
    return wanted


def run(args: argparse.Namespace) -> None:
    config = cli.config(args, SCRIPT)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("stability.py runs in one process (its comparisons, kept batches and sample are not gathered "
                         "across torchrun ranks; a model too large for one GPU runs with --device_map auto)")
    comparisons = _comparisons(args)
    if "batch" in comparisons and args.batch_size < 2 and args.compare:
        raise InputError("--compare batch compares a window alone with it in a batch: --batch_size must be at least 2")
    from common.cli import pipeline

    s = pipeline.setup(config)
    import dataclasses
    import gc

    import pandas as pd
    import torch
    from tqdm import tqdm

    from common.analysis import stability as st
    from common.figures.stability import plot_by_layer, plot_consistency, plot_consistency_tokens, plot_margin
    from common.model import load_moe

    if "batch" in comparisons and args.batch_size < 2:
        warnings.warn("--batch_size 1: no window is batched with others, the batch comparison is skipped", stacklevel=1)
        comparisons.remove("batch")
    reference = str(s.moe.dtype).removeprefix("torch.")
    dtypes = (list(dict.fromkeys(args.dtypes)) if args.dtypes is not None
              else ["bfloat16", *(["float16"] if s.moe.device.type == "cuda" else [])])
    domains = [d.name for d in s.domains]
    layer_ids = [m.layer for m in s.layers]
    tokenizer = s.moe.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stream = pipeline.batches(s)
    with pipeline.start_run(s) as out:
        stats = st.ChangeStats(len(s.layers), len(domains))
        margins = st.MarginStats(len(s.layers))
        sample = st.RouteSample(args.sample, len(tokenizer))
        kept: list = []  # dtype comparison: (batch, counted positions, their domains, reference routes) per batch
        router_only = st.RouterOnly(s.layers, dtypes if "router" in comparisons else [])
        resumable = pipeline.resumable(out, s, stream, stats=stats, margins=margins, sample=sample, kept=kept)
        with router_only.active():
            for records, batch, _ in pipeline.captured_batches(s.moe, resumable, s.layers, ("topk", "logits")):
                width = batch.input_ids.shape[1]
                flat = st.counted_flat(batch.count_mask).cpu()
                token_domains = batch.token_domains().cpu()[flat]
                ref = [st.routes_at(records[m.layer], flat, m.num_choices) for m in s.layers]
                gaps = [st.topk_gap(records[m.layer].logits[flat.to(records[m.layer].logits.device)], m.top_k)
                        for m in s.layers]
                for name in dtypes if "router" in comparisons else []:
                    for i, m in enumerate(s.layers):
                        if m.layer in router_only.unsupported:
                            continue
                        variant = st.routes_at(_as_record(router_only.routes[(m.layer, name)]), flat, m.num_choices)
                        change = st.route_changes(*ref[i], *variant, m.num_choices)
                        stats.update(("router", reference, name), i, change, token_domains)
                        margins.update(("router", reference, name), i, change, gaps[i])
                if "dtype" in comparisons and dtypes:
                    kept.append((batch.to("cpu"), flat, token_domains, ref, gaps))
                if "context" in comparisons:
                    generator = torch.Generator().manual_seed(_seed(args.seed, batch.number, 0))
                    keys = torch.rand(flat.numel(), generator=generator, dtype=torch.float64)
                    windows = batch.number * args.batch_size + flat // width
                    sample.add(batch.input_ids.cpu().reshape(-1)[flat], windows, keys, ref)
                if "batch" in comparisons and batch.input_ids.shape[0] > 1:
                    rows = flat // width
                    for row in range(batch.input_ids.shape[0]):
                        n = int(batch.attention_mask[row].sum())
                        mine = rows == row
                        if not mine.any():
                            continue
                        alone = st.forward_routes(s.moe, s.layers, batch.input_ids[row:row + 1, :n],
                                                  batch.attention_mask[row:row + 1, :n], flat[mine] - row * width)
                        for i, m in enumerate(s.layers):
                            change = st.route_changes(ref[i][0][mine], ref[i][1][mine], *alone[i], m.num_choices)
                            stats.update(("batch", "batched", "alone"), i, change, token_domains[mine])
                            margins.update(("batch", "batched", "alone"), i, change, gaps[i][mine])
                if "padding" in comparisons and batch.input_ids.shape[0] > 1:
                    generator = torch.Generator().manual_seed(_seed(args.seed, batch.number, 1))
                    lengths = st.cut_lengths(batch.attention_mask.cpu(), generator)
                    sides = {side: st.cut_and_pad(batch.input_ids.cpu(), batch.count_mask.cpu(), lengths, side, pad_id,
                                                  "mask" if side == "right" else args.left_positions)
                             for side in ("right", "left")}
                    cut_gaps: list = []
                    routes = {side: st.forward_routes(s.moe, s.layers, p.input_ids, p.attention_mask, p.flat,
                                                      p.position_ids, cut_gaps if side == "right" else None)
                              for side, p in sides.items()}
                    cut_domains = batch.domain_ids.cpu()[sides["right"].flat // sides["right"].input_ids.shape[1]]
                    for i, m in enumerate(s.layers):
                        change = st.route_changes(*routes["right"][i], *routes["left"][i], m.num_choices)
                        key = ("padding", "right", f"left ({args.left_positions} positions)")
                        stats.update(key, i, change, cut_domains)
                        margins.update(key, i, change, cut_gaps[i])
        out.record(tokens=stream.report.to_dict())
        if not stats.tables and not sample.counts.any():
            raise InputError("nothing routed: the data gave no counted token to compare")

        if "dtype" in comparisons and kept:
            _release(s.moe)
            for name in dtypes:
                variant = load_moe(dataclasses.replace(config.model, dtype=name))
                layers = variant.select(config.layers)
                for batch, flat, token_domains, ref, gaps in tqdm(kept, desc=f"{name} model", unit="batch",
                                                                  disable=not args.progress):
                    routes = st.forward_routes(variant, layers, batch.input_ids, batch.attention_mask, flat)
                    for i, m in enumerate(layers):
                        change = st.route_changes(*ref[i], *routes[i], m.num_choices)
                        stats.update(("dtype", reference, name), i, change, token_domains)
                        margins.update(("dtype", reference, name), i, change, gaps[i])
                del variant, layers
                gc.collect()

        rows = stats.rows(layer_ids, domains)
        if rows:
            summary = pd.DataFrame(rows)
            out.save_table(summary, "stability_summary")
            out.save_figure(plot_by_layer(summary), "stability_by_layer")
            margin = pd.DataFrame(margins.rows(layer_ids))
            out.save_table(margin, "stability_margin")
            out.save_figure(plot_margin(margin), "stability_margin")
        if "context" in comparisons:
            by_layer, tokens = st.consistency(sample, layer_ids, args.min_count, args.max_pairs, args.seed)
            if not by_layer or not tokens:
                warnings.warn(f"route consistency: no token id occurred {args.min_count} times in two windows; "
                              "raise --num_tokens or lower --min_count", stacklevel=1)
            else:
                table = pd.DataFrame(tokens)
                table.insert(2, "token", [tokenizer.decode([int(t)]) for t in table.token_id])
                consistency = pd.DataFrame(by_layer)
                out.save_table(consistency, "stability_consistency")
                out.save_table(table, "stability_tokens")
                out.save_figure(plot_consistency(consistency, table), "stability_consistency")
                out.save_figure(plot_consistency_tokens(table), "stability_consistency_tokens")
        out.record(reference_dtype=reference, dtypes=dtypes, comparisons=comparisons,
                   left_positions=args.left_positions, router_only_unsupported=sorted(router_only.unsupported),
                   min_count=args.min_count, sample=args.sample, max_pairs=args.max_pairs)


def _seed(seed: int, number: int, stream: int) -> int:
    """A generator seed per (--seed, batch number, use): the same draws on resume and in any batch order."""
    return (seed * 1_000_003 + number * 7 + stream) % (2**63)


def _as_record(routing):
    from common.hooks.capture import LayerRecord

    return LayerRecord(topk_index=routing[0], topk_weight=routing[1])


def _release(moe) -> None:
    """Free the reference model's weights before a variant is loaded (a large model fits once, not twice)."""
    import gc

    import torch

    try:
        if getattr(moe.model, "hf_device_map", None):  # --device_map: accelerate's hooks first, or .to() refuses
            from accelerate.hooks import remove_hook_from_module

            remove_hook_from_module(moe.model, recurse=True)
        moe.model.to("meta")
    except Exception:  # a model that cannot move: its memory goes when the variant's load replaces it
        return
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
