"""Are expert neurons more monosemantic than dense FFN neurons? k-sparse probing of concepts in both.

    uv run probing.py                                    # demo MoE vs its dense twin, demo data, every concept
    uv run probing.py --concepts code --k 1 4 16          # the code concepts only, three values of k
    uv run probing.py --model random:deepseek_v3 --dense_model same   # dense layers of the same model as baseline
    uv run probing.py --list-concepts                     # the concepts and what each regex matches

Method (SPEC "k-sparse probing"; Gurnee et al. 2023 as applied by Herbst et al. 2026, arXiv:2604.02178). Concepts
are token-level binary labels from regular expressions over the decoded text of each window (text, code, LaTeX;
--list-concepts): a token is positive if its characters overlap a match. One streamed pass keeps, per unit (an
expert of a MoE layer, seen only on the tokens routed to it; or a dense FFN layer, seen on every token) and
concept, a seeded sample of at most --max_examples positives and --max_examples negatives with their FFN neurons
act(gate·x)·(up·x); negatives come from windows holding a positive of the concept (--negatives window; 'all' drops
that). Per (concept, layer, expert | dense, k): neurons ranked by |mean(pos) − mean(neg)| on the train split; L2
logistic regression (balanced classes, --C) on the top k; binary F1, precision and recall on a stratified
held-out --test_fraction. The control probes k neurons drawn at random (seeded). Cells whose unit saw fewer than
--min_examples of either class are skipped and counted (probing_examples.csv, run.json). Best-layer F1 = max over
experts, then over layers.

Dense baseline (--dense_model): 'auto' = demo-dense for --model demo, else the model's own dense layers when it
has some, else none; 'same' = the dense FFN layers of --model; 'none'; or any dense causal LM (local folder or hub
id), read with its own tokenizer on the same data.

Cost: the defaults (demo vs demo-dense, 6 domains × 10,000 tokens, 37 concepts, 4 layers × 16 experts + 4 dense
layers, up to 500 + 500 examples per cell, ~15,000 probes) take about 30 s on 2 idle CPU cores and a few minutes
when the cores are shared with other jobs; peak memory about 1.7 GB. The samples hold at most
units × 2·max_examples·concepts tokens × neurons float32 (run.json → samples.megabytes says what they held);
lower --max_examples, --concepts or --layers for large models.

Outputs: probing.csv (one row per probe: concept, layer, expert | dense, k, selection ranked | random, f1,
precision, recall, num_positive, num_negative, neurons: the k neuron ids the probe read, within the expert or dense
FFN, best-ranked first), probing_best_layer.csv (with the best probe's neurons), probing_examples.csv (examples per concept
and unit, and whether it was probed), figures probing_f1_vs_k and probing_concepts.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from common import cli
from common.cli import at_least, base_parser, open_fraction, positive_float, run_main
from common.errors import InputError

SCRIPT = "probing"
K_VALUES = (1, 2, 4, 8, 16, 32, 64)  # the SPEC's k; common.analysis.probing.K_VALUES (kept here: no torch)
FIGURE_KS = (1, 16)


class _ListConcepts(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from common.analysis.concepts import listing

        print(listing())
        parser.exit(0)


def build_parser():
    paragraphs = __doc__.split("\n\n")
    cost = next(p for p in paragraphs if p.startswith("Cost:"))
    parser = base_parser(f"{paragraphs[0]}\n\n{cost}")
    parser.add_argument("--list-concepts", action=_ListConcepts, help="list the concepts and their patterns, then exit")
    probe = parser.add_argument_group("probing")
    probe.add_argument("--concepts", nargs="+", default=None, metavar="NAME",
                       help="concepts to probe, or the groups text, code, latex; default: all (see --list-concepts)")
    probe.add_argument("--dense_model", default="auto",
                       help="dense baseline: auto, same (dense layers of --model), none, or a dense causal LM "
                       "(folder or hub id); auto = demo-dense for --model demo, else same when --model has dense "
                       "layers, else none")
    probe.add_argument("--dense_layers", nargs="+", default=None, metavar="L",
                       help="decoder layers of the dense baseline to probe (negatives from the end); default: all "
                       "its dense FFN layers")
    probe.add_argument("--k", nargs="+", type=at_least(1), default=list(K_VALUES), metavar="K",
                       help="numbers of neurons per probe (values above a unit's width are skipped)")
    probe.add_argument("--max_examples", type=at_least(1), default=500,
                       help="positives, and negatives, kept per (unit, concept): a seeded uniform sample of what the "
                       "unit saw")
    probe.add_argument("--min_examples", type=at_least(2), default=50,
                       help="a (unit, concept) cell with fewer positives or fewer negatives than this is skipped "
                       "(counted in probing_examples.csv and run.json)")
    probe.add_argument("--test_fraction", type=open_fraction, default=0.25,
                       help="share of each class held out for the F1 (stratified)")
    probe.add_argument("--C", dest="C", type=positive_float, default=1.0,
                       help="inverse L2 strength of the logistic regression (scikit-learn's C; features standardised)")
    probe.add_argument("--negatives", choices=("window", "all"), default="window",
                       help="window: negatives only from windows that hold a positive of the concept; all: any token")
    return parser


def resolve_dense(choice: str, model: str) -> str | None:
    """--dense_model as given -> 'same', None (no baseline) or a model name; 'auto' stays 'auto' (needs the skeleton)."""
    lowered = choice.lower()
    if lowered == "none":
        return None
    if lowered in ("same", "auto"):
        if lowered == "auto" and model == "demo":
            return "demo-dense"
        return lowered
    return choice


def run(args: argparse.Namespace) -> None:
    from common.analysis.concepts import select_concepts

    try:
        concepts = select_concepts(args.concepts)
    except ValueError as err:
        raise InputError(f"--concepts: {err}") from None
    if args.max_examples < args.min_examples:
        raise InputError(f"--max_examples {args.max_examples} is below --min_examples {args.min_examples}: "
                         "every cell would be skipped")
    k_values = sorted(set(args.k))

    config = cli.config(args, SCRIPT)  # the flags and data specs, checked before torch is imported
    from common.cli import pipeline
    from common.config import ModelSpec
    from common.model import MoEModel, inspect_model

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("probing.py runs in one process (its samples are not gathered across torchrun ranks)")
    dense_choice = resolve_dense(args.dense_model, args.model)
    plan: dict = {}

    def preflight(skeleton, layers, domains) -> None:
        choice = dense_choice
        if choice == "auto":
            choice = "same" if skeleton.ffns else None
            if choice is None:
                warnings.warn(f"{args.model} has no dense FFN layers and no --dense_model was given: probing the "
                              "experts only (no dense baseline)", stacklevel=1)
        if choice == "same":
            if not skeleton.ffns:
                raise InputError(f"--dense_model same: {args.model} has no dense FFN layers (every decoder layer is "
                                 "MoE); name a dense model with --dense_model, or none")
            baseline = skeleton
        elif choice is not None:
            spec = ModelSpec(model=choice, dtype=args.dtype, device=args.device, device_map=args.device_map,
                             trust_remote_code=args.trust_remote_code, seed=args.seed)
            try:
                baseline = inspect_model(spec)
            except InputError as err:
                raise InputError(f"--dense_model: {err}") from None
            if isinstance(baseline, MoEModel):
                raise InputError(f"--dense_model {choice} is a MoE model; the baseline must be dense (use "
                                 "--dense_model same for the dense layers of --model)")
            plan["spec"] = spec
        elif args.dense_layers is not None:
            raise InputError("--dense_layers needs a dense baseline (--dense_model)")
        if choice is not None:
            try:
                plan["dense_layers"] = [f.layer for f in baseline.select_ffns(args.dense_layers)]
            except InputError as err:
                raise InputError(f"--dense_layers: {err}") from None
        plan["choice"] = choice

    try:
        s = pipeline.setup(config, preflight)
    except InputError as err:
        if "no MoE layers" in str(err):
            raise InputError(f"{err}; probing.py probes the experts of a MoE --model (a dense model is the "
                             "baseline: --dense_model)") from None
        raise
    # imported once the input is known to be good: a refused run does not pay for them
    import time

    import pandas as pd
    import torch

    from common.analysis.probing import (
        DENSE,
        ConceptSampler,
        WindowLabeller,
        best_layer,
        gather,
        pool_bytes,
        probe_units,
        random_seed,
    )
    from common.data import token_batches
    from common.figures.probing import plot_concepts, plot_f1_vs_k
    from common.model import load_model

    choice = plan["choice"]
    dense = s.moe if choice == "same" else load_model(plan["spec"]) if choice is not None else None
    dense_ffns = dense.select_ffns(plan["dense_layers"]) if dense is not None else []
    dense_name = None if dense is None else f"{args.model} (dense layers)" if choice == "same" else choice
    stream = pipeline.batches(s)
    dense_stream = None
    if dense is not None and choice != "same":
        context = dense.context_length
        data = s.config.data
        dense_stream = token_batches(
            s.domains, dense.tokenizer, num_tokens=data.num_tokens,
            seq_len=min(s.seq_len, context) if context else s.seq_len, batch_size=data.batch_size, seed=data.seed,
            keep_special=data.keep_special, pack=data.pack, split="train", progress=s.config.run.progress,
        )
    device = s.moe.device

    with pipeline.start_run(s) as out:
        timings = {}
        started = time.perf_counter()
        sampler = ConceptSampler(len(concepts), args.max_examples, device)
        labeller = WindowLabeller(s.moe.tokenizer, concepts)
        # the dense model's own objects: the checkpoint refers to them, never saves them
        live = ([("dense", dense), ("dense_model", getattr(dense, "model", None)),
                 ("dense_tokenizer", getattr(dense, "tokenizer", None))] if dense not in (None, s.moe) else [])
        gather(s.moe, pipeline.resumable(out, s, stream, live=live, sampler=sampler), labeller, sampler,
               moe_layers=s.layers, ffns=dense_ffns if choice == "same" else (), seed=args.seed, negatives=args.negatives)
        timings["gather_moe_s"] = round(time.perf_counter() - started, 2)
        record = {"tokens": stream.report.to_dict()}
        if dense_stream is not None:
            started = time.perf_counter()
            gather(dense, pipeline.resumable(out, s, dense_stream, name="dense", live=live, sampler=sampler),
                   WindowLabeller(dense.tokenizer, concepts), sampler, ffns=dense_ffns,
                   seed=args.seed, negatives=args.negatives)
            timings["gather_dense_s"] = round(time.perf_counter() - started, 2)
            record["dense_tokens"] = dense_stream.report.to_dict()
            record["dense_model_info"] = dense.describe()

        started = time.perf_counter()
        groups: dict[tuple, list] = {}
        pools = sampler.finish()
        for unit, pool in pools.items():
            groups.setdefault(unit[:2], []).append((unit, pool))
        rows, example_rows = [], []
        ordered = sorted(groups, key=lambda g: (g[0] != "moe", g[1]))
        for tag, layer in ordered:
            units = sorted(groups[(tag, layer)], key=lambda item: -1 if item[0][2] == DENSE else item[0][2])
            what = "dense FFN" if tag == "dense" else f"{len(units)} experts"
            got, examples = probe_units(
                units, concepts, k_values=k_values, min_examples=args.min_examples,
                max_examples=args.max_examples, test_fraction=args.test_fraction, C=args.C,
                seed=random_seed(args.seed, tag, layer), progress=s.config.run.progress,
                desc=f"probes, layer {layer} ({what})",
            )
            rows += got
            example_rows += examples
        timings["probes_s"] = round(time.perf_counter() - started, 2)

        columns = ["concept", "layer", "expert", "k", "selection", "f1", "precision", "recall", "num_positive",
                   "num_negative", "neurons"]
        table = pd.DataFrame(rows, columns=columns)
        order = {c.name: i for i, c in enumerate(concepts)}
        examples = pd.DataFrame(example_rows, columns=["concept", "layer", "expert", "seen_positive", "seen_negative",
                                                       "num_positive", "num_negative", "probed"])
        examples = examples.assign(model=examples["expert"].map(lambda e: "dense" if e == DENSE else "moe"))
        examples = examples[["concept", "model", "layer", "expert", "seen_positive", "seen_negative", "num_positive",
                             "num_negative", "probed"]]
        examples = examples.sort_values(["concept", "model", "layer"], key=lambda col: col.map(order)
                                        if col.name == "concept" else col, kind="stable")
        out.save_table(table, "probing")
        out.save_table(examples, "probing_examples")
        with_model = table.assign(model=table["expert"].map(lambda e: "dense" if e == DENSE else "moe"))
        best = best_layer(with_model, [c.name for c in concepts])
        out.save_table(best, "probing_best_layer")

        skipped = examples[examples["probed"] == 0]
        probed = examples[examples["probed"] == 1]
        record.update(
            concepts=[c.name for c in concepts],
            dense_baseline={"choice": args.dense_model, "resolved": choice, "model": dense_name,
                            "layers": plan.get("dense_layers")},
            cells={"probed": len(probed), "skipped": len(skipped),
                   "skipped_per_concept": {c: int(n) for c, n in skipped.groupby("concept", sort=False).size().items()},
                   "probes_fitted": len(table)},
            samples={"units": len(pools), "tokens_kept": int(sum(p.key.numel() for p in pools.values())),
                     "megabytes": round(pool_bytes(pools.values()) / 2**20, 1)},
            timings=timings,
        )
        if torch.cuda.is_available() and device.type == "cuda":
            record["samples"]["cuda_peak_megabytes"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        out.record(**record)
        if table.empty:
            warnings.warn(f"no (unit, concept) cell had --min_examples {args.min_examples} positives and negatives: "
                          "nothing was probed (raise --num_tokens or lower --min_examples)", stacklevel=1)
        moe_units = sum(m.num_experts for m in s.layers)
        units = f"{moe_units} experts ({len(s.layers)} layers)"
        if dense is not None:
            units += f" vs {len(dense_ffns)} dense layer{'s' if len(dense_ffns) != 1 else ''}"
        out.save_figure(plot_f1_vs_k(best, args.model, dense_name, units), "probing_f1_vs_k")
        out.save_figure(plot_concepts(best, FIGURE_KS, [c.name for c in concepts]), "probing_concepts")


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
