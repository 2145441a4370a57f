"""compare.py: planted runs (run.json and CSVs written here with known values) give a comparison table equal to those
values and a gap-vs-sparsity correlation equal to scipy's; bad input is refused in one line with nothing written;
two tiny real runs give every figure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import compare
from common.analysis import comparison

# (model id, decoder layers, E, k) of the planted models
PLANTED = [("org/alpha", 4, 8, 2), ("org/beta", 6, 64, 8), ("org/gamma", 3, 32, 1), ("org/delta", 5, 16, 4)]


def _write_run(root: Path, script: str, model: str, layers: int, experts: int, top_k: int, *, data: str = "demo",
               num_tokens: int = 300) -> Path:
    folder = root / script / model.replace("/", "-") / data / "20260101-000000"
    folder.mkdir(parents=True)
    info = {"script": script, "run_id": folder.name, "model": model,
            "arguments": {"model": model, "revision": None, "data": [data], "num_tokens": num_tokens},
            "model_info": {"model": model, "revision": None, "architecture": "PlantedForCausalLM", "dtype": "float32",
                           "num_decoder_layers": layers,
                           "moe_layers": [{"layer": i, "num_experts": experts, "top_k": top_k, "shared_experts": 1}
                                          for i in range(layers)]},
            "tokens": {"domains": {"code": {"counted": num_tokens}, "prose": {"counted": num_tokens}}}}
    (folder / "run.json").write_text(json.dumps(info))
    return folder


def _entropy_value(model_index: int, layer: int) -> float:
    return 0.1 * model_index + 0.01 * layer + 0.5


def _decisive_runs(root: Path) -> list[Path]:
    folders = []
    for index, (model, layers, experts, top_k) in enumerate(PLANTED[:3]):
        folder = _write_run(root, "router_decisive", model, layers, experts, top_k)
        rows = [{"metric": metric, "layer": layer, "domain": domain, "count": 300,
                 "mean": _entropy_value(index, layer) + (0.2 if metric != "entropy_normalized" else 0)
                 + (0.05 if domain == "code" else 0)}
                for metric in ("entropy_normalized", "topk_entropy_normalized", "top1_prob", "top1_top2_margin",
                               "topk_mass", "entropy")
                for layer in range(layers) for domain in ("code", "all")]
        pd.DataFrame(rows).to_csv(folder / "entropy_summary.csv", index=False)
        folders.append(folder)
    return folders


def test_planted_comparison_table_equals_the_written_values(tmp_path):
    folders = _decisive_runs(tmp_path / "runs")
    assert compare.main([*map(str, folders), "--out", str(tmp_path / "out"), "--metrics", "entropy_normalized"]) == 0
    [folder] = list((tmp_path / "out" / "compare").glob("*/*/*"))
    table = pd.read_csv(folder / "comparison.csv")
    assert len(table) == sum(layers for _, layers, _, _ in PLANTED[:3]) * 2  # layers × (code, all)
    for index, (model, layers, experts, top_k) in enumerate(PLANTED[:3]):
        part = table[(table["model"] == model) & (table["domain"] == "all")].sort_values("layer")
        assert part["layer"].tolist() == list(range(layers))
        assert np.allclose(part["value"], [_entropy_value(index, layer) for layer in range(layers)])
        assert np.allclose(part["relative_depth"], np.arange(layers) / (layers - 1))
        assert set(part["num_experts"]) == {experts} and set(part["top_k"]) == {top_k}
        assert np.allclose(part["sparsity"], top_k / experts)
        assert set(part["layers"]) == {layers} and set(part["tokens"]) == {600} and set(part["shared_experts"]) == {1}
    code = table[(table["model"] == "org/beta") & (table["domain"] == "code") & (table["layer"] == 5)]
    assert code["value"].item() == pytest.approx(_entropy_value(1, 5) + 0.05)
    assert sorted(p.name for p in (folder / "figures").iterdir()) == ["by_depth_entropy_normalized.pdf",
                                                                        "by_depth_entropy_normalized.png"]
    assert json.loads((folder / "run.json").read_text())["compared_script"] == "router_decisive"


def _probing_runs(root: Path, gaps: dict[str, list[float]]) -> list[Path]:
    """Probing runs whose best-layer F1 gives, per model, concept gaps `gaps[model]` (dense) and twice them (random)."""
    folders = []
    for model, layers, experts, top_k in PLANTED:
        folder = _write_run(root, "probing", model, layers, experts, top_k)
        rows = []
        for concept, gap in zip(("digit", "keyword", "bracket"), gaps[model], strict=True):
            for probe_k in (1, 4):
                moe = 0.6 + 0.01 * probe_k
                rows += [{"concept": concept, "model": "moe", "selection": "ranked", "k": probe_k, "f1": moe,
                          "layer": 1, "expert": "3"},
                         {"concept": concept, "model": "dense", "selection": "ranked", "k": probe_k, "f1": moe - gap,
                          "layer": 0, "expert": "dense"},
                         {"concept": concept, "model": "moe", "selection": "random", "k": probe_k,
                          "f1": moe - 2 * gap, "layer": 2, "expert": "5"}]
        pd.DataFrame(rows).to_csv(folder / "probing_best_layer.csv", index=False)
        folders.append(folder)
    return folders


def test_planted_gap_vs_sparsity_matches_scipy(tmp_path):
    gaps = {"org/alpha": [0.10, 0.30, 0.20], "org/beta": [0.05, 0.01, 0.02], "org/gamma": [0.40, 0.20, 0.35],
            "org/delta": [0.15, 0.12, 0.01]}
    folders = _probing_runs(tmp_path / "runs", gaps)
    assert compare.main([str(tmp_path / "runs"), "--script", "probing", "--out", str(tmp_path / "out")]) == 0
    [folder] = list((tmp_path / "out" / "compare").glob("*/*/*"))
    points = pd.read_csv(folder / "gap_vs_sparsity.csv")
    fits = pd.read_csv(folder / "gap_correlation.csv")
    assert len(points) == len(folders) * 2 * 2  # models × baselines × probe k
    sparsity = {model: top_k / experts for model, _, experts, top_k in PLANTED}
    medians = {model: float(np.median(values)) for model, values in gaps.items()}
    for baseline, factor in (("dense", 1), ("random", 2)):
        part = points[(points["baseline"] == baseline) & (points["probe_k"] == 1)].set_index("label")
        for model in gaps:
            assert part.loc[model, "median_gap"] == pytest.approx(factor * medians[model])
            assert part.loc[model, "sparsity"] == pytest.approx(sparsity[model])
            assert part.loc[model, "concepts"] == 3
        x = [sparsity[m] for m in gaps]
        y = [factor * medians[m] for m in gaps]
        expected = stats.spearmanr(x, y)
        slope, intercept = np.polyfit(np.log10(x), y, 1)
        fit = fits[(fits["baseline"] == baseline) & (fits["probe_k"] == 1)].iloc[0]
        assert fit["spearman_rho"] == pytest.approx(expected.statistic)
        assert fit["p_value"] == pytest.approx(expected.pvalue)
        assert (fit["slope"], fit["intercept"]) == pytest.approx((slope, intercept))
        assert fit["models"] == 4
    # sparsity order alpha .25, beta .125, gamma .03125, delta .25: the sparsest has the largest gap, ρ < 0
    assert fits["spearman_rho"].lt(0).all()
    assert (folder / "figures" / "gap_vs_sparsity.png").is_file()
    table = pd.read_csv(folder / "comparison.csv")
    assert len(table) == 4 * 3 * 2 * 3 and set(table["metric"]) == {"best_layer_f1"}


def _refused(capsys, tmp_path: Path, argv: list[str]) -> str:
    out = tmp_path / "out"
    assert compare.main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("compare.py: error: "), err
    assert not out.exists() or not any(out.rglob("*")), "a refused comparison wrote something"
    return err[0]


def test_bad_inputs_are_refused_in_one_line(tmp_path, capsys):
    folders = _decisive_runs(tmp_path / "runs")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a run folder" in _refused(capsys, tmp_path, [str(empty), str(folders[0])])
    assert "at least two" in _refused(capsys, tmp_path, [str(folders[0])])
    other = _write_run(tmp_path / "runs", "router_metrics", "org/zeta", 2, 4, 1)
    assert "different scripts" in _refused(capsys, tmp_path, [str(folders[0]), str(other)])
    assert "lack load_balance_cv" in _refused(capsys, tmp_path, [*map(str, folders), "--metrics", "load_balance_cv"])
    (folders[1] / "entropy_summary.csv").unlink()
    assert "has no entropy_summary.csv" in _refused(capsys, tmp_path, [*map(str, folders)])
    french = _write_run(tmp_path / "runs", "router_decisive", "org/eta", 2, 4, 1, data="french")
    assert "different data" in _refused(capsys, tmp_path, [str(folders[0]), str(french)])


@pytest.mark.slow  # 17 s: two real runs; the planted tests cover the numbers
def test_end_to_end_on_two_tiny_real_runs(tmp_path):
    import router_decisive

    runs = tmp_path / "runs"
    for model in ("demo", "random:mixtral"):
        assert router_decisive.main(["--model", model, "--num_tokens", "300", "--no-progress", "--threads", "1",
                                     "--out", str(runs)]) == 0
    assert compare.main([str(runs), "--script", "router_decisive", "--out", str(tmp_path / "out")]) == 0
    [folder] = list((tmp_path / "out" / "compare").glob("*/*/*"))
    table = pd.read_csv(folder / "comparison.csv")
    assert set(table["model"]) == {"demo", "random:mixtral"}
    assert set(table.loc[table["model"] == "demo", "sparsity"]) == {2 / 16}
    for metric in comparison.metric_names("router_decisive"):
        assert (folder / "figures" / f"by_depth_{metric}.png").is_file()
    assert "Undocumented" not in (folder / "README.md").read_text()


# ------------------------------------------------------------------------------------------ checkpoints, sweeps
def test_training_position_reads_steps_tokens_and_the_final_branch():
    assert comparison.training_position("step5000-tokens20B") == (5000, "step")
    assert comparison.training_position("stage1-step10000-tokens42B") == (10000, "step")
    assert comparison.training_position("tokens20B") == (2e10, "tokens")
    assert comparison.training_position("main") == (float("inf"), "final")
    assert comparison.training_position("v1.0") is None


def _checkpoint_runs(root: Path, revisions: list[str], *, script: str = "router_decisive") -> list[Path]:
    """Runs of one model at `revisions`, entropy = 0.1 × (index of the revision in training order) + 0.01 × layer."""
    folders = []
    order = {"step100": 0, "step250": 1, "step1000": 2, "main": 3}
    for revision in revisions:
        folder = _write_run(root / revision, script, "demo", 3, 16, 2)
        info = json.loads((folder / "run.json").read_text())
        info["model_info"]["revision"] = None if revision == "main" else revision
        (folder / "run.json").write_text(json.dumps(info))
        rows = [{"metric": metric, "layer": layer, "domain": "all", "count": 300,
                 "mean": 0.1 * order[revision] + 0.01 * layer}
                for metric in ("entropy_normalized", "topk_entropy_normalized", "top1_prob", "top1_top2_margin",
                               "topk_mass") for layer in range(3)]
        pd.DataFrame(rows).to_csv(folder / "entropy_summary.csv", index=False)
        folders.append(folder)
    return folders


def test_checkpoints_of_one_model_are_drawn_in_training_order(tmp_path):
    """Runs given out of order (step1000, main, step100, step250) come out in training order, main last, with one
    over-training figure per metric; a sweep's record folder names the same runs."""
    folders = _checkpoint_runs(tmp_path / "runs", ["step1000", "main", "step100", "step250"])
    assert compare.main([*map(str, folders), "--out", str(tmp_path / "out"), "--metrics", "entropy_normalized"]) == 0
    [folder] = list((tmp_path / "out" / "compare").glob("*/*/*"))
    table = pd.read_csv(folder / "comparison.csv")
    labels = list(dict.fromkeys(table["label"]))
    assert labels == ["demo@step100", "demo@step250", "demo@step1000", "demo@main"]
    first_layer = table[table["layer"] == 0].set_index("label")["value"]
    assert np.allclose(first_layer[labels], [0.0, 0.1, 0.2, 0.3])
    assert (folder / "figures" / "over_training_entropy_normalized.png").is_file()
    assert json.loads((folder / "run.json").read_text())["checkpoints"] is True

    records = tmp_path / "runs" / ".sweep"
    records.mkdir()
    for i, run in enumerate(folders):
        (records / f"job{i}.json").write_text(json.dumps({"job": {}, "run": str(run)}))
    (records / "gone.json").write_text(json.dumps({"job": {}, "run": str(tmp_path / "deleted")}))
    assert comparison.find_runs(records) == folders


def test_checkpoint_saturation_comes_from_the_run_that_measured_most(tmp_path):
    folders = _checkpoint_runs(tmp_path / "runs", ["step100", "main"])
    for folder, positions in zip(folders, (1, 3), strict=True):
        rows = [{"position": p, "revision": f"step{p}", "final": "main", "layer": layer, "topk_overlap": 0.2 * p,
                 "top1_agreement": 0.1 * p, "tokens": 50} for p in range(positions) for layer in range(3)]
        pd.DataFrame(rows).to_csv(folder / "saturation.csv", index=False)
    assert compare.main([*map(str, folders), "--out", str(tmp_path / "out"), "--metrics", "entropy_normalized"]) == 0
    [folder] = list((tmp_path / "out" / "compare").glob("*/*/*"))
    saturation = pd.read_csv(folder / "saturation_over_training.csv")
    assert sorted(saturation["position"].unique()) == [0, 1, 2] and set(saturation["label"]) == {"demo@main"}
    assert (folder / "figures" / "saturation_over_training.png").is_file()


# ------------------------------------------------------------------------------------------ sim, logit_lens, interv
def test_similarity_lens_and_importance_metrics_read_the_written_values(tmp_path):
    roots = tmp_path / "runs"
    # sim: both runs computed cosine, only one CKA -> the default compares cosine alone
    sims = [_write_run(roots, "sim", model, layers, experts, top_k) for model, layers, experts, top_k in PLANTED[:2]]
    for i, folder in enumerate(sims):
        methods = ("cosine", "cka") if i == 0 else ("cosine",)
        rows = [{"layer": layer, "method": method, "mean_offdiag": 0.3 * i + 0.01 * layer + (0.5 if method == "cka" else 0)}
                for method in methods for layer in range(PLANTED[i][1])]
        pd.DataFrame(rows).to_csv(folder / "similarity_summary.csv", index=False)
    assert compare.main([*map(str, sims), "--out", str(tmp_path / "out-sim")]) == 0
    [folder] = list((tmp_path / "out-sim" / "compare").glob("*/*/*"))
    table = pd.read_csv(folder / "comparison.csv")
    assert set(table["metric"]) == {"similarity_cosine"}
    beta = table[table["model"] == "org/beta"].sort_values("layer")["value"]
    assert np.allclose(beta, 0.3 + 0.01 * np.arange(6))

    # logit_lens: the cosine at the smallest k′, and the perplexity curves on k′ and k′ / k
    lenses = [_write_run(roots, "logit_lens", model, layers, experts, top_k)
              for model, layers, experts, top_k in (PLANTED[0], PLANTED[1])]
    for i, folder in enumerate(lenses):
        k = PLANTED[i][3]
        pd.DataFrame([{"k_prime": kp, "layer": layer, "domain": "all", "mean": 0.9 - 0.1 * kp - 0.01 * layer}
                      for kp in range(1, k) for layer in range(PLANTED[i][1])]).to_csv(folder / "cosine_summary.csv",
                                                                                      index=False)
        pd.DataFrame([{"domain": "all", "k_prime": kp, "ppl": 10.0 / kp, "normalized_log_ppl": 1 + (k - kp) / k}
                      for kp in range(1, k + 1)]).to_csv(folder / "perplexity.csv", index=False)
    assert compare.main([*map(str, lenses), "--out", str(tmp_path / "out-lens")]) == 0
    [folder] = list((tmp_path / "out-lens" / "compare").glob("*/*/*"))
    table = pd.read_csv(folder / "comparison.csv")
    assert np.allclose(table.sort_values(["model", "layer"])["value"],
                       [0.8 - 0.01 * layer for layer in range(4)] + [0.8 - 0.01 * layer for layer in range(6)])
    perplexity = pd.read_csv(folder / "perplexity_by_k.csv")
    beta = perplexity[perplexity["model"] == "org/beta"]
    assert np.allclose(beta["k_fraction"], beta["k_prime"] / 8) and len(beta) == 8
    assert (folder / "figures" / "perplexity_vs_k.png").is_file()

    # interv: one importance table per layer, all read
    intervs = [_write_run(roots, "interv", model, layers, experts, top_k) for model, layers, experts, top_k in PLANTED[:2]]
    for i, folder in enumerate(intervs):
        for layer in (1, 3):
            pd.DataFrame([{"layer": layer, "domain": "all", "delta_nll_max": 0.5 * i + layer}]).to_csv(
                folder / f"importance_summary_layer{layer}.csv", index=False)
    assert compare.main([*map(str, intervs), "--out", str(tmp_path / "out-interv")]) == 0
    [folder] = list((tmp_path / "out-interv" / "compare").glob("*/*/*"))
    table = pd.read_csv(folder / "comparison.csv").sort_values(["model", "layer"])
    assert np.allclose(table["value"], [1, 3, 1.5, 3.5]) and set(table["table"]) == {"importance_summary_layer<L>"}
