"""cluster.py: spherical k-means of the unembedding, the JSD specialization score with its multinomial baseline
(on constructed counts), the logit-lens output tokens, and the script end to end on a tiny random OLMoE."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy.spatial.distance import jensenshannon

import cluster
from common.analysis import clusters as cl
from common.hooks import capture
from common.model import MoEModel, tiny
from common.plots import MAX_PNG_WIDTH
from tests.script_probe import run_script

PROJECT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ JSD and score


def test_jsd_bits_equals_scipy_squared_distance():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(30), size=50)
    q = rng.dirichlet(np.ones(30), size=50)
    p[:10, :5] = 0.0  # zeros in one distribution only
    p[:10] /= p[:10].sum(axis=1, keepdims=True)
    expected = np.array([jensenshannon(a, b, base=2) ** 2 for a, b in zip(p, q, strict=True)])
    np.testing.assert_allclose(cl.jsd_bits(p, q), expected, rtol=1e-9, atol=1e-12)
    assert cl.jsd_bits(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(1.0)
    assert np.isnan(cl.jsd_bits(np.array([np.nan, np.nan]), np.array([0.5, 0.5])))


def _counts_from_mix(mu: np.ndarray, sizes: list[int], rng: np.random.Generator) -> np.ndarray:
    return np.stack([rng.multinomial(n, mu) for n in sizes]).astype(np.float64)


def test_score_near_zero_for_a_random_sample_and_large_for_one_cluster():
    rng = np.random.default_rng(1)
    k = 50
    mu = rng.dirichlet(np.full(k, 2.0))
    sizes = [200, 500, 1000, 3000, 10000, 300]
    counts = _counts_from_mix(mu, sizes, rng)
    counts[-1] = 0.0
    counts[-1, 7] = 300  # the last expert receives one cluster only
    scores = cl.specialization_scores(counts, draws=20, rng=np.random.default_rng(2))
    assert scores["tokens"].tolist() == sizes
    random_experts = scores["score"][:-1]
    assert np.all(np.abs(random_experts) < 0.02), random_experts
    assert np.all(scores["jsd"][:-1] > 0) and np.all(scores["baseline"][:-1] > 0)  # the raw JSD is not 0: the baseline is needed
    assert scores["jsd"][0] > scores["jsd"][4]  # and it shrinks with the sample size
    assert scores["score"][-1] > 0.5
    assert scores["score"][-1] == pytest.approx(scores["jsd"][-1] - scores["baseline"][-1])


def test_baseline_is_the_expected_jsd_of_a_sample():
    """For n ≫ k, JSD(p̂ ‖ μ) ≈ χ² / (8 n ln 2) with E χ² = k − 1; and n = 0 has no baseline."""
    k, n = 20, 20000
    mu = np.full(k, 1 / k)
    baseline = cl.multinomial_jsd_baseline(mu, np.array([n, 0]), draws=200, rng=np.random.default_rng(0))
    assert baseline[0] == pytest.approx((k - 1) / (8 * n * np.log(2)), rel=0.1)
    assert np.isnan(baseline[1])
    again = cl.multinomial_jsd_baseline(mu, np.array([n, 0]), draws=200, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(baseline, again)  # seeded


def test_expert_without_tokens_and_empty_layer_give_nan():
    counts = np.array([[5.0, 5.0], [0.0, 0.0]])
    scores = cl.specialization_scores(counts, draws=5, rng=np.random.default_rng(0))
    assert np.isfinite(scores["score"][0]) and np.isnan(scores["score"][1]) and np.isnan(scores["jsd"][1])
    empty = cl.specialization_scores(np.zeros((3, 4)), draws=5, rng=np.random.default_rng(0))
    assert np.isnan(empty["score"]).all() and empty["tokens"].tolist() == [0, 0, 0]


def test_cluster_counts_sum_token_rows_by_cluster():
    table = np.array([[1, 0], [2, 3], [0, 4], [5, 6]])
    assignment = np.array([1, 0, 1, 0])
    np.testing.assert_array_equal(cl.cluster_counts(table, assignment, 3), [[7, 1, 0], [9, 4, 0]])


# ------------------------------------------------------------------------------------------------ k-means


def _planted(k: int = 6, per: int = 40, d: int = 24, noise: float = 0.1, seed: int = 0):
    """k orthogonal unit directions, `per` noisy copies of each (noise of norm ≈ `noise`), shuffled."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(d, k, generator=g)).Q.T  # [k, d], orthonormal
    labels = torch.arange(k).repeat_interleave(per)
    x = directions[labels] + noise * torch.randn(k * per, d, generator=g) / d**0.5
    order = torch.randperm(k * per, generator=g)
    return torch.nn.functional.normalize(x[order], dim=1), labels[order]


def test_kmeans_is_seeded_and_reproducible():
    x = torch.nn.functional.normalize(torch.randn(300, 16, generator=torch.Generator().manual_seed(3)), dim=1)
    a = cl.spherical_kmeans(x, 8, seed=5)
    b = cl.spherical_kmeans(x, 8, seed=5)
    assert torch.equal(a.assignment, b.assignment) and torch.equal(a.centroids, b.centroids)
    others = [cl.spherical_kmeans(x, 8, seed=s).assignment for s in range(6, 10)]
    assert any(not torch.equal(a.assignment, o) for o in others)  # unstructured data: seeds find other partitions


def test_kmeans_assigns_every_row_to_its_most_similar_centroid():
    x = torch.nn.functional.normalize(torch.randn(400, 12, generator=torch.Generator().manual_seed(4)), dim=1)
    result = cl.spherical_kmeans(x, 10, seed=0, max_iter=200)
    assert result.converged and result.iterations >= 1
    similarity = x @ result.centroids.T
    torch.testing.assert_close(similarity.max(dim=1).values, similarity[torch.arange(400), result.assignment])
    torch.testing.assert_close(result.similarity, similarity.max(dim=1).values)
    torch.testing.assert_close(result.centroids.norm(dim=1), torch.ones(10))
    means = torch.zeros(10, 12).index_add_(0, result.assignment, x)  # each centroid is its members' mean direction
    torch.testing.assert_close(result.centroids, torch.nn.functional.normalize(means, dim=1))
    capped = cl.spherical_kmeans(x, 10, seed=0, max_iter=1)  # stopped early: still nearest-centroid assignments
    similarity = x @ capped.centroids.T
    torch.testing.assert_close(similarity.max(dim=1).values, similarity[torch.arange(400), capped.assignment])


def test_kmeans_recovers_a_planted_partition():
    for planted_seed, seed in [(0, 0), (1, 1), (2, 2), (3, 3)]:
        x, labels = _planted(seed=planted_seed)
        found = cl.spherical_kmeans(x, 6, seed=seed).assignment
        contingency = np.zeros((6, 6), dtype=int)
        np.add.at(contingency, (labels.numpy(), found.numpy()), 1)
        assert ((contingency > 0).sum(axis=1) == 1).all() and ((contingency > 0).sum(axis=0) == 1).all(), contingency


def test_kmeans_edge_cases():
    x = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), dim=1)
    result = cl.spherical_kmeans(x, 4, seed=0)  # k = V with a duplicated row: no crash, every row assigned
    assert result.assignment.shape == (4,) and result.assignment[0] == result.assignment[1]
    assert sorted(cl.spherical_kmeans(x, 3, seed=1).sizes.tolist()) == [1, 1, 2]
    with pytest.raises(ValueError):
        cl.spherical_kmeans(x, 5)


def test_centred_unit_rows():
    w = torch.randn(50, 8, generator=torch.Generator().manual_seed(0)) + 3.0
    rows = cl.centred_unit_rows(w)
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(50))
    torch.testing.assert_close(rows, torch.nn.functional.normalize(w - w.mean(0), dim=1))


# ------------------------------------------------------------------------------------------------ output tokens


def test_output_tokens_are_the_logit_lens_top1_of_each_weighted_expert_output():
    model, tokenizer = tiny.build_random_model("olmoe", seed=0)
    moe = MoEModel(model, tokenizer, name="random:olmoe")
    layers = moe.layers[:2]
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    count_mask = torch.ones(2, 12, dtype=torch.bool)
    count_mask[1, 8:] = False
    acc = cl.ExpertOutputTokens(moe, layers, torch.device("cpu"))
    with capture(moe, layers, ("topk", "input")) as records:
        moe.forward(ids)
        acc.update(records, SimpleNamespace(count_mask=count_mask))
        expected = np.zeros((len(layers), moe.vocab_size, layers[0].num_choices), dtype=np.int64)
        with torch.no_grad():
            # expert_fn calls the experts module, whose capture hook would overwrite the records: copy them first
            seen = {m.layer: (records[m.layer].topk_index, records[m.layer].topk_weight, records[m.layer].expert_input)
                    for m in layers}
            for li, layer in enumerate(layers):
                index, weight, x = seen[layer.layer]
                for t in np.flatnonzero(count_mask.reshape(-1).numpy()).tolist():
                    for slot in range(index.shape[1]):
                        e = int(index[t, slot])
                        top = int(moe.unembed(weight[t, slot] * layer.expert_fn(e, x[t : t + 1])).argmax())
                        expected[li, top, e] += 1
    table = acc.table()
    np.testing.assert_array_equal(table, expected)
    assert table.sum() == 20 * layers[0].top_k * len(layers)


# ------------------------------------------------------------------------------------------------ the script


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster-data")
    (folder / "a.txt").write_text("Alpha beta gamma delta, epsilon. " * 40)
    (folder / "b.jsonl").write_text("\n".join(json.dumps({"text": f"print({i} + {i * 7})"}) for i in range(60)))
    return folder


def _argv(out: Path, data: Path, *extra: str) -> list[str]:
    return ["--model", "random:olmoe", "--data", f"prose={data / 'a.txt'}", f"code={data / 'b.jsonl'}",
            "--num_tokens", "150", "--seq_len", "32", "--batch_size", "8", "--out", str(out), "--no-progress",
            "--layers", "0", "-1", "--clusters", "4", "16", "--baseline_draws", "5", *extra]


def test_script_end_to_end(tmp_path, data):
    assert cluster.main(_argv(tmp_path, data)) == 0
    assert cluster.main(_argv(tmp_path, data, "--no-figures")) == 0
    first, second = sorted(p for p in tmp_path.glob("cluster/*/*/*") if p.is_dir())
    for name in ("cluster_scores.csv", "cluster_sizes.csv", "clusters_k4.json", "clusters_k16.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name  # seeded: identical reruns
    for name in ("cluster_scores_layer0", "cluster_scores_layer3", "cluster_scores_by_layer", "cluster_sizes"):
        assert (first / "figures" / f"{name}.png").is_file() and (first / "figures" / f"{name}.pdf").is_file()
    assert not (second / "figures").exists()
    for png in (first / "figures").glob("*.png"):  # A4 width, as every figure of the suite
        assert Image.open(png).size[0] <= MAX_PNG_WIDTH, png.name

    scores = pd.read_csv(first / "cluster_scores.csv")
    assert list(scores.columns) == ["layer", "expert", "k", "tokens", "jsd_input_bits", "baseline_input_bits",
                                    "score_input", "jsd_output_bits", "baseline_output_bits", "score_output"]
    assert set(scores.layer) == {0, 3} and set(scores.k) == {4, 16} and len(scores) == 2 * 2 * 8
    assert pd.api.types.is_integer_dtype(scores.tokens)
    picks = scores.groupby(["layer", "k"]).tokens.sum()
    assert (picks == 300 * 2).all()  # 300 counted tokens, top-2
    used = scores[scores.tokens > 0]
    for side in ("input", "output"):
        np.testing.assert_allclose(used[f"score_{side}"], used[f"jsd_{side}_bits"] - used[f"baseline_{side}_bits"])
        assert used[f"jsd_{side}_bits"].between(0, 1).all() and (used[f"baseline_{side}_bits"] > 0).all()

    info = json.loads((first / "run.json").read_text())
    assert [m["k"] for m in info["kmeans"]] == [4, 16]
    assignment = np.load(first / "cluster_assignment.npy")
    assert assignment.shape == (2, 259)
    members = json.loads((first / "clusters_k16.json").read_text())
    assert list(members) == [str(c) for c in range(16)]
    assert sum(len(v) for v in members.values()) == 259 and all(isinstance(t, str) for v in members.values() for t in v)
    assert [len(members[str(c)]) for c in range(16)] == np.bincount(assignment[1], minlength=16).tolist()
    sizes = pd.read_csv(first / "cluster_sizes.csv")
    assert sizes.groupby("k")["size"].sum().tolist() == [259, 259]
    counts = np.load(first / "cluster_counts_k16.npy")
    assert counts.shape == (2, 2, 8, 16)
    np.testing.assert_array_equal(counts.sum(axis=3)[0], counts.sum(axis=3)[1])  # one output token per pick
    layer0 = scores[(scores.layer == 0) & (scores.k == 16)].sort_values("expert")
    assert counts[0, 0].sum(axis=1).tolist() == layer0.tokens.tolist()



def test_default_cluster_counts_that_exceed_a_tiny_vocabulary_are_left_out_with_a_warning(tmp_path, data, capsys):
    """The defaults (10 50 100 1000) suit real vocabularies; on a 259-token random model k = 1000 is left out with
    one warning line instead of failing (given explicitly, it is an error: see BAD)."""
    argv = _argv(tmp_path, data, "--no-figures")
    at = argv.index("--clusters")
    del argv[at : at + 3]  # back to the default --clusters
    assert cluster.main(argv) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == ["cluster.py: warning: --clusters: leaving out 1000 (more clusters than the model's 259 "
                        "token ids)"]
    (run,) = [p for p in tmp_path.glob("cluster/*/*/*") if p.is_dir()]
    assert [m["k"] for m in json.loads((run / "run.json").read_text())["kmeans"]] == [10, 50, 100]
    assert sorted(pd.read_csv(run / "cluster_scores.csv").k.unique()) == [10, 50, 100]


BAD = {
    "one cluster": (["--clusters", "1"], "argument --clusters: must be at least 2 (got 1)"),
    "zero clusters": (["--clusters", "0"], "argument --clusters: must be at least 2 (got 0)"),
    "more clusters than tokens": (["--clusters", "10", "300"], "--clusters 300: more clusters than the model's 259 token ids"),
    "dense model": (["--model", "{dense}"], "has no MoE layers"),
    "no draws": (["--baseline_draws", "0"], "argument --baseline_draws: must be at least 1"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_one_line_exit_2_nothing_written(case, tmp_path, data, saved_dense_model, capsys):
    extra, message = BAD[case]
    extra = [e.format(dense=saved_dense_model) for e in extra]
    code = cluster.main(_argv(tmp_path / "results", data, *extra))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("cluster.py: error: ") and message in lines[0]
    assert not (tmp_path / "results").exists()


def test_help_does_not_import_torch():
    done, heavy = run_script("cluster.py", "--help")
    assert done.returncode == 0 and heavy == [], (done.stderr, heavy)
    assert "--clusters" in done.stdout and "about a minute" in done.stdout
