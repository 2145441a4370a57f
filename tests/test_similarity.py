"""Expert-output similarity (common/analysis/similarity.py, sim.py): the all-pairs blocked computation against textbook
formulas written out pair by pair, its invariances, routed-only subsets, the memory plan, a planted model whose
twin experts must come out with CKA 1, and sim.py's outputs and input errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import sim
from common.analysis.similarity import (
    METHODS,
    ExpertOutputs,
    KernelStats,
    TensorOutputs,
    cluster_order,
    expert_similarities,
    median_distance,
    pair_summary,
    plan_blocks,
)
from common.errors import InputError
from common.plots import MAX_PNG_WIDTH
from tests.planted_similarity import save_rotated_twin
from tests.script_probe import run_script

ROOT = Path(__file__).resolve().parent.parent
F64 = torch.float64


def _outputs(rows=5, n=23, width=6, seed=0, offset=2.0) -> torch.Tensor:
    """Random outputs with correlated rows (a shared part plus noise) and a common offset (tests centring)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, width, generator=g, dtype=F64)
    mix = torch.rand(rows, 1, 1, generator=g, dtype=F64)
    noise = torch.randn(rows, n, width, generator=g, dtype=F64)
    return mix * base + (1 - mix) * noise + offset


def _similarities(y, methods=METHODS, **kwargs):
    return expert_similarities(TensorOutputs(y, F64), methods, dtype=F64, **kwargs)


# ------------------------------------------------------------------------------------- reference formulas
def _centre(y):
    return y - y.mean(0, keepdim=True)


def _feature_cka(yi, yj):
    """‖YᵢᵀYⱼ‖²_F / (‖YᵢᵀYᵢ‖_F ‖YⱼᵀYⱼ‖_F) on column-centred Y."""
    yi, yj = _centre(yi), _centre(yj)
    return float((yi.T @ yj).norm() ** 2 / ((yi.T @ yi).norm() * (yj.T @ yj).norm()))


def _hsic_biased(ka, kb):
    n = ka.shape[0]
    h = torch.eye(n, dtype=F64) - torch.ones(n, n, dtype=F64) / n
    return float(torch.trace(ka @ h @ kb @ h))


def _hsic_song(ka, kb):
    """Song et al. (2012), eq. 5, term by term with explicit loops over index tuples (K = ka, L = kb)."""
    n = ka.shape[0]
    trace = sum(ka[i, j] * kb[j, i] for i in range(n) for j in range(n) if i != j)  # tr(K̃L̃)
    sum_k = sum(ka[i, j] for i in range(n) for j in range(n) if i != j)  # 1ᵀK̃1
    sum_l = sum(kb[i, j] for i in range(n) for j in range(n) if i != j)  # 1ᵀL̃1
    path = sum(ka[i, j] * kb[j, q] for i in range(n) for j in range(n) for q in range(n) if i != j and j != q)  # 1ᵀK̃L̃1
    return float((trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * path) / (n * (n - 3)))


def _cka(ka, kb, hsic):
    return hsic(ka, kb) / np.sqrt(hsic(ka, ka) * hsic(kb, kb))


def _linear(y):
    return y @ y.T


def _rbf(y, sigma):
    return torch.exp(-torch.cdist(y, y) ** 2 / (2 * sigma**2))


# ------------------------------------------------------------------------------------- formulas
def test_linear_cka_equals_feature_space_and_gram_forms():
    y = _outputs()
    result = _similarities(y, ["cka"]).matrices["cka"]
    single = expert_similarities(TensorOutputs(y), ["cka"], block=7).matrices["cka"]  # float32, blocked
    for i in range(y.shape[0]):
        for j in range(y.shape[0]):
            feature = _feature_cka(y[i], y[j])
            gram = _cka(_linear(y[i]), _linear(y[j]), _hsic_biased)
            assert abs(feature - gram) < 1e-10
            assert abs(float(result[i, j]) - feature) < 1e-10
            assert abs(float(single[i, j]) - feature) < 1e-5


def test_cka_is_invariant_to_orthogonal_maps_scale_and_offset():
    x = _outputs(rows=1, n=40, width=6)[0]
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(3), dtype=F64))
    other = _outputs(rows=1, n=40, width=6, seed=9)[0]
    y = torch.stack([x, -2.5 * x @ q + torch.linspace(-3, 4, 6, dtype=F64), other])
    result = _similarities(y, ["cka", "cka-debiased", "cka-rbf"], block=9)  # RBF: median σ scales with c
    for method, matrix in result.matrices.items():
        assert abs(float(matrix[0, 1]) - 1) < 1e-5, method
        assert float(matrix[0, 2]) < 0.9, method


def test_debiased_cka_equals_song_unbiased_hsic_term_by_term():
    y = _outputs(rows=3, n=8, width=3)
    result = _similarities(y, ["cka-debiased"], block=3).matrices["cka-debiased"]
    for i in range(3):
        for j in range(3):
            expected = _cka(_linear(y[i]), _linear(y[j]), _hsic_song)
            assert abs(float(result[i, j]) - expected) < 1e-10


def test_unbiased_hsic_is_the_u_statistic():
    """The closed form used equals the U-statistic it estimates: the mean over ordered distinct (i, j, q, r) of
    k_ij (l_ij + l_qr − 2 l_iq)."""
    import itertools

    y = _outputs(rows=2, n=7, width=3)
    ka, kb = _linear(y[0]), _linear(y[1])
    tuples = list(itertools.permutations(range(7), 4))
    ustat = sum(float(ka[i, j] * (kb[i, j] + kb[q, r] - 2 * kb[i, q])) for i, j, q, r in tuples) / len(tuples)
    stats = KernelStats(2, 7, dtype=F64)
    stats.add(torch.stack([ka, kb]), slice(0, 7), slice(0, 7))
    cross, _ = stats.hsic(unbiased=True)
    assert abs(float(cross[0, 1]) - ustat) < 1e-10
    assert abs(_hsic_song(ka, kb) - ustat) < 1e-10


def test_rbf_cka_and_median_heuristic():
    y = _outputs(rows=3, n=15, width=4)
    result = _similarities(y, ["cka-rbf"], block=4)
    for r in range(3):
        distances = torch.pdist(y[r]).numpy()
        assert abs(float(result.sigmas[r]) - float(np.median(distances))) < 1e-10
        assert abs(median_distance(y[r]) - float(np.median(distances))) < 1e-10
    for i in range(3):
        for j in range(3):
            ka, kb = _rbf(y[i], result.sigmas[i]), _rbf(y[j], result.sigmas[j])
            assert abs(float(result.matrices["cka-rbf"][i, j]) - _cka(ka, kb, _hsic_biased)) < 1e-10
    given = _similarities(y, ["cka-rbf"], sigma=1.7)
    ka, kb = _rbf(y[0], 1.7), _rbf(y[2], 1.7)
    assert abs(float(given.matrices["cka-rbf"][0, 2]) - _cka(ka, kb, _hsic_biased)) < 1e-10


def test_cosine_equals_a_per_token_loop():
    y = _outputs(offset=0.0)
    y[2, 5] = 0  # a zero output counts as cosine 0
    result = _similarities(y, ["cosine"], token_block=4).matrices["cosine"]
    n = y.shape[1]
    for i in range(y.shape[0]):
        for j in range(y.shape[0]):
            total = 0.0
            for a in range(n):
                u, v = y[i, a], y[j, a]
                if u.norm() > 0 and v.norm() > 0:
                    total += float(u @ v / (u.norm() * v.norm()))
            assert abs(float(result[i, j]) - total / n) < 1e-12


@pytest.mark.parametrize("routed", [False, True])
def test_blocked_equals_unblocked_for_every_block_size(routed):
    y = _outputs(n=21)
    mask = (torch.rand(5, 21, generator=torch.Generator().manual_seed(1)) < 0.6).double() if routed else None
    whole = _similarities(y, mask=mask)
    for block in (1, 3, 7, 21):
        part = _similarities(y, mask=mask, block=block, token_block=block)
        for method in METHODS:
            assert torch.allclose(part.matrices[method], whole.matrices[method], atol=1e-10, equal_nan=True), (
                method, block)


def test_routed_only_equals_each_pair_on_its_own_tokens():
    rows, n, min_tokens = 5, 30, 6
    y = _outputs(rows=rows, n=n)
    g = torch.Generator().manual_seed(4)
    mask = (torch.rand(rows, n, generator=g) < torch.tensor([0.9, 0.7, 0.5, 0.3, 0.15])[:, None]).double()
    result = _similarities(y, mask=mask, min_pair_tokens=min_tokens, block=4, token_block=5)
    sig = result.sigmas  # per expert, from all tokens
    checked = {"nan": 0, "value": 0}
    for i in range(rows):
        for j in range(rows):
            subset = torch.nonzero(mask[i].bool() & mask[j].bool()).view(-1)
            shared = len(subset)
            assert float(result.tokens[i, j]) == shared
            yi, yj = y[i, subset], y[j, subset]
            if shared < min_tokens:
                assert all(torch.isnan(result.matrices[m][i, j]) for m in METHODS)
                checked["nan"] += 1
                continue
            cos = float(torch.nn.functional.cosine_similarity(yi, yj, dim=1).mean())
            expected = {
                "cosine": cos,
                "cka": _feature_cka(yi, yj),
                "cka-debiased": _cka(_linear(yi), _linear(yj), _hsic_song) if shared >= 4 else float("nan"),
                "cka-rbf": _cka(_rbf(yi, sig[i]), _rbf(yj, sig[j]), _hsic_biased),
            }
            for method, value in expected.items():
                got = float(result.matrices[method][i, j])
                assert (np.isnan(got) and np.isnan(value)) or abs(got - value) < 1e-9, (method, i, j)
            checked["value"] += 1
    assert checked["nan"] > 0 and checked["value"] > 0


def test_debiased_is_nan_below_four_tokens():
    y = _outputs(rows=2, n=12)
    mask = torch.ones(2, 12, dtype=F64)
    mask[1, 3:] = 0  # the pair shares 3 tokens
    result = _similarities(y, ["cka", "cka-debiased"], mask=mask)
    assert torch.isnan(result.matrices["cka-debiased"][0, 1]) and not torch.isnan(result.matrices["cka"][0, 1])


# ------------------------------------------------------------------------------------- memory plan
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("rbf", [False, True])
def test_plan_stays_within_the_budget(masked, rbf):
    plan = plan_blocks(65, 10_000, 2048, masked=masked, rbf=rbf, budget_mb=512)
    assert plan.estimate_mb <= 512 and 1 <= plan.block < 10_000 and not plan.cache
    small = plan_blocks(16, 10_000, 128, masked=False, rbf=rbf, budget_mb=512)
    assert small.cache and small.estimate_mb <= 512
    with pytest.raises(InputError, match="--block_mb 1 is too small"):
        plan_blocks(64, 10_000, 2048, masked=True, rbf=rbf, budget_mb=1)


def test_cluster_order_groups_similar_rows_and_summary_names_the_best_pair():
    m = np.array([[1, 0.9, 0.1, 0.2], [0.9, 1, 0.15, 0.1], [0.1, 0.15, 1, 0.8], [0.2, 0.1, 0.8, 1]])
    order, tree = cluster_order(m)
    assert {frozenset(order[:2]), frozenset(order[2:])} == {frozenset({0, 1}), frozenset({2, 3})}
    assert tree is not None
    summary = pair_summary(m, ["0", "1", "2", "3"], has_shared=False)
    assert (summary["most_similar_i"], summary["most_similar_j"], summary["most_similar_value"]) == ("0", "1", 0.9)
    assert (summary["least_similar_i"], summary["least_similar_j"]) == ("0", "2")
    assert summary["nan_pairs"] == 0 and summary["pairs"] == 6


# ------------------------------------------------------------------------------------- sim.py
@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sim-data")
    (folder / "a.txt").write_text("Alpha beta gamma delta epsilon. The quick brown fox jumps. " * 40)
    (folder / "b.jsonl").write_text("\n".join(json.dumps({"text": f"def f{i}(x): return x * {i} + 1"})
                                              for i in range(80)))
    return folder


def _argv(out: Path, data: Path, *extra: str) -> list[str]:
    return ["--data", f"prose={data / 'a.txt'}", f"code={data / 'b.jsonl'}", "--seq_len", "64",
            "--batch_size", "4", "--out", str(out), "--no-progress", *extra]


def _run_dir(out: Path) -> Path:
    (run,) = [p for p in out.glob("sim/*/*/*") if p.is_dir()]
    return run


def test_planted_twin_experts_have_cka_one(tmp_path, data_files):
    model = save_rotated_twin(tmp_path / "twin", layer=1, source=0, twin=1)
    argv = _argv(tmp_path / "out", data_files, "--model", str(model), "--layers", "1", "--num_tokens", "301",
                 "--method", "CKA", "cka-debiased", "--block_mb", "1")
    assert sim.main(argv) == 0
    run = _run_dir(tmp_path / "out")
    info = json.loads((run / "run.json").read_text())
    assert info["sample"]["num_tokens"] == 301 and info["sample"]["per_domain"] == {"prose": 151, "code": 150}
    assert info["blocks"]["1"]["block_tokens"] < 301  # --block_mb 1 forces several token blocks
    for method in ("cka", "cka-debiased"):
        matrix = np.load(run / f"similarity_{method}.npy")
        assert matrix.shape == (1, 8, 8)
        assert abs(matrix[0, 0, 1] - 1) < 1e-5 and abs(matrix[0, 1, 0] - 1) < 1e-5
        others = matrix[0][~np.eye(8, dtype=bool)]
        others = np.delete(others, [0, 7])  # (0, 1) and (1, 0) in row-major order without the diagonal
        assert others.max() < 0.9, method
    summary = pd.read_csv(run / "similarity_summary.csv")
    best = summary[summary.method == "cka"].iloc[0]
    assert {str(best.most_similar_i), str(best.most_similar_j)} == {"0", "1"} and best.nan_pairs == 0
    table = pd.read_csv(run / "similarity.csv")
    assert list(table.columns) == ["layer", "expert_i", "expert_j", "method", "value", "tokens"]
    assert len(table) == 2 * 64 and (table.tokens == 301).all()
    order = pd.read_csv(run / "cluster_order.csv")
    assert sorted(order[order.method == "cka"].expert) == list(range(8))
    for method in ("cka", "cka-debiased"):
        with Image.open(run / "figures" / f"similarity_{method}_layer1.png") as image:
            assert image.width <= MAX_PNG_WIDTH
    assert "Undocumented" not in (run / "README.md").read_text()  # every file and column is in common/run/outputs.py


def test_shared_experts_and_routed_only(tmp_path, data_files):
    argv = _argv(tmp_path, data_files, "--model", "random:qwen2_moe", "--layers", "1", "--num_tokens", "120",
                 "--method", "cosine", "cka-debiased", "cka-rbf", "cka", "--routed-only", "--min_pair_tokens", "10")
    assert sim.main(argv) == 0
    run = _run_dir(tmp_path)
    table = pd.read_csv(run / "similarity.csv", dtype={"expert_i": str, "expert_j": str})
    assert set(table.method) == set(METHODS)
    assert "Undocumented" not in (run / "README.md").read_text()
    shared = table[(table.expert_i == "shared") & (table.expert_j == "shared")]
    assert (shared.tokens == 120).all()  # the shared experts see every token
    tokens = np.load(run / "similarity_tokens.npy")[0]
    assert tokens.shape == (9, 9) and (tokens[8, :8] == np.diag(tokens)[:8]).all()  # shared vs e: e's tokens
    cka = np.load(run / "similarity_cka.npy")[0]
    few = tokens < 10
    assert np.isnan(cka[few]).all() and not np.isnan(cka[~few]).any()
    summary = pd.read_csv(run / "similarity_summary.csv")
    assert (summary.nan_pairs == int(np.triu(few, 1).sum())).all()
    assert summary.mean_vs_shared.notna().all()
    sigma = pd.read_csv(run / "rbf_sigma.csv")
    assert len(sigma) == 9 and (sigma.sigma > 0).all()


BAD = {
    "unknown method": (["--method", "cka", "procrustes"], "argument --method: invalid choice: 'procrustes'"),
    "one token": (["--num_tokens", "1"], "argument --num_tokens: must be at least 2 (got 1)"),
    "zero pair tokens": (["--min_pair_tokens", "0"], "argument --min_pair_tokens: must be at least 1 (got 0)"),
    "dense layer": (["--model", "random:deepseek_v3", "--layers", "0"], "dense (non-MoE) layer; MoE layers: 1, 2, 3"),
    "negative sigma": (["--sigma", "-1"], "argument --sigma: must be positive"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_one_line_exit_2_nothing_written(case, tmp_path, data_files, capsys):
    extra, message = BAD[case]
    code = sim.main(_argv(tmp_path / "results", data_files, "--model", "random:olmoe", *extra))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert message in lines[0] and "Traceback" not in err
    assert not (tmp_path / "results").exists()


def test_flag_errors_and_help_do_not_import_torch():
    for flags, code in ((["--method", "nope"], 2), (["--num_tokens", "1"], 2), (["--help"], 0)):
        result, heavy = run_script("sim.py", *flags)
        assert result.returncode == code and heavy == [], (flags, result.stderr, heavy)


def test_method_names_agree():
    assert sim.METHODS == METHODS
    assert sim.chosen_methods(["all"]) == list(METHODS)
    assert sim.chosen_methods(["cka", "cosine", "cka"]) == ["cosine", "cka"]
    assert sim.domain_quotas(10, 3) == [4, 3, 3] and sum(sim.domain_quotas(10_000, 6)) == 10_000


def test_recomputed_outputs_equal_the_held_ones():
    """ExpertOutputs (experts applied per token block, shared row held) gives the cache's numbers."""
    from common.config import ModelSpec
    from common.model import all_expert_outputs, load_moe

    moe = load_moe(ModelSpec(model="random:olmoe", device="cpu", dtype="float32"))
    layer = moe.layers[1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, moe.hidden_size, generator=g)
    shared = torch.randn(40, moe.hidden_size, generator=g)
    held = torch.cat([all_expert_outputs(layer, x), shared[None]])
    source = ExpertOutputs(layer, x, shared, max_elements=500)
    assert torch.allclose(source(slice(3, 17)), held[:, 3:17], atol=1e-6)
    assert torch.allclose(source(torch.tensor([5, 1, 30]), rows=[2, 8]), held[[2, 8]][:, [5, 1, 30]], atol=1e-6)
    assert torch.allclose(source.all(7).y, held, atol=1e-6)
    a = expert_similarities(source, METHODS, block=6, token_block=9)
    b = expert_similarities(TensorOutputs(held), METHODS)
    for method in METHODS:
        assert torch.allclose(a.matrices[method], b.matrices[method], atol=1e-5), method
