"""The benches' checks can fail: bench/capture_overhead.py compares its streamed histograms with numpy's on the
accumulators' own edges and exits 1, naming the quantity, when they disagree (issue: it once compared against a
fallback range and printed OK over a 34% disagreement); likewise sim_speed.py (all-pairs CKA against the per-pair
loop), early_errors.py (each answer against the expected one-line error and the time limit), the memory benches
(peak RSS ratio and the tokens each run counted) and stats_memory.py (each plan against its budgets) fail on a
planted wrong value. gpu_throughput.py compares nothing (timings and op counts)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--layers", "0", "1", "--batch_size", "2", "--seq_len", "64", "--repeats", "1", "--warmup", "0"]


@pytest.fixture(scope="module")
def capture_overhead():
    spec = importlib.util.spec_from_file_location("capture_overhead", ROOT / "bench" / "capture_overhead.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["capture_overhead"] = module  # its dataclasses look their module up while they are built
    spec.loader.exec_module(module)
    yield module
    del sys.modules["capture_overhead"]


def _agreement_line(out: str) -> str:
    return next(line for line in out.splitlines() if "histogram entries in another bin" in line)


def test_streamed_histograms_agree_with_numpy_on_their_own_edges(capture_overhead, capsys):
    assert capture_overhead.main(SMALL) == 0
    line = _agreement_line(capsys.readouterr().out)
    moved, entries = (int(n) for n in line.split("histogram entries in another bin: ")[1].split(" (")[0].split(" of "))
    assert entries > 10_000 and moved <= 1e-5 * entries and line.endswith("-> OK"), line


@pytest.mark.parametrize("quantity", ["top1_prob", "logit"])  # a fixed-range and a grown histogram
def test_edges_shifted_by_one_bin_fail_naming_the_quantity(capture_overhead, capsys, monkeypatch, quantity):
    read = capture_overhead.Bench.read_edges

    def shifted(self):
        edges = read(self)
        bounds = edges[quantity]
        edges[quantity] = bounds + (bounds[1] - bounds[0])  # numpy now bins on edges one bin to the right
        return edges

    monkeypatch.setattr(capture_overhead.Bench, "read_edges", shifted)
    assert capture_overhead.main(SMALL) == 1
    out = capsys.readouterr().out
    assert _agreement_line(out).endswith("-> MISMATCH")
    failures = [line for line in out.splitlines() if line.startswith("  MISMATCH ")]
    assert failures and all(line.startswith(f"  MISMATCH {quantity}: ") for line in failures), failures
    assert np.isfinite(float(failures[0].split(": ")[1].split(" of ")[0]))


# ------------------------------------------------------------------------------------------ the other benches' checks
# Each comparison a bench makes can fail: a planted wrong value (one count, one token, one entry off) makes it fail
# and name what failed; the right value passes.


def _load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while they are built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sim_speed():
    yield _load_bench("sim_speed")
    del sys.modules["bench_sim_speed"]


@pytest.fixture(scope="module")
def early_errors():
    yield _load_bench("early_errors")
    del sys.modules["bench_early_errors"]


@pytest.fixture(scope="module")
def stats_memory():
    yield _load_bench("stats_memory")
    del sys.modules["bench_stats_memory"]


# sim_speed.py: all-pairs CKA (the project's SimilarityResult) against the per-pair loop


@pytest.fixture(scope="module")
def cka_pairs(sim_speed):
    """(the project's all-pairs result, the per-pair loop's values) on small random outputs."""
    from common.analysis.similarity import TensorOutputs, expert_similarities

    g = torch.Generator().manual_seed(0)
    y = torch.rand(5, 1, 1, generator=g) * torch.randn(64, 16, generator=g) + torch.randn(5, 64, 16, generator=g)
    result = expert_similarities(TensorOutputs(y), list(sim_speed.METHODS))
    reference = {(i, j): sim_speed.pair_cka(y[i], y[j]) for i in range(5) for j in range(i + 1, 5)}
    return result, reference


def test_sim_speed_all_pairs_agree_with_the_loop(sim_speed, cka_pairs):
    result, reference = cka_pairs
    worst = sim_speed.largest_difference(result, reference)
    assert 0 <= worst <= sim_speed.TOLERANCE and sim_speed.agreement_failure(worst, len(reference)) is None


@pytest.mark.parametrize("planted", ["reference off", "project NaN", "project off"])
def test_sim_speed_planted_difference_fails(sim_speed, cka_pairs, planted):
    result, reference = cka_pairs
    result = type(result)(**{**vars(result), "matrices": {k: v.clone() for k, v in result.matrices.items()}})
    reference = dict(reference)
    if planted == "reference off":  # the loop's linear CKA of one pair off by twice the tolerance
        linear, debiased = reference[(1, 3)]
        reference[(1, 3)] = (linear + 2 * sim_speed.TOLERANCE, debiased)
    elif planted == "project NaN":  # NaN must not hide behind the other pairs' small differences
        result.matrices["cka-debiased"][2, 4] = float("nan")
    else:
        result.matrices["cka-debiased"][0, 1] -= 2 * sim_speed.TOLERANCE
    failure = sim_speed.agreement_failure(sim_speed.largest_difference(result, reference), len(reference))
    assert failure is not None and failure.startswith("results: "), failure
    assert ("NaN" in failure) == (planted == "project NaN")


def test_sim_speed_exits_1_naming_the_disagreement(sim_speed, capsys, monkeypatch):
    flags = ["--experts", "5", "--tokens", "64", "--width", "16", "--device", "cpu"]
    pair_cka = sim_speed.pair_cka
    sim_speed.main(flags)  # the right values agree (the speed-up of so small a run is not asserted)
    out = capsys.readouterr().out
    assert "≤ 1e-05 allowed: PASS" in out and "FAIL results" not in out, out
    monkeypatch.setattr(sim_speed, "pair_cka", lambda yi, yj: tuple(v + 1e-3 for v in pair_cka(yi, yj)))
    assert sim_speed.main(flags) == 1
    out = capsys.readouterr().out
    assert "≤ 1e-05 allowed: FAIL" in out and "FAIL results: largest |difference| 1.00e-03" in out, out


# early_errors.py: each run's exit code and stderr against the expected one-line error, and its time against --limit


def _done(code: int, stderr: str) -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess([], code, "", stderr)


def test_early_errors_judges_the_expected_answer_ok(early_errors, tmp_path):
    case = early_errors.CASES[1]  # data: unknown preset
    line = f"{case.script}: error: --data 'olmo': {case.expected} (presets: demo)\n"
    assert early_errors.problem_of(case, _done(2, line), tmp_path / "results") is None


@pytest.mark.parametrize(
    ("code", "stderr", "left", "problem"),
    [
        (1, "router_decisive.py: error: --data 'olmo': unknown preset\n", False, "exit code 1"),
        (2, "", False, "0 lines on stderr"),
        (2, "Traceback (most recent call last):\nrouter_decisive.py: error: unknown preset\n", False, "2 lines"),
        (2, "router_decisive.py: error: --data 'olmo': unknown presel\n", False, "another error than expected"),
        (2, "router_decisive.py: error: --data 'olmo': unknown preset\n", True, "behind"),
    ],
    ids=["exit code", "silent", "two lines", "other message", "left --out"],
)
def test_early_errors_planted_wrong_answers_fail(early_errors, tmp_path, code, stderr, left, problem):
    case = early_errors.CASES[1]
    assert case.expected == "unknown preset"
    out = tmp_path / "results"
    if left:
        out.mkdir()
    found = early_errors.problem_of(case, _done(code, stderr), out)
    assert found is not None and problem in found, found


@pytest.mark.parametrize(
    ("expected", "limit", "code", "note"),
    [("unknown preset", "3", 0, ""), ("unknown presetx", "3", 1, "another error than expected"),
     ("unknown preset", "0", 1, "over 0 s")],
    ids=["right", "planted message", "planted limit"],
)
def test_early_errors_exit_status(early_errors, tmp_path, capsys, monkeypatch, expected, limit, code, note):
    """A real run of one data-spec case (answered before torch: ~0.3 s), the checkpoints and floor left out."""
    case = dataclasses.replace(early_errors.CASES[1], expected=expected)
    monkeypatch.setattr(early_errors, "CASES", (case,))
    monkeypatch.setattr(early_errors, "build_checkpoints", lambda folder: (folder / "moe", folder / "dense"))
    monkeypatch.setattr(early_errors, "floor_seconds", lambda env: 0.0)
    assert early_errors.main(["--folder", str(tmp_path), "--limit", limit]) == code
    row = next(line for line in capsys.readouterr().out.splitlines() if case.name in line)
    assert row.startswith("ok " if code == 0 else "FAIL") and note in row, row


# interv_memory.py, lens_memory.py, router_metrics_memory.py: peak RSS ratio and the tokens each run counted


def _fake_runs(monkeypatch, ratio: float, counted):
    """Stands in for common.measure.peak_rss_ratio: writes each run's run.json with `counted(tokens)` per domain."""
    from bench import memory_runs

    calls = []

    def fake(script, argv_for, small, large, goal=1.10):
        for tokens in (small, large):
            argv = list(argv_for(tokens, "the helper's own folder, unused"))
            assert argv[argv.index("--num_tokens") + 1] == str(tokens)
            record = Path(argv[argv.index("--out") + 1]) / script.removesuffix(".py") / "demo" / "data" / "1" / "run.json"
            record.parent.mkdir(parents=True)
            domains = {name: {"counted": n, "complete": n == tokens} for name, n in counted(tokens).items()}
            record.write_text(json.dumps({"tokens": {"num_tokens_requested": tokens, "domains": domains}}))
        calls.append(script)
        return ratio

    monkeypatch.setattr(memory_runs, "peak_rss_ratio", fake)
    return memory_runs, calls


def _two_domains(tokens: int) -> dict[str, int]:
    return {"code": tokens, "prose": tokens}


def test_memory_flat_passes_with_flat_memory_and_grown_tokens(monkeypatch, capsys):
    memory_runs, calls = _fake_runs(monkeypatch, 1.10, _two_domains)
    assert memory_runs.memory_flat("router_metrics.py", lambda t, out: ["--num_tokens", str(t), "--out", out],
                                   100, 1000) == 0
    out = capsys.readouterr().out
    assert calls == ["router_metrics.py"] and "10.00x of 10.00x requested" in out and "FAIL" not in out, out


@pytest.mark.parametrize(
    ("ratio", "counted", "failure"),
    [
        (1.1001, _two_domains, "FAIL peak RSS: large/small 1.100 > 1.10"),
        # every domain ran out at 120 tokens: the large run read what the small one read
        (1.0, lambda t: {"code": min(t, 120), "prose": min(t, 120)}, "FAIL tokens:"),
        # one token short of half the requested growth (5x the small run's 200 = 1000 counted tokens needed)
        (1.0, lambda t: {"code": min(t, 500), "prose": min(t, 499)}, "FAIL tokens: the large run counted"),
    ],
    ids=["ratio over the goal", "data ran out", "one token short"],
)
def test_memory_flat_planted_failures(monkeypatch, capsys, ratio, counted, failure):
    memory_runs, _ = _fake_runs(monkeypatch, ratio, counted)
    assert memory_runs.memory_flat("logit_lens.py", lambda t, out: ["--num_tokens", str(t), "--out", out],
                                   100, 1000) == 1
    out = capsys.readouterr().out
    assert failure in out, out


def test_memory_flat_exactly_half_the_growth_passes(monkeypatch, capsys):
    memory_runs, _ = _fake_runs(monkeypatch, 1.0, lambda t: {"code": min(t, 500), "prose": min(t, 500)})
    assert memory_runs.memory_flat("interv.py", lambda t, out: ["--num_tokens", str(t), "--out", out], 100, 1000) == 0
    assert "5.00x of 10.00x requested (≥ 5.00x required: PASS)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("bench", "script"),
    [("interv_memory", "interv.py"), ("lens_memory", "logit_lens.py"), ("router_metrics_memory", "router_metrics.py")],
)
def test_memory_benches_exit_status(monkeypatch, capsys, bench, script):
    module = _load_bench(bench)
    try:
        for ratio, code in ((1.0, 0), (1.2, 1)):
            _, calls = _fake_runs(monkeypatch, ratio, _two_domains)
            assert module.main(["--small", "100", "--large", "1000"]) == code
            assert calls == [script]
        assert "FAIL peak RSS: large/small 1.200" in capsys.readouterr().out
    finally:
        del sys.modules[f"bench_{bench}"]


# stats_memory.py: each plan's bytes (StatsPlan.to_dict) against the budgets it was made for


SMALL_CONFIG = {"small MoE": (259, 8, 2)}  # vocab, routed experts, MoE layers


def test_stats_memory_plans_within_their_budgets(stats_memory, monkeypatch, capsys):
    monkeypatch.setattr(stats_memory, "CONFIGS", SMALL_CONFIG)
    assert stats_memory.main() == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("small MoE"))
    assert row.endswith(" yes"), row


def test_stats_memory_plan_one_byte_over_budget_fails(stats_memory, monkeypatch, capsys):
    plan_routing_counts = stats_memory.plan_routing_counts

    def over(*args, **kwargs):  # the real plan, one byte over the device budget
        plan = plan_routing_counts(*args, **kwargs)
        budget = int(stats_memory.DEFAULT_DEVICE_BUDGET_GIB * stats_memory.GiB)
        extra = budget + 1 - sum(plan.on_device.values())
        return dataclasses.replace(plan, on_device={**plan.on_device, "planted": extra})

    monkeypatch.setattr(stats_memory, "CONFIGS", SMALL_CONFIG)
    monkeypatch.setattr(stats_memory, "plan_routing_counts", over)
    assert stats_memory.main() == 1
    out = capsys.readouterr().out
    assert "NO, over the budgets the plan was made for" in out and "FAIL plans over their budgets: small MoE" in out


def test_stats_memory_refused_plan_is_reported_not_fitting(stats_memory, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise stats_memory.InputError("--stats_memory 4: the routing statistics need 9.00 GiB")

    monkeypatch.setattr(stats_memory, "CONFIGS", SMALL_CONFIG)
    monkeypatch.setattr(stats_memory, "plan_routing_counts", refuse)
    assert stats_memory.main() == 0  # the script's refusal is its right answer, reported as not fitting
    assert "NO, the planner refuses: --stats_memory 4" in capsys.readouterr().out


# tests/figure_checks.py: the helper the figure tests use fails on a table without its figure


@pytest.mark.parametrize(
    ("pngs", "message"),
    [(["decisiveness_by_layer"], None), (["decisiveness_by_layers"], "no decisiveness_by_layer for entropy_summary"),
     ([], "no decisiveness_by_layer")],
    ids=["right", "planted name", "missing"],
)
def test_figure_checks_fail_on_a_table_without_its_figure(tmp_path, pngs, message):
    from tests.figure_checks import assert_every_table_has_a_figure

    (tmp_path / "figures").mkdir()
    (tmp_path / "entropy_summary.csv").write_text("layer\n0\n")
    for stem in pngs:
        (tmp_path / "figures" / f"{stem}.png").write_bytes(b"")
    if message is None:
        assert_every_table_has_a_figure(tmp_path, "run")
    else:
        with pytest.raises(AssertionError, match=message):
            assert_every_table_has_a_figure(tmp_path, "run")
