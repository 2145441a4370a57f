"""Do experts write to separable regions? UMAP and PCA of expert outputs on the tokens routed to them.

    uv run dim_reduc.py                                # shipped demo model, offline demo domains (about a minute on 2 CPUs)
    uv run dim_reduc.py --model allenai/OLMoE-1B-7B-0924 --data olmoe --layers 1 7 15 --num_tokens 10000

Per MoE layer (SPEC "UMAP / PCA"): a seeded sample of the counted tokens (every counted token, keyed at random
by --seed) gives one point per (token, routed expert): the expert's unweighted output E_e(x), or w_e · E_e(x) with
--weighted (w_e = the routing weight the expert really receives; for Llama 4, whose router scales the expert
*inputs*, this is the output scaled after the fact). Each expert keeps at most --per_expert points: those of its
routed tokens with the smallest keys. The points are embedded in 2-D by PCA (exact SVD) and UMAP (Euclidean,
random_state = --seed, hence single-threaded and reproducible).

Separation: leave-one-out k-nearest-neighbour accuracy (k = --knn, Euclidean, majority vote with ties to the
smallest label) of the expert label and of the domain label, in each 2-D embedding and in the original output
space, each beside the same accuracy with the labels permuted (seeded: the chance control) and the majority-class
share.

Defaults are sized for the demo model on a laptop CPU (2 cores: about a minute, most of it UMAP): 2,000 tokens
per domain and 100 points per expert. For a real model raise them (--num_tokens 10000; the sample keeps every
counted token's expert input for each chosen layer, on the CPU) and expect UMAP to take a minute per layer for
~10,000 points.

Outputs: embedding_coords.csv (one row per point, layer and method: layer, method, point, x, y, expert, rank,
weight, domain, token_id, token, batch, row, position), separation.csv (layer, space = original|pca|umap, label =
expert|domain, accuracy, accuracy_permuted, majority_baseline, k, num_points, num_classes, dims), and figures
<method>_layer<L>_by_expert and <method>_layer<L>_by_domain.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from common import cli
from common.cli import at_least, base_parser, run_main
from common.errors import InputError

SCRIPT = "dim_reduc"
METHODS = ("umap", "pca")
DEFAULT_NUM_TOKENS = 2_000


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (got {text})")
    return value


def build_parser():
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.epilog = (
        "Defaults are sized for the shipped demo model on a 2-core CPU: about a minute (most of it UMAP) with\n"
        f"--num_tokens {DEFAULT_NUM_TOKENS} per domain and --per_expert 100. For a real model raise them, e.g.\n"
        "--num_tokens 10000 --per_expert 200; UMAP takes about a minute per layer for ~10,000 points."
    )
    parser.set_defaults(num_tokens=DEFAULT_NUM_TOKENS)
    for action in parser._actions:
        if action.dest == "num_tokens":
            action.help = "tokens counted per domain (padding and specials never count); each is a candidate point: --per_expert picks among them"
    parser.add_argument("--method", choices=(*METHODS, "both"), default="both", help="2-D embedding(s) to compute")
    parser.add_argument("--per_expert", type=at_least(1), default=100,
                        help="at most this many points (routed tokens) per expert, seeded")
    parser.add_argument("--weighted", action="store_true", help="embed w_e · E_e(x) instead of E_e(x)")
    parser.add_argument("--knn", type=at_least(1), default=10, help="k of the leave-one-out k-NN separation")
    parser.add_argument("--n_neighbors", type=at_least(2), default=15, help="UMAP's n_neighbors")
    parser.add_argument("--min_dist", type=_unit_interval, default=0.1, help="UMAP's min_dist")
    return parser


def run(args: argparse.Namespace) -> None:
    config = cli.config(args, SCRIPT)  # the flags and data specs, checked before torch is imported
    from common.cli import pipeline

    methods = list(METHODS) if args.method == "both" else [args.method]
    s = pipeline.setup(config)
    # imported once the input is known to be good: a refused run does not pay for them
    import pandas as pd
    import torch
    from tqdm import tqdm

    from common.analysis.embedding import MIN_POINTS, embed_pca, embed_umap, expert_points, separation_rows
    from common.analysis.sample import TokenSample
    from common.figures.embedding import plot_layer

    domains = [d.name for d in s.domains]
    stream = pipeline.batches(s)
    progress = s.config.run.progress
    with pipeline.start_run(s) as out:
        # Every counted token is kept (per_domain = num_tokens), on the CPU: the per-expert cap picks among them.
        sample_acc = TokenSample(s.layers, len(domains), args.num_tokens, args.seed, torch.device("cpu"))
        batches = pipeline.resumable(out, s, stream, sample=sample_acc)
        for records, batch, _ in pipeline.captured_batches(s.moe, batches, s.layers, ("topk", "input")):
            sample_acc.update(records, batch)
        out.record(tokens=stream.report.to_dict())
        if sample_acc.kept is None:
            raise InputError("no tokens were counted: the data is empty after removing special tokens")
        sample = sample_acc.all_reduce().result()
        token_ids = sample["token_id"].numpy()
        token_text = {int(t): s.moe.tokenizer.decode([int(t)]) for t in set(token_ids.tolist())}

        coord_tables, separation, points_per_layer, explained_by_layer, to_plot = [], [], {}, {}, []
        steps = tqdm(total=len(s.layers) * (1 + len(methods)), desc="layers × spaces", disable=not progress)
        for moe_layer in s.layers:
            points = expert_points(moe_layer, sample, args.per_expert, weighted=args.weighted, progress=progress)
            n = len(points)
            if n < MIN_POINTS:
                raise InputError(
                    f"layer {moe_layer.layer}: only {n} (token, routed expert) point(s); an embedding needs at least "
                    f"{MIN_POINTS}: raise --num_tokens or --per_expert"
                )
            domain_of = sample["domain"].numpy()[points.token]
            labels = {"expert": points.expert, "domain": domain_of}
            knn = {"k": args.knn, "seed": args.seed, "progress": progress}
            layer_rows = separation_rows(points.outputs, labels, layer=moe_layer.layer, space="original",
                                         device=s.moe.device, **knn)
            steps.update()
            meta = pd.DataFrame({
                "expert": points.expert, "rank": points.rank, "weight": points.weight,
                "domain": [domains[d] for d in domain_of], "token_id": token_ids[points.token],
                "token": [token_text[int(t)] for t in token_ids[points.token]],
                "batch": sample["batch_number"].numpy()[points.token], "row": sample["row"].numpy()[points.token],
                "position": sample["position"].numpy()[points.token],
            })
            embedded = {}
            for method in methods:
                if method == "pca":
                    coords, explained = embed_pca(points.outputs)
                    explained_by_layer[moe_layer.layer] = explained.tolist()
                else:
                    coords = embed_umap(points.outputs, args.seed, args.n_neighbors, args.min_dist)
                embedded[method] = coords
                layer_rows += separation_rows(coords, labels, layer=moe_layer.layer, space=method, **knn)
                head = pd.DataFrame({"layer": moe_layer.layer, "method": method, "point": range(n),
                                     "x": coords[:, 0], "y": coords[:, 1]})
                coord_tables.append(pd.concat([head, meta], axis=1))
                steps.update()
            separation += layer_rows
            points_per_layer[moe_layer.layer] = n
            to_plot.append((moe_layer, points.expert, domain_of, embedded, layer_rows))
        steps.close()
        out.record(points=points_per_layer, pca_explained_variance=explained_by_layer)
        out.save_table(pd.concat(coord_tables, ignore_index=True), "embedding_coords")
        out.save_table(pd.DataFrame(separation), "separation")
        figures_bar = tqdm(total=2 * sum(len(item[3]) for item in to_plot), desc="figures", disable=not progress)
        for moe_layer, experts, domain_of, embedded, layer_rows in to_plot:
            for method, coords in embedded.items():
                figures = plot_layer(
                    coords, experts, domain_of, layer=moe_layer.layer, method=method,
                    num_experts=moe_layer.num_experts, domain_names=domains, weighted=args.weighted,
                    separation=[r for r in layer_rows if r["space"] in (method, "original")],
                    explained=explained_by_layer.get(moe_layer.layer) if method == "pca" else None, seed=args.seed,
                )
                for colour, fig in figures.items():
                    out.save_figure(fig, f"{method}_layer{moe_layer.layer}_by_{colour}")
                    figures_bar.update()
        figures_bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
