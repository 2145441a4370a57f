"""weights.py against planted answers: routers and experts overwritten with known structure in a tiny OLMoE,
saved, and analysed through the script (the real loading path).

Planted: layers 0 and 1 route through row spaces with chosen principal angles (two of them 0: a shared plane);
layer 2's router is U·diag(s)·Vᵀ with a chosen spectrum; at layer 3 expert 0's gate rows contain its own router
row, the other experts stay random. References are computed here independently (numpy loops, float64).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import weights as script
from common.analysis.subspaces import effective_rank, principal_angles, row_cosine
from common.analysis.weights import analyze, find_router_weight
from common.errors import InputError
from common.model import find_moe_layers, tiny
from tests.conftest import ALL_MOE_TYPES
from tests.script_probe import run_script

ROOT = Path(__file__).resolve().parent.parent
H, E, WIDTH = 64, 8, 32  # the tiny OLMoE's hidden size, experts and expert width
THETAS = np.radians([0, 0, 10, 25, 40, 55, 70, 85])  # principal angles planted between layers 0 and 1
SPECTRUM = np.sqrt([50, 30, 10, 5, 2, 1.5, 0.9, 0.6])  # layer 2: variance shares 0.5 ... 0.006 -> 6 above 1%
TABLES = ["router_summary", "router_cosine", "router_spectra", "cross_layer", "principal_angles",
          "expert_weight_cosine", "expert_weight_summary", "router_expert_alignment"]
FIGURES = ["router_cosine", "cross_layer", "router_spectra", "expert_weight_cosine_gate", "expert_weight_cosine_up",
           "expert_weight_cosine_down", "router_expert_alignment"]


def _orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]


def _mixing(g: torch.Generator) -> torch.Tensor:
    """A well-conditioned random E × E matrix: rows become mixtures of the basis, the row space stays the same."""
    return _orthogonal(E, g) @ torch.diag(torch.linspace(1.0, 2.0, E, dtype=torch.float64)) @ _orthogonal(E, g)


def build_planted():
    model, tokenizer = tiny.build_random_model("olmoe")
    layers = find_moe_layers(model)
    g = torch.Generator().manual_seed(1)
    frame = _orthogonal(H, g)  # a random orthonormal frame, so nothing is axis-aligned
    basis_a = frame[:, :E]
    theta = torch.tensor(THETAS)
    basis_b = torch.cos(theta) * frame[:, :E] + torch.sin(theta) * frame[:, E:2 * E]
    with torch.no_grad():
        layers[0].router.weight.copy_(_mixing(g) @ basis_a.T)
        layers[1].router.weight.copy_(_mixing(g) @ basis_b.T)
        layers[2].router.weight.copy_(_orthogonal(E, g) @ torch.diag(torch.tensor(SPECTRUM)) @ frame[:, 2 * E:3 * E].T)
        r0 = layers[3].router.weight[0].clone()
        gate = layers[3].expert_params(0).gate  # a view into the fused parameter
        gate[5] = 0.3 * r0 + 0.7 * gate[5]  # r_0 is now a combination of two gate rows
        gate[9] = r0 - gate[5]
    return model, tokenizer, layers


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    model, tokenizer, layers = build_planted()
    path = tmp_path_factory.mktemp("planted-olmoe")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    out = tmp_path_factory.mktemp("results")
    argv = ["--model", str(path), "--out", str(out), "--no-progress", "--no-figures", "--num_random", "2000"]
    assert script.main(argv) == 0
    (run,) = [p for p in out.glob("weights/*/*/*") if p.is_dir()]
    return run, layers


def _table(run: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(run / f"{name}.csv")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def test_planted_principal_angles_and_alignment(planted):
    run, _ = planted
    angles = _table(run, "principal_angles")
    pair = angles[(angles.layer_a == 0) & (angles.layer_b == 1)].sort_values("component")
    np.testing.assert_allclose(pair.cosine, np.sort(np.cos(THETAS))[::-1], atol=1e-5)
    np.testing.assert_allclose(np.radians(pair.angle_deg), np.sort(THETAS), atol=1e-5)
    cross = _table(run, "cross_layer")
    row = cross[(cross.layer_a == 0) & (cross.layer_b == 1)].iloc[0]
    assert row.alignment == pytest.approx(np.cos(THETAS).mean(), abs=1e-5)
    assert row.rank_a == row.rank_b == E
    assert cross[(cross.layer_a == 1) & (cross.layer_b == 0)].alignment.iloc[0] == pytest.approx(row.alignment, abs=1e-12)
    matrices = np.load(run / "cross_layer.npy")  # [metric, layer_a, layer_b]
    assert matrices.shape == (4, 4, 4)
    assert matrices[3, 0, 1] == pytest.approx(row.alignment)
    np.testing.assert_allclose(np.diagonal(matrices[3]), 1.0, atol=1e-9)  # a row space with itself
    # the control: random 8-dim subspaces of R^64 are far less aligned than the planted pair
    assert row.alignment_random_mean < 0.5 < row.alignment and row.alignment_z > 5


def test_principal_angles_of_subspaces_of_different_dimension():
    g = torch.Generator().manual_seed(3)
    frame = _orthogonal(10, g)
    big, small = frame[:, :4], (frame[:, 0:1] + frame[:, 5:6]) / math.sqrt(2)  # 45° from the big subspace
    for qa, qb in ((big, small), (small, big)):
        cos, angles = principal_angles(qa, qb)
        assert cos.shape == (1,) and float(angles[0]) == pytest.approx(math.pi / 4, abs=1e-12)


def test_planted_spectrum_and_effective_rank(planted):
    run, layers = planted
    shares = SPECTRUM**2 / (SPECTRUM**2).sum()
    expected = int((shares > 0.01).sum())
    assert expected == 6
    summary = _table(run, "router_summary")
    layer2 = summary[(summary.scope == "layer") & (summary.layer == 2)].iloc[0]
    assert layer2.effective_rank == expected and layer2["rank"] == E
    assert layer2.participation_ratio == pytest.approx((SPECTRUM**2).sum() ** 2 / (SPECTRUM**4).sum(), rel=1e-5)
    singular = np.load(run / "router_singular_values.npy")  # [layer, component]
    np.testing.assert_allclose(singular[2], SPECTRUM, rtol=1e-5)
    spectra = _table(run, "router_spectra")
    rows = spectra[(spectra.scope == "layer") & (spectra.layer == 2)]
    np.testing.assert_allclose(rows.variance_share, shares, atol=1e-6)
    assert rows.above_threshold.sum() == expected
    # stacked: the definition applied to an independent SVD of all routers stacked
    stacked = np.concatenate([_np(m.router.weight) for m in layers])
    s = np.linalg.svd(stacked, compute_uv=False)
    reference = int((s**2 / (s**2).sum() > 0.01).sum())
    assert summary[summary.scope == "stacked"].effective_rank.iloc[0] == reference
    np.testing.assert_allclose(np.load(run / "stacked_singular_values.npy"), s, rtol=1e-6)
    # the threshold sits at 1% of the variance
    assert effective_rank(torch.sqrt(torch.tensor([98.9, 1.1], dtype=torch.float64))) == 2
    assert effective_rank(torch.sqrt(torch.tensor([99.1, 0.9], dtype=torch.float64))) == 1


def test_router_cosine_equals_a_double_loop(planted):
    run, layers = planted
    cosine = np.load(run / "router_cosine.npy")  # [layer, expert_a, expert_b]
    assert cosine.shape == (4, E, E)
    for li, moe_layer in enumerate(layers):
        r = _np(moe_layer.router.weight)
        for a in range(E):
            for b in range(E):
                naive = sum(r[a, h] * r[b, h] for h in range(H)) / math.sqrt(
                    sum(x * x for x in r[a]) * sum(x * x for x in r[b]))
                assert cosine[li, a, b] == pytest.approx(naive, abs=1e-6)
    table = _table(run, "router_cosine")
    assert len(table) == 4 * E * (E - 1) // 2 and (table.expert_a < table.expert_b).all()
    row = table[(table.layer == 3) & (table.expert_a == 2) & (table.expert_b == 5)].cosine.iloc[0]
    assert row == pytest.approx(cosine[3, 2, 5])


def test_expert_weight_cosine_equals_a_per_pair_loop(planted):
    run, layers = planted
    cosine = np.load(run / "expert_weight_cosine.npy")  # [layer, matrix (gate, up, down), expert_a, expert_b]
    assert cosine.shape == (4, 3, E, E)
    for li, moe_layer in enumerate(layers):
        params = [moe_layer.expert_params(e) for e in range(E)]
        for mi, matrix in enumerate(("gate", "up", "down")):
            flat = [_np(getattr(p, matrix)).ravel() for p in params]
            for a in range(E):
                for b in range(E):
                    naive = float(flat[a] @ flat[b]) / (np.linalg.norm(flat[a]) * np.linalg.norm(flat[b]))
                    assert cosine[li, mi, a, b] == pytest.approx(naive, abs=1e-9)
    table = _table(run, "expert_weight_cosine")
    assert set(table.matrix) == {"gate", "up", "down"} and len(table) == 4 * 3 * E * (E - 1) // 2


def test_router_expert_alignment_planted_and_random(planted):
    run, layers = planted
    table = _table(run, "router_expert_alignment")
    layer3 = table[table.layer == 3].set_index(["expert", "metric"])
    # expert 0's gate rows span r_0: all of r_0 lies in the row space
    own = layer3.loc[(0, "gate_rowspace_share")]
    assert own.value == pytest.approx(1.0, abs=1e-5)
    assert own.control_z > 3 and own.control_percentile == 100.0
    assert own.expected == pytest.approx(WIDTH / H) and own["rank"] == WIDTH
    # random experts: indistinguishable from random directions (rank I of H: expected share I/H)
    for metric in ("gate_rowspace_share", "up_rowspace_share"):
        rows = table[(table.metric == metric) & ~((table.layer == 3) & (table.expert == 0))]
        assert rows.control_mean.to_numpy() == pytest.approx(WIDTH / H, abs=0.01)
        assert rows.expected.to_numpy() == pytest.approx(WIDTH / H)
        assert (rows.control_z.abs() < 4).all() and abs(rows.control_z.mean()) < 0.6
        assert (rows.value - rows.control_mean).abs().mean() < 0.1
    # the norm by hand, for one expert, and its "other experts" control
    moe_layer = layers[3]
    unit = _np(moe_layer.router.weight)
    unit = unit / np.linalg.norm(unit, axis=1, keepdims=True)
    gate = _np(moe_layer.expert_params(4).gate)
    norm = layer3.loc[(4, "gate_norm")]
    assert norm.value == pytest.approx(np.linalg.norm(gate @ unit[4]), rel=1e-9)
    others = [np.linalg.norm(gate @ unit[e]) for e in range(E) if e != 4]
    assert norm.other_rows_mean == pytest.approx(np.mean(others), rel=1e-9)
    assert norm.expected == pytest.approx(np.linalg.norm(gate) / math.sqrt(H), rel=1e-9)
    values = np.load(run / "router_expert_alignment.npy")  # [layer, expert, metric, stat]
    assert values.shape == (4, E, 4, 7)
    assert values[3, 0, 2, 0] == pytest.approx(own.value)


def test_planted_run_folder(planted):
    run, _ = planted
    for name in TABLES:
        assert (run / f"{name}.csv").is_file(), name
    assert not (run / "figures").exists()  # --no-figures
    info = json.loads((run / "run.json").read_text())
    assert info["weights"]["router_parameters"] == {str(i): "weight" for i in range(4)}
    assert info["weights"]["alignment_stats"][0] == "value"


def test_figures(tmp_path):
    # one layer keeps the rendering cheap (and covers the single-layer cross-layer map)
    argv = ["--model", "random:olmoe", "--out", str(tmp_path), "--no-progress", "--layers", "-1", "--num_random", "64"]
    assert script.main(argv) == 0
    (run,) = [p for p in tmp_path.glob("weights/*/*/*") if p.is_dir()]
    for name in FIGURES:
        for ext in ("pdf", "png"):
            assert (run / "figures" / f"{name}.{ext}").is_file(), name


SMOKE = ["olmoe", "mixtral", "deepseek_v3", "gpt_oss", "llama4_text", "nemotron_h", "longcat_flash"]


@pytest.mark.parametrize("arch", SMOKE)
def test_runs_on_architecture(arch, tmp_path):
    argv = ["--model", f"random:{arch}", "--out", str(tmp_path), "--no-progress", "--no-figures", "--num_random", "64"]
    assert script.main(argv) == 0
    (run,) = [p for p in tmp_path.glob("weights/*/*/*") if p.is_dir()]
    for name in TABLES:
        assert (run / f"{name}.csv").is_file(), name
    info = json.loads((run / "run.json").read_text())
    moe_layers = [m["layer"] for m in info["model_info"]["moe_layers"]]
    summary = _table(run, "router_summary")
    assert summary[summary.scope == "layer"].layer.tolist() == moe_layers
    alignment = _table(run, "router_expert_alignment")
    gate = alignment[alignment.metric == "gate_norm"]
    if arch == "nemotron_h":  # ungated experts: gate parts are NaN, the up parts are computed
        assert gate.value.isna().all()
        assert np.isnan(np.load(run / "expert_weight_cosine.npy")[:, 0]).all()
        assert alignment[alignment.metric == "up_norm"].value.notna().all()
    else:
        assert gate.value.notna().all() and (gate.value > 0).all()
    if arch == "gpt_oss":
        assert set(info["weights"]["router_bias"].values()) == {True}
    if arch == "longcat_flash":  # 8 routed experts + 2 zero-compute choices: 10 router rows, 8 aligned experts
        assert np.load(run / "router_cosine.npy").shape[1:] == (10, 10)
        assert set(alignment.expert) == set(range(8))
    if arch == "deepseek_v3":
        assert 0 not in moe_layers  # the first layer is dense


def test_deterministic(tmp_path):
    argv = ["--model", "random:mixtral", "--out", str(tmp_path), "--no-progress", "--no-figures", "--layers", "0", "2"]
    assert script.main(argv) == 0 and script.main(argv) == 0
    first, second = sorted(p for p in tmp_path.glob("weights/*/*/*") if p.is_dir())
    for csv in first.glob("*.csv"):
        assert (second / csv.name).read_bytes() == csv.read_bytes(), csv.name
    assert _table(first, "router_summary").layer.dropna().tolist() == [0, 2]


@pytest.mark.parametrize(("extra", "message"), [
    (["--model", "random:deepseek_v3", "--layers", "0"], "dense (non-MoE) layer; MoE layers: 1, 2, 3"),
    (["--model", "random:zaya"], "cannot find the weight of router ZayaRouter"),
    (["--num_random", "1"], "argument --num_random: must be at least 2"),
])
def test_bad_input_one_line_exit_2_nothing_written(extra, message, tmp_path, capsys):
    code = script.main(["--out", str(tmp_path / "results"), "--no-progress", *extra])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert message in lines[0] and "Traceback" not in err
    assert not (tmp_path / "results").exists()


def test_help_does_not_import_torch():
    result, heavy = run_script("weights.py", "--help")
    assert "--routers-only" in result.stdout and heavy == []


def test_row_cosine_of_a_zero_row_is_nan():
    rows = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    assert torch.isnan(row_cosine(rows)[1]).all()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ALL_MOE_TYPES)
def test_every_architecture_or_a_clear_error(arch):
    """Each MoE type either analyses completely or refuses with an error naming its router class."""
    model, _ = tiny.build_random_model(arch)
    layers = find_moe_layers(model)
    hidden = int(model.config.get_text_config().hidden_size)
    try:
        res = analyze(layers, hidden, torch.device("cpu"), num_random=16, progress=False)
    except InputError as err:
        assert type(layers[0].router).__name__ in str(err)
        assert arch == "zaya", err  # its router is an MLP: no [E, H] weight
        return
    routers = [find_router_weight(m, hidden).weight for m in layers]
    if not any(bool((r == 0).all(dim=1).any()) for r in routers):  # afmoe initialises its routers to zero: cosines are undefined (NaN) there
        assert np.isfinite(res.arrays["router_cosine"]).all()
    assert set(res.tables["router_expert_alignment"].layer) == {m.layer for m in layers}


def _alignment_figure(monkeypatch, argv: list[str]) -> dict:
    """Run the script and keep, of its router_expert_alignment figure, the titles of the panels drawn and all text."""
    from matplotlib.text import Text

    from common.run import Run

    kept: dict = {}
    save = Run.save_figure

    def recording(self, fig, name):
        if name == "router_expert_alignment":
            kept["panels"] = [ax.get_title() for ax in fig.axes if ax.get_visible()]
            kept["text"] = "\n".join(t.get_text() for t in fig.findobj(Text))
        return save(self, fig, name)

    monkeypatch.setattr(Run, "save_figure", recording)
    assert script.main(argv) == 0
    return kept


def test_alignment_figure_leaves_out_row_space_panels_of_full_column_rank(monkeypatch, tmp_path):
    """The demo's experts have I = 128 ≥ H = 64: W's row space is all of ℝ^H, the share is 1 for every direction.
    Those two panels are left out (they were half the figure, empty) and the caption says why."""
    argv = ["--model", "demo", "--layers", "1", "--num_random", "64", "--out", str(tmp_path), "--no-progress"]
    figure = _alignment_figure(monkeypatch, argv)
    (run,) = [p for p in tmp_path.glob("weights/*/*/*") if p.is_dir()]
    table = _table(run, "router_expert_alignment")
    shares = table[table.metric.str.endswith("rowspace_share")]
    assert (shares.value.round(9) == 1).all() and shares.control_z.isna().all()  # the data: uninformative
    assert (table[table.metric.str.endswith("norm")].control_z > 2).all()  # the norms are informative
    assert figure["panels"] == ["gate response ‖W_gate,e r̂_e‖", "up response ‖W_up,e r̂_e‖"]
    assert "not shown: the share of ‖r_e‖² in rowspace(W_gate,e) and rowspace(W_up,e)" in figure["text"]
    assert "full column rank (I ≥ H)" in figure["text"]


def test_alignment_figure_leaves_out_gate_panels_of_ungated_experts(monkeypatch, tmp_path):
    argv = ["--model", "random:nemotron_h", "--num_random", "64", "--out", str(tmp_path), "--no-progress"]
    figure = _alignment_figure(monkeypatch, argv)
    assert figure["panels"] == ["up response ‖W_up,e r̂_e‖", "share of ‖r_e‖² in rowspace(W_up,e)"]
    assert "ungated experts" in figure["text"]
