"""torchrun with two CPU processes (gloo) gives the numbers of one process: batches are split between ranks and the
streamed accumulators are summed with all_reduce; only rank 0 publishes a results folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

import router_stats

ROOT = Path(__file__).resolve().parent.parent


def test_two_processes_equal_one(tmp_path):
    data = tmp_path / "a.txt"
    data.write_text("alpha beta gamma delta epsilon " * 150)
    common = ["--model", "random:olmoe", "--data", f"a={data}", "--num_tokens", "600", "--seq_len", "32",
              "--batch_size", "4", "--no-progress"]
    assert router_stats.main([*common, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "router_stats.py"),
                    *common, "--out", str(tmp_path / "two")], cwd=ROOT, env=env, check=True, capture_output=True)
    one, two = (sorted((tmp_path / w).glob("router_stats/*/*")) for w in ("one", "two"))
    assert len(one) == len(two) == 1  # rank 1 published nothing
    a, b = (pd.read_csv(run[0] / "distribution_summary.csv") for run in (one, two))
    assert (a["count"] == b["count"]).all() and (a["count"] > 0).all()
    # Logit and weight histograms take their range from the first batch each rank sees, so their quantiles
    # may differ within one bin; everything else matches.
    fixed_range = ~a.quantity.isin(["logit", "weight"])
    exact = ["count", "mean", "std", "min", "max"]
    np.testing.assert_allclose(b[exact].to_numpy(), a[exact].to_numpy(), rtol=1e-6, atol=1e-7)
    quantiles = [c for c in a.columns if c.startswith("q0")]
    np.testing.assert_allclose(b.loc[fixed_range, quantiles].to_numpy(), a.loc[fixed_range, quantiles].to_numpy(), atol=1e-7)
    hist_a, hist_b = (np.load(run[0] / "softmax_hist.npy") for run in (one, two))
    np.testing.assert_array_equal(hist_a, hist_b)  # counts are exact whatever the split
