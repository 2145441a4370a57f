"""torchrun with two CPU processes (gloo) gives the numbers of one process: batches are split between ranks and the
streamed accumulators are summed with all_reduce; only rank 0 publishes a results folder."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import profiles
import router_metrics
import router_stats
from common.data import resolve_domains, token_batches
from common.model import tiny

ROOT = Path(__file__).resolve().parent.parent
NUM_TOKENS = 300  # per domain: 10 windows of 31 counted tokens, 3 batches of 4 per domain, 3 batches per rank


def _torchrun(script: str, argv: list[str], log: Path) -> subprocess.Popen:
    """Start `script` under torchrun with two processes (gloo, one thread each, like this one: see conftest); the
    one-process run goes on meanwhile (two cores). `_finish` waits for it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as sink:
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / script),
                                 *argv], cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)


def _finish(run: subprocess.Popen, log: Path) -> None:
    assert run.wait(timeout=300) == 0, log.read_text()[-5000:]


def _published(out: Path) -> Path:
    """The one results folder under `out` (rank 1 published nothing)."""
    runs = sorted(p.parent for p in out.rglob("run.json"))
    assert len(runs) == 1, runs
    return runs[0]


def _assert_same_numbers(a: np.ndarray, b: np.ndarray, what: str) -> None:
    """Integer-valued (counts) exactly, anything else to float64 summation-order rounding."""
    assert a.shape == b.shape, what
    finite = np.isfinite(a)
    integral = all((x[finite] == np.round(x[finite])).all() for x in (a, b))
    if np.array_equal(finite, np.isfinite(b)) and integral:
        np.testing.assert_array_equal(b, a, err_msg=what)
    else:
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12, err_msg=what)


def _assert_same_table(a: pd.DataFrame, b: pd.DataFrame, what: str) -> None:
    assert list(a.columns) == list(b.columns) and len(a) == len(b) > 0, what
    for column in a.columns:
        if a[column].dtype.kind in "biuf" and b[column].dtype.kind in "biuf":
            _assert_same_numbers(a[column].to_numpy(np.float64), b[column].to_numpy(np.float64), f"{what}: {column}")
        else:  # strings (domains, revisions, decoded tokens) exactly
            assert a[column].astype(str).tolist() == b[column].astype(str).tolist(), f"{what}: {column}"


def _assert_same_json(a, b, what: str) -> None:
    assert type(a) is type(b) or {type(a), type(b)} <= {int, float}, what
    if isinstance(a, dict):
        assert list(a) == list(b), what
        for key in a:
            _assert_same_json(a[key], b[key], f"{what}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_json(x, y, f"{what}[{i}]")
    elif isinstance(a, int | float):
        _assert_same_numbers(np.array([a], dtype=np.float64), np.array([b], dtype=np.float64), what)
    else:
        assert a == b, what


def _world_size(run: Path) -> int:
    return json.loads((run / "run.json").read_text())["world_size"]


@pytest.fixture(scope="module")
def two_domains(tmp_path_factory) -> list[str]:
    """Two data domains: prose from a small vocabulary (seeded) and code."""
    root = tmp_path_factory.mktemp("domains")
    words = ["the", "a", "model", "expert", "token", "router", "layer", "of", "to", "and", "in", "is", "was",
             "learns", "routes", "picks"]
    rng = random.Random(0)
    (root / "prose.txt").write_text(" ".join(rng.choice(words) for _ in range(1500)))
    (root / "code.txt").write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(200)))
    specs = [f"prose={root / 'prose.txt'}", f"code={root / 'code.txt'}"]
    batches = [list(token_batches(resolve_domains(specs), tiny.tiny_tokenizer(), num_tokens=NUM_TOKENS, seq_len=32,
                                  batch_size=4, progress=False, shard=(rank, 2))) for rank in (0, 1)]
    assert min(len(b) for b in batches) >= 3  # both ranks get several batches, of both domains
    assert all({int(batch.domain_ids[0]) for batch in b} == {0, 1} for b in batches)
    return specs


def _common(specs: list[str], model: str) -> list[str]:
    return ["--model", model, "--data", *specs, "--num_tokens", str(NUM_TOKENS), "--seq_len", "32", "--batch_size", "4",
            "--no-progress", "--no-figures"]  # the numbers are compared


def test_two_processes_equal_one(tmp_path):
    data = tmp_path / "a.txt"
    data.write_text("alpha beta gamma delta epsilon " * 150)
    common = ["--model", "random:olmoe", "--data", f"a={data}", "--num_tokens", "600", "--seq_len", "32",
              "--batch_size", "4", "--no-progress", "--no-figures"]  # the numbers are compared
    two = _torchrun("router_stats.py", [*common, "--out", str(tmp_path / "two")], tmp_path / "torchrun.log")
    assert router_stats.main([*common, "--out", str(tmp_path / "one")]) == 0
    _finish(two, tmp_path / "torchrun.log")
    one, two = (_published(tmp_path / w) for w in ("one", "two"))
    a, b = (pd.read_csv(run / "distribution_summary.csv") for run in (one, two))
    assert (a["count"] == b["count"]).all() and (a["count"] > 0).all()
    # Every histogram bins alike on both ranks, the growing logit and weight ones included (their range is agreed
    # over ranks before the counts are summed), so the quantiles match too.
    exact = ["count", "mean", "std", "min", "max"]
    np.testing.assert_allclose(b[exact].to_numpy(), a[exact].to_numpy(), rtol=1e-6, atol=1e-7)
    quantiles = [c for c in a.columns if c.startswith("q0")]
    np.testing.assert_allclose(b[quantiles].to_numpy(), a[quantiles].to_numpy(), atol=1e-7)
    assert (a[["below", "above"]] == 0).all().all() and (b[["below", "above"]] == 0).all().all()
    for name in ("logit", "softmax", "topk_renormalized", "weight"):
        for part in ("hist", "edges"):  # counts are exact whatever the split
            np.testing.assert_array_equal(*(np.load(run / f"{name}_{part}.npy") for run in (one, two)), err_msg=name)


@pytest.fixture(scope="module")
def metrics_runs(tmp_path_factory, two_domains) -> tuple[Path, Path]:
    """router_metrics.py on layers 0-2 with router saturation against a second random checkpoint (one run pair
    serves both tests below): torchrun with two processes, and meanwhile one process in this one."""
    root = tmp_path_factory.mktemp("metrics")
    for seed in (0, 1):  # --model and the --revisions checkpoint: two tiny random OLMoE folders
        model, tokenizer = tiny.build_random_model("olmoe", seed=seed)
        model.save_pretrained(root / f"olmoe{seed}")
        tokenizer.save_pretrained(root / f"olmoe{seed}")
    argv = [*_common(two_domains, str(root / "olmoe0")), "--layers", "0", "1", "2", "--revisions", str(root / "olmoe1")]
    two = _torchrun("router_metrics.py", [*argv, "--out", str(root / "two")], root / "torchrun.log")
    assert router_metrics.main([*argv, "--out", str(root / "one")]) == 0
    _finish(two, root / "torchrun.log")
    return _published(root / "one"), _published(root / "two")


@pytest.mark.slow  # 30 s on the 2-core box; test_two_processes_equal_one covers the same sum in the default run
def test_router_metrics_two_processes_equal_one(metrics_runs):
    one, two = metrics_runs
    assert (_world_size(one), _world_size(two)) == (1, 2)
    tables = sorted(p.name for p in one.glob("*.csv"))
    assert tables == sorted(p.name for p in two.glob("*.csv"))
    assert {"frequency.csv", "expert_specialization.csv", "coverage50.csv", "load_balance.csv", "coactivation.csv",
            "transitions.csv", "indicator_correlation_summary.csv", "token_overlap.csv", "token_specialization.csv",
            "saturation.csv"} <= set(tables)
    for name in tables:
        _assert_same_table(pd.read_csv(one / name), pd.read_csv(two / name), name)
    # Named here so that a rename cannot drop them from the comparison: the token-shuffled control (drawn per
    # batch number, not per rank) and the switch aux loss (from summed router probabilities).
    assert pd.read_csv(two / "indicator_correlation_summary.csv").mean_abs_pearson_shuffled.notna().all()
    assert (pd.read_csv(two / "load_balance.csv").aux_loss > 0).all()
    arrays = sorted(p.name for p in one.glob("*.npy"))
    assert arrays == sorted(p.name for p in two.glob("*.npy"))
    assert {"indicator_correlation.npy", "indicator_correlation_shuffled.npy", "transition_probabilities.npy",
            "coactivation_counts.npy", "counts_topk.npy", "token_overlap.npy"} <= set(arrays)
    for name in arrays:
        _assert_same_numbers(np.load(one / name), np.load(two / name), name)
    assert json.loads((one / "run.json").read_text())["tokens"] == json.loads((two / "run.json").read_text())["tokens"]


@pytest.mark.slow  # shares the 30 s two-process router_metrics runs above
def test_saturation_two_processes_equal_one(metrics_runs):
    one, two = metrics_runs
    a, b = (pd.read_csv(run / "saturation.csv") for run in (one, two))
    _assert_same_table(a, b, "saturation.csv")
    assert list(b.layer) == [0, 1, 2]
    # Every counted token once across ranks (each rank reads only its share of the stream), not once per rank.
    counted = json.loads((two / "run.json").read_text())["tokens"]["domains"]
    assert sum(d["counted"] for d in counted.values()) == 2 * NUM_TOKENS
    assert (b.tokens == 2 * NUM_TOKENS).all()
    assert b.topk_overlap.between(0, 1).all() and (b.topk_overlap < 1).all()  # a different checkpoint


@pytest.mark.slow  # 40 s on the 2-core box
def test_profiles_two_processes_equal_one(tmp_path, two_domains):
    argv = [*_common(two_domains, "random:olmoe"), "--layer", "1", "--all"]
    two = _torchrun("profiles.py", [*argv, "--out", str(tmp_path / "two")], tmp_path / "torchrun.log")
    assert profiles.main([*argv, "--out", str(tmp_path / "one")]) == 0
    _finish(two, tmp_path / "torchrun.log")
    one, two = _published(tmp_path / "one"), _published(tmp_path / "two")
    assert (_world_size(one), _world_size(two)) == (1, 2)
    a, b = (pd.read_csv(run / "profiles_layer1.csv") for run in (one, two))
    _assert_same_table(a, b, "profiles_layer1.csv")
    # The JSON profiles too: the weight histograms share rank 0's range, and the top contexts are merged over ranks
    # with ties ranked by stream position, so they are those of one process.
    names = sorted(p.name for p in one.glob("profile_layer1_expert*.json"))
    assert len(names) == len(a) and names == sorted(p.name for p in two.glob("profile_layer1_expert*.json"))
    for name in names:
        x, y = (json.loads((run / name).read_text()) for run in (one, two))
        assert x["top_contexts"], name
        _assert_same_json(x, y, name)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_on_the_loopback_equal_one_process(tmp_path, two_domains):
    """Multi-node is torchrun's: two "nodes" of one process each (`--nnodes 2 --node_rank i`, static rendezvous on the
    loopback, as on two Slurm nodes with MASTER_ADDR set) write the numbers of one process (CSVs to 1e-9), and only
    global rank 0 publishes."""
    argv = [*_common(two_domains, "random:olmoe"), "--layers", "0", "1"]
    port, env = _free_port(), {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = []
    for node in (0, 1):
        log = (tmp_path / f"node{node}.log").open("w")
        nodes.append((subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
             str(ROOT / "router_stats.py"), *argv, "--out", str(tmp_path / "two")],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), tmp_path / f"node{node}.log"))
    assert router_stats.main([*argv, "--out", str(tmp_path / "one")]) == 0
    for process, log in nodes:
        _finish(process, log)
    one, two = (_published(tmp_path / w) for w in ("one", "two"))
    assert _world_size(two) == 2 and _world_size(one) == 1
    for table in ("distribution_summary.csv", "distribution_histograms.csv"):
        _assert_same_table(*(pd.read_csv(run / table) for run in (one, two)), table)
    for name in ("logit", "softmax", "weight"):
        np.testing.assert_array_equal(*(np.load(run / f"{name}_hist.npy") for run in (one, two)), err_msg=name)


@pytest.mark.slow  # 30 s on the 2-core box: two torchrun launches
def test_a_stopped_torchrun_run_resumes_on_every_rank(tmp_path, two_domains):
    """Each rank checkpoints its own share into rank 0's staging folder; a torchrun run stopped by SIGTERM (every rank
    during its second batch) and run again resumes on both ranks and gives one process's numbers."""
    import router_decisive

    argv = [*_common(two_domains, "random:olmoe"), "--checkpoint_every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOESCOPE_FAULT_AT_BATCH": "2:SIGTERM"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "router_decisive.py"),
               *argv, "--out", str(tmp_path / "two")]
    stopped = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert stopped.returncode != 0
    (staging,) = (tmp_path / "two").glob("router_decisive/*/*/.*.partial")
    assert sorted(p.name for p in (staging / "checkpoint").glob("state*.pt")) == ["state.rank0.pt", "state.rank1.pt"]
    assert "stopped by SIGTERM; checkpoint (2 batches done) kept in" in stopped.stderr
    env.pop("MOESCOPE_FAULT_AT_BATCH")
    resumed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    two = _published(tmp_path / "two")
    info = json.loads((two / "run.json").read_text())
    assert info["world_size"] == 2 and [r["batches_done"] for r in info["resumed"]] == [{"data": 2}]
    assert router_decisive.main([*argv, "--out", str(tmp_path / "one")]) == 0
    one = _published(tmp_path / "one")
    for name in ("entropy_summary.csv", "entropy_histograms.csv"):
        _assert_same_table(pd.read_csv(one / name), pd.read_csv(two / name), name)


@pytest.mark.parametrize("script", ["prune", "outliers", "stability", "contrast"])
def test_single_process_scripts_refuse_torchrun_in_one_line(script, monkeypatch, tmp_path, capsys):
    """Their state (kept batches, running maxima, paired passes, counts and generations) is not gathered across
    ranks, so under torchrun they would publish one rank's share: refused before the model loads."""
    import importlib

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert importlib.import_module(script).main(["--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runs in one process" in err[0] and "torchrun" in err[0], err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("run.json"))
