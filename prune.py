"""What if experts go? Per-domain perplexity as a growing fraction of experts is removed, by criterion.

    uv run prune.py                                                     # demo model and domains, every MoE layer
    uv run prune.py --model deepseek-ai/deepseek-moe-16b-base --data moe-lens --num_tokens 5000 --criteria frequency random

One observation pass over the data measures, per layer and routed expert, its selection frequency, mean routing
weight and REAP-style saliency (mean of w · ‖E_e(x)‖ over the tokens routed to it); each criterion ranks the experts
from least to most important and removes them in that order, at each --fractions value (per layer, or ranked over all
layers with --scope global; a layer keeps at least top-k). `random` is the control: --draws seeded permutations,
reported as mean ± sd. Removal (docs/METRICS.md#expert-pruning): `drop` sets the removed experts' router logits to
-inf before selection, so the router chooses among those left with the model's own normalisation (what a checkpoint
with them deleted computes; tested equal to such checkpoints); `zero` keeps the routing and gives them weight 0
(their outputs vanish, as with zeroed down projections). Shared experts are never removed. The same counted tokens
serve the observation and every perplexity.

Outputs: prune_scores.csv (per layer and expert: the observations), prune_perplexity.csv (criterion, draw,
fraction, experts removed, domain, predictions, NLL, perplexity), prune_perplexity.npy [criterion, fraction,
domain + all] (random: exp of the mean NLL over draws), figures prune_scores (each layer's experts sorted by each
score) and prune_perplexity (perplexity, log scale, against the
fraction removed: one line per criterion, random's exp(mean ± sd of the NLL) band; a panel per domain and pooled).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from common import cli
from common.cli import at_least, base_parser, run_main
from common.errors import InputError

SCRIPT = "prune"
CRITERIA = ("frequency", "weight", "saliency", "importance", "redundancy", "random")  # common/analysis/pruning.py
DEFAULT_CRITERIA = ("frequency", "weight", "saliency", "random")  # + importance / redundancy with their run folders
DEFAULT_FRACTIONS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"a fraction of experts must lie in [0, 1), got {text}")
    return value


def build_parser():
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.set_defaults(num_tokens=2000)
    prune = parser.add_argument_group("pruning")
    prune.add_argument("--criteria", nargs="+", choices=CRITERIA, default=None,
                       help="which experts go first: the least selected (frequency), the lowest mean weight, the lowest "
                       "saliency, the least ablation importance (ΔNLL: from --importance run folders, else computed "
                       "here at E+1 forwards per batch and layer), output-similarity redundancy (needs --similarity), "
                       "or random (the control). Default: frequency weight saliency random, + importance / redundancy "
                       "when their run folders are given")
    prune.add_argument("--importance", nargs="+", metavar="RUN", default=None,
                       help="interv.py --data run folders (one per layer) whose ΔNLL ranks the experts")
    prune.add_argument("--similarity", metavar="RUN", default=None,
                       help="a sim.py run folder: of the most similar pair, the more redundant expert goes first")
    prune.add_argument("--similarity_method", default=None, choices=("cosine", "cka", "cka-debiased", "cka-rbf"),
                       help="which of the sim.py run's similarities (default: its first)")
    prune.add_argument("--merge", nargs="*", type=at_least(1), default=None, metavar="CLUSTERS",
                       help="also the merging what-if (needs --similarity): average-linkage clusters of the similarity, "
                       "each replaced by the frequency-weighted average of its experts' weights, routing unchanged "
                       "(HC-SMoE); rows 'merge' beside the criteria. Cluster counts per layer, or none: E·(1 − fraction) "
                       "at each --fractions value")
    prune.add_argument("--fractions", nargs="+", type=_fraction, default=list(DEFAULT_FRACTIONS),
                       help="fractions of each layer's routed experts removed (capped at E − k)")
    prune.add_argument("--scope", choices=("layer", "global"), default="layer",
                       help="layer: every MoE layer loses the same fraction; global: experts ranked over all layers")
    prune.add_argument("--how", choices=("drop", "zero"), default="drop",
                       help="drop: the router chooses among the experts left; zero: routing unchanged, removed experts' "
                       "outputs are 0")
    prune.add_argument("--draws", type=at_least(1), default=3, help="seeded random orders for the random control")
    prune.add_argument("--include-shared", dest="include_shared", action="store_true",
                       help="count each layer's shared experts as one more removable unit (frequency and weight 1, "
                       "saliency their mean output norm; removed = output 0); default: never removed")
    return parser


def run(args: argparse.Namespace) -> None:
    config = cli.config(args, SCRIPT)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("prune.py runs in one process (its observations and kept batches are not gathered across torchrun ranks; a model too large for one GPU runs with --device_map auto)")
    merging = args.merge is not None
    if ("redundancy" in (args.criteria or ()) or merging) and not args.similarity:
        raise InputError(f"{'--merge' if merging else '--criteria redundancy'} needs --similarity RUN (a sim.py run "
                         "folder of this model)")
    from common.cli import pipeline

    def preflight(skeleton, layers, domains) -> None:  # on the weightless model: refused before any weight is read
        for count in args.merge or ():
            for layer in layers:
                if count > layer.num_experts:
                    raise InputError(f"--merge {count}: more clusters than the {layer.num_experts} experts of layer "
                                     f"{layer.layer}")
        if args.how != "drop":
            return
        for fraction in args.fractions:
            if args.scope == "layer":
                for layer in layers:
                    if round(fraction * layer.num_experts) > layer.num_experts - layer.top_k:
                        raise InputError(
                            f"--fractions {fraction:g} with --how drop: layer {layer.layer} would keep "
                            f"{layer.num_experts - round(fraction * layer.num_experts)} of its {layer.num_experts} "
                            f"experts, fewer than top-k = {layer.top_k} (the router needs k to choose from; --how zero "
                            "allows it)")
            elif round(fraction * sum(m.num_experts for m in layers)) > sum(m.num_experts - m.top_k for m in layers):
                raise InputError(f"--fractions {fraction:g} with --how drop: the layers would keep fewer experts than "
                                 "their top-k (--how zero allows it)")

    s = pipeline.setup(config, preflight)
    import numpy as np
    import pandas as pd
    from tqdm import tqdm

    from common.analysis import pruning
    from common.figures.pruning import plot_prune_perplexity, plot_prune_scores

    biased = [m.layer for m in s.layers
              if any(("bias" in name and "correction" in name) or name.endswith("expert_bias")
                     for name, _ in [*m.router.named_buffers(), *m.router.named_parameters()])]
    if args.how == "drop" and biased:
        warnings.warn(f"--how drop: the routers of layers {', '.join(map(str, biased))} add a selection bias to their "
                      "scores, so a dropped expert (score 0) can still take a slot with weight 0: its output is gone, but "
                      "the token gets one expert fewer than a pruned checkpoint would give it", stacklevel=1)
    domains = [d.name for d in s.domains]
    fractions = sorted(set(args.fractions) | {0.0})
    criteria = list(args.criteria or [*DEFAULT_CRITERIA[:3], *(["importance"] if args.importance else []),
                                      *(["redundancy"] if args.similarity else []), "random"])
    redundancy = pruning.read_similarity(args.similarity, s.layers, args.similarity_method) if args.similarity else None
    importance = pruning.read_importance(args.importance, s.layers, args.model) if args.importance else None
    stream = pipeline.batches(s)
    with pipeline.start_run(s) as out:
        observations = pruning.ExpertObservations(s.layers, s.moe.device, include_shared=args.include_shared)
        with_shared = args.include_shared and any(m.shared_experts for m in s.layers)
        batches: list = []
        resumable = pipeline.resumable(out, s, stream, observations=observations, batches=batches)
        what = ("topk", "input", "shared_output") if with_shared else ("topk", "input")
        for records, batch, _ in pipeline.captured_batches(s.moe, resumable, s.layers, what):
            observations.update(records, batch)
            batches.append(batch.to("cpu"))  # kept: every perplexity reads the same counted tokens
        out.record(tokens=stream.report.to_dict())
        if not batches:
            raise InputError("the data gave no batch to measure")

        rows = []
        for i, layer in enumerate(s.layers):
            table = {c: observations.scores(c)[i] for c in ("frequency", "weight", "saliency")}
            for e in range(observations.units(layer)):
                name = "shared" if e == layer.num_experts else e
                rows.append({"layer": layer.layer, "expert": name, **{c: float(table[c][e]) for c in table}})
        out.save_table(pd.DataFrame(rows), "prune_scores")
        out.save_figure(plot_prune_scores(pd.DataFrame(rows)), "prune_scores")

        if "importance" in criteria and importance is None:
            importance = pruning.computed_importance(s.moe, s.layers, batches, domains)
        if importance is not None:
            out.save_table(pd.DataFrame([{"layer": m.layer, "expert": e, "delta_nll": float(importance[i][e])}
                                         for i, m in enumerate(s.layers) for e in range(m.num_experts)]),
                           "prune_importance")
        runs = [(c, 0) for c in criteria if c != "random"]
        runs += [("random", d) for d in range(args.draws)] if "random" in criteria else []
        results = []
        base = None
        with tqdm(total=len(runs) * len(fractions), desc="perplexity with experts removed", unit="run",
                  disable=not args.progress) as bar:
            for criterion, draw in runs:
                scores = (importance if criterion == "importance" else None
                          if criterion in ("random", "redundancy") else observations.scores(criterion))
                if criterion == "random":
                    orders = pruning.random_order(s.layers, args.seed, draw, args.include_shared)
                elif criterion == "redundancy":
                    orders = redundancy[0]
                else:
                    orders = pruning.removal_order(scores)
                for fraction in fractions:
                    removed = pruning.removed_sets(s.layers, orders, fraction, args.scope, scores, args.how)
                    if not any(removed) and base is not None:
                        nll_sum, count = base
                    else:
                        nll_sum, count = pruning.perplexity(s.moe, batches, removed, s.layers, len(domains), args.how)
                        if not any(removed):
                            base = (nll_sum, count)
                    mean, predictions = pruning.nll_table(nll_sum, count)
                    for d, name in enumerate([*domains, "all"]):
                        results.append({"criterion": criterion, "draw": draw, "fraction": fraction,
                                        "experts_removed": sum(len(r) for r in removed), "domain": name,
                                        "predictions": int(predictions[d]), "nll": float(mean[d]),
                                        "ppl": float(np.exp(mean[d]))})
                    bar.update(1)
        if merging:
            matrices = pruning.read_similarity_matrices(args.similarity, s.layers, args.similarity_method)
            frequency = observations.scores("frequency")
            targets = ([[count] * len(s.layers) for count in sorted(set(args.merge), reverse=True)] if args.merge else
                       [[max(1, m.num_experts - round(f * m.num_experts)) for m in s.layers] for f in fractions])
            for counts in tqdm(targets, desc="perplexity with experts merged", unit="run", disable=not args.progress):
                clusters = [pruning.merge_clusters(m, count) for m, count in zip(matrices, counts, strict=True)]
                fraction = 1 - counts[0] / s.layers[0].num_experts
                with pruning.merged(s.layers, clusters, frequency):
                    nll_sum, count = pruning.perplexity(s.moe, batches, [()] * len(s.layers), s.layers, len(domains))
                mean, predictions = pruning.nll_table(nll_sum, count)
                merged_away = sum(layer.num_experts - len(c) for layer, c in zip(s.layers, clusters, strict=True))
                for d, name in enumerate([*domains, "all"]):
                    results.append({"criterion": "merge", "draw": 0, "fraction": fraction,
                                    "experts_removed": merged_away, "domain": name, "predictions": int(predictions[d]),
                                    "nll": float(mean[d]), "ppl": float(np.exp(mean[d]))})
        table = pd.DataFrame(results)
        out.save_table(table, "prune_perplexity")
        criteria = list(dict.fromkeys(table.criterion))  # the order they ran in
        cube = np.exp(table.groupby(["criterion", "fraction", "domain"], sort=False)["nll"].mean()  # random: over draws
                      .unstack("domain")[[*domains, "all"]])
        out.save_array(np.stack([cube.loc[c].loc[fractions].to_numpy() for c in criteria]), "prune_perplexity")
        out.record(criteria=criteria, fractions=fractions, scope=args.scope, how=args.how, draws=args.draws,
                   similarity_method=redundancy[1] if redundancy else None)
        out.save_figure(plot_prune_perplexity(table, [*domains, "all"], args.scope, args.how), "prune_perplexity")


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
