"""Streamed decisiveness and distribution statistics against a naive per-token Python loop on the same tokens.

The reference reads router logits from transformers' own `output_router_logits=True` (not our hooks) and computes
every quantity token by token with the `math` module.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.analysis import ALL_DOMAINS
from common.analysis.routing import DecisivenessStats, DistributionStats
from common.cli import pipeline
from common.data import resolve_domains, token_batches
from common.model import ModelSpec, load_moe

TEXTS = {
    "prose": "The quick brown fox jumps over the lazy dog. " * 12,
    "code": "def f(x):\n    return [i * x for i in range(10) if i % 2]\n" * 10,
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, saved_tiny_model):
    folder = tmp_path_factory.mktemp("texts")
    sources = []
    for name, text in TEXTS.items():
        (folder / f"{name}.txt").write_text(text)
        sources.append(f"{name}={folder / name}.txt")
    domains = resolve_domains(sources)
    moe = load_moe(ModelSpec(model=str(saved_tiny_model("olmoe")), device="cpu", dtype="float32"))
    batches = list(token_batches(domains, moe.tokenizer, num_tokens=300, seq_len=64, batch_size=3, progress=False))
    return moe, domains, batches


def _naive_token_values(logits_row: list[float], k: int) -> dict[str, float]:
    exps = [math.exp(z - max(logits_row)) for z in logits_row]
    total = sum(exps)
    p = [e / total for e in exps]
    ranked = sorted(p, reverse=True)
    top = ranked[:k]
    mass = sum(top)
    renorm = [q / mass for q in top]
    entropy = -sum(q * math.log(q) for q in p if q > 0)
    topk_entropy = -sum(q * math.log(q) for q in renorm if q > 0)
    return {
        "entropy": entropy,
        "entropy_normalized": entropy / math.log(len(p)),
        "topk_entropy": topk_entropy,
        "topk_entropy_normalized": topk_entropy / math.log(k),
        "top1_prob": ranked[0],
        "top1_top2_margin": ranked[0] - ranked[1],
        "topk_mass": mass,
        "renorm_ranks": renorm,
        "p": p,
        "logits": logits_row,
    }


def _naive(moe, domains, batches):
    """{(layer, domain): [per-token dicts]} over exactly the counted tokens."""
    values: dict[tuple[int, str], list[dict]] = {}
    for batch in batches:
        with torch.no_grad():
            out = moe.model(**batch.model_inputs(), output_router_logits=True, use_cache=False)
        domain = domains[int(batch.domain_ids[0])].name
        counted = batch.count_mask.reshape(-1).tolist()
        for moe_layer, logits in zip(moe.layers, out.router_logits, strict=True):
            rows = logits.reshape(-1, logits.shape[-1]).double().tolist()
            for row, counts in zip(rows, counted, strict=True):
                if counts:
                    values.setdefault((moe_layer.layer, domain), []).append(_naive_token_values(row, moe_layer.top_k))
    return values


def _stream(acc, moe, batches):
    for records, batch, _ in pipeline.captured_batches(moe, iter(batches), acc.layers, ("logits", "topk")):
        acc.update(records, batch.token_domains(), batch.token_weights())
    return acc


def _assert_hist_matches(part, naive_values: list[float]) -> None:
    """`part`: the tidy histogram rows (left, right, count) of one group, compared with np.histogram on the same edges."""
    counts = part["count"].to_numpy()
    edges = np.append(part["left"].to_numpy(), part["right"].to_numpy()[-1])
    expected, _ = np.histogram(np.clip(naive_values, edges[0], edges[-1]), bins=edges)
    # float32 (model) vs float64 (reference) may put a value that sits on a bin edge into the neighbouring bin.
    near_edge = sum(np.min(np.abs(edges - v)) < 1e-5 for v in naive_values)
    assert np.abs(counts - expected).sum() <= 2 * near_edge


def test_decisiveness_equals_naive_loop(setup):
    moe, domains, batches = setup
    naive = _naive(moe, domains, batches)
    acc = _stream(DecisivenessStats(moe.layers, [d.name for d in domains], moe.device, bins=50), moe, batches)
    summary = acc.summary()
    histograms = acc.histograms()
    for (layer, domain), tokens in naive.items():
        assert len(tokens) == 300
        for metric in ("entropy", "entropy_normalized", "topk_entropy", "top1_prob", "top1_top2_margin", "topk_mass"):
            row = summary[(summary.metric == metric) & (summary.layer == layer) & (summary.domain == domain)].iloc[0]
            values = [t[metric] for t in tokens]
            assert row["count"] == len(values)
            assert row["mean"] == pytest.approx(np.mean(values), rel=1e-5, abs=1e-6)
            assert row["std"] == pytest.approx(np.std(values), rel=1e-3, abs=1e-6)
            assert row["min"] == pytest.approx(min(values), rel=1e-5, abs=1e-6)
            assert row["max"] == pytest.approx(max(values), rel=1e-5, abs=1e-6)
            hist = histograms[(histograms.metric == metric) & (histograms.layer == layer) & (histograms.domain == domain)]
            _assert_hist_matches(hist, values)
    # The pooled row is the union of the domains.
    entropy = summary[(summary.metric == "entropy") & (summary.domain == ALL_DOMAINS)]
    for layer in {key[0] for key in naive}:
        pooled = [t["entropy"] for (lay, _), tokens in naive.items() if lay == layer for t in tokens]
        row = entropy[entropy.layer == layer].iloc[0]
        assert row["count"] == len(pooled)
        assert row["mean"] == pytest.approx(np.mean(pooled), rel=1e-5)


def test_distributions_equal_naive_loop(setup):
    moe, domains, batches = setup
    naive = _naive(moe, domains, batches)
    acc = _stream(DistributionStats(moe.layers, [d.name for d in domains], moe.device, bins=40), moe, batches)
    hist = acc.histograms()
    summary = acc.summary()
    for (layer, domain), tokens in naive.items():
        def rows(quantity, rank="all", layer=layer, domain=domain):
            return hist[(hist.quantity == quantity) & (hist.layer == layer) & (hist.domain == domain) & (hist["rank"] == rank)]

        for quantity, values in (
            ("logit", [z for t in tokens for z in t["logits"]]),
            ("softmax", [q for t in tokens for q in t["p"]]),
        ):
            part = rows(quantity)
            _assert_hist_matches(part, values)
        for rank in (1, 2):
            values = [t["renorm_ranks"][rank - 1] for t in tokens]
            part = rows("topk_renormalized", rank)
            _assert_hist_matches(part, values)
            # OLMoE does not renormalise (norm_topk_prob=False): the weights it uses are the raw top-k p.
            weight = summary[(summary.quantity == "weight") & (summary.layer == layer) & (summary.domain == domain)
                             & (summary["rank"] == rank)].iloc[0]
            ranked_p = [sorted(t["p"], reverse=True)[rank - 1] for t in tokens]
            assert weight["mean"] == pytest.approx(np.mean(ranked_p), rel=1e-5)
