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
