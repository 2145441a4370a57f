"""Token-cluster specialization: do experts receive, and write, tokens of particular parts of the vocabulary?

    uv run cluster.py                                      # demo model, offline data (about a minute on 2 CPUs)
    uv run cluster.py --model allenai/OLMoE-1B-7B-0924 --data olmoe --layers 1 7 15 --num_tokens 100000
    uv run cluster.py --model random:olmoe --clusters 5 20  # tiny random models have 259 token ids

Method ("The Expert Strikes Back", arXiv:2604.02178; definitions: docs/METRICS.md#token-cluster-specialization):
the rows of the output embedding are centred and clustered by spherical k-means (k-means++ seeding from --seed,
at most --kmeans_iters rounds or until no assignment changes; on the model's device) for every k of --clusters.
For each expert and MoE layer, the cluster distribution of the tokens routed to it (top-k picks of counted tokens)
is compared with the layer's overall distribution by the Jensen-Shannon divergence (bits), minus the expected JSD
of a multinomial sample of the same size from the overall distribution (--baseline_draws seeded draws): the score
is about 0 for an expert that receives a random sample of the layer's tokens. The same for its output tokens: the
top-1 token of the expert's weighted output w·E_e(x) alone through the final norm and unembedding, per pick.

Outputs: cluster_scores.csv (layer, expert, k, tokens, jsd / baseline / score for input and output), cluster_sizes.csv
(per k and cluster: size, cohesion, most central tokens), clusters_k<K>.json ({"<cluster id>": ["tok", ...]}, most
central first), cluster_assignment.npy [k (order of --clusters), token id], cluster_counts_k<K>.npy [side (input,
output), layer, expert, cluster]; figures cluster_scores_layer<L> (score per expert, input vs output, one panel per
k), cluster_scores_by_layer and cluster_sizes. Defaults: 3,000 tokens per domain (18,000 on the demo corpus), which
on 2 CPU cores runs in about a minute with the demo model; real studies want far more (--num_tokens).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from common import cli
from common.cli import at_least, base_parser, positive_float, run_main
from common.errors import InputError

SCRIPT = "cluster"
DEFAULT_CLUSTERS = (10, 50, 100, 1000)
DEFAULT_NUM_TOKENS = 3000


def build_parser():
    parser = base_parser(f"{__doc__.split(chr(10) * 2)[0]} Defaults ({DEFAULT_NUM_TOKENS:,} tokens per domain, "
                         f"k = {' '.join(map(str, DEFAULT_CLUSTERS))}) run in about a minute on 2 CPU cores with the "
                         "demo model; see docs/METRICS.md#token-cluster-specialization.")
    parser.set_defaults(num_tokens=DEFAULT_NUM_TOKENS)
    parser.add_argument("--clusters", type=at_least(2), nargs="+", default=list(DEFAULT_CLUSTERS), metavar="K",
                        help="numbers of clusters k of the unembedding (each ≥ 2 and at most the vocabulary size; of the defaults, those above it are left out with a warning)")
    parser.add_argument("--kmeans_iters", type=at_least(1), default=100,
                        help="most k-means rounds (it stops earlier when no assignment changes)")
    parser.add_argument("--baseline_draws", type=at_least(1), default=20,
                        help="multinomial samples per expert that estimate the expected JSD of a random sample")
    parser.add_argument("--stats_memory", type=positive_float, default=4.0, metavar="GIB",
                        help="memory budget of the routing statistics on the model's device, in GiB; token × expert "
                        "tables that do not fit go to the host (the output-token table, as large as one of them, goes "
                        "where they go; the plan is in run.json)")
    parser.add_argument("--host_stats_memory", type=positive_float, default=None, metavar="GIB",
                        help="host memory budget of token tables moved off the device, in GiB (default: half the RAM)")
    return parser


def run(args: argparse.Namespace) -> None:
    config = cli.config(args, SCRIPT)  # the flags and data specs, checked before torch is imported
    from common.analysis.memory import plan_routing_counts
    from common.cli import pipeline
    from common.model import resolve_device

    ks = list(dict.fromkeys(args.clusters))
    plans = []

    def preflight(skeleton, layers, domains) -> None:  # from the config alone, before any weight is read
        too_many = [k for k in ks if k > skeleton.vocab_size]
        if too_many and args.clusters == list(DEFAULT_CLUSTERS) and len(too_many) < len(ks):
            # the defaults suit real vocabularies; a tiny model keeps the ones that fit rather than failing
            warnings.warn(f"--clusters: leaving out {', '.join(map(str, too_many))} (more clusters than the model's "
                          f"{skeleton.vocab_size} token ids)", stacklevel=1)
            ks[:] = [k for k in ks if k <= skeleton.vocab_size]
        elif too_many:
            raise InputError(f"--clusters {too_many[0]}: more clusters than the model's {skeleton.vocab_size} token ids")
        plans.append(plan_routing_counts(layers, [d.name for d in domains], skeleton.vocab_size,
                                         resolve_device(config.model.device), device_budget_gib=args.stats_memory,
                                         host_budget_gib=args.host_stats_memory))

    s = pipeline.setup(config, preflight)
    # imported once the input is known to be good: a refused run does not pay for them
    import numpy as np
    import pandas as pd
    import torch
    from tqdm import tqdm

    from common.analysis import clusters as cl
    from common.analysis.specialization import RoutingCounts

    moe, layers = s.moe, s.layers
    domains = [d.name for d in s.domains]
    stream = pipeline.batches(s)
    plan = plans[0]
    with pipeline.start_run(s) as out:
        out.record(stats_memory=plan.to_dict())
        with torch.no_grad():
            rows = cl.centred_unit_rows(cl.unembedding_rows(moe).to(moe.device))
        results = {}
        for k in tqdm(ks, desc="k-means", unit="k", disable=not args.progress):
            results[k] = cl.spherical_kmeans(rows, k, seed=args.seed, max_iter=args.kmeans_iters,
                                             progress=args.progress, desc=f"k-means k={k}")
        out.record(kmeans=[results[k].summary() for k in ks])
        del rows

        inputs = RoutingCounts(layers, domains, moe.vocab_size, moe.device, seed=args.seed, table_device=plan.table_device)
        outputs = cl.ExpertOutputTokens(moe, layers, plan.table_device)
        batches = pipeline.resumable(out, s, stream, inputs=inputs, outputs=outputs)
        for records, batch, logits in pipeline.captured_batches(moe, batches, layers, ("logits", "topk", "input")):
            inputs.update(records, batch, predicted=logits.argmax(-1))
            outputs.update(records, batch)
        inputs.all_reduce()
        outputs.all_reduce()
        out.record(tokens=stream.report.to_dict())
        tables = {"input": inputs.arrays()["token_current"], "output": outputs.table()}  # [layer, token, expert]

        strings = cl.token_strings(moe.tokenizer, moe.vocab_size)
        score_rows, size_rows = [], []
        assignments = np.stack([results[k].assignment.cpu().numpy() for k in ks])
        bar = tqdm(total=len(ks) * len(layers), desc="scores", unit="layer", disable=not args.progress)
        for ki, k in enumerate(ks):
            result = results[k]
            members = cl.cluster_members(result, strings)
            out.save_json(members, f"clusters_k{k}")
            sizes = result.sizes.cpu().numpy()
            cohesion = np.bincount(assignments[ki], weights=result.similarity.cpu().numpy(), minlength=k)
            for c in range(k):
                size_rows.append({"k": k, "cluster": c, "size": int(sizes[c]),
                                  "mean_cosine": cohesion[c] / sizes[c] if sizes[c] else np.nan,
                                  "central_tokens": " ".join(repr(t) for t in members[str(c)][:8])})
            counts = np.zeros((2, len(layers), inputs.choices, k), dtype=np.int64)
            for li, moe_layer in enumerate(layers):
                C = moe_layer.num_choices
                scores = {}
                for side_index, side in enumerate(cl.SIDES):
                    per_cluster = cl.cluster_counts(tables[side][li][:, :C], assignments[ki], k)
                    counts[side_index, li, :C] = per_cluster.round().astype(np.int64)
                    rng = cl.baseline_rng(args.seed, moe_layer.layer, k, side_index)
                    scores[side] = cl.specialization_scores(per_cluster, args.baseline_draws, rng)
                for e in range(C):
                    score_rows.append({
                        "layer": moe_layer.layer, "expert": e, "k": k, "tokens": scores["input"]["tokens"][e],
                        "jsd_input_bits": scores["input"]["jsd"][e], "baseline_input_bits": scores["input"]["baseline"][e],
                        "score_input": scores["input"]["score"][e],
                        "jsd_output_bits": scores["output"]["jsd"][e],
                        "baseline_output_bits": scores["output"]["baseline"][e],
                        "score_output": scores["output"]["score"][e],
                    })
                bar.update(1)
            out.save_array(counts, f"cluster_counts_k{k}")
        bar.close()
        table = pd.DataFrame(score_rows)
        sizes_table = pd.DataFrame(size_rows)
        out.save_table(table, "cluster_scores")
        out.save_table(sizes_table, "cluster_sizes")
        out.save_array(assignments, "cluster_assignment")
        if args.figures:
            from common.figures.clusters import save_cluster_figures

            save_cluster_figures(out, table, sizes_table, [m.layer for m in layers], ks, progress=args.progress)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
