"""profiles.py on the planted-routing model: each profile states what the planting implies."""

from __future__ import annotations

import json

import pytest

import profiles
from tests.planted import GROUPS, NUM_EXPERTS, planted_experts, save_planted, write_domains


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted-profiles")
    return save_planted(root / "model"), write_domains(root), root


def _argv(planted, *extra):
    model, specs, root = planted
    return ["--model", str(model), "--data", *specs, "--num_tokens", "300", "--seq_len", "64", "--batch_size", "4",
            "--out", str(root / "out"), "--no-progress", *extra]


def test_planted_profiles(planted):
    _, _, root = planted
    assert profiles.main(_argv(planted, "--layer", "1", "--all", "--top", "8")) == 0
    run_dir = next(p for p in (root / "out").glob("profiles/*/*/*") if p.is_dir())
    assert (run_dir / "profiles_layer1.csv").is_file()
    for g, letters in enumerate(GROUPS):
        first, second = planted_experts(1, g)
        profile = json.loads((run_dir / f"profile_layer1_expert{first}.json").read_text())
        assert {t["token"] for t in profile["top_tokens_by_count"]} == set(letters)
        domain = {d["domain"]: d for d in profile["domains"]}[f"d{g // 2}"]
        assert domain["share_of_expert"] == 1.0
        assert profile["frequency_top1"] == profile["frequency_topk"]  # the planted first choice always wins
        assert profile["coactivated_experts"] == [{"expert": second, "count": profile["selected_topk"], "p_given_this": 1.0}]
        assert {(p["layer"], p["expert"], p["probability"]) for p in profile["predecessors"]} == {
            (0, e, 1.0) for e in planted_experts(0, g)}
        assert {(p["layer"], p["expert"], p["probability"]) for p in profile["successors"]} == {
            (2, e, 1.0) for e in planted_experts(2, g)}
        assert all(c["token"] in letters for c in profile["top_contexts"])
        assert profile["weight_when_selected"]["count"] == profile["selected_topk"]
    dead = json.loads((run_dir / f"profile_layer1_expert{NUM_EXPERTS - 1}.json").read_text())
    assert dead["selected_topk"] == 0 and dead["top_tokens_by_count"] == [] and dead["top_contexts"] == []


BAD = {
    "expert out of range": (["--layer", "1", "--expert_id", "99"], "--expert_id 99 out of range"),
    "missing layer": (["--layer", "5", "--all"], "layer 5 does not exist"),
    "num_domains too large": (["--layer", "1", "--all", "--num_domains", "4"], "num_domains"),
    "no expert chosen": (["--layer", "1"], "one of the arguments --expert_id --all is required"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input(case, planted, capsys, tmp_path):
    extra, message = BAD[case]
    argv = _argv(planted, *extra)
    argv[argv.index("--out") + 1] = str(tmp_path / "out")
    assert profiles.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_dense_layer_refused(saved_tiny_model, capsys, tmp_path):
    argv = ["--model", str(saved_tiny_model("deepseek_v3")), "--layer", "0", "--all", "--out", str(tmp_path / "o"),
            "--no-progress", "--data", "demo:math", "--num_tokens", "50"]
    assert profiles.main(argv) == 2
    assert "dense (non-MoE) layer; MoE layers: 1, 2, 3" in capsys.readouterr().err
