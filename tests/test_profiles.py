"""profiles.py on the planted-routing model: each profile states what the planting implies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import profiles
from tests.planted import GROUPS, NUM_EXPERTS, planted_experts, save_planted, write_domains

ROOT = Path(__file__).resolve().parent.parent


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
    # numbers only: 16 profile figures would cost 80% of the run (the figure tests below draw one)
    assert profiles.main(_argv(planted, "--layer", "1", "--all", "--top", "8", "--no-figures")) == 0
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


# ------------------------------------------------------------------- what the figure must tell a reader


def _record_figures(monkeypatch) -> dict[str, dict]:
    """Every figure a run saves, as it is saved: per axes its title, x label and tick labels, and all text."""
    from matplotlib.text import Text

    from common.run import Run

    figures: dict[str, dict] = {}
    save = Run.save_figure

    def recording(self, fig, name):
        figures[name] = {
            "axes": [{"title": ax.get_title(), "xlabel": ax.get_xlabel(),
                      "yticks": [t.get_text() for t in ax.get_yticklabels()],
                      "vlines": [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"]}
                     for ax in fig.axes],
            "text": "\n".join(t.get_text() for t in fig.findobj(Text)),
        }
        return save(self, fig, name)

    monkeypatch.setattr(Run, "save_figure", recording)
    return figures


# 300 counted tokens of domain 0 over its 8 letters: about 37 occurrences each, so --min_count 30 keeps some of
# group 0's four letters in every document order (40, tried first, left none in some orders).
@pytest.mark.parametrize("min_count", [None, 30])
def test_lift_ceiling_ties_and_minimum_count_are_stated(planted, monkeypatch, tmp_path, min_count):
    """Every token of a planted group goes to the group's first expert each time it occurs, so all four sit on the
    lift ceiling N / n_e: the profile says where the ceiling is, how many tokens reach it and the minimum count;
    the figure draws the ceiling, labels each bar 'routed here / occurrences' and states the minimum on its axis."""
    figures = _record_figures(monkeypatch)
    extra = [] if min_count is None else ["--min_count", str(min_count)]
    argv = _argv(planted, "--layer", "1", "--expert_id", str(planted_experts(1, 0)[0]), *extra)
    argv[argv.index("--out") + 1] = str(tmp_path)
    assert profiles.main(argv) == 0
    (run_dir,) = [p for p in tmp_path.glob("profiles/*/*/*") if p.is_dir()]
    expert = planted_experts(1, 0)[0]
    profile = json.loads((run_dir / f"profile_layer1_expert{expert}.json").read_text())
    minimum = 5 if min_count is None else min_count
    ceiling = profile["tokens"] / profile["selected_topk"]
    assert profile["lift_min_count"] == minimum and profile["lift_ceiling"] == pytest.approx(ceiling)
    lift = profile["top_tokens_by_lift"]
    assert lift and all(t["occurrences"] >= minimum for t in lift)
    assert {t["token"] for t in lift} <= set(GROUPS[0])
    assert all(t["lift"] == pytest.approx(ceiling) and t["count"] == t["occurrences"] for t in lift)
    assert [t["count"] for t in lift] == sorted((t["count"] for t in lift), reverse=True)  # ties: by count
    assert profile["lift_at_ceiling"] == len(lift)
    figure = figures[f"profile_layer1_expert{expert}"]
    (panel,) = [a for a in figure["axes"] if a["title"].startswith("Top input tokens by lift")]
    assert f"seen ≥ {minimum}× (--min_count)" in panel["xlabel"] and "ties ranked by count" in panel["xlabel"]
    assert f"ceiling 1 / f_e = {ceiling:.3g}" in panel["title"] and panel["vlines"] == [pytest.approx(ceiling)]
    for t in lift:
        assert f"{t['count']:.0f}/{t['occurrences']:.0f}" in figure["text"]
    contexts = profile["top_contexts"][:8]
    assert contexts and "Top contexts" in figure["text"]
    for context in contexts:
        assert f"{context['weight']:.2f}, {context['score']:.3g}" in figure["text"]


def test_byte_fragments_are_told_apart_by_their_bytes():
    """Byte-level BPE entries that are parts of a UTF-8 character all decode to '�': the profile keeps their bytes
    and the figure labels them with bytes and id (the demo's ids 97-99 are bytes a1-a3, 957 is e2 80)."""
    from transformers import AutoTokenizer

    from common.analysis.profile_json import _token_list, token_bytes
    from common.figures.profiles import token_tick
    from common.model import tiny_tokenizer

    demo = AutoTokenizer.from_pretrained(ROOT / "data/demo-moe")
    ids = np.array([97, 98, 99, 957, 803])
    items = _token_list(demo, ids, np.ones(len(ids)), "count")
    assert [t["token"] for t in items[:4]] == ["\ufffd"] * 4
    assert [t.get("bytes") for t in items] == ["a1", "a2", "a3", "e280", None]
    ticks = [token_tick(t) for t in items]
    assert ticks == ["b'\\xa1' (id 97)", "b'\\xa2' (id 98)", "b'\\xa3' (id 99)", "b'\\xe2\\x80' (id 957)", "' any'"]
    tiny = tiny_tokenizer()  # one token per byte
    assert [token_bytes(tiny, i) for i in (200, 201, 65)] == [b"\xc8", b"\xc9", b"A"]
