"""Compare finished runs of one script across models or checkpoints: one tidy table, per-layer figures on relative
depth, the probing gap against routing sparsity, and training curves when the runs are checkpoints of one model.

    uv run compare.py results/router_decisive/demo/demo/20261125-101500 results/router_decisive/random-mixtral/demo/20261125-102000
    uv run compare.py results --script router_metrics --data demo          # every matching run under a results root
    uv run compare.py results --script probing                            # the gap-vs-sparsity figure
    uv run compare.py results --script router_metrics --model demo        # demo's checkpoints (--revision stepN)
    uv run compare.py results/.sweep --script sim                         # the runs a sweep wrote

Inputs are run folders (holding run.json), results roots searched for runs (narrowed by --script, --model and
--data) or a sweep's record folder (<out>/.sweep). The runs must be of one script (router_decisive,
router_metrics, sim, logit_lens, interv, probing) and on the same data; different --num_tokens are compared with a
warning (means and shares estimate the same quantities). Runs of one model that differ only in revision are a
checkpoint series: ordered by the step (or token count) their revision names (main last), else as given.

Outputs (docs/METRICS.md#comparison-across-runs): comparison.csv (every run's per-layer metrics with its model
metadata: E, k, k/E, layers, parameters, dtype, tokens, relative depth) and one figure per metric over relative
depth and absolute layer; for a checkpoint series one figure per metric over the checkpoints (a line per layer)
and the router saturation of the run that measured it (router_metrics --revisions; saturation_over_training.csv);
for logit_lens runs the perplexity-vs-k′ curves of every model (perplexity_by_k.csv); for probing runs gap_vs_sparsity.csv,
gap_correlation.csv and the gap-vs-sparsity figure. Reads only CSV and JSON: no model is loaded.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from common.cli import ArgumentParser, run_main
from common.cli.flags import output_root
from common.config import RunSpec
from common.errors import InputError

SCRIPT = "compare"
SCRIPTS = ("router_decisive", "router_metrics", "sim", "logit_lens", "interv", "probing")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="compare.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (holding run.json), results roots with runs below them, "
                        "or a sweep's record folder (<out>/.sweep: the runs its jobs wrote)")
    parser.add_argument("--script", default=None, help="keep only runs of this script (under a results root)")
    parser.add_argument("--model", nargs="+", default=None, help="keep only runs of these model ids")
    parser.add_argument("--data", default=None, help="keep only runs whose --data reads exactly this "
                        "(space-separated sources, e.g. demo)")
    parser.add_argument("--metrics", nargs="+", default=None,
                        help="per-layer metrics to compare (default: all of the script's; see docs/METRICS.md)")
    parser.add_argument("--out", default="results", type=output_root, help="results root of the comparison's own folder")
    parser.add_argument("--seed", type=int, default=0, help="recorded in run.json (nothing here is random)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="accepted for symmetry; no bars")
    return parser


def _collect(args: argparse.Namespace):
    """The runs to compare, in the order given (path order under a root), checked; InputError otherwise."""
    from common.analysis import comparison

    folders: list[Path] = []
    for given in args.runs:
        path = Path(given)
        if not path.is_dir():
            raise InputError(f"{given} is not a folder")
        found = comparison.find_runs(path)
        if not found:
            raise InputError(f"{given} is not a run folder (no run.json) and holds no finished run")
        folders += [f for f in found if f not in folders]
    runs = [comparison.read_run(folder) for folder in folders]
    runs = [run for run in runs if run.script != SCRIPT]  # a comparison is not compared again
    if args.script:
        runs = [run for run in runs if run.script == args.script]
    if args.model:
        runs = [run for run in runs if run.model in args.model]
    if args.data:
        runs = [run for run in runs if run.data == args.data]
    for message in comparison.check_comparable(runs):
        warnings.warn(message, stacklevel=1)
    script = runs[0].script
    if script not in SCRIPTS:
        raise InputError(f"compare.py compares runs of {', '.join(SCRIPTS)}; these are {script} runs")
    return runs, script


def _chosen_metrics(args: argparse.Namespace, script: str, runs):
    from common.analysis import comparison

    catalog = {metric.name: metric for metric in comparison.METRICS.get(script, ())}
    if args.metrics is None:  # what every run has (sim: the --method values all of them computed)
        chosen = [metric for metric in catalog.values() if all(comparison.readable(run, metric) for run in runs)]
        if not chosen and catalog:  # say which run lacks what the first metric needs
            first = next(iter(catalog.values()))
            comparison.layer_table(runs, [run.model for run in runs], [first])
            raise InputError(f"no per-layer metric of {script} is in every run ({', '.join(catalog)})")
        return chosen
    unknown = [name for name in args.metrics if name not in catalog]
    if unknown:
        known = ", ".join(catalog) or "none (probing runs give the gap-vs-sparsity comparison)"
        raise InputError(f"--metrics: {script} runs lack {', '.join(unknown)}; theirs: {known}")
    return [catalog[name] for name in args.metrics]


def run(args: argparse.Namespace) -> None:
    from common.analysis import comparison

    runs, script = _collect(args)
    series = comparison.checkpoint_series(runs)  # checkpoints of one model: in training order
    if series is not None:
        runs = series
        labels = [f"{run.model}@{run.revision or 'main'}" for run in runs]
    else:
        labels = comparison.run_labels(runs)
    metrics = _chosen_metrics(args, script, runs)
    perplexity = comparison.lens_perplexity_table(runs, labels) if script == "logit_lens" else None
    saturation = comparison.saturation_table(runs, labels) if series is not None else None
    # Every table is read before the run folder exists: a run that lacks a metric leaves nothing behind.
    if script == "probing":
        table = comparison.probing_table(runs, labels)
        points, fits = comparison.gap_vs_sparsity(table, labels)
        if points.empty:
            raise InputError("no concept has both an expert and a baseline best-layer F1 in these probing runs")
    else:
        table = comparison.layer_table(runs, labels, metrics)

    from common.figures.comparison import (
        plot_gap_vs_sparsity,
        plot_metric_by_depth,
        plot_metric_over_training,
        plot_perplexity_vs_k,
    )
    from common.figures.specialization import plot_saturation
    from common.run import Run

    arguments = {k: v for k, v in vars(args).items() if k != "_command"}
    spec = RunSpec(script=SCRIPT, out=Path(args.out), seed=args.seed, progress=args.progress,
                   arguments=tuple(arguments.items()), command=getattr(args, "_command", None))
    models = "+".join(dict.fromkeys(run.model for run in runs))
    with Run(spec, models, script) as out:
        out.record(compared_script=script, checkpoints=series is not None,
                   runs=[{"folder": str(run.folder), "label": name, "model": run.model, "revision": run.revision,
                          "run_id": run.info.get("run_id")} for run, name in zip(runs, labels, strict=True)])
        out.save_table(table, "comparison")
        if script == "probing":
            out.save_table(points, "gap_vs_sparsity")
            out.save_table(fits, "gap_correlation")
            out.save_figure(plot_gap_vs_sparsity(points, fits, labels), "gap_vs_sparsity")
        if perplexity is not None:
            out.save_table(perplexity, "perplexity_by_k")
        if saturation is not None:
            out.save_table(saturation, "saturation_over_training")
        for metric in metrics:
            out.save_figure(plot_metric_by_depth(table, metric.name, metric.description, labels),
                            f"by_depth_{metric.name}")
            if series is not None:
                out.save_figure(plot_metric_over_training(table, metric.name, metric.description, labels,
                                                          runs[0].model), f"over_training_{metric.name}")
        if perplexity is not None:
            out.save_figure(plot_perplexity_vs_k(perplexity, labels), "perplexity_vs_k")
        if saturation is not None:
            out.save_figure(plot_saturation(saturation), "saturation_over_training")


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
