"""Comparison across finished runs (compare.py): each run's model metadata from its run.json, its per-layer tables
joined into one tidy table on relative depth, and the probing gap against routing sparsity with its rank
correlation. Pure pandas / numpy / scipy over files already written: nothing here imports torch, so a comparison
of hours of GPU runs costs seconds on a laptop. Definitions: docs/METRICS.md#comparison-across-runs."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from common.analysis import ALL_DOMAINS
from common.errors import InputError

# ------------------------------------------------------------------------------------------------ run records

# Columns of comparison.csv that describe the run a row comes from (the same for every row of one run).
METADATA_COLUMNS = ("label", "model", "revision", "run_id", "architecture", "layers", "num_experts", "top_k",
                    "shared_experts", "total_parameters", "active_parameters", "sparsity", "dtype", "data",
                    "num_tokens", "tokens")


@dataclass(frozen=True)
class RunRecord:
    """One finished run folder and what its run.json says."""

    folder: Path
    info: dict
    # The run's CSVs read so far, by name: every table is read once per comparison (the metric choice reads them first)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict, compare=False, repr=False)

    def table(self, name: str) -> pd.DataFrame:
        """A CSV of the run; a glob pattern (interv's one table per layer) reads every match, stacked."""
        if name not in self.tables:
            paths = sorted(self.folder.glob(name)) if "*" in name else [self.folder / name]
            paths = [path for path in paths if path.is_file()]
            if not paths:
                raise InputError(f"{self.folder} has no {name}")
            self.tables[name] = pd.concat([pd.read_csv(path, keep_default_na=False, na_values=[""]) for path in paths],
                                          ignore_index=True)
        return self.tables[name]

    @property
    def script(self) -> str:
        return str(self.info.get("script", ""))

    @property
    def model(self) -> str:
        return str(self.info.get("model", ""))

    @property
    def revision(self) -> str | None:
        revision = (self.info.get("model_info") or {}).get("revision") or (self.info.get("arguments") or {}).get("revision")
        return str(revision) if revision else None

    @property
    def data(self) -> str:
        """The data the run read, as given to --data (space-separated), '' for a run that reads none."""
        data = (self.info.get("arguments") or {}).get("data")
        return " ".join(map(str, data)) if isinstance(data, list) else str(data or "")


def read_run(folder: Path) -> RunRecord:
    """The run of `folder`; InputError if it holds no run.json, an unreadable one, or a failed run."""
    path = folder / "run.json"
    if not path.is_file():
        raise InputError(f"{folder} is not a run folder (no run.json) and holds no finished run")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not a readable run record ({error})") from None
    if not isinstance(info, dict) or "script" not in info:
        raise InputError(f"{path}: not a run record (no 'script')")
    if "error" in info:
        raise InputError(f"{folder} is a failed run ({info['error']}); compare finished runs only")
    return RunRecord(folder, info)


def sweep_runs(records: Path) -> list[Path]:
    """The run folders a sweep's job records (`<out>/.sweep/*.json`, tools/sweep.py) name, in record order; records
    whose run folder is gone are skipped."""
    found = []
    for record in sorted(records.glob("*.json")):
        try:
            run = Path(json.loads(record.read_text(encoding="utf-8"))["run"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if (run / "run.json").is_file() and run not in found:
            found.append(run)
    return found


def find_runs(root: Path) -> list[Path]:
    """Finished run folders at or below `root`, in path order: staging (.partial), failed and hidden folders skipped;
    for a sweep's record folder (`.sweep`), the runs its jobs wrote."""
    if (root / "run.json").is_file():
        return [root]
    if root.name == ".sweep":
        return sweep_runs(root)
    found = []
    for path in sorted(root.rglob("run.json")):
        parts = path.parent.relative_to(root).parts
        if any(part.startswith(".") or part.endswith(".failed") for part in parts):
            continue
        found.append(path.parent)
    return found


def _first_moe_layer(info: dict) -> dict:
    layers = (info.get("model_info") or {}).get("moe_layers") or []
    return layers[0] if layers and isinstance(layers[0], dict) else {}


def run_metadata(run: RunRecord) -> dict:
    """The model and data facts of a run as comparison.csv records them (None where run.json does not say).

    E, k and the shared experts are the first MoE layer's: the scripts' architectures use one routing shape in every
    MoE layer. Parameter counts are read when run.json records them (`model_info.total_parameters` /
    `active_parameters`), else left empty."""
    model_info = run.info.get("model_info") or {}
    first = _first_moe_layer(run.info)
    experts, top_k = first.get("num_experts"), first.get("top_k")
    domains = ((run.info.get("tokens") or {}).get("domains") or {}).values()
    counted = [d.get("counted") for d in domains if isinstance(d, dict) and isinstance(d.get("counted"), int)]
    return {
        "model": run.model, "revision": run.revision, "run_id": run.info.get("run_id", run.folder.name),
        "architecture": model_info.get("architecture"), "layers": model_info.get("num_decoder_layers"),
        "num_experts": experts, "top_k": top_k, "shared_experts": first.get("shared_experts"),
        "total_parameters": model_info.get("total_parameters"),
        "active_parameters": model_info.get("active_parameters"),
        "sparsity": top_k / experts if experts and top_k else None, "dtype": model_info.get("dtype"),
        "data": run.data, "num_tokens": (run.info.get("arguments") or {}).get("num_tokens"),
        "tokens": sum(counted) if counted else None,
    }


def run_labels(runs: Sequence[RunRecord]) -> list[str]:
    """A legend name per run: the model id, '@revision' when given, and the run id where two would read the same."""
    base = [run.model + (f"@{run.revision}" if run.revision else "") for run in runs]
    return [name if base.count(name) == 1 else f"{name} ({run.info.get('run_id', run.folder.name)})"
            for name, run in zip(base, runs, strict=True)]


def relative_depth(layer: pd.Series | np.ndarray | int, layers: pd.Series | np.ndarray | int):
    """layer / (layers − 1): 0 at the first decoder layer, 1 at the last (0 for a one-layer model)."""
    denominator = np.maximum(np.asarray(layers, dtype=float) - 1, 1)
    return np.asarray(layer, dtype=float) / denominator


def check_comparable(runs: Sequence[RunRecord]) -> list[str]:
    """InputError for runs that cannot be compared (fewer than two, different scripts, different data); the
    warnings for harmless differences (token counts: the per-layer metrics are means or shares, estimates of the same
    quantity at any count; different counts change their noise, not their value)."""
    if len(runs) < 2:
        raise InputError(f"{len(runs)} run{'' if len(runs) == 1 else 's'} found (after --script, --model, --data); "
                         "a comparison needs at least two")
    scripts = sorted({run.script for run in runs})
    if len(scripts) > 1:
        raise InputError(f"runs of different scripts ({', '.join(scripts)}); compare runs of one script "
                         "(--script picks one under a results root)")
    data = sorted({run.data for run in runs})
    if len(data) > 1:
        raise InputError(f"runs on different data ({' | '.join(data)}); their metrics are not comparable "
                         "(--data picks one under a results root)")
    tokens = sorted({str((run.info.get("arguments") or {}).get("num_tokens")) for run in runs})
    return [f"runs counted different --num_tokens ({', '.join(tokens)}); means and shares are compared as "
            "estimates of the same quantities"] if len(tokens) > 1 else []


# ------------------------------------------------------------------------------------------------ metrics


@dataclass(frozen=True)
class Metric:
    """A per-layer metric of a script: the table it comes from and how one value per (layer, domain) is read."""

    name: str
    table: str  # CSV file of the run folder
    description: str  # axis label
    read: Callable[[pd.DataFrame], pd.DataFrame]  # table -> columns layer, domain, value


def _summary_mean(metric: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def read(table: pd.DataFrame) -> pd.DataFrame:
        part = table[table["metric"] == metric]
        return part[["layer", "domain"]].assign(value=part["mean"].to_numpy())
    return read


def _column(column: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def read(table: pd.DataFrame) -> pd.DataFrame:
        domain = table.get("domain", ALL_DOMAINS)
        return pd.DataFrame({"layer": table["layer"], "domain": domain, "value": table[column]})
    return read


def _jsd_mean(table: pd.DataFrame) -> pd.DataFrame:
    chosen = table[table["assignments"] > 0]  # an expert never chosen has no domain mix
    value = chosen.groupby("layer", sort=True)["jsd_bits"].mean()
    return pd.DataFrame({"layer": value.index, "domain": ALL_DOMAINS, "value": value.to_numpy()})


def _frequency_cv(table: pd.DataFrame) -> pd.DataFrame:
    grouped = table.groupby(["layer", "domain"], sort=False)["freq_topk"]
    value = grouped.std(ddof=0) / grouped.mean()
    return value.rename("value").reset_index()


DECISIVE_METRICS = tuple(
    Metric(name, "entropy_summary.csv", text, _summary_mean(name)) for name, text in (
        ("entropy_normalized", "router entropy H / ln E (mean over tokens)"),
        ("topk_entropy_normalized", "entropy of the renormalised top-k / ln k (mean)"),
        ("top1_prob", "top-1 router probability (mean)"),
        ("top1_top2_margin", "top-1 − top-2 probability (mean)"),
        ("topk_mass", "router probability inside the top-k (mean)"),
    ))
ROUTER_METRICS = (
    Metric("load_balance_cv", "load_balance.csv", "load balance: CV of top-k frequencies", _column("cv")),
    Metric("max_over_mean", "load_balance.csv", "load balance: max / mean frequency", _column("max_over_mean")),
    Metric("jsd_specialization", "expert_specialization.csv", "JSD specialization (bits, mean over experts)",
           _jsd_mean),
    Metric("coverage50", "coverage50.csv", "coverage50: share of experts for half a domain",
           _column("fraction_of_experts")),
    Metric("frequency_spread", "frequency.csv", "selection-frequency spread: CV over experts", _frequency_cv),
)


def _similarity(method: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def read(table: pd.DataFrame) -> pd.DataFrame:
        part = table[table["method"] == method]
        return pd.DataFrame({"layer": part["layer"], "domain": ALL_DOMAINS, "value": part["mean_offdiag"]})
    return read


def _lens_cosine(table: pd.DataFrame) -> pd.DataFrame:
    """The residual cosine of the sparsest restriction run (smallest k′, k′ = 1 when k > 1) against the full run."""
    part = table[table["k_prime"] == table["k_prime"].min()]
    return part[["layer", "domain"]].assign(value=part["mean"].to_numpy())


# sim.py --method -> its name on axes
SIMILARITY_METHODS = {"cosine": "cosine similarity", "cka": "linear CKA", "cka-debiased": "debiased linear CKA",
                      "cka-rbf": "RBF CKA"}
SIM_METRICS = tuple(
    Metric(f"similarity_{method.replace('-', '_')}", "similarity_summary.csv",
           f"expert-output {name}, mean over pairs of routed experts", _similarity(method))
    for method, name in SIMILARITY_METHODS.items())
LENS_METRICS = (Metric("lens_cosine", "cosine_summary.csv", "cosine of the residual keeping the fewest experts "
                       "(k′ = 1) with the full run's (mean over tokens)", _lens_cosine),)
INTERV_METRICS = (Metric("ablation_importance", "importance_summary_layer*.csv",
                         "ΔNLL of the costliest single-expert ablation (nats per token)", _column("delta_nll_max")),)
METRICS: dict[str, tuple[Metric, ...]] = {"router_decisive": DECISIVE_METRICS, "router_metrics": ROUTER_METRICS,
                                          "sim": SIM_METRICS, "logit_lens": LENS_METRICS, "interv": INTERV_METRICS}
PROBING_TABLE = "probing_best_layer.csv"


def metric_names(script: str) -> list[str]:
    return [metric.name for metric in METRICS.get(script, ())]


def readable(run: RunRecord, metric: Metric) -> bool:
    """Whether `metric` can be read from `run` (its table exists and has the metric's rows)."""
    try:
        return not metric.read(run.table(metric.table)).empty
    except (InputError, KeyError):
        return False


def _with_metadata(part: pd.DataFrame, run: RunRecord, label: str) -> pd.DataFrame:
    meta = {"label": label, **run_metadata(run)}
    front = pd.DataFrame({column: [meta[column]] * len(part) for column in METADATA_COLUMNS}, index=part.index)
    return pd.concat([front, part], axis=1)


def layer_table(runs: Sequence[RunRecord], labels: Sequence[str], metrics: Sequence[Metric]) -> pd.DataFrame:
    """The tidy comparison table: one row per run, metric, layer and domain, with each run's metadata and the
    layer's relative depth. A run that lacks a metric's table or rows is an InputError naming both."""
    parts = []
    for run, label in zip(runs, labels, strict=True):
        for metric in metrics:
            try:
                values = metric.read(run.table(metric.table))
            except KeyError as missing:
                raise InputError(f"{run.folder}/{metric.table} lacks {missing} (metric {metric.name})") from None
            if values.empty:
                raise InputError(f"{run.folder} has no rows of metric {metric.name}")
            meta = run_metadata(run)
            values = values.assign(table=metric.table.removesuffix(".csv").replace("*", "<L>"), metric=metric.name,
                                   relative_depth=relative_depth(values["layer"], meta["layers"] or 1))
            parts.append(_with_metadata(values[["table", "metric", "layer", "relative_depth", "domain", "value"]]
                                        .reset_index(drop=True), run, label))
    return pd.concat(parts, ignore_index=True)


# ------------------------------------------------------------------------------------------------ probing gap


def probing_table(runs: Sequence[RunRecord], labels: Sequence[str]) -> pd.DataFrame:
    """Every run's best-layer F1 (probing_best_layer.csv) with its metadata: one row per concept, units (moe |
    dense), selection and probe k."""
    parts = []
    for run, label in zip(runs, labels, strict=True):
        best = run.table(PROBING_TABLE).rename(columns={"model": "units", "k": "probe_k"})
        missing = {"concept", "units", "selection", "probe_k", "f1"} - set(best.columns)
        if missing:
            raise InputError(f"{run.folder}/{PROBING_TABLE} lacks {', '.join(sorted(missing))}")
        meta = run_metadata(run)
        best = best.assign(table=PROBING_TABLE.removesuffix(".csv"), metric="best_layer_f1",
                           relative_depth=relative_depth(best["layer"], meta["layers"] or 1) if "layer" in best
                           else np.nan)
        columns = ["table", "metric", "concept", "units", "selection", "probe_k", "layer", "relative_depth"]
        part = best[[c for c in columns if c in best]].assign(domain=ALL_DOMAINS, value=best["f1"].to_numpy())
        parts.append(_with_metadata(part.reset_index(drop=True), run, label))
    return pd.concat(parts, ignore_index=True)


GAPS = {"dense": ("dense", "ranked"), "random": ("moe", "random")}  # baseline -> (units, selection) subtracted


def probing_gaps(table: pd.DataFrame) -> pd.DataFrame:
    """Per run, concept, probe k and baseline: best-layer F1 of the ranked expert neurons minus the baseline's
    (dense: ranked dense FFN neurons; random: randomly drawn expert neurons). Concepts without both are left out."""
    keys = ["label", "concept", "probe_k"]
    experts = table[(table["units"] == "moe") & (table["selection"] == "ranked")].set_index(keys)["value"]
    rows = []
    for baseline, (units, selection) in GAPS.items():
        other = table[(table["units"] == units) & (table["selection"] == selection)].set_index(keys)["value"]
        gap = (experts - other).dropna()
        rows.append(gap.rename("gap").reset_index().assign(baseline=baseline))
    return pd.concat(rows, ignore_index=True)


def gap_vs_sparsity(table: pd.DataFrame, labels: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(points, fits). points: one row per run, baseline and probe k: k/E and the median gap over concepts.
    fits: one row per baseline and probe k over the runs: Spearman's ρ and its p-value (scipy.stats.spearmanr), and
    the least-squares line gap = intercept + slope · log10(k/E) (the figure's x axis is logarithmic)."""
    from scipy import stats

    gaps = probing_gaps(table)
    sparsity = table.drop_duplicates("label").set_index("label")["sparsity"]
    points = (gaps.groupby(["label", "baseline", "probe_k"], sort=False)["gap"]
              .agg(median_gap="median", concepts="size").reset_index())
    points.insert(1, "sparsity", points["label"].map(sparsity).astype(float))
    points["order"] = points["label"].map({label: i for i, label in enumerate(labels)})
    points = points.sort_values(["baseline", "probe_k", "order"]).drop(columns="order").reset_index(drop=True)
    fits = []
    for (baseline, probe_k), group in points.groupby(["baseline", "probe_k"], sort=True):
        x, y = np.log10(group["sparsity"].to_numpy()), group["median_gap"].to_numpy()
        rho = p_value = slope = intercept = np.nan
        if len(group) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:  # a rank correlation of two points is always ±1
            result = stats.spearmanr(group["sparsity"], y)
            rho, p_value = float(result.statistic), float(result.pvalue)
        if len(group) >= 2 and np.ptp(x) > 0:
            slope, intercept = np.polyfit(x, y, 1)
        fits.append({"baseline": baseline, "probe_k": probe_k, "models": len(group), "spearman_rho": rho,
                     "p_value": p_value, "slope": slope, "intercept": intercept})
    return points, pd.DataFrame(fits)


# ------------------------------------------------------------------------------------------------ MoE Lens curves


def lens_perplexity_table(runs: Sequence[RunRecord], labels: Sequence[str]) -> pd.DataFrame:
    """Every logit_lens run's perplexity.csv (top-k′ restriction, MoE Lens Figure 3) with its metadata: one row per
    run, domain and k′, with k′ / k beside k′ (models with different k share one axis on it)."""
    parts = []
    for run, label in zip(runs, labels, strict=True):
        table = run.table("perplexity.csv")
        missing = {"domain", "k_prime", "ppl", "normalized_log_ppl"} - set(table.columns)
        if missing:
            raise InputError(f"{run.folder}/perplexity.csv lacks {', '.join(sorted(missing))}")
        top_k = run_metadata(run)["top_k"] or int(table["k_prime"].max())
        part = table[["domain", "k_prime", "ppl", "normalized_log_ppl"]].assign(
            table="perplexity", metric="normalized_log_ppl", k_fraction=table["k_prime"] / top_k)
        parts.append(_with_metadata(part.reset_index(drop=True), run, label))
    return pd.concat(parts, ignore_index=True)


# ------------------------------------------------------------------------------------------------ checkpoints

_STEP = re.compile(r"step[-_]?(\d+)", re.IGNORECASE)
_TOKENS = re.compile(r"tokens[-_]?(\d+(?:\.\d+)?)([KMBT]?)", re.IGNORECASE)
_SCALE = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
FINAL_NAMES = ("main", "final", "last")


def training_position(revision: str) -> tuple[float, str] | None:
    """Where a revision name sits in training: (its step, or its token count, 'step' | 'tokens'), +inf for the
    final branch ('main'); None when the name says neither."""
    if revision.lower() in FINAL_NAMES:
        return math.inf, "final"
    if match := _STEP.search(revision):
        return float(match.group(1)), "step"
    if match := _TOKENS.search(revision):
        return float(match.group(1)) * _SCALE[match.group(2).upper()], "tokens"
    return None


def checkpoint_series(runs: Sequence[RunRecord]) -> list[RunRecord] | None:
    """The runs in training order when they are checkpoints of one model (one model id, every revision different;
    no revision = 'main'), else None. Ordered by the revisions' steps (or token counts) where every name states
    one the same way (the final branch last), else as given."""
    if len({run.model for run in runs}) != 1:
        return None
    revisions = [run.revision or "main" for run in runs]
    if len(set(revisions)) != len(runs):
        return None
    positions = [training_position(revision) for revision in revisions]
    kinds = {p[1] for p in positions if p is not None} - {"final"}
    if None in positions or len(kinds) > 1:
        return list(runs)
    order = sorted(range(len(runs)), key=lambda i: positions[i][0])
    return [runs[i] for i in order]


def saturation_table(runs: Sequence[RunRecord], labels: Sequence[str]) -> pd.DataFrame | None:
    """Router saturation (router_metrics --revisions: saturation.csv) of the run that compared the most checkpoints,
    with its label; None when no run has one."""
    found = [(run, label, run.table("saturation.csv")) for run, label in zip(runs, labels, strict=True)
             if (run.folder / "saturation.csv").is_file()]
    if not found:
        return None
    run, label, table = max(found, key=lambda item: item[2]["position"].nunique())
    return table.assign(label=label, run_id=run.info.get("run_id", run.folder.name))
