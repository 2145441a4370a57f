"""Every table a script writes has a figure, and every figure reads at A4 width: each script runs once in-process on
a tiny random OLMoE with small data. Also: the growing histograms of unbounded quantities (logits, weights) cover
their data with no overflow, and bin exactly like numpy on their final edges however the stream is cut."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import profiles
import router_decisive
import router_metrics
import router_stats
from common.analysis.routing import GrowingDistribution, GrowingHistogram
from common.model import tiny
from common.plots import MAX_PNG_WIDTH
from tests.figure_checks import assert_every_table_has_a_figure

SCRIPTS = {
    "router_decisive": (router_decisive, ["--layers", "0", "1"]),
    "router_stats": (router_stats, ["--layers", "1"]),
    "router_metrics": (router_metrics, ["--layers", "0", "1"]),
    "profiles": (profiles, ["--layer", "1", "--expert_id", "5"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("figures")
    (root / "a.txt").write_text("Alpha beta gamma delta. " * 40)
    (root / "b.jsonl").write_text("\n".join(json.dumps({"text": f"print({i} + {i})"}) for i in range(60)))
    model, tokenizer = tiny.build_random_model("olmoe", seed=1)  # the earlier checkpoint of the saturation figure
    model.save_pretrained(root / "checkpoint")
    tokenizer.save_pretrained(root / "checkpoint")
    common = ["--model", "random:olmoe", "--data", f"prose={root / 'a.txt'}", f"code={root / 'b.jsonl'}",
              "--num_tokens", "120", "--seq_len", "32", "--batch_size", "4", "--out", str(root / "results"),
              "--no-progress"]
    folders = {}
    for name, (script, extra) in SCRIPTS.items():
        if name == "router_metrics":
            extra = [*extra, "--revisions", str(root / "checkpoint")]
        assert script.main([*common, *extra]) == 0, name
        (folders[name],) = [p for p in (root / "results" / name).glob("*/*/*") if p.is_dir()]
    return folders


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_table_has_a_figure(runs, name):
    folder = runs[name]
    figures = sorted(p.stem for p in (folder / "figures").glob("*.png"))
    assert figures and sorted(p.stem for p in (folder / "figures").glob("*.pdf")) == figures
    assert_every_table_has_a_figure(folder, name)



@pytest.mark.parametrize("name", SCRIPTS)
def test_figures_fit_the_page(runs, name):
    for png in sorted((runs[name] / "figures").glob("*.png")):
        with Image.open(png) as image:
            width, height = image.size
            dpi = image.info.get("dpi", (150, 150))[0]
        assert round(dpi) == 150, png.name
        assert width <= MAX_PNG_WIDTH, f"{png.name}: {width} px wide at {dpi:.0f} dpi"
        assert height <= 2 * MAX_PNG_WIDTH, f"{png.name}: {height} px tall"


def test_unbounded_histograms_cover_the_data(runs):
    """router_stats: logit and weight histograms have nothing in below/above and edges around the exact min/max."""
    folder = runs["router_stats"]
    summary = pd.read_csv(folder / "distribution_summary.csv")
    assert (summary["below"] == 0).all() and (summary["above"] == 0).all()
    for quantity in ("logit", "weight"):
        edges = np.load(folder / f"{quantity}_edges.npy")
        rows = summary[summary.quantity == quantity]
        assert edges[0] <= rows["min"].min() and rows["max"].max() < edges[-1], quantity
        counts = np.load(folder / f"{quantity}_hist.npy")
        filled = np.nonzero(counts.reshape(-1, len(edges) - 1).sum(0))[0]
        assert filled[-1] - filled[0] + 1 >= (len(edges) - 1) / 2 - 1, quantity  # the data fill the range


# ------------------------------------------------------------------------------------------ GrowingHistogram


def _stream(values, groups, weights, bins, parts):
    """A GrowingHistogram fed the stream cut into `parts` consecutive batches."""
    h = GrowingHistogram(3, bins)
    for v, g, w in zip(*(np.array_split(a, parts) for a in (values, groups, weights)), strict=True):
        h.update(torch.from_numpy(v), torch.from_numpy(g), torch.from_numpy(w))
    return h


@pytest.mark.parametrize("seed", range(10))
def test_growing_histogram_is_exact_and_covers(seed):
    rng = np.random.default_rng(seed)
    bins = int(rng.integers(2, 60))
    scale = 10 ** rng.uniform(-3, 3)
    n = int(rng.integers(1, 400))
    # drifting values, so later batches widen the range in both directions
    values = rng.normal(0, scale, n) * np.linspace(0.1, 3, n) + rng.uniform(-5, 5) * scale
    groups = rng.integers(0, 3, n)
    weights = (rng.random(n) < 0.8).astype(np.float64)
    weights[0] = 1.0
    values[rng.random(n) < 0.1] = 1e9  # masked (weight 0) values never widen the range
    weights[values == 1e9] = 0.0
    one = _stream(values, groups, weights, bins, 1).result()
    live = weights != 0
    assert one.edges[0] <= values[live].min() and values[live].max() < one.edges[-1]
    assert (one.below == 0).all() and (one.above == 0).all()
    assert np.all(np.diff(one.edges) == one.edges[1] - one.edges[0])  # equal, power-of-two widths
    for g in range(3):
        expected, _ = np.histogram(values[live & (groups == g)], bins=one.edges)
        np.testing.assert_array_equal(one.counts[g], expected)
    for parts in (2, 7, n):  # any batching gives the same edges and counts
        streamed = _stream(values, groups, weights, bins, min(parts, n)).result()
        np.testing.assert_array_equal(streamed.edges, one.edges)
        np.testing.assert_array_equal(streamed.counts, one.counts)
    # two "ranks" merged (what all_reduce does) equal one process
    half = n // 2
    a = _stream(values[:half], groups[:half], weights[:half], bins, 3)
    b = _stream(values[half:], groups[half:], weights[half:], bins, 2)
    merged = a.merge(b).result()
    np.testing.assert_array_equal(merged.edges, one.edges)
    np.testing.assert_array_equal(merged.counts, one.counts)


def test_growing_histogram_infinities_and_empty():
    h = GrowingHistogram(None, 10, lo=0.0, hi=2.0)
    np.testing.assert_array_equal(h.result().edges, np.linspace(0.0, 2.0, 11))  # nothing seen: the fallback range
    h.update(torch.tensor([-np.inf, 0.5, np.nan]))
    h.update(torch.tensor([np.inf, 3.0, -2.0]))
    r = h.result()
    assert (r.below, r.above, r.nan) == (1.0, 1.0, 1.0)
    assert r.edges[0] <= -2.0 and r.edges[-1] > 3.0 and r.counts.sum() == 5  # ±inf clamped into the edge bins
    assert r.counts[0] >= 1 and r.counts[-1] >= 1
    d = GrowingDistribution({"expert": [0, 1]}, bins=20)
    d.update(torch.tensor([[0.25, 1.5], [0.75, 0.0]]), {"expert": torch.tensor([[0, 1]])},
             torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    frame = d.frame()
    assert list(frame["count"]) == [2.0, 1.0] and (frame["below"] == 0).all() and (frame["above"] == 0).all()
    assert d.marginalize("expert").frame()["count"].item() == 3.0


_RANK_SCRIPT = """
import sys, numpy as np, torch, torch.distributed as dist
from common.analysis.routing import GrowingDistribution
rank, out = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", rank=rank, world_size=2)
values = np.load(out + "/values.npy")
acc = GrowingDistribution({"group": [0, 1]}, bins=16)
if rank == 0:  # rank 1 has no batch at all, yet joins every collective
    for part in np.array_split(values, 3):
        acc.update(torch.from_numpy(part), torch.from_numpy((np.abs(part * 7) % 2).astype(np.int64)))
acc.all_reduce()
result = acc.histogram.result()
np.save(f"{out}/counts{rank}.npy", result.counts)
np.save(f"{out}/edges{rank}.npy", result.edges)
dist.destroy_process_group()
"""


def test_growing_histogram_rank_without_batches(tmp_path):
    """Under torch.distributed a rank that saw nothing takes part in the range agreement: no hang, and both ranks
    end with the histogram of one process."""
    import os
    import socket
    import subprocess
    import sys

    values = np.random.default_rng(0).normal(3.0, 2.0, 200)
    np.save(tmp_path / "values.npy", values)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    ranks = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(r), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in (0, 1)]
    for r in ranks:
        output, _ = r.communicate(timeout=120)
        assert r.returncode == 0, output.decode()[-3000:]
    single = GrowingDistribution({"group": [0, 1]}, bins=16)
    single.update(torch.from_numpy(values), torch.from_numpy((np.abs(values * 7) % 2).astype(np.int64)))
    expected = single.histogram.result()
    for rank in (0, 1):
        np.testing.assert_array_equal(np.load(tmp_path / f"edges{rank}.npy"), expected.edges)
        np.testing.assert_array_equal(np.load(tmp_path / f"counts{rank}.npy"), expected.counts)
