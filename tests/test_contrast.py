"""contrast.py: the activation counts equal a naive loop; the z-test, BH, Newcombe and the classifier equal their
textbook / scipy / sklearn references; the document bootstrap widens where documents are all-or-nothing; "on"
equals the router's own softmax over the lifted logits; a planted behaviour expert is found first and switching it
off steers generation to B (random experts do not); the script writes its documented outputs and refuses bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import stats

import contrast as script
from common.analysis import contrast
from common.config import ModelSpec
from common.data import resolve_domains, token_batches
from common.hooks import capture, registered_hook_count
from common.hooks.intervene import ACTIVATION_MARGIN
from common.model import MoEModel, load_moe
from common.plots import MAX_PNG_WIDTH


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("contrast-data")
    (folder / "a.jsonl").write_text("\n".join(json.dumps({"text": f"the quick brown fox {i} jumps over the lazy dog "
                                                                   "and runs away into the forest"}) for i in range(40)))
    (folder / "b.jsonl").write_text("\n".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + 1"})
                                              for i in range(60)))
    return [f"prose={folder / 'a.jsonl'}", f"code={folder / 'b.jsonl'}"]


def _load(path: Path) -> MoEModel:
    return load_moe(ModelSpec(model=str(path), device="cpu", dtype="float32"))


def test_counts_equal_a_naive_loop(saved_tiny_model, data):
    moe = _load(saved_tiny_model("olmoe"))
    batches = list(token_batches(resolve_domains(data), moe.tokenizer, num_tokens=150, seq_len=24, batch_size=4,
                                 progress=False))
    counts = contrast.ContrastCounts(moe.layers, moe.vocab_size, moe.device)
    E = moe.layers[0].num_experts
    naive = np.zeros((2, len(moe.layers), E))
    tokens, docs = np.zeros(2), [{}, {}]
    vocab = np.zeros((2, moe.vocab_size))
    with capture(moe, moe.layers, ("topk",)) as records:
        for batch in batches:
            moe.forward(batch.input_ids, batch.attention_mask)
            counts.update(records, batch)
            for b in range(batch.input_ids.shape[0]):
                d = int(batch.domain_ids[b])
                for s in range(batch.input_ids.shape[1]):
                    if not batch.count_mask[b, s]:
                        continue
                    t = b * batch.input_ids.shape[1] + s
                    tokens[d] += 1
                    vocab[d, int(batch.input_ids[b, s])] += 1
                    doc = docs[d].setdefault(int(batch.doc_ids[b, s]), np.zeros((len(moe.layers), E)))
                    for i, layer in enumerate(moe.layers):
                        rec = records[layer.layer]
                        for e, w in zip(rec.topk_index[t].tolist(), rec.topk_weight[t].tolist(), strict=True):
                            if w != 0:
                                naive[d, i, e] += 1
                                doc[i, e] += 1
    np.testing.assert_array_equal(counts.tokens.numpy(), tokens)
    assert tokens.tolist() == [150, 150]
    np.testing.assert_array_equal(counts.routed.numpy(), naive)
    np.testing.assert_array_equal(counts.vocab.numpy(), vocab)
    for d in (0, 1):
        per_doc = counts.doc_routed[d].numpy()
        assert set(np.nonzero(counts.doc_tokens[d].numpy())[0]) == set(docs[d])
        for doc, expected in docs[d].items():
            np.testing.assert_array_equal(per_doc[doc], expected)
        np.testing.assert_array_equal(per_doc.sum(0), naive[d])
    np.testing.assert_array_equal(naive.sum(-1), 2 * np.repeat(tokens[:, None], len(moe.layers), 1))  # top-2


def test_statistics_equal_their_references():
    rng = np.random.default_rng(0)
    n1, n2 = 900, 1300
    x1, x2 = rng.integers(0, n1, 40), rng.integers(0, n2, 40)
    x1[:3], x2[:3] = 0, 0  # never chosen: the test has nothing to say
    z, p = contrast.two_proportion_z(x1, n1, x2, n2)
    for i in range(3, 40):  # the pooled z-test is the 2×2 chi-square test without continuity correction
        table = [[x1[i], n1 - x1[i]], [x2[i], n2 - x2[i]]]
        chi2, reference, _, _ = stats.chi2_contingency(table, correction=False)
        assert p[i] == pytest.approx(reference, rel=1e-9, abs=1e-300)
        assert z[i] ** 2 == pytest.approx(chi2, rel=1e-9)
    assert (p[:3] == 1).all() and (z[:3] == 0).all()
    np.testing.assert_allclose(contrast.benjamini_hochberg(p), stats.false_discovery_control(p, method="bh"),
                               rtol=1e-12)
    # Newcombe (1998), Table II, method 10: 56/70 − 48/80 -> (0.0524, 0.3339); 9/10 − 3/10 -> (0.1705, 0.8090)
    low, high = contrast.newcombe(np.array([56, 9]), np.array([70, 10]), np.array([48, 3]), np.array([80, 10]))
    np.testing.assert_allclose(low, [0.0524, 0.1705], atol=5e-5)
    np.testing.assert_allclose(high, [0.3339, 0.8090], atol=5e-5)
    # Wilson (1927) as statsmodels / R's prop.test(correct = FALSE) give it: 81/263 -> (0.2553, 0.3662)
    lo, hi = contrast.wilson(np.array([81]), np.array([263]))
    np.testing.assert_allclose([lo[0], hi[0]], [0.2553, 0.3662], atol=5e-5)


def test_document_bootstrap_widens_where_documents_are_all_or_nothing():
    """40 documents per set of 50 tokens each; in A half the documents route every token to the expert and half
    none (p_A = ½), in B every document routes half its tokens (p_B = ½ too, but independent tokens)."""
    a_docs = np.repeat([[50.0], [0.0]], 20, axis=0)
    b_docs = np.full((40, 1), 25.0)
    tokens = np.full(40, 50.0)
    low, high = contrast.bootstrap_delta([a_docs, b_docs], [tokens, tokens], 2000, seed=0)
    newcombe_low, newcombe_high = contrast.newcombe(1000, 2000, 1000, 2000)
    assert high[0] - low[0] > 4 * (newcombe_high - newcombe_low)
    assert low[0] < 0 < high[0]
    # the textbook standard error of a mean of 40 documents of rate 0 or 1: 0.5 / sqrt(40) ≈ 0.079, so ±0.155
    assert high[0] - low[0] == pytest.approx(2 * 1.96 * 0.5 / np.sqrt(40), rel=0.15)
    assert np.isnan(contrast.bootstrap_delta([a_docs[:1], b_docs], [tokens[:1], tokens], 100, 0)[0]).all()


def test_naive_bayes_equals_sklearn():
    from sklearn.naive_bayes import MultinomialNB

    counts = np.array([[5, 0, 3, 0, 9, 1], [0, 7, 3, 2, 0, 1]], dtype=float)
    reference = MultinomialNB(alpha=1.0).fit(counts, [0, 1])
    nb = contrast.NaiveBayes(counts, ignore=[5])
    np.testing.assert_allclose(nb.log_odds, reference.feature_log_prob_[1] - reference.feature_log_prob_[0])
    text = [0, 1, 1, 4, 5, 5]
    assert nb.b_share(text) == (2, 4)  # token 5 ignored; tokens 1, 1 favour B
    row = np.bincount([t for t in text if t != 5], minlength=6)[None]
    log_posterior = reference.predict_joint_log_proba(row)[0] - reference.class_log_prior_  # equal priors
    assert nb.log_odds_b(text) == pytest.approx(log_posterior[1] - log_posterior[0])


def test_steering_sets_respect_the_layer_caps_and_random_sets_match_them():
    layers = [type("L", (), {"layer": i, "num_experts": 4, "top_k": 2})() for i in range(2)]
    table = pd.DataFrame({"layer": [0] * 4 + [1] * 4, "expert": list(range(4)) * 2,
                          "delta": [0.9, 0.8, 0.7, -0.9, 0.1, -0.8, -0.7, -0.6],
                          "q_value": [0.001] * 8, "candidate": ["A", "A", "A", "B", "A", "B", "B", "B"]})
    a_set, b_set, chosen = contrast.steering_sets(table, layers, top=4)
    assert a_set == {0: (0, 1), 1: (0,)}  # layer 0 keeps k = 2 to choose from: its third A-expert is skipped
    assert b_set == {0: (3,), 1: (1, 2)}  # at most k = 2 on per layer: layer 1's third B-expert is skipped
    assert chosen == [("A", 1, 0, 0), ("A", 2, 0, 1), ("A", 3, 1, 0), ("B", 1, 0, 3), ("B", 2, 1, 1), ("B", 3, 1, 2)]
    drawn = contrast.random_like(a_set, layers, [a_set, b_set], np.random.default_rng(0))
    # layer 1: outside both sets only expert 3 is left; layer 0: only expert 2 is, so the draw falls back to the
    # experts outside the A set alone (2 and 3)
    assert drawn == {0: (2, 3), 1: (3,)}
    assert contrast.set_text(drawn) == "L0:E2 L0:E3 L1:E3"


def test_on_is_the_routers_softmax_over_lifted_logits_and_off_never_routes(saved_tiny_model, data):
    moe = _load(saved_tiny_model("olmoe"))  # OLMoE: softmax over all experts, then top-k, not renormalised
    ids = torch.randint(0, 250, (3, 12), generator=torch.Generator().manual_seed(0))
    baseline = registered_hook_count(moe.model)
    layer = moe.layers[1]  # edited at layer 1 only, so that its input (and its logits before the edit) stay the same
    with capture(moe, [layer], ("logits", "topk")) as records:
        moe.forward(ids)
        logits = records[layer.layer].logits.clone()
        with contrast.steered(moe, {1: (2,)}, {1: (6,)}):
            moe.forward(ids)
            index, weight = records[layer.layer].topk_index, records[layer.layer].topk_weight
    with capture(moe, moe.layers[:1], ("topk",)) as records, contrast.steered(moe, {0: (3, 5)}, {}):
        moe.forward(ids)
        assert not torch.isin(records[0].topk_index, torch.tensor([3, 5])).any()
    assert registered_hook_count(moe.model) == baseline  # every wrapper and hook removed
    top = logits.max(-1, keepdim=True).values
    lifted = logits.clone()
    lifted[:, 6] = (top + torch.clamp(top.abs() / 32, min=ACTIVATION_MARGIN)).squeeze(-1)
    lifted[:, 2] = float("-inf")
    probs = torch.softmax(lifted.double(), -1)
    expected_weight, expected_index = probs.topk(2, dim=-1)
    assert (index == 6).any(-1).all() and not (index == 2).any()
    torch.testing.assert_close(index.sort(-1).values, expected_index.sort(-1).values)
    torch.testing.assert_close(weight.double().sort(-1).values, expected_weight.sort(-1).values, rtol=1e-5, atol=1e-6)
    # the forced expert takes more than any other expert's weight
    assert (weight[index == 6] >= weight.max(-1).values - 1e-7).all()


def test_greedy_generation_with_the_cache_equals_re_forwarding(saved_tiny_model):
    moe = _load(saved_tiny_model("olmoe"))
    prompts = torch.randint(0, 250, (3, 6), generator=torch.Generator().manual_seed(1))
    found = contrast.generate(moe, prompts, 5, np.zeros((3, 5)), greedy=True, temperature=1.0, eos_id=None,
                              batch_size=2)
    for row, tokens in zip(prompts, found, strict=True):
        sequence = row.tolist()
        for _ in range(5):
            sequence.append(int(moe.forward(torch.tensor([sequence])).logits[0, -1].argmax()))
        assert tokens == sequence[6:]
    # inverse-CDF sampling: a uniform of 0 takes the first token with probability > 0, one just below 1 the last
    sampled = contrast.generate(moe, prompts[:1], 1, np.full((1, 1), 1 - 1e-12), greedy=False, temperature=1.0,
                                eos_id=None, batch_size=1)
    assert sampled[0][0] >= moe.vocab_size - 5


def test_planted_behaviour_expert_is_found_and_switching_it_off_steers_to_b(tmp_path):
    from tests.planted_contrast import A_EXPERT, B_EXPERT, save_model, write_data

    model = save_model(tmp_path / "model")
    specs = write_data(tmp_path)
    argv = ["--model", str(model), "--data", *specs, "--num_tokens", "300", "--seq_len", "64", "--top", "1",
            "--prompts", "6", "--prompt_len", "8", "--max_new_tokens", "8", "--draws", "4", "--no-progress",
            "--no-figures", "--out", str(tmp_path / "out")]
    assert script.main(argv) == 0
    (run,) = [p for p in (tmp_path / "out").glob("contrast/*/*/*") if p.is_dir()]
    experts = pd.read_csv(run / "contrast_experts.csv")
    best = experts.loc[experts.delta.idxmax()]
    assert (best.layer, best.expert, best.p_a, best.p_b) == (0, A_EXPERT, 1.0, 0.0)
    assert experts.delta.nlargest(2).iloc[1] < 0.6  # the half-domain experts: Δ ≈ ½
    assert experts.loc[experts.delta.idxmin()].expert == B_EXPERT
    top = pd.read_csv(run / "contrast_top.csv")
    assert top[["side", "rank", "layer", "expert"]].values.tolist() == [["A", 1, 0, A_EXPERT], ["B", 1, 0, B_EXPERT]]
    steering = pd.read_csv(run / "contrast_steering.csv").set_index(["condition", "draw"])
    off, none = steering.loc[("A off", 0)], steering.loc[("none", 0)]
    randoms = steering.loc["random off"]
    assert len(randoms) == 4 and (off.b_token_share > randoms.b_token_share + 0.5).all()
    assert off.b_token_share > 0.9 and none.b_token_share < 0.1 and off.p_b_mean > 0.9
    assert off.delta_nll_a > 3 and abs(off.delta_nll_b) < 1e-6  # A's expert off hurts A, not B
    assert (randoms.delta_nll_a.abs() < 1e-6).all()
    refs = steering.loc[["reference A", "reference B"]].b_token_share.to_numpy()
    assert refs.tolist() == [0.0, 1.0]


def test_script_writes_documented_outputs_and_refuses_bad_input(tmp_path, data, capsys):
    argv = ["--model", "random:olmoe", "--data", *data, "--num_tokens", "200", "--seq_len", "32", "--batch_size", "8",
            "--prompts", "3", "--prompt_len", "6", "--max_new_tokens", "4", "--draws", "2", "--bootstrap", "100",
            "--no-progress", "--out", str(tmp_path / "out")]
    assert script.main(argv) == 0
    (run,) = [p for p in (tmp_path / "out").glob("contrast/*/*/*") if p.is_dir()]
    experts = pd.read_csv(run / "contrast_experts.csv")
    assert len(experts) == 4 * 8 and (experts.tokens_a == 200).all()
    np.testing.assert_allclose(experts.groupby("layer").p_a.sum(), 2.0)  # top-2: two experts per token
    rates = np.load(run / "contrast_rates.npy")
    assert rates.shape == (2, 4, 8)
    np.testing.assert_array_equal(rates[0].reshape(-1), experts.p_a)
    written = {p.name for p in (run / "figures").glob("*.png")}
    assert {"contrast_delta.png", "contrast_volcano.png"} <= written
    for name in written:  # within the page width
        assert Image.open(run / "figures" / name).size[0] <= MAX_PNG_WIDTH, name
    if (run / "contrast_steering.csv").exists():
        steering = pd.read_csv(run / "contrast_steering.csv")
        assert (steering[steering.condition == "none"].kl_a == 0).all()
        assert "contrast_steering.png" in written
    capsys.readouterr()
    folder = Path(data[0].split("=", 1)[1]).parent
    (folder / "blank.jsonl").write_text(json.dumps({"text": "   "}))
    bad = {  # one line, exit 2, nothing written
        "A = B": (["--data", f"x={data[0].split('=', 1)[1]}", f"y={data[0].split('=', 1)[1]}"], "are the same data"),
        "A = B unnamed": (["--data", data[0], data[0]], "A and B are the same data"),
        "three sets": (["--data", *data, "demo:french"], "exactly two sets, A then B; got 3"),
        "one set": (["--data", data[0]], "exactly two sets, A then B; got 1"),
        "a dense layer": (["--model", "random:qwen3_moe", "--layers", "0"], "layer 0 is a dense (non-MoE) layer"),
        "nothing counted": (["--data", data[0], f"blank={folder / 'blank.jsonl'}"], "has no token to count"),
        "alpha": (["--alpha", "1"], "must lie strictly between 0 and 1"),
        "prompt too long": (["--prompt_len", "30", "--max_new_tokens", "10000"], "exceeds the model's context length"),
    }
    for case, (extra, message) in bad.items():
        assert script.main([*argv[:-2], *extra, "--out", str(tmp_path / "bad")]) == 2, case
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (case, err)
        assert not (tmp_path / "bad").exists(), case


def test_a_stopped_run_resumes_to_identical_results(tmp_path, data):
    """SIGTERM during the measurement pass keeps a checkpoint; the same command again finishes it, equal to an
    uninterrupted run (every table and array, byte for byte)."""
    import os
    import signal

    from common.run.checkpoint import FAULT_ENV

    argv = ["--model", "random:olmoe", "--data", *data, "--num_tokens", "120", "--seq_len", "32", "--batch_size", "2",
            "--prompts", "2", "--prompt_len", "6", "--max_new_tokens", "3", "--draws", "1", "--bootstrap", "50",
            "--no-progress", "--no-figures", "--threads", "1", "--checkpoint_every", "0"]

    def files(out: Path) -> dict[str, bytes]:
        (run,) = [p for p in out.glob("contrast/*/*/*") if p.is_dir() and not p.name.startswith(".")]
        return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.suffix in (".csv", ".npy")}

    assert script.main([*argv, "--out", str(tmp_path / "reference")]) == 0
    pid = os.fork()
    if pid == 0:  # the child stops itself while batch 3 is processed
        code = 99
        try:
            os.environ[FAULT_ENV] = "3:SIGTERM"
            code = script.main([*argv, "--out", str(tmp_path / "stopped")])
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 128 + signal.SIGTERM
    assert list((tmp_path / "stopped").glob("contrast/*/*/.*.partial"))
    assert script.main([*argv, "--out", str(tmp_path / "stopped")]) == 0
    run = next(p for p in (tmp_path / "stopped").glob("contrast/*/*/*") if p.is_dir())
    assert [r["batches_done"]["data"] for r in json.loads((run / "run.json").read_text())["resumed"]] == [3]
    assert files(tmp_path / "stopped") == files(tmp_path / "reference")


def test_heldout_windows_skip_the_measured_documents(tmp_path, tiny_tokenizer):
    from common.data import Domain
    from common.data.documents import iter_documents

    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": f"<{i:02d}>" + "xyz" * (3 + i % 4)})
                                                   for i in range(12)))
    domain = Domain("d", str(tmp_path / "docs.jsonl"))
    order = [text[:4] for text in iter_documents(domain, "train", seed=0)]  # the measurement's (seeded) order
    windows = contrast.heldout_windows(domain, tiny_tokenizer, split="train", skip=5, seed=0, length=8, count=20)
    assert windows.shape[1] == 8  # the tiny tokenizer adds no BOS: 8 text tokens each
    texts = [tiny_tokenizer.decode(w.tolist()) for w in windows]
    starts = [t[:4] for t in texts if t.startswith("<")]
    assert starts == order[5:]  # every later document once, in order: the first windows, round-robin
    assert all(not t.startswith("<") for t in texts[len(starts):])  # then their second windows
    assert len(texts) == sum((4 + 3 * (3 + int(s[1:3]) % 4)) // 8 for s in order[5:])
