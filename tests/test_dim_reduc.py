"""dim_reduc.py: the k-NN separation against a naive loop, the points against the experts themselves, a planted
model whose experts write to disjoint output dimensions (separable, and chance under permuted labels),
reproducible CSVs, and bad input refused in one line with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import dim_reduc
from common.analysis.embedding import expert_points, knn_accuracy, loo_neighbours, select_points
from common.config import ModelSpec
from common.model import MoEModel, load_moe, tiny
from tests.script_probe import run_script

ROOT = Path(__file__).resolve().parent.parent


def _naive_knn_accuracy(points: np.ndarray, labels: np.ndarray, k: int) -> float:
    hits = 0
    for i in range(len(points)):
        distances = [(float(np.linalg.norm(points[i] - points[j])), j) for j in range(len(points)) if j != i]
        nearest = [j for _, j in sorted(distances)[:k]]
        votes: dict[int, int] = {}
        for j in nearest:
            votes[int(labels[j])] = votes.get(int(labels[j]), 0) + 1
        best = max(votes.values())
        hits += min(label for label, count in votes.items() if count == best) == labels[i]
    return hits / len(points)


@pytest.mark.parametrize("k", [1, 4, 10, 200])
def test_knn_accuracy_equals_a_naive_leave_one_out_loop(k):
    rng = np.random.default_rng(k)
    labels = rng.integers(0, 4, size=70)
    points = rng.normal(size=(70, 5)) + labels[:, None] * 0.6  # partly separable
    assert knn_accuracy(points, labels, k) == pytest.approx(_naive_knn_accuracy(points, labels, min(k, 69)))
    neighbours = loo_neighbours(points, k)
    assert neighbours.shape == (70, min(k, 69)) and not (neighbours == np.arange(70)[:, None]).any()


def test_select_points_caps_each_expert_at_its_smallest_keys():
    rng = np.random.default_rng(0)
    index = torch.from_numpy(np.stack([rng.choice(6, 2, replace=False) for _ in range(200)]))
    key = torch.from_numpy(rng.random(200).astype(np.float32))
    tokens, experts, slots = select_points(index, key, num_experts=6, per_expert=7)
    assert np.array_equal(index.numpy()[tokens, slots], experts)
    for e in range(6):
        routed = np.nonzero((index.numpy() == e).any(1))[0]
        chosen = tokens[experts == e]
        assert len(chosen) == min(7, len(routed))
        assert np.array_equal(np.sort(chosen), np.sort(routed[np.argsort(key.numpy()[routed])[:7]]))


@pytest.mark.parametrize("weighted", [False, True])
def test_points_are_the_experts_outputs_on_their_routed_tokens(weighted):
    moe = load_moe(ModelSpec(model="random:olmoe", device="cpu", dtype="float32"))
    layer = moe.layers[1]
    generator = torch.Generator().manual_seed(1)
    tokens = 50
    index = torch.stack([torch.randperm(layer.num_experts, generator=generator)[:2] for _ in range(tokens)])
    sample = {"key": torch.rand(tokens, generator=generator),
              f"input_{layer.layer}": torch.randn(tokens, moe.hidden_size, generator=generator),
              f"topk_index_{layer.layer}": index, f"topk_weight_{layer.layer}": torch.rand(tokens, 2, generator=generator)}
    points = expert_points(layer, sample, per_expert=5, weighted=weighted)
    assert np.bincount(points.expert, minlength=layer.num_experts).max() <= 5
    for row in range(len(points)):
        t, e, slot = points.token[row], points.expert[row], points.slot[row]
        assert index[t, slot] == e
        weights = sample[f"topk_weight_{layer.layer}"][t]
        assert points.rank[row] == 1 + int((weights > weights[slot]).sum())
        expected = layer.expert_fn(int(e), sample[f"input_{layer.layer}"][t : t + 1])[0]
        w = sample[f"topk_weight_{layer.layer}"][t, slot]
        assert points.weight[row] == pytest.approx(float(w))
        torch.testing.assert_close(torch.from_numpy(points.outputs[row]), expected * w if weighted else expected,
                                   rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ planted model


def plant_disjoint_outputs(model: torch.nn.Module) -> None:
    """Expert e of every MoE layer writes only to output dimensions [e·b, (e+1)·b): its down-projection is zero
    elsewhere and positive there; up = gate makes its neurons silu(g)·g ≥ 0, so each expert's outputs lie on
    a narrow cone of its own block."""
    view = MoEModel(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for moe_layer in view.layers:
            block = moe_layer.expert_params(0).down.shape[0] // moe_layer.num_experts
            for e in range(moe_layer.num_experts):
                params = moe_layer.expert_params(e)
                params.up.copy_(params.gate)
                params.down.zero_()
                rows = slice(e * block, (e + 1) * block)
                params.down[rows] = 0.5 + 0.5 * torch.rand(params.down[rows].shape, generator=generator)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted-dim-reduc")
    model, tokenizer = tiny.build_random_model("olmoe")
    plant_disjoint_outputs(model)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "a.txt").write_text("The quick brown fox jumps over the lazy dog; alpha beta gamma delta. " * 30)
    (root / "b.jsonl").write_text("\n".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + 1"})
                                            for i in range(80)))
    return root


def _argv(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(root / "model"), "--data", f"prose={root / 'a.txt'}", f"code={root / 'b.jsonl'}",
            "--num_tokens", "300", "--seq_len", "48", "--batch_size", "8", "--out", str(out), "--no-progress", *extra]


def _run_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("dim_reduc/*/*/*") if p.is_dir())


@pytest.fixture(scope="module")
def planted_run(planted) -> Path:
    """The run folder of dim_reduc.py on the planted model: layers 1 and 3, both methods, unweighted."""
    out = planted / "out"
    assert dim_reduc.main(_argv(planted, out, "--layers", "1", "-1", "--per_expert", "40")) == 0
    (run,) = _run_dirs(out)
    return run


def test_planted_experts_separate(planted_run):
    run = planted_run
    for stem in ("umap_layer1_by_expert", "umap_layer3_by_domain", "pca_layer3_by_expert", "pca_layer1_by_domain"):
        assert (run / "figures" / f"{stem}.png").is_file() and (run / "figures" / f"{stem}.pdf").is_file()
    info = json.loads((run / "run.json").read_text())
    coords = pd.read_csv(run / "embedding_coords.csv", keep_default_na=False)
    sep = pd.read_csv(run / "separation.csv")
    assert set(coords.method) == {"umap", "pca"} and set(coords.layer) == {1, 3}
    assert {"layer", "method", "token_id", "token", "domain", "expert", "weight", "x", "y"} <= set(coords.columns)
    for (layer, _method), part in coords.groupby(["layer", "method"]):
        assert len(part) == info["points"][str(layer)] == part.point.nunique()  # one row per point
        assert (sep[sep.layer == layer].num_points == len(part)).all()
        assert part.groupby("expert").size().max() <= 40
        assert part.weight.between(0, 1).all() and set(part.domain) == {"prose", "code"}
        assert set(part["rank"]) == {1, 2}

    expert = sep[sep.label == "expert"].set_index(["layer", "space"])
    for layer in (1, 3):
        original = expert.loc[(layer, "original")]
        assert original.accuracy >= 0.97, original
        assert original.majority_baseline < 0.3 and original.num_classes >= 6 and original.k == 10
        assert expert.loc[(layer, "pca")].accuracy >= 0.5
        assert expert.loc[(layer, "umap")].accuracy >= 0.8
        assert (expert.loc[layer].accuracy_permuted <= 0.35).all()  # chance: 8 experts


def test_same_seed_same_csvs_and_weighted_scales_the_points(planted, planted_run):
    out = planted / "out-weighted"
    argv = _argv(planted, out, "--layers", "-1", "--per_expert", "40", "--method", "umap", "--weighted")
    assert dim_reduc.main(argv) == 0
    assert dim_reduc.main(argv) == 0
    first, second = _run_dirs(out)
    for name in ("embedding_coords.csv", "separation.csv"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    weighted = pd.read_csv(first / "embedding_coords.csv", keep_default_na=False)
    assert set(weighted.method) == {"umap"} and set(weighted.layer) == {3}
    plain = pd.read_csv(planted_run / "embedding_coords.csv", keep_default_na=False)
    plain = plain[(plain.layer == 3) & (plain.method == "umap")].reset_index(drop=True)
    columns = ["point", "token_id", "expert", "rank", "weight", "domain", "position"]
    assert plain[columns].equals(weighted[columns])  # the same points ...
    assert not np.allclose(plain[["x", "y"]].to_numpy(), weighted[["x", "y"]].to_numpy())  # ... embedded otherwise


BAD = {
    "per_expert 0": (["--per_expert", "0"], "argument --per_expert: must be at least 1 (got 0)"),
    "umap n_neighbors 1": (["--n_neighbors", "1"], "argument --n_neighbors: must be at least 2 (got 1)"),
    "unknown method": (["--method", "tsne"], "argument --method: invalid choice: 'tsne'"),
    "knn 0": (["--knn", "0"], "argument --knn: must be at least 1"),
    "dense layer": (["--model", "random:deepseek_v3", "--layers", "0"], "dense (non-MoE) layer; MoE layers: 1, 2, 3"),
    "fewer than 3 points": (["--num_tokens", "1", "--data", "{root}/a.txt"], "an embedding needs at least 3"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_one_line_exit_2_nothing_written(case, planted, tmp_path, capsys):
    extra, message = BAD[case]
    argv = [*_argv(planted, tmp_path / "results", "--layers", "1"), *(e.format(root=planted) for e in extra)]
    assert dim_reduc.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "results").exists()


def test_help_imports_neither_torch_nor_umap_nor_sklearn():
    result, heavy = run_script("dim_reduc.py", "--help")
    assert "--per_expert" in result.stdout and "about a minute" in result.stdout
    assert heavy == []
