"""router_metrics.py on a model with planted routing: every metric returns the value the planting implies.

Expected values are derived from the token ids alone (which group each counted token belongs to) and the planted
expert table, never from the model or the code under test.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.distance import jensenshannon

import router_metrics
from common.analysis.specialization import load_balance
from common.data import resolve_domains, token_batches
from common.hooks import capture
from common.model import MoEModel
from tests.planted import (
    GROUPS,
    NUM_EXPERTS,
    NUM_LAYERS,
    TOP_K,
    VOCAB,
    build_planted_model,
    group_of,
    planted_experts,
    save_planted,
    write_domains,
)

NUM_TOKENS, SEQ_LEN = 400, 64


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    model_dir = save_planted(root / "planted")
    perturbed_dir = save_planted(root / "perturbed", swap_group=0)
    specs = write_domains(root)
    out = root / "results"
    argv = ["--model", str(model_dir), "--data", *specs, "--num_tokens", str(NUM_TOKENS), "--seq_len", str(SEQ_LEN),
            "--batch_size", "4", "--out", str(out), "--no-progress", "--num_experts", str(NUM_EXPERTS), "--topk", str(TOP_K),
            "--revisions", str(perturbed_dir), str(model_dir), "--no-figures"]  # numbers only: figures cost 80%
    assert router_metrics.main(argv) == 0
    run_dir = next(p for p in out.glob("router_metrics/*/*/*") if p.is_dir())
    assert not (run_dir / "figures").exists() and json.loads((run_dir / "run.json").read_text())["arguments"]["figures"] is False
    # The counted tokens, from the data layer alone (same arguments as the script).
    from common.model import tiny_tokenizer

    batches = list(token_batches(resolve_domains(specs), tiny_tokenizer(), num_tokens=NUM_TOKENS, seq_len=SEQ_LEN,
                                 batch_size=4, progress=False))
    return run_dir, batches


def _group_counts(batches) -> tuple[list[int], list[Counter]]:
    """Counted tokens per group, and per domain the (next token -> preceding group) pairs."""
    per_group = [0] * len(GROUPS)
    next_pairs: list[Counter] = [Counter() for _ in range(3)]
    for batch in batches:
        ids, counted, real = batch.input_ids.tolist(), batch.count_mask.tolist(), batch.attention_mask.tolist()
        for row_ids, row_counted, row_real in zip(ids, counted, real, strict=True):
            for s, (token, c) in enumerate(zip(row_ids, row_counted, strict=True)):
                if c:
                    per_group[group_of(token)] += 1
                    if s + 1 < len(row_ids) and row_real[s + 1]:
                        next_pairs[group_of(token) // 2][(row_ids[s + 1], group_of(token))] += 1
    return per_group, next_pairs


def _read(run_dir: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(run_dir / f"{name}.csv")


def test_planted_frequency_and_specialization(planted_run):
    run_dir, batches = planted_run
    n_group, _ = _group_counts(batches)
    freq = _read(run_dir, "frequency")
    assert len(freq) == NUM_LAYERS * 4 * NUM_EXPERTS
    for layer in range(NUM_LAYERS):
        for d, domain in enumerate(["d0", "d1", "d2"]):
            expected_topk, expected_top1 = np.zeros(NUM_EXPERTS), np.zeros(NUM_EXPERTS)
            for g in (2 * d, 2 * d + 1):
                first, second = planted_experts(layer, g)
                expected_topk[[first, second]] += n_group[g] / NUM_TOKENS
                expected_top1[first] += n_group[g] / NUM_TOKENS
            rows = freq[(freq.layer == layer) & (freq.domain == domain)].sort_values("expert")
            np.testing.assert_array_equal(rows.freq_topk.to_numpy(), expected_topk)
            np.testing.assert_array_equal(rows.freq_top1.to_numpy(), expected_top1)
            assert (rows.uniform_topk == TOP_K / NUM_EXPERTS).all()

    spec = _read(run_dir, "expert_specialization")
    mix = np.full(3, 1 / 3)  # every domain has NUM_TOKENS tokens, each with 2 picks
    for g in range(len(GROUPS)):
        for layer in range(NUM_LAYERS):
            for expert in planted_experts(layer, g):
                row = spec[(spec.layer == layer) & (spec.expert == expert)].iloc[0]
                one_hot = np.eye(3)[g // 2]
                assert row.jsd_bits == pytest.approx(jensenshannon(one_hot, mix, base=2) ** 2, abs=1e-12)
                assert row.top_domain == f"d{g // 2}" and row.top_domain_share == 1.0
    assert spec[spec.expert >= 12].jsd_bits.isna().all()

    coverage = _read(run_dir, "coverage50")
    for d in range(3):
        shares = sorted([n_group[2 * d]] * 2 + [n_group[2 * d + 1]] * 2, reverse=True)
        expected = int(np.argmax(np.cumsum(shares) >= NUM_TOKENS)) + 1
        assert (coverage[coverage.domain == f"d{d}"].experts_needed == expected).all()

    balance = _read(run_dir, "load_balance")
    assert (balance.dead_experts == 2).all()


def test_planted_overlap_and_token_specialization(planted_run):
    run_dir, batches = planted_run
    _, next_pairs = _group_counts(batches)
    overlap = _read(run_dir, "token_overlap")
    for layer in range(NUM_LAYERS):
        partner = {}
        for g in range(len(GROUPS)):
            first, second = planted_experts(layer, g)
            partner[first], partner[second] = second, first
        rows = overlap[(overlap.layer == layer) & (overlap.expert_i < 12) & (overlap.expert_j < 12)]
        same = rows.apply(lambda r, p=partner: p[r.expert_i] == r.expert_j, axis=1)
        assert (rows[same].jaccard == 1).all() and (rows[same].weighted_overlap == 1).all()
        assert (rows[~same].jaccard == 0).all() and (rows[~same].weighted_overlap == 0).all()

    spec = _read(run_dir, "token_specialization")
    assert (spec[spec.token == "current"].unweighted == 1).all()
    assert (spec[spec.token == "predicted"].weighted == 1).all()  # the planted head predicts the current token
    # Next token: the experts are those of the preceding token's group, so the share is that of its majority group.
    per_token: dict[int, Counter] = {}
    for pairs in next_pairs:
        for (token, group), n in pairs.items():
            per_token.setdefault(token, Counter())[group] += n
    shares = {t: max(c.values()) / sum(c.values()) for t, c in per_token.items()}
    totals = {t: sum(c.values()) for t, c in per_token.items()}
    next_rows = spec[spec.token == "next"]
    assert (next_rows.ids == len(shares)).all()
    assert next_rows.unweighted.to_numpy() == pytest.approx(np.mean(list(shares.values())), abs=1e-12)
    weighted = sum(shares[t] * totals[t] for t in shares) / sum(totals.values())
    assert next_rows.weighted.to_numpy() == pytest.approx(weighted, abs=1e-12)


def test_planted_coactivation_transitions_correlation(planted_run):
    run_dir, batches = planted_run
    n_group, _ = _group_counts(batches)
    coact = np.load(run_dir / "coactivation_counts.npy")
    transitions = np.load(run_dir / "transition_probabilities.npy")
    for layer in range(NUM_LAYERS):
        expected = np.zeros((NUM_EXPERTS, NUM_EXPERTS))
        for g in range(len(GROUPS)):
            first, second = planted_experts(layer, g)
            expected[first, second] = expected[second, first] = n_group[g]
        np.testing.assert_array_equal(coact[layer], expected)
    table = _read(run_dir, "coactivation")
    pairs = table[table["count"] > 0]
    assert (pairs.p_j_given_i == 1).all() and (pairs.jaccard == 1).all()
    for layer in range(NUM_LAYERS - 1):
        expected = np.full((NUM_EXPERTS, NUM_EXPERTS), np.nan)
        for g in range(len(GROUPS)):
            for a in planted_experts(layer, g):
                expected[a] = 0
                expected[a, list(planted_experts(layer + 1, g))] = 1
        np.testing.assert_array_equal(transitions[layer], expected)
    correlation = np.load(run_dir / "indicator_correlation.npy")
    shuffled = np.load(run_dir / "indicator_correlation_shuffled.npy")
    # Shuffled within each batch (one domain), each layer by its own permutation: the two groups of a domain no
    # longer line up token by token, but both indicators still live only in their domain's batches. The expected
    # joint count is then sum over batches of n_g^2 / n (n counted tokens, n_g of them in group g); about 0.4 here.
    per_batch = [Counter(group_of(t) for t, c in zip(batch.input_ids.view(-1).tolist(), batch.count_mask.view(-1).tolist(),
                                                     strict=True) if c) for batch in batches]
    total = sum(sum(c.values()) for c in per_batch)
    for g in range(len(GROUPS)):
        a = planted_experts(0, g)[0]
        b = NUM_EXPERTS * 2 + planted_experts(2, g)[0]
        assert correlation[a, b] == pytest.approx(1.0)
        p = sum(c[g] for c in per_batch) / total
        joint = sum(c[g] ** 2 / sum(c.values()) for c in per_batch) / total
        expected = (joint - p * p) / (p * (1 - p))
        assert 0.3 < expected < 0.5
        # Hypergeometric spread of the joint count over these ~1,200 tokens: sd about 0.05 in r.
        assert shuffled[a, b] == pytest.approx(expected, abs=0.2)


def test_planted_saturation(planted_run):
    run_dir, batches = planted_run
    n_group, _ = _group_counts(batches)
    table = _read(run_dir, "saturation")
    assert list(table.layer) == list(range(NUM_LAYERS))
    total = 3 * NUM_TOKENS
    expected = {0: 1.0, 1: 1 - n_group[0] / total, 2: 1.0}  # group 0 swapped to unused experts at layer 1
    for row in table.itertuples():
        assert row.topk_overlap == pytest.approx(expected[row.layer], abs=1e-12)
        assert row.top1_agreement == pytest.approx(expected[row.layer], abs=1e-12)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["arguments"]["revisions"][-1].endswith("planted")


def test_aux_loss_equals_transformers(tmp_path):
    """The switch auxiliary loss from streamed counts equals transformers' load_balancing_loss_func (1e-6)."""
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

    from common.analysis.specialization import RoutingCounts
    from common.data import Batch

    model = build_planted_model()
    with torch.no_grad():  # give the routers some spread so the loss is not trivially the balanced value
        for layer in model.model.layers:
            layer.mlp.gate.weight.add_(torch.randn_like(layer.mlp.gate.weight) * 0.3)
    moe = MoEModel(model)
    ids = torch.randint(97, 121, (3, 20), generator=torch.Generator().manual_seed(0))
    batch = Batch(input_ids=ids, attention_mask=torch.ones_like(ids), count_mask=torch.ones_like(ids, dtype=torch.bool),
                  domain_ids=torch.zeros(3, dtype=torch.long), doc_ids=torch.zeros_like(ids))
    counts = RoutingCounts(moe.layers, ["all"], 259, torch.device("cpu"))
    with torch.no_grad(), capture(moe) as records:
        out = model(ids, output_router_logits=True)
    counts.update(records, batch)
    table = load_balance(counts.arrays(), moe.layers)
    for moe_layer, logits in zip(moe.layers, out.router_logits, strict=True):
        expected = load_balancing_loss_func((logits,), NUM_EXPERTS, TOP_K)
        assert table[table.layer == moe_layer.layer].aux_loss.iloc[0] == pytest.approx(float(expected), abs=1e-6)


BAD = {
    "expert count mismatch": (["--num_experts", "8"], "--num_experts 8: layer 0 has 14 experts"),
    "top-k mismatch": (["--topk", "4"], "--topk 4"),
    "num_domains too large": (["--num_domains", "5"], "num_domains"),
    "missing revision folder": (["--revisions", "./no/such/checkpoint"], "--revisions ./no/such/checkpoint: no such checkpoint folder"),
    "revision of a local model": (["--revisions", "step100"], "--revisions step100: no such checkpoint folder (and --model"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input(case, tmp_path, capsys):
    model_dir = save_planted(tmp_path / "planted")
    specs = write_domains(tmp_path)
    extra, message = BAD[case]
    argv = ["--model", str(model_dir), "--data", *specs, "--num_tokens", "50", "--out", str(tmp_path / "out"),
            "--no-progress", *extra]
    assert router_metrics.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_frequency_and_coactivation_equal_naive_loop_on_demo(tmp_path):
    """On the shipped demo model: streamed counts equal a per-token Python loop over transformers' router logits."""
    from common.analysis.specialization import RoutingCounts
    from common.cli import pipeline
    from common.data import resolve_domains
    from common.model import ModelSpec, load_moe

    moe = load_moe(ModelSpec(model="demo", device="cpu", dtype="float32"))
    domains = resolve_domains(["demo"], num_domains=3)
    batches = list(token_batches(domains, moe.tokenizer, num_tokens=300, seq_len=128, batch_size=4, progress=False))
    counts = RoutingCounts(moe.layers, [d.name for d in domains], len(moe.tokenizer), torch.device("cpu"))
    for records, batch, logits in pipeline.captured_batches(moe, iter(batches), moe.layers, ("logits", "topk")):
        counts.update(records, batch, predicted=logits.argmax(-1))
    arrays = counts.arrays()

    E, k = moe.layers[0].num_experts, moe.layers[0].top_k
    topk = np.zeros((len(moe.layers), len(domains), E))
    coact = np.zeros((len(moe.layers), E, E))
    for batch in batches:
        with torch.no_grad():
            out = moe.model(**batch.model_inputs(), output_router_logits=True, use_cache=False)
        d = int(batch.domain_ids[0])
        counted = batch.count_mask.reshape(-1).tolist()
        for li, logits in enumerate(out.router_logits):
            for row, c in zip(logits.tolist(), counted, strict=True):
                if not c:
                    continue
                chosen = sorted(range(E), key=lambda e, row=row: -row[e])[:k]  # softmax is monotonic in the logits
                for e in chosen:
                    topk[li, d, e] += 1
                    for other in chosen:
                        if other != e:
                            coact[li, e, other] += 1
    np.testing.assert_array_equal(arrays["topk"], topk)
    np.testing.assert_array_equal(arrays["coactivation"], coact)
    assert arrays["tokens"].tolist() == [300.0] * 3


def test_olmoe_compat_counts_rank_adjacent_pairs_only():
    """Top-3 routing with known weights: all pairs vs the OLMoE script's rank-adjacent pairs (by weight, not slot)."""
    from common.analysis.specialization import RoutingCounts
    from common.data import Batch
    from common.hooks import Capture, LayerRecord

    model = build_planted_model()
    moe_layer = MoEModel(model).layers[0]
    index = torch.tensor([[4, 1, 7]])  # ranks by weight: 7 (0.5), 4 (0.3), 1 (0.2)
    weight = torch.tensor([[0.3, 0.2, 0.5]])
    records = Capture({moe_layer.layer: LayerRecord(logits=torch.zeros(1, NUM_EXPERTS), topk_index=index, topk_weight=weight)})
    ids = torch.tensor([[97]])
    batch = Batch(input_ids=ids, attention_mask=torch.ones_like(ids), count_mask=torch.ones_like(ids, dtype=torch.bool),
                  domain_ids=torch.zeros(1, dtype=torch.long), doc_ids=torch.zeros_like(ids))
    pairs = {}
    for compat in (False, True):
        counts = RoutingCounts([moe_layer], ["d"], VOCAB, torch.device("cpu"), olmoe_compat=compat)
        counts.update(records, batch)
        matrix = counts.arrays()["coactivation"][0]
        pairs[compat] = {(int(i), int(j)) for i, j in zip(*np.nonzero(matrix), strict=True)}
    assert pairs[False] == {(a, b) for a in (1, 4, 7) for b in (1, 4, 7) if a != b}
    assert pairs[True] == {(7, 4), (4, 7), (4, 1), (1, 4)}
