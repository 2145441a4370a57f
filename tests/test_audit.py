"""The causal audit in interv.py --data: observational metrics of the ablated experts on the same tokens, their rank
correlations with ΔNLL with bootstrap intervals over documents, and the top-10 overlap."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import interv
from common.analysis.audit import METRICS, AuditAccumulator, correlations, rank_correlations, top_overlap


def test_a_metric_planted_to_rank_like_the_ablation_correlates_exactly_one_in_every_resample():
    """Per document, each expert's ΔNLL and output norm are the same multiple c_e of the document's share: every
    resample of the documents gives output_norm = c_e = ΔNLL, so ρ = τ = 1 with the interval [1, 1]."""
    experts, documents = 12, 30
    layer = SimpleNamespace(num_experts=experts, layer=3)
    acc = AuditAccumulator(layer, list(range(experts)), vocab_size=50, device=torch.device("cpu"))
    acc._grow(documents)
    for doc in range(documents):
        acc.doc_index[(doc % 2, doc)] = doc
        acc.doc_domain.append(doc % 2)
    rng = np.random.default_rng(0)
    c = rng.permutation(experts) + 1.0
    share, routed = rng.uniform(1, 5, documents), rng.integers(1, 9, (experts, documents)).astype(float)
    acc.predictions[:documents], acc.counted[:documents] = share, 10 * share
    acc.delta[:, :documents] = c[:, None] * share[None, :]
    acc.routed[:, :documents] = routed
    acc.norm[:, :documents] = c[:, None] * routed
    rows = {row["metric"]: row for row in correlations(acc, draws=50)}
    planted = rows["output_norm"]
    assert planted["spearman"] == pytest.approx(1.0) and planted["kendall"] == pytest.approx(1.0)
    assert planted["spearman_low"] == pytest.approx(1.0) and planted["kendall_high"] == pytest.approx(1.0)
    assert planted["top10_overlap"] == 10 and planted["documents"] == documents and planted["bootstrap_draws"] == 50
    assert set(rows) == set(METRICS)
    assert rank_correlations(-c, c) == (pytest.approx(-1.0), pytest.approx(-1.0))
    assert top_overlap(np.arange(12.0), np.arange(12.0)[::-1]) == 8  # of 12, the top 10 of each share 8


def test_interv_audits_the_planted_carriers(tmp_path):
    """On the planted model only the two carriers (layer 1) matter and only they produce outputs: their ΔNLL is the
    only non-zero one, the audit's ΔNLL equals the importance table's, and saliency and output norm rank them first."""
    from tests.planted import carriers, save_planted, write_domains

    model = save_planted(tmp_path / "model", carry_layer=1)
    argv = ["--model", str(model), "--data", *write_domains(tmp_path), "--num_tokens", "200", "--seq_len", "64",
            "--layer", "1", "--bootstrap", "30", "--no-progress", "--out", str(tmp_path / "out")]
    assert interv.main(argv) == 0
    (run,) = [p for p in (tmp_path / "out").glob("interv/*/*/*") if p.is_dir()]
    audit = pd.read_csv(run / "audit_layer1.csv").set_index("expert")
    importance = pd.read_csv(run / "importance_layer1.csv").query("domain == 'all'").set_index("expert")
    np.testing.assert_allclose(audit.delta_nll, importance.delta_nll.loc[audit.index], rtol=1e-9, atol=1e-12)
    carrying = list(carriers(1))
    assert (audit.loc[carrying, "delta_nll"] > 1).all()
    assert (audit.drop(index=carrying).delta_nll.abs() < 1e-9).all()
    assert (audit.drop(index=carrying)[["saliency", "output_norm"]] == 0).all().all()
    table = pd.read_csv(run / "audit_correlation_layer1.csv").set_index("metric")
    assert table.loc["saliency", "spearman"] > 0.5 and table.loc["output_norm", "spearman"] > 0.5
    assert (table.documents > 1).all() and (run / "figures" / "audit_layer1.png").is_file()
