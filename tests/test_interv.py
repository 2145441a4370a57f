"""interv.py and common.analysis.importance against independent references.

References: a copy of the experts whose down projection of one expert is zeroed, spliced in for the targeted
tokens only; a manual top-k of the captured router logits + d; generation by full re-forwards instead of the KV
cache; transformers' own causal-LM loss; a planted model whose expert can never be selected.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import interv
from common.analysis.importance import kl_divergence, log_probs, run_prompt
from common.config import ModelSpec
from common.data import resolve_domains, token_batches
from common.hooks import RoutingEdit, capture, intervene
from common.hooks.routing import experts_call_args
from common.model import load_moe, tiny
from tests.planted import write_domains
from tests.script_probe import run_script

ROOT = Path(__file__).resolve().parent.parent
LAYER = 1
SEQ = 12
TARGET = 5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random OLMoE made decisive: at init its routing and next-token distributions are near uniform and
    an expert's output is tiny, so an edit would move probabilities by ~1e-9. Scaled router, experts and head make
    each edit visible."""
    model, tokenizer = tiny.build_random_model("olmoe")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(20)
            layer.mlp.experts.gate_up_proj.mul_(8)
            layer.mlp.experts.down_proj.mul_(8)
        model.lm_head.weight.mul_(30)
    path = tmp_path_factory.mktemp("sharp-olmoe")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def moe(model_dir):
    return load_moe(ModelSpec(model=str(model_dir), device="cpu", dtype="float32"))


def _ids(batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(0))


def _forward(moe, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return moe.model(input_ids=ids, use_cache=False).logits


def _routing(moe, ids, edits=()):
    with intervene(moe, list(edits)), capture(moe, [moe.layer(LAYER)], ("logits", "topk")) as records:
        logits = _forward(moe, ids)
    rec = records[LAYER]
    return logits, rec.logits.clone(), rec.topk_index.clone(), rec.topk_weight.clone()


def _selected_at(moe, ids, row: int, position: int) -> int:
    _, _, index, _ = _routing(moe, ids)
    return int(index.view(ids.shape[0], ids.shape[1], -1)[row, position, 0])


def _zeroed_down_at(moe, ids: torch.Tensor, expert: int, position: int) -> torch.Tensor:
    """Logits with `expert`'s down projection zeroed for the tokens at `position` only: the experts' output of
    those tokens comes from a copy of the experts module with that expert's down projection set to 0."""
    moe_layer = moe.layer(LAYER)
    twin = copy.deepcopy(moe_layer.experts)
    with torch.no_grad():
        twin.down_proj[expert].zero_()
    batch, seq = ids.shape

    def splice(module, args, kwargs, out):
        hidden, index, weight = experts_call_args(moe_layer, args, kwargs)
        rows = torch.arange(batch) * seq + position
        replaced = out.clone()
        replaced[rows] = twin(hidden, index, weight)[rows]
        return replaced

    handle = moe_layer.experts.register_forward_hook(splice, with_kwargs=True)
    try:
        return _forward(moe, ids)
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------- the edits, exactly


def test_ablation_equals_zeroed_down_projection_at_the_target_only(moe):
    ids = _ids()
    base = _forward(moe, ids)
    expert = _selected_at(moe, ids, 0, TARGET)
    edited, _, _, _ = _routing(moe, ids, [RoutingEdit(LAYER, expert, "scale", 0.0, positions=[TARGET])])
    reference = _zeroed_down_at(moe, ids, expert, TARGET)
    assert torch.equal(edited[:, :TARGET], base[:, :TARGET])  # causality: earlier positions bit-identical
    assert torch.equal(reference[:, :TARGET], base[:, :TARGET])
    assert (edited - reference).abs().max() <= 1e-5
    assert (edited[0, TARGET] - base[0, TARGET]).abs().max() > 1e-4  # the ablation did something


def test_script_records_the_ablation_of_the_reference(moe, model_dir, tmp_path):
    prompt = "The quick brown fox"
    ids = moe.tokenizer(prompt, return_tensors="pt")["input_ids"]
    position = 3
    expert = _selected_at(moe, ids, 0, position)
    argv = ["--model", str(model_dir), "--prompt", prompt, "--layer", str(LAYER), "--expert_id", str(expert),
            "--target_idx", str(position), "--value", "0", "--max_new_tokens", "3", "--out", str(tmp_path), "--no-progress"]
    assert interv.main(argv) == 0
    (run,) = tmp_path.glob("interv/*/prompts/*")
    sweep = pd.read_csv(run / "intervention_sweep.csv")
    reference = _zeroed_down_at(moe, ids, expert, position)[0, -1]
    expected = kl_divergence(log_probs(_forward(moe, ids)[0, -1]), log_probs(reference))
    assert expected > 1e-4
    assert sweep.kl_nats.iloc[0] == pytest.approx(expected, rel=1e-4)
    assert sweep.selected_before.iloc[0] == 1 and sweep.selected_after.iloc[0] == 0  # a zero weight is no pick
    assert sweep.weight_after_mean.iloc[0] == 0.0
    tokens = pd.read_csv(run / "prompt_tokens.csv", keep_default_na=False)
    target = tokens[tokens.target]
    assert target.position.tolist() == [position] and target.token_id.tolist() == [int(ids[0, position])]
    assert target.token.tolist() == [moe.tokenizer.decode([int(ids[0, position])])]


def test_scale_one_leaves_every_logit_bit_identical(moe, model_dir, tmp_path):
    ids = _ids()
    base = _forward(moe, ids)
    for expert in range(moe.layer(LAYER).num_experts):
        edited, _, _, _ = _routing(moe, ids, [RoutingEdit(LAYER, expert, "scale", 1.0)])
        assert torch.equal(edited, base), expert
    argv = ["--model", str(model_dir), "--prompt", "Hello there", "--layer", str(LAYER), "--expert_id", "0",
            "--value", "1", "--max_new_tokens", "5", "--out", str(tmp_path), "--no-progress"]
    assert interv.main(argv) == 0
    (run,) = tmp_path.glob("interv/*/prompts/*")
    sweep = pd.read_csv(run / "intervention_sweep.csv")
    assert sweep.kl_nats.tolist() == [0.0] and not sweep.continuation_changed.any()
    assert (sweep.entropy_before == sweep.entropy_after).all()


def test_force_puts_the_expert_in_the_topk_with_the_stated_weight(moe):
    ids = _ids()
    _, _, base_index, base_weight = _routing(moe, ids)
    k = base_index.shape[1]
    rare = int(torch.bincount(base_index.flatten(), minlength=moe.layer(LAYER).num_experts).argmin())
    targets = [2, SEQ - 1]
    _, _, index, weight = _routing(moe, ids, [RoutingEdit(LAYER, rare, "force", 0.3, positions=[2, -1])])
    index, weight = index.view(2, SEQ, k), weight.view(2, SEQ, k)
    base_index, base_weight = base_index.view(2, SEQ, k), base_weight.view(2, SEQ, k)
    for p in targets:
        hit = index[:, p] == rare
        assert hit.sum(-1).tolist() == [1, 1]
        assert torch.all(weight[:, p][hit] == torch.tensor(0.3))
    others = [p for p in range(SEQ) if p not in targets]
    # Earlier positions keep their routing exactly; later ones only through the (changed) residual stream.
    assert torch.equal(index[:, :2], base_index[:, :2]) and torch.equal(weight[:, :2], base_weight[:, :2])
    assert all((index[:, p] != rare).all() or (base_index[:, p] == rare).any() for p in others)
    # Without a value the forced expert takes the weight of the slot it replaces (the smallest).
    _, _, index, weight = _routing(moe, ids, [RoutingEdit(LAYER, rare, "force", None, positions=[2])])
    slot = index.view(2, SEQ, k)[:, 2] == rare
    assert torch.equal(weight.view(2, SEQ, k)[:, 2][slot], base_weight[:, 2].min(-1).values)


def test_logit_shift_selects_as_a_manual_topk_of_the_shifted_logits(moe):
    ids = _ids()
    _, logits, base_index, _ = _routing(moe, ids)
    k = base_index.shape[1]
    position, row = 3, 0
    token = row * SEQ + position
    z = logits[token]
    outside = [e for e in range(z.shape[0]) if e not in base_index[token].tolist()]
    inside = base_index[token].tolist()
    kth = z.topk(k).values[-1]
    # Promote an unselected expert just past the k-th logit, then demote a selected one below the rest.
    for expert, d in ((outside[0], float(kth - z[outside[0]]) + 0.25), (inside[0], -float(z[inside[0]] - z.min()) - 1)):
        _, shifted, index, weight = _routing(moe, ids, [RoutingEdit(LAYER, expert, "logit", d, positions=[position])])
        manual = logits.clone()
        manual.view(2, SEQ, -1)[:, position, expert] += d
        torch.testing.assert_close(shifted, manual, rtol=0, atol=1e-6)
        probs = torch.softmax(manual.float(), dim=-1)
        expected_weight, expected_index = probs.topk(k, dim=-1)
        assert torch.equal(index.sort(-1).values, expected_index.sort(-1).values)
        torch.testing.assert_close(weight.sort(-1).values, expected_weight.sort(-1).values)
        assert (expert in index[token].tolist()) == (d > 0)


@pytest.mark.parametrize("positions", [[7], [0], None])
def test_generation_under_the_edit_matches_full_reforwards(moe, positions):
    """Cached generation under an edit of prompt positions (kept in the KV cache, generated tokens unedited) or of
    every position equals generating by re-forwarding the whole sequence under the same edit."""
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(3))
    expert = _selected_at(moe, ids, 0, 7 if positions is None else positions[0])
    edit = RoutingEdit(LAYER, expert, "set", 30.0, positions=positions)
    cached = run_prompt(moe, ids, moe.layer(LAYER), [edit], [edit] if positions is None else [], 6).continuation
    sequence = ids
    for _ in range(6):
        with intervene(moe, [edit]):
            token = int(_forward(moe, sequence)[0, -1].argmax())
        sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
    assert cached == sequence[0, ids.shape[1]:].tolist()
    uncached = run_prompt(moe, ids, moe.layer(LAYER), [edit], [], 6, kv_cache=False).continuation
    assert uncached == cached
    if positions != [0]:  # position 0 reaches the last token only through attention, too weakly in this model
        unedited = run_prompt(moe, ids, moe.layer(LAYER), [], [], 6).continuation
        assert cached != unedited  # the edit matters, so the comparison above means something


def test_prompt_mode_outputs(model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("First prompt here\n\n  \nSecond one, a bit longer\n")
    argv = ["--model", str(model_dir), "--prompts", str(prompts), "--layer", "-1", "--expert_id", "2",
            "--target_idx", "1", "-1", "--values", "0", "1", "4", "--max_new_tokens", "4", "--target_token", "e",
            "--sample", "--temperature", "0.7", "--out", str(tmp_path / "out"), "--no-progress"]
    assert interv.main(argv) == 0
    assert interv.main(argv) == 0
    first, second = sorted((tmp_path / "out").glob("interv/*/prompts/*"))
    for name in ("prompt_tokens.csv", "intervention_sweep.csv", "next_token_top.csv", "sweep_token_probs.csv",
                 "interventions.json", "figures/sweep_prompt0.png", "figures/sweep_prompt1.pdf",
                 "figures/kl_by_value.png", "run.json"):
        assert (first / name).is_file(), name
    for name in ("intervention_sweep.csv", "next_token_top.csv", "interventions.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name  # seeded sampling
    sweep = pd.read_csv(first / "intervention_sweep.csv")
    assert len(sweep) == 2 * 3 and sweep.value.tolist() == [0, 1, 4] * 2
    assert set(sweep.layer) == {3} and set(sweep.targets) == {f"1 {n - 1}" for n in (17, 24)}
    assert sweep.target_prob_before.between(0, 1).all()
    top = pd.read_csv(first / "next_token_top.csv")
    assert len(top) == 2 * 10 * 4 and set(top.which) == {"before", "after"}
    report = json.loads((first / "interventions.json").read_text())
    assert [p["prompt"] for p in report["prompts"]] == ["First prompt here", "Second one, a bit longer"]
    assert report["prompts"][0]["targets"] == [1, 16]


def test_target_all_and_force_default_weight(model_dir, tmp_path):
    argv = ["--model", str(model_dir), "--prompt", "abc", "--prompt", "de", "--layer", "1", "--expert_id", "5",
            "--mode", "force", "--renormalize", "--max_new_tokens", "0", "--out", str(tmp_path), "--no-progress"]
    assert interv.main(argv) == 0
    (run,) = tmp_path.glob("interv/*/prompts/*")
    sweep = pd.read_csv(run / "intervention_sweep.csv")
    assert sweep.targets.tolist() == ["all", "all"] and sweep.value.isna().all()
    assert sweep.selected_after.tolist() == [3, 2]  # forced at every position
    assert (run / "figures/sweep_prompt1.png").is_file() and not (run / "figures/kl_by_value.png").exists()


# ------------------------------------------------------------------------- an edit that cannot act, said so


def _record_figures(monkeypatch) -> dict[str, dict]:
    """Every figure a run saves, as it is saved: all its text joined, and each axes' y limits."""
    from matplotlib.text import Text

    from common.run import Run

    figures: dict[str, dict] = {}
    save = Run.save_figure

    def recording(self, fig, name):
        figures[name] = {"text": "\n".join(t.get_text() for t in fig.findobj(Text)),
                         "ylims": [ax.get_ylim() for ax in fig.axes]}
        return save(self, fig, name)

    monkeypatch.setattr(Run, "save_figure", recording)
    return figures


def _png_width(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[16:20], "big")  # IHDR width


PROMPTS = ["The quick brown fox", "Some other words here", "Once upon a time", "A B C D E F"]
POSITION = 3


def _routed_at(moe, prompt: str, position: int) -> set[int]:
    ids = moe.tokenizer(prompt, return_tensors="pt")["input_ids"]
    _, _, index, weight = _routing(moe, ids)
    return {int(e) for e, w in zip(index[position], weight[position], strict=True) if w != 0}


@pytest.fixture(scope="module")
def unrouted_case(moe) -> tuple[int, str, str]:
    """An expert, a prompt where it is not routed at POSITION and one where it is."""
    routed = {prompt: _routed_at(moe, prompt, POSITION) for prompt in PROMPTS}
    for expert in range(moe.layer(LAYER).num_experts):
        absent = [p for p in PROMPTS if expert not in routed[p]]
        present = [p for p in PROMPTS if expert in routed[p]]
        if absent and present:
            return expert, absent[0], present[0]
    raise AssertionError(f"no expert routed in one prompt and not in another: {routed}")


@pytest.mark.parametrize("values", [["0", "2", "8"], ["0"]], ids=["sweep", "one value"])
def test_scale_where_the_expert_is_not_routed_is_said_on_stderr_json_and_figure(
        values, unrouted_case, model_dir, tmp_path, monkeypatch, capsys):
    """The issue's case (Reproduce.md on the demo: expert 9 is not routed at position 4): scale multiplies w_e = 0,
    so every value gives KL 0. The run says so once on stderr, in interventions.json and on the figure, whose KL
    axis is not scaled to 1e-12."""
    expert, prompt, _ = unrouted_case
    figures = _record_figures(monkeypatch)
    argv = ["--model", str(model_dir), "--prompt", prompt, "--layer", str(LAYER), "--expert_id", str(expert),
            "--target_idx", str(POSITION), "--values", *values, "--max_new_tokens", "2", "--out", str(tmp_path),
            "--no-progress"]
    assert interv.main(argv) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "not routed" in line]
    assert len(warned) == 1 and "warning:" in warned[0] and "--mode force" in warned[0], warned
    (run,) = tmp_path.glob("interv/*/prompts/*")
    sweep = pd.read_csv(run / "intervention_sweep.csv")
    assert sweep.kl_nats.tolist() == [0.0] * len(values) and (sweep.selected_before == 0).all()
    report = json.loads((run / "interventions.json").read_text())["prompts"][0]
    assert report["routed_at_targets"] == 0 and report["edit_cannot_act"] is True
    figure = figures["sweep_prompt0"]
    assert f"Expert {expert} was not routed at the target" in figure["text"]
    assert "--mode scale cannot act" in figure["text"] and "--mode force" in figure["text"]
    if len(values) > 1:
        assert "KL = 0 at every value" in figure["text"]
        assert figure["ylims"][1][1] == 1.0  # a unit KL axis, not 1.15e-12
    assert _png_width(run / "figures/sweep_prompt0.png") <= 1200


def test_scale_where_the_expert_is_routed_carries_no_note(unrouted_case, model_dir, tmp_path, monkeypatch, capsys):
    """Two prompts, the expert routed at the target of the second only: only the first is flagged, in the JSON
    and in the several-prompt figure's title; the second prompt's figure has no note and a real KL."""
    expert, absent, present = unrouted_case
    figures = _record_figures(monkeypatch)
    argv = ["--model", str(model_dir), "--prompt", absent, "--prompt", present, "--layer", str(LAYER),
            "--expert_id", str(expert), "--target_idx", str(POSITION), "--values", "0", "4", "--max_new_tokens", "2",
            "--out", str(tmp_path), "--no-progress"]
    assert interv.main(argv) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "not routed" in line]
    assert len(warned) == 1 and warned[0].count("prompt 0:") == 1, warned
    (run,) = tmp_path.glob("interv/*/prompts/*")
    report = json.loads((run / "interventions.json").read_text())["prompts"]
    assert [(p["routed_at_targets"], p["edit_cannot_act"]) for p in report] == [(0, True), (1, False)]
    sweep = pd.read_csv(run / "intervention_sweep.csv")
    assert (sweep[sweep.prompt == 1].kl_nats > 0).any()
    assert "not routed" not in figures["sweep_prompt1"]["text"]
    assert "expert routed at 1/1 targets before the edit" in figures["sweep_prompt1"]["text"]
    assert "not routed at any target of 1 of 2 prompts (0)" in figures["kl_by_value"]["text"]
    assert figures["kl_by_value"]["ylims"][0][1] < 1  # a real KL sets the axis


# ---------------------------------------------------------------------------------------------- dataset mode


def _dead_expert_model(path: Path, dead: int) -> Path:
    """A tiny OLMoE whose expert `dead` can never be selected: residual coordinate 0 is held at 1 in every layer
    (embedding column 0 = 1; attention and expert outputs never write it), and the router row of `dead` reads
    only that coordinate with weight -1e4, so its logit is about -1e4 / rms(x) ≤ -1e3 at every token."""
    model, tokenizer = tiny.build_random_model("olmoe")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0
            layer.mlp.experts.down_proj[:, 0] = 0
            layer.mlp.gate.weight[dead] = 0
            layer.mlp.gate.weight[dead, 0] = -1e4
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


DEAD = 6


@pytest.fixture(scope="module")
def dataset_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("importance")
    model = _dead_expert_model(root / "model", DEAD)
    specs = write_domains(root, documents=12, length=50)
    common = ["--model", str(model), "--data", *specs, "--num_tokens", "150", "--seq_len", "32", "--layer", str(LAYER),
              "--no-progress"]
    for batch_size in (4, 3):
        assert interv.main([*common, "--batch_size", str(batch_size), "--out", str(root / f"out{batch_size}")]) == 0
    runs = {b: next((root / f"out{b}").glob("interv/*/*/*")) for b in (4, 3)}
    return model, specs, runs


def test_never_selected_expert_costs_exactly_nothing(dataset_run):
    _, specs, runs = dataset_run
    table = pd.read_csv(runs[4] / f"importance_layer{LAYER}.csv")
    dead = table[table.expert == DEAD]
    assert len(dead) == len(specs) + 1  # every domain and 'all'
    assert (dead.delta_nll == 0.0).all() and (dead.selected == 0).all()
    assert (table[table.expert != DEAD].delta_nll.abs() > 0).any()
    matrix = np.load(runs[4] / f"importance_layer{LAYER}.npy")
    assert matrix.shape == (8, len(specs))
    assert np.all(matrix[DEAD] == 0)
    wide = table[table.domain != "all"].pivot(index="expert", columns="domain", values="delta_nll")
    np.testing.assert_allclose(matrix, wide[[s.split("=")[0] for s in specs]].to_numpy(), rtol=1e-12)
    frequency = np.load(runs[4] / f"importance_frequency_layer{LAYER}.npy")
    np.testing.assert_allclose(frequency.sum(0), 2.0)  # k = 2 experts per counted token
    summary = pd.read_csv(runs[4] / f"importance_summary_layer{LAYER}.csv")
    assert summary.domain.tolist() == ["d0", "d1", "d2", "all"]
    for name in (f"importance_heatmap_layer{LAYER}.png", f"importance_vs_frequency_layer{LAYER}.pdf"):
        assert (runs[4] / "figures" / name).is_file()


def test_base_nll_equals_transformers_loss_on_the_counted_tokens(dataset_run):
    model_dir, specs, runs = dataset_run
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    totals: dict[int, list[float]] = {}
    batches = token_batches(resolve_domains(specs), tokenizer, num_tokens=150, seq_len=32, batch_size=4, progress=False)
    for batch in batches:
        labels = torch.where(batch.count_mask, batch.input_ids, -100)
        with torch.no_grad():
            loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        total = totals.setdefault(int(batch.domain_ids[0]), [0.0, 0])
        total[0] += float(loss) * n
        total[1] += n
    table = pd.read_csv(runs[4] / f"importance_layer{LAYER}.csv")
    for d, (loss_sum, n) in totals.items():
        rows = table[(table.domain == f"d{d}") & (table.expert == 0)]
        assert int(rows.tokens.iloc[0]) == n < 150  # a window's first token is never predicted
        assert rows.nll_base.iloc[0] == pytest.approx(loss_sum / n, rel=1e-5)
    # Another batching (other padding) gives the same numbers.
    other = pd.read_csv(runs[3] / f"importance_layer{LAYER}.csv")
    np.testing.assert_allclose(other.nll_base, table.nll_base, rtol=1e-5)
    np.testing.assert_allclose(other.delta_nll, table.delta_nll, rtol=1e-3, atol=1e-6)
    assert (other.tokens == table.tokens).all() and (other.selected == table.selected).all()


def _crowded_importance(experts: int = 16) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One domain whose labelled experts (the 3 most selected and the 5 costliest ablations) all sit near (0, 0)
    except one far outlier that sets the axes: the case where the labels overprinted."""
    rng = np.random.default_rng(0)
    freq = np.concatenate([[0.60], 0.004 + 0.002 * rng.random(experts - 1)])
    delta = np.concatenate([[0.50], 0.0005 + 0.0005 * rng.random(experts - 1)])
    # the labelled crowd: experts 1..7 have the next largest frequency (7 the most) and ΔNLL (1 the most), still
    # within 2% of the axes
    freq[1:8] = 0.0065 + 0.001 * np.arange(7)
    delta[1:8] = 0.004 - 0.0004 * np.arange(7)
    freq_rank = np.argsort(np.argsort(-freq)) + 1
    delta_rank = np.argsort(np.argsort(-delta)) + 1
    table = pd.DataFrame({"domain": "d0", "expert": range(experts), "freq_topk": freq, "delta_nll": delta,
                          "freq_rank": freq_rank, "delta_rank": delta_rank})
    summary = pd.DataFrame({"domain": ["d0"], "spearman_delta_vs_freq": [0.9]})
    return table, summary


def test_importance_scatter_labels_near_the_origin_do_not_overprint():
    from matplotlib.text import Text

    from common.figures.interventions import plot_importance_scatter
    from common.plots import plt

    table, summary = _crowded_importance()
    labelled = set(table[(table.freq_rank <= 3) | (table.delta_rank <= 5)].expert)
    assert len(labelled) >= 6  # the crowd is really there
    fig = plot_importance_scatter(table, ["d0"], LAYER, 2 / 16, summary)
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    labels = [t for t in fig.findobj(Text) if t.get_gid() == "point-label"]
    boxes = [t.get_window_extent(renderer) for t in labels]
    named = [int(part) for a in labels for part in a.get_text().split(",")]
    assert sorted(named) == sorted(labelled)  # every notable expert named, once
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j]), (labels[i].get_text(), labels[j].get_text())
    ax = fig.axes[0]
    for expert in labelled:  # no label covers a labelled expert's marker
        row = table[table.expert == expert].iloc[0]
        px, py = ax.transData.transform((100 * row.freq_topk, row.delta_nll))
        assert not any(box.contains(px, py) for box in boxes), expert
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def bad_input_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "empty.txt").write_text("\n  \n")
    (root / "p.txt").write_text("hello\n")
    return root


BAD = {
    "target beyond prompt": (["--prompt", "abc", "--expert_id", "1", "--target_idx", "9"],
                             "--target_idx 9 is beyond prompt 0 ('abc'): it has 3 tokens"),
    "negative target beyond prompt": (["--prompt", "abc", "--expert_id", "1", "--target_idx", "-4"], "--target_idx -4 is beyond"),
    "expert out of range": (["--prompt", "abc", "--expert_id", "8"], "--expert_id 8 out of range: layer 1 has experts 0..7"),
    "dataset expert out of range": (["--experts", "3", "99", "--data", "demo:math"], "--experts 99 out of range"),
    "dense layer": (["--model", "random:deepseek_v3", "--layer", "0", "--prompt", "abc", "--expert_id", "1"],
                    "dense (non-MoE) layer; MoE layers: 1, 2, 3"),
    "missing layer": (["--layer", "9", "--prompt", "abc", "--expert_id", "1"], "layer 9 does not exist"),
    "empty prompt": (["--prompt", " ", "--expert_id", "1"], "--prompt is empty"),
    "empty prompts file": (["--prompts", "{root}/empty.txt", "--expert_id", "1"], "no prompt in it"),
    "missing prompts file": (["--prompts", "{root}/nope.txt", "--expert_id", "1"], "no such file"),
    "prompt and prompts": (["--prompt", "abc", "--prompts", "{root}/p.txt", "--expert_id", "1"],
                           "argument --prompts: not allowed with argument --prompt"),
    "force with a list": (["--prompt", "abc", "--expert_id", "1", "--mode", "force", "--values", "0.1", "0.2"],
                          "--mode force takes one --value"),
    "value and values": (["--prompt", "abc", "--expert_id", "1", "--value", "1", "--values", "1", "2"],
                         "argument --values: not allowed with argument --value"),
    "no expert": (["--prompt", "abc"], "--expert_id is required with a prompt"),
    "prompt flag in dataset mode": (["--expert_id", "1"], "--expert_id needs a prompt"),
    "data with a prompt": (["--prompt", "abc", "--expert_id", "1", "--data", "demo"], "--data is for dataset mode"),
    "temperature without sample": (["--prompt", "abc", "--expert_id", "1", "--temperature", "2"],
                                   "--temperature applies to --sample"),
    "all mixed with positions": (["--prompt", "abc", "--expert_id", "1", "--target_idx", "all", "2"],
                                 "give 'all' alone"),
    "target token of two tokens": (["--prompt", "abc", "--expert_id", "1", "--target_token", "ab"], "is 2 tokens"),
    "non-finite value": (["--prompt", "abc", "--expert_id", "1", "--value", "nan"], "must be finite"),
    "too long for the context": (["--prompt", "abc", "--expert_id", "1", "--max_new_tokens", "600"],
                                 "exceeds the model's context length 512"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_one_line_exit_2_nothing_written(case, model_dir, bad_input_files, tmp_path, capsys):
    extra, message = BAD[case]
    extra = [e.format(root=bad_input_files) for e in extra]
    argv = ["--model", str(model_dir), "--layer", str(LAYER), "--out", str(tmp_path / "results"), "--no-progress", *extra]
    assert interv.main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert message in lines[0], lines[0]
    assert not (tmp_path / "results").exists()


def test_help_and_flag_errors_never_import_torch():
    for flags, code in ((["--help"], 0), (["--layer", "1", "--prompt", "a", "--expert_id", "1", "--mode", "force",
                                            "--values", "1", "2"], 2)):
        result, heavy = run_script("interv.py", *flags)
        assert result.returncode == code, result.stderr
        assert heavy == []


# ---------------------------------------------------------------------------------------------- demo model


@pytest.mark.slow
def test_demo_importance_falls_on_frequently_selected_experts(tmp_path):
    """On the demo model, the ablation that costs a domain most hits one of its 3 most-selected experts in at
    least 4 of the 6 domains (layer 1, 3000 tokens per domain)."""
    argv = ["--model", "demo", "--data", "demo", "--layer", "1", "--num_tokens", "3000", "--out", str(tmp_path),
            "--no-progress"]
    assert interv.main(argv) == 0
    (run,) = tmp_path.glob("interv/*/*/*")
    summary = pd.read_csv(run / "importance_summary_layer1.csv").set_index("domain").drop("all")
    assert len(summary) == 6
    assert summary.important_in_top3_selected.sum() >= 4, summary


# Architectures whose decoder layers differ in what sits below the ablated one: OLMoE (the demo's), DeepSeek-V3
# (a dense first layer, shared experts), Qwen3-MoE, gpt-oss (alternating sliding-window attention), Jamba (Mamba
# layers between attention layers).
RESUME_TYPES = ["olmoe", "deepseek_v3", "qwen3_moe", "gpt_oss", "jamba"]


@pytest.mark.parametrize("model_type", RESUME_TYPES)
def test_batched_ablations_resumed_at_the_layer_equal_whole_forwards(model_type, tmp_path):
    """The fast importance pass (every ablation of a batch side by side in one forward that starts at the ablated
    layer from the unedited residual) gives the ΔNLL and counts of the plain pass (one whole forward per expert),
    to float rounding (1e-6 nats per token); on each architecture the resumed path is the one taken."""
    from common.analysis.importance import ImportanceAccumulator, accumulate_importance

    model, tokenizer = tiny.build_random_model(model_type)
    from common.model import MoEModel

    moe = MoEModel(model.eval(), tokenizer, name=model_type)
    layer = moe.layers[-1]
    specs = write_domains(tmp_path, documents=12, length=40)
    domains = resolve_domains(specs[:2])

    def run(**how):
        acc = ImportanceAccumulator(layer, list(range(layer.num_experts)), [d.name for d in domains], moe.device)
        batches = token_batches(domains, tokenizer, num_tokens=60, seq_len=24, batch_size=3, progress=False)
        return accumulate_importance(moe, acc, batches, False, **how), acc.arrays()

    how_plain, plain = run(variants=1, resume=False)
    how_fast, fast = run(variants=layer.num_experts, resume=True)
    assert how_fast == {"variants_per_forward": layer.num_experts, "resumed": True} and not how_plain["resumed"]
    for name in ("tokens", "routed", "selected"):
        np.testing.assert_array_equal(fast[name], plain[name], err_msg=name)
    np.testing.assert_allclose(fast["nll_base"], plain["nll_base"], rtol=0, atol=1e-9)
    per_token = (fast["delta"] - plain["delta"]) / plain["tokens"]
    assert np.abs(per_token).max() <= 1e-6, per_token
    assert np.abs(plain["delta"]).max() > 1e-3  # the ablations change something to agree on


def test_replaced_forwards_are_restored_to_what_was_there_before(moe):
    """A forward replaced by an edit or a resumed forward is restored on exit to what the module had, an instance
    wrapper included (accelerate's offloading hook under device_map is one): not deleted."""
    from common.hooks import layer_input, start_at
    from common.hooks.intervene import registered_hook_count

    layer = moe.layers[-1]
    decoder = moe.decoder_layers()

    def wrapper(*args, **kwargs):
        return type(decoder[0]).forward(decoder[0], *args, **kwargs)

    decoder[0].forward = wrapper  # stands for accelerate's instance-level forward
    router_before = moe.layer(layer.layer).router.__dict__.get("forward")
    baseline = registered_hook_count(moe.model)
    try:
        ids = _ids()
        with layer_input(decoder, layer.layer) as entering:
            moe.forward(ids)
        edits = [RoutingEdit(layer.layer, 0, "logit", 1.0), RoutingEdit(layer.layer, 1, "logit", -1.0)]
        with intervene(moe, edits), start_at(decoder, layer.layer, entering["hidden"]):
            moe.forward(ids)
        assert decoder[0].__dict__.get("forward") is wrapper
        assert moe.layer(layer.layer).router.__dict__.get("forward") is router_before
        assert registered_hook_count(moe.model) == baseline
    finally:
        del decoder[0].forward


@pytest.mark.parametrize("arch", ["olmoe", "mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_expert_activation_puts_the_experts_in_every_tokens_topk(arch, saved_tiny_model):
    """ExpertActivation (SteerMoE's "on"): the activated experts are selected at every token, the others keep their
    order among themselves, and the logits of the experts left alone are untouched."""
    from common.hooks import ExpertActivation

    moe = load_moe(ModelSpec(model=str(saved_tiny_model(arch)), device="cpu", dtype="float32"))
    layer = moe.layers[-1]
    ids = torch.randint(3, moe.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with capture(moe, [layer], ("logits", "topk")) as records, torch.no_grad():
        moe.forward(ids)
        base_logits, base_index = records[layer.layer].logits.clone(), records[layer.layer].topk_index.clone()
        # the expert the tokens choose least often, so the edit has to move most of them
        counts = torch.bincount(base_index.reshape(-1), minlength=layer.num_choices)[: layer.num_experts]
        target = int(counts.argmin())
        with intervene(moe, [ExpertActivation(layer.layer, (target,))]):
            moe.forward(ids)
        index, logits = records[layer.layer].topk_index, records[layer.layer].logits
    assert (index == target).any(dim=1).all()  # chosen at every token
    others = [e for e in range(layer.num_choices) if e != target]
    torch.testing.assert_close(logits[:, others], base_logits[:, others], rtol=0, atol=0)
    top = base_logits.max(dim=-1).values
    torch.testing.assert_close(logits[:, target], top + torch.clamp(top.abs() / 32, min=0.1))
