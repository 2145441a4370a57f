"""k-sparse probing: the pieces against naive or scikit-learn references, the streamed sampler against keeping
everything, a planted expert neuron found at k = 1 (and not by random neurons), and probing.py as a user meets it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import probing
from common.analysis.concepts import BY_NAME
from common.analysis.probing import (
    Cells,
    ConceptSampler,
    binary_scores,
    capped,
    fit_cells,
    fit_logistic,
    rank_neurons,
    stratified_test,
)
from tests.script_probe import run_script

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ pieces


def test_ranking_equals_a_naive_loop_over_neurons():
    g = torch.Generator().manual_seed(0)
    U, P, width, C = 3, 40, 9, 4
    acts = torch.randn(U, P, width, generator=g)
    pos = torch.rand(U, P, C, generator=g) < 0.3
    neg = ~pos & (torch.rand(U, P, C, generator=g) < 0.7)
    order, score = rank_neurons(acts, pos, neg)
    for u in range(U):
        for c in range(C):
            gaps = []
            for j in range(width):
                column = acts[u, :, j].double().tolist()
                p = [v for v, m in zip(column, pos[u, :, c].tolist(), strict=True) if m]
                n = [v for v, m in zip(column, neg[u, :, c].tolist(), strict=True) if m]
                gaps.append(abs(sum(p) / len(p) - sum(n) / len(n)))
            expected = sorted(range(width), key=lambda j, gaps=gaps: (-gaps[j], j))
            assert order[u, c].tolist() == expected
            np.testing.assert_allclose(score[u, c].numpy(), gaps, rtol=1e-12)


def test_stratified_split_holds_out_a_quarter_of_each_class():
    g = torch.Generator().manual_seed(1)
    members = torch.rand(200, 3, generator=g) < torch.tensor([0.1, 0.5, 0.9])
    split = torch.rand(200, generator=g, dtype=torch.float64)
    test = stratified_test(members, split, 0.25)
    assert not (test & ~members).any()
    n = members.sum(0)
    assert test.sum(0).tolist() == [max(1, round(0.25 * int(v))) for v in n]
    for c in range(3):  # the held-out members are those with the smallest split keys
        held = split[test[:, c]]
        kept = split[members[:, c] & ~test[:, c]]
        assert held.max() < kept.min()


def _cells(seed: int = 0, B: int = 3, N: int = 120, width: int = 12, k: int = 3):
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(1, N, width, generator=g, dtype=torch.float64)
    y = torch.rand(B, N, generator=g) < 0.4
    acts[0, :, 0] += 1.5 * y[0].double()  # some signal, so that predictions are not constant
    test = torch.zeros(B, N, dtype=torch.bool)
    test[:, ::4] = True
    features = torch.stack([torch.randperm(width, generator=g)[:k] for _ in range(B)])
    features[0, 0] = 0
    examples = torch.arange(N).expand(B, N)
    return acts, Cells(torch.zeros(B, dtype=torch.long), examples, torch.ones(B, N, dtype=torch.bool), y.long(), test,
                       features)


def test_probe_equals_sklearn_logistic_regression_and_f1():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score, precision_score, recall_score
    from sklearn.preprocessing import StandardScaler

    acts, cells = _cells()
    decision, theta = fit_cells(acts, cells, C=0.7, dtype=torch.float64)
    f1, precision, recall = binary_scores(cells.y, decision > 0, cells.test)
    for b in range(cells.y.shape[0]):
        X = acts[0][:, cells.features[b]].numpy()
        y = cells.y[b].numpy()
        train, test = ~cells.test[b].numpy(), cells.test[b].numpy()
        scaler = StandardScaler().fit(X[train])
        model = LogisticRegression(C=0.7, class_weight="balanced", solver="newton-cholesky", tol=1e-12, max_iter=100)
        model.fit(scaler.transform(X[train]), y[train])
        np.testing.assert_allclose(theta[b, :-1].numpy(), model.coef_[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(theta[b, -1].item(), model.intercept_[0], rtol=1e-5, atol=1e-6)
        predicted = model.predict(scaler.transform(X[test]))
        assert (decision[b].numpy()[test] > 0).astype(int).tolist() == predicted.tolist()
        assert f1[b].item() == pytest.approx(f1_score(y[test], predicted), abs=1e-12)
        assert precision[b].item() == pytest.approx(precision_score(y[test], predicted, zero_division=0), abs=1e-12)
        assert recall[b].item() == pytest.approx(recall_score(y[test], predicted, zero_division=0), abs=1e-12)
    # float32 (the default) gives the same predictions here
    decision32, _ = fit_cells(acts.float(), cells, C=0.7)
    assert ((decision32 > 0) == (decision > 0)).float().mean() > 0.99


def test_newton_handles_separable_data_and_warm_starts():
    X = torch.tensor([[[-2.0], [-1.0], [1.0], [2.0]]], dtype=torch.float64)
    y = torch.tensor([[0, 0, 1, 1]])
    coef, intercept = fit_logistic(X, y, torch.ones(1, 4, dtype=torch.float64))
    assert coef[0, 0] > 0 and torch.isfinite(coef).all() and abs(intercept.item()) < 1e-9
    warm, _ = fit_logistic(X.expand(1, 4, 1), y, torch.ones(1, 4, dtype=torch.float64),
                           init=torch.tensor([[coef[0, 0].item() * 0.5, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(warm, coef)


def test_scores_are_zero_where_undefined():
    y = torch.tensor([[1, 0, 1]])
    f1, precision, recall = binary_scores(y, torch.zeros(1, 3, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool))
    assert f1.item() == precision.item() == recall.item() == 0.0


def test_sampler_keeps_the_smallest_keys_of_each_class_and_computes_only_kept_neurons():
    g = torch.Generator().manual_seed(2)
    n, C, M, width = 900, 3, 25, 4
    key = torch.rand(n, generator=g, dtype=torch.float64)
    split = torch.rand(n, generator=g, dtype=torch.float64)
    pos = torch.rand(n, C, generator=g) < torch.tensor([0.05, 0.3, 0.6])
    neg = ~pos & (torch.rand(n, C, generator=g) < 0.8)
    acts = torch.randn(n, width, generator=g)
    sampler = ConceptSampler(C, M, torch.device("cpu"))
    computed = []
    for start in range(0, n, 100):  # a stream of 9 batches
        part = slice(start, start + 100)

        def neurons(index, part=part):
            computed.append(index.numel())
            return acts[part][index]

        sampler.update(("moe", 0, 0), key[part], split[part], pos[part], neg[part], neurons)
    pool = sampler.finish()[("moe", 0, 0)]
    assert sum(computed) < n / 2  # most tokens never had their neurons computed
    for members, kept in ((pos, capped(pool.pos, M)), (neg, capped(pool.neg, M))):
        for c in range(C):
            expected = torch.sort(key[members[:, c]]).values[:M]
            assert torch.equal(torch.sort(pool.key[kept[:, c]]).values, expected)
    where = {float(k): i for i, k in enumerate(key)}
    rows = [where[float(k)] for k in pool.key]
    torch.testing.assert_close(pool.acts, acts[rows])
    assert pool.seen_pos.tolist() == pos.sum(0).tolist() and pool.seen_neg.tolist() == neg.sum(0).tolist()


# ------------------------------------------------------------------------------------------------ planted

PLANTED_EXPERT, PLANTED_NEURON = 2, 5


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny OLMoE whose expert 2, neuron 5 fires exactly on digit tokens, at both layers, and whose other
    neurons cannot tell a digit from the letter it copies.

    The residual stream is the embedding at every layer (attention and expert outputs zeroed). Coordinate 0 of
    the embedding is the digit direction (+0.05 on digits, −0.05 on letters: the same norm, so RMSNorm scales
    both alike); coordinate 1 is 3 on every token and routes every token to expert 2 first; digit d copies every
    other coordinate of letter 'a' + d. Only neuron 5 of expert 2 reads coordinate 0 (gate and up rows = 100 ×
    that coordinate): silu(g)·g ≈ 23 on digits and ≈ 0.2 on letters. The data are strings over a…j and 0…9, so
    a neuron blind to coordinate 0 sees exactly the same value on digit d as on letter 'a' + d, and the router
    sends them to the same experts.
    """
    from transformers import OlmoeConfig, OlmoeForCausalLM

    from common.model import MoEModel, tiny_tokenizer

    config = OlmoeConfig(vocab_size=259, hidden_size=64, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2,
                         norm_topk_prob=False, max_position_embeddings=128, tie_word_embeddings=False,
                         bos_token_id=256, eos_token_id=257, pad_token_id=258)
    torch.manual_seed(0)
    model = OlmoeForCausalLM(config).eval()
    view = MoEModel(model)
    with torch.no_grad():
        embedding = torch.randn(259, 64)
        embedding[:, 0], embedding[:, 1] = 0.0, 3.0
        for d in range(10):
            embedding[ord("0") + d, 2:] = embedding[ord("a") + d, 2:]
            embedding[ord("0") + d, 0], embedding[ord("a") + d, 0] = 0.05, -0.05
        model.model.embed_tokens.weight.copy_(embedding)
        for layer, moe_layer in zip(model.model.layers, view.layers, strict=True):
            layer.self_attn.o_proj.weight.zero_()
            router = moe_layer.router.weight
            router[:, :2] = 0.0
            router[PLANTED_EXPERT, 1] = 5.0
            for e in range(moe_layer.num_experts):
                params = moe_layer.expert_params(e)
                params.down.zero_()
                params.gate[:, 0] = 0.0
                params.up[:, 0] = 0.0
            params = moe_layer.expert_params(PLANTED_EXPERT)
            for row in (params.gate[PLANTED_NEURON], params.up[PLANTED_NEURON]):
                row.zero_()
                row[0] = 100.0
    folder = tmp_path_factory.mktemp("planted-probe")
    model.save_pretrained(folder / "model")
    tiny_tokenizer().save_pretrained(folder / "model")
    rng = np.random.default_rng(0)
    alphabet = list("abcdefghij0123456789")
    lines = ["".join(rng.choice(alphabet, size=60)) for _ in range(80)]
    (folder / "chars.jsonl").write_text("\n".join(json.dumps({"text": line}) for line in lines))
    return folder


@pytest.fixture
def no_figures(monkeypatch):
    """Skip rendering (seconds per figure on a shared CPU) in runs that test the numbers, not the figures."""
    from common.plots import plt
    from common.run import Run

    monkeypatch.setattr(Run, "save_figure", lambda self, fig, name: plt.close(fig) or [])


def _run_dir(out: Path) -> Path:
    (run,) = [p for p in out.glob("probing/*/*/*") if p.is_dir()]
    return run


def test_planted_digit_neuron_is_found_at_k1_and_random_neurons_are_near_chance(planted, tmp_path, no_figures):
    argv = ["--model", str(planted / "model"), "--data", f"chars={planted / 'chars.jsonl'}", "--num_tokens", "1500",
            "--seq_len", "64", "--concepts", "digits", "--k", "1", "2", "--max_examples", "300",
            "--min_examples", "30", "--dense_model", "none", "--out", str(tmp_path), "--no-progress"]
    assert probing.main(argv) == 0
    run = _run_dir(tmp_path)
    table = pd.read_csv(run / "probing.csv")
    assert list(table.columns) == ["concept", "layer", "expert", "k", "selection", "f1", "precision", "recall",
                                   "num_positive", "num_negative", "neurons"]
    assert set(table.concept) == {"digits"} and set(table.layer) == {0, 1}
    planted_rows = table[(table.expert.astype(str) == str(PLANTED_EXPERT)) & (table.k == 1)]
    ranked = planted_rows[planted_rows.selection == "ranked"]
    random = planted_rows[planted_rows.selection == "random"]
    assert len(ranked) == 2 and (ranked.f1 == 1.0).all()
    assert (ranked.neurons.astype(str) == str(PLANTED_NEURON)).all()  # the CSV names the planted neuron
    k2 = table[(table.expert.astype(str) == str(PLANTED_EXPERT)) & (table.k == 2) & (table.selection == "ranked")]
    assert all(str(n).split()[0] == str(PLANTED_NEURON) and len(str(n).split()) == 2 for n in k2.neurons), k2
    assert all(len(str(n).split()) == k for n, k in zip(table.neurons, table.k, strict=True))
    assert (ranked.num_positive == 300).all() and (ranked.num_negative == 300).all()
    assert (random.f1 < 0.8).all(), random  # a blind neuron: about the 0.67 of always answering "digit"
    others = table[(table.expert.astype(str) != str(PLANTED_EXPERT)) & (table.k == 1) & (table.selection == "ranked")]
    assert len(others) and (others.f1 < 0.8).all(), others
    best = pd.read_csv(run / "probing_best_layer.csv")
    top = best[(best.k == 1) & (best.selection == "ranked")].iloc[0]
    assert top.f1 == 1.0 and str(top.expert) == str(PLANTED_EXPERT) and top.model == "moe"
    assert str(top.neurons) == str(PLANTED_NEURON)
    info = json.loads((run / "run.json").read_text())
    assert info["dense_baseline"]["resolved"] is None and info["cells"]["skipped"] == 0


# ------------------------------------------------------------------------------------------------ the script


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from common.model import tiny_tokenizer

    path = tmp_path_factory.mktemp("dense-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, bos_token_id=256, eos_token_id=257,
                         pad_token_id=258)
    LlamaForCausalLM(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("probe-data") / "mixed.jsonl"
    docs = [f"def f{i}(x):\n    return x + {i}  # Note {i}.\nThe value is {i * 7}, Said Alice." for i in range(60)]
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    return path


def _argv(out: Path, data: Path, *extra: str) -> list[str]:
    return ["--data", f"mixed={data}", "--num_tokens", "1500", "--seq_len", "64", "--k", "1", "4", "--max_examples",
            "120", "--min_examples", "20", "--concepts", "digits", "capitalized", "newline", "--out", str(out),
            "--no-progress", *extra]


def test_same_model_dense_layers_as_baseline(tmp_path, text_file, monkeypatch):
    argv = _argv(tmp_path, text_file, "--model", "random:deepseek_v3", "--dense_model", "same")
    assert probing.main(argv) == 0
    run = _run_dir(tmp_path)
    table = pd.read_csv(run / "probing.csv")
    dense = table[table.expert == "dense"]
    assert len(dense) and set(dense.layer) == {0}  # the tiny deepseek_v3's dense layer
    assert set(table[table.expert != "dense"].layer) == {1, 2, 3}
    assert set(table.selection) == {"ranked", "random"} and set(table.k) == {1, 4}
    assert table.f1.between(0, 1).all()
    best = pd.read_csv(run / "probing_best_layer.csv")
    assert set(best.model) == {"moe", "dense"}
    examples = pd.read_csv(run / "probing_examples.csv")
    assert (examples.num_positive <= 120).all() and (examples.num_positive <= examples.seen_positive).all()
    for name in ("probing_f1_vs_k", "probing_concepts"):
        assert (run / "figures" / f"{name}.png").is_file() and (run / "figures" / f"{name}.pdf").is_file()
    readme = (run / "README.md").read_text()
    assert "Undocumented" not in readme
    from common.plots import plt
    from common.run import Run

    monkeypatch.setattr(Run, "save_figure", lambda self, fig, name: plt.close(fig) or [])
    assert probing.main(argv) == 0  # deterministic
    runs = sorted(p for p in tmp_path.glob("probing/*/*/*") if p.is_dir())
    assert (runs[0] / "probing.csv").read_bytes() == (runs[1] / "probing.csv").read_bytes()


def test_separate_dense_model_with_its_own_layers(tmp_path, text_file, dense_dir, no_figures):
    argv = _argv(tmp_path, text_file, "--model", "random:olmoe", "--layers", "0", "--dense_model", str(dense_dir),
                 "--dense_layers", "-1", "--negatives", "all")
    assert probing.main(argv) == 0
    run = _run_dir(tmp_path)
    table = pd.read_csv(run / "probing.csv")
    assert set(table[table.expert == "dense"].layer) == {1}
    assert set(table[table.expert != "dense"].layer) == {0}
    info = json.loads((run / "run.json").read_text())
    assert info["dense_baseline"]["layers"] == [1] and "dense_tokens" in info


@pytest.fixture(scope="module")
def moe_dir(saved_tiny_model):
    return saved_tiny_model("olmoe")


BAD = {
    "unknown concept": (["--concepts", "digits", "nonsense"], "unknown concept(s) nonsense"),
    "zero min_examples": (["--min_examples", "0"], "argument --min_examples: must be at least 2 (got 0)"),
    "dense model as --model": (["--model", "{dense}"], "has no MoE layers"),
    "same without dense layers": (["--model", "random:mixtral", "--dense_model", "same"],
                                  "random:mixtral has no dense FFN layers"),
    "MoE as dense baseline": (["--model", "random:olmoe", "--dense_model", "{moe}"], "is a MoE model"),
    "missing dense layer": (["--model", "random:olmoe", "--dense_model", "{dense}", "--dense_layers", "5"],
                            "--dense_layers: layer 5 does not exist"),
    "max below min": (["--max_examples", "10", "--min_examples", "20"], "below --min_examples"),
    "bad fraction": (["--test_fraction", "1.5"], "argument --test_fraction: must lie strictly between 0 and 1"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_one_line_exit_2_nothing_written(case, tmp_path, text_file, dense_dir, moe_dir, capsys):
    extra, message = BAD[case]
    extra = [e.format(dense=dense_dir, moe=moe_dir) for e in extra]
    code = probing.main([*_argv(tmp_path / "results", text_file), *extra])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "Traceback" not in err and message in lines[0], lines[0]
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("flags", [["--help"], ["--list-concepts"], ["--concepts", "nonsense"]])
def test_help_listing_and_flag_errors_import_nothing_heavy(flags):
    result, heavy = run_script("probing.py", *flags, timeout=120)
    assert heavy == [], (heavy, result.stderr)
    if flags == ["--help"]:
        assert result.returncode == 0 and "--max_examples" in result.stdout and "a few minutes" in result.stdout
    elif flags == ["--list-concepts"]:
        assert result.returncode == 0 and all(name in result.stdout for name in BY_NAME)
    else:
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and "nonsense" in result.stderr
