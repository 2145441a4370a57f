"""The benches' agreement checks can fail: bench/capture_overhead.py compares its streamed histograms with numpy's
on the accumulators' own edges and exits 1, naming the quantity, when they disagree (issue: it once compared
against a fallback range and printed OK over a 34% disagreement)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

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
