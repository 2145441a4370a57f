"""Compare finished runs of one script across models or revisions: one tidy table, per-layer figures on relative
depth, and the probing gap against routing sparsity.

    uv run compare.py results/router_decisive/demo/demo/20261125-101500 results/router_decisive/random-mixtral/demo/20261125-102000
    uv run compare.py results --script router_metrics --data demo          # every matching run under a results root
    uv run compare.py results --script probing                            # the gap-vs-sparsity figure

Inputs are run folders (holding run.json) or results roots searched for runs, narrowed by --script, --model and
--data. The runs must be of one script and on the same data; different --num_tokens are compared with a warning
(means and shares estimate the same quantities). Outputs (docs/METRICS.md#comparison-across-runs): comparison.csv
(every run's per-layer metrics with its model metadata: E, k, k/E, layers, dtype, tokens, relative depth), one
figure per metric over relative depth and absolute layer (router_decisive, router_metrics), and for probing runs
gap_vs_sparsity.csv, gap_correlation.csv and the gap-vs-sparsity figure. Reads only CSV and JSON: no model is loaded.
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
SCRIPTS = ("router_decisive", "router_metrics", "probing")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="compare.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (holding run.json) or results roots with runs below them")
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


def _chosen_metrics(args: argparse.Namespace, script: str):
    from common.analysis import comparison

    catalog = {metric.name: metric for metric in comparison.METRICS.get(script, ())}
    if args.metrics is None:
        return list(catalog.values())
    unknown = [name for name in args.metrics if name not in catalog]
    if unknown:
        known = ", ".join(catalog) or "none (probing runs give the gap-vs-sparsity comparison)"
        raise InputError(f"--metrics: {script} runs lack {', '.join(unknown)}; theirs: {known}")
    return [catalog[name] for name in args.metrics]


def run(args: argparse.Namespace) -> None:
    from common.analysis import comparison

    runs, script = _collect(args)
    metrics = _chosen_metrics(args, script)
    labels = comparison.run_labels(runs)
    # Every table is read before the run folder exists: a run that lacks a metric leaves nothing behind.
    if script == "probing":
        table = comparison.probing_table(runs, labels)
        points, fits = comparison.gap_vs_sparsity(table, labels)
        if points.empty:
            raise InputError("no concept has both an expert and a baseline best-layer F1 in these probing runs")
    else:
        table = comparison.layer_table(runs, labels, metrics)

    from common.figures.comparison import plot_gap_vs_sparsity, plot_metric_by_depth
    from common.run import Run

    arguments = {k: v for k, v in vars(args).items() if k != "_command"}
    spec = RunSpec(script=SCRIPT, out=Path(args.out), seed=args.seed, progress=args.progress,
                   arguments=tuple(arguments.items()), command=getattr(args, "_command", None))
    models = "+".join(dict.fromkeys(run.model for run in runs))
    with Run(spec, models, script) as out:
        out.record(compared_script=script,
                   runs=[{"folder": str(run.folder), "label": name, "model": run.model, "revision": run.revision,
                          "run_id": run.info.get("run_id")} for run, name in zip(runs, labels, strict=True)])
        out.save_table(table, "comparison")
        if script == "probing":
            out.save_table(points, "gap_vs_sparsity")
            out.save_table(fits, "gap_correlation")
            out.save_figure(plot_gap_vs_sparsity(points, fits, labels), "gap_vs_sparsity")
        for metric in metrics:
            out.save_figure(plot_metric_by_depth(table, metric.name, metric.description, labels),
                            f"by_depth_{metric.name}")


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
