"""stability.py: the change metrics and the weighted Jaccard equal naive loops; the bottom-k sample keeps each id's
smallest keys whatever the batch order; a planted router whose two logits lie within bfloat16's precision for the
vowels changes exactly the vowels' routing in bfloat16 (model and router alone); float32 against float32 is exactly
zero; padding and batch comparisons align the same tokens (right vs right is exactly 0, float64 left vs right ~0);
the script writes its documented outputs and refuses bad input in one line."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from transformers import OlmoeConfig, OlmoeForCausalLM

import stability
from common.analysis import stability as st
from common.config import ModelSpec
from common.data import resolve_domains, token_batches
from common.hooks import capture
from common.model import MoEModel, build_random_model, load_moe, tiny_tokenizer
from common.plots import MAX_PNG_WIDTH

VOWELS = "aeiou"
# Router weights found by a search on this construction: in float32 expert 5's logit beats expert 4's by 0.010
# (1.9630 vs 1.9527, under one and a half bfloat16 steps of 2^-7 at that size), in bfloat16 expert 4's wins by one step
# (1.9609 vs 1.9531): the rounding of the router weights and of its input reverses them. Every other gap is ≥ 0.9.
NEAR_B, NEAR_C, NEAR_C2 = 0.5058503150939941, 0.5020183324813843, 0.004781106021255255


def _is_vowel(token: int) -> bool:
    return token < 128 and chr(token) in VOWELS


def build_near_tie_model() -> OlmoeForCausalLM:
    """A two-layer OLMoE with a constant residual (attention and expert outputs are 0): the embedding of a token is
    4 on coordinate 1 (vowels) or 0 (every other id), plus 1 on coordinate 2, so each router sees one of two inputs.
    Every other id: experts 0 (logit 3.9) and 1 (1.9) at both layers, far apart. Vowels: layer 0 sends them to
    expert 0 (3.9) and the second slot goes to expert 5 in float32, expert 4 in bfloat16 (the top-k set changes);
    layer 1 sends them to experts 5 and 4 (expert 6, third, at 0.97) with 5 first in float32 and 4 first in
    bfloat16 (the set stays, the top-1 changes)."""
    config = OlmoeConfig(vocab_size=259, hidden_size=16, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                         max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=256, eos_token_id=257,
                         pad_token_id=258)
    torch.manual_seed(0)
    model = OlmoeForCausalLM(config).eval()
    with torch.no_grad():
        embedding = torch.zeros(259, 16)
        for token in range(259):
            embedding[token, 1 if _is_vowel(token) else 0] = 4.0
            embedding[token, 2] = 1.0
        model.model.embed_tokens.weight.copy_(embedding)
        for index, layer in enumerate(model.model.layers):
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.experts.down_proj.zero_()
            router = torch.zeros(8, 16)
            router[0, 0], router[1, 0] = 1.0, 0.5
            if index == 0:
                router[0, 1] = 1.0
            else:
                router[6, 1] = 0.25
            router[5, 1], router[4, 1], router[4, 2] = NEAR_B, NEAR_C, NEAR_C2
            layer.mlp.gate.weight.copy_(router)
    return model


@pytest.fixture(scope="module")
def near_tie_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("near-tie")
    build_near_tie_model().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def letters(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 8))) for _ in range(400)]
    path = tmp_path_factory.mktemp("letters") / "letters.jsonl"
    path.write_text("\n".join(json.dumps({"text": " ".join(words[i:i + 20])}) for i in range(0, 400, 20)))
    return path


# ------------------------------------------------------------------------------------------ metrics vs loops


def test_route_changes_and_weighted_jaccard_equal_naive_loops():
    rng = np.random.default_rng(1)
    num, k, choices = 300, 3, 7
    ref_index = torch.tensor(np.stack([rng.choice(choices, k, replace=False) for _ in range(num)]))
    var_index = ref_index.clone()
    for t in range(num):  # a third keep the set in another order, a third swap one expert
        if t % 3 == 1:
            var_index[t] = var_index[t].flip(0)
        elif t % 3 == 2:
            var_index[t, 0] = next(e for e in range(choices) if e not in ref_index[t].tolist())
    ref_weight = torch.tensor(rng.random((num, k)), dtype=torch.float32)
    var_weight = ref_weight.clone()
    var_weight[::4] += 0.01
    var_weight[5, :] = var_weight[5, 0]  # equal weights: top-1 is the lowest index
    change = st.route_changes(ref_index, ref_weight, var_index, var_weight, choices)
    for t in range(num):
        ref = {int(e): float(w) for e, w in zip(ref_index[t], ref_weight[t], strict=True)}
        var = {int(e): float(w) for e, w in zip(var_index[t], var_weight[t], strict=True)}
        assert bool(change.set_changed[t]) == (set(ref) != set(var))

        def top1(routes):
            return min(e for e, w in routes.items() if w == max(routes.values()))

        assert bool(change.top1_changed[t]) == (top1(ref) != top1(var))
        naive = sum(abs(ref.get(e, 0.0) - var.get(e, 0.0)) for e in range(choices))
        assert float(change.abs_dw[t]) == pytest.approx(naive, abs=1e-6)
    assert 0 < int(change.set_changed.sum()) < num

    a, b = rng.integers(0, num, 200), rng.integers(0, num, 200)
    ours = st.weighted_jaccard(ref_index[a], ref_weight[a], var_index[b], var_weight[b])
    dense_a = st.dense_weights(ref_index[a], ref_weight[a], choices).double()
    dense_b = st.dense_weights(var_index[b], var_weight[b], choices).double()
    for i in range(200):
        low = sum(min(float(dense_a[i, e]), float(dense_b[i, e])) for e in range(choices))
        high = sum(max(float(dense_a[i, e]), float(dense_b[i, e])) for e in range(choices))
        assert float(ours[i]) == pytest.approx(low / high, abs=1e-6)
    zero = torch.zeros(1, k)
    assert float(st.weighted_jaccard(ref_index[:1], zero, var_index[:1], zero)[0]) == 1.0  # both empty: identical


def test_change_stats_sum_per_layer_and_domain():
    stats = st.ChangeStats(num_layers=2, num_domains=2)
    change = st.RouteChange(torch.tensor([True, False, True, False]), torch.tensor([False, False, True, False]),
                            torch.tensor([0.5, 0.0, 1.5, 0.25]))
    stats.update(("dtype", "float32", "bfloat16"), 1, change, torch.tensor([0, 0, 1, 1]))
    rows = pd.DataFrame(stats.rows([3, 7], ["x", "y"]))
    at = rows.set_index(["layer", "domain"])
    assert at.loc[(7, "x"), "topk_changed"] == 1 and at.loc[(7, "y"), "topk_changed"] == 1
    assert at.loc[(7, "all"), "topk_changed_fraction"] == 0.5 and at.loc[(7, "all"), "top1_changed_fraction"] == 0.25
    assert at.loc[(7, "all"), "weight_changed_fraction"] == 0.75
    assert at.loc[(7, "all"), "mean_abs_dw"] == pytest.approx(2.25 / 4) and at.loc[(7, "y"), "max_abs_dw"] == 1.5
    assert at.loc[(7, "x"), "max_abs_dw"] == 0.5 and at.loc[(3, "all"), "tokens"] == 0  # layer 3 saw nothing


def test_bottom_k_sample_is_order_free_and_keeps_each_ids_smallest_keys():
    rng = np.random.default_rng(2)
    n = 5000
    ids, keys = rng.integers(0, 40, n), rng.random(n)
    index = rng.integers(0, 8, (n, 2))
    weight = rng.random((n, 2)).astype(np.float32)

    def filled(order, chunk) -> st.RouteSample:
        sample = st.RouteSample(size=6, vocab=16)  # ids beyond 16: the counts grow
        for start in range(0, n, chunk):
            part = order[start:start + chunk]
            routes = [(torch.tensor(index[part]), torch.tensor(weight[part]))] * 3
            sample.add(torch.tensor(ids[part]), torch.tensor(part), torch.tensor(keys[part]), routes)
            if start % (4 * chunk) == 0:
                sample.compact()
        sample.compact()
        return sample

    first, second = filled(np.arange(n), 97), filled(rng.permutation(n), 500)
    for sample in (first, second):
        np.testing.assert_array_equal(sample.counts[:40], np.bincount(ids, minlength=40))
        kept = {(int(i), float(k)) for i, k in zip(sample.ids, sample.keys, strict=True)}
        naive = {(int(i), float(k)) for i in range(40) for k in sorted(keys[ids == i])[:6]}
        assert kept == naive
        rows = sample.windows  # the occurrence number: its route travelled with it
        np.testing.assert_array_equal(sample.index[:, 2], index[rows])
    np.testing.assert_array_equal(np.sort(first.windows), np.sort(second.windows))


def test_gap_bins_count_tokens_and_changes_like_a_loop():
    rng = np.random.default_rng(4)
    logits = torch.tensor(rng.normal(size=(500, 6)))
    logits[:20, 1] = logits[:20, 0]  # exact ties: gap 0
    gap = st.topk_gap(logits, 2)
    for t in range(0, 500, 37):
        ordered = sorted(logits[t].tolist(), reverse=True)
        assert float(gap[t]) == pytest.approx(ordered[1] - ordered[2], abs=1e-6)
    assert torch.isinf(st.topk_gap(logits[:, :2], 2)).all()  # k choices: nothing to tie with
    changed = torch.tensor(rng.random(500) < 0.3)
    margins = st.MarginStats(num_layers=1)
    margins.update(("x", "a", "b"), 0, st.RouteChange(changed, changed, torch.zeros(500)), gap)
    rows = pd.DataFrame(margins.rows([5]))
    for row in rows.itertuples():
        inside = [(row.left <= float(g) < row.right) or (row.bin == 0 and float(g) < row.right)
                  or (row.bin == len(rows) - 1 and float(g) >= row.left) for g in gap]
        assert row.tokens == sum(inside) and row.topk_changed == int(changed[torch.tensor(inside)].sum())
    assert rows.tokens.sum() == 500


def test_frequency_bins_merge_single_ids():
    counts = np.array([5, 6, 9, 12, 100, 3000])
    # ⌊log2⌋ = 2, 2, 3, 3, 6, 11: the 11 bin (one id) joins 6, which then has two
    np.testing.assert_array_equal(st.frequency_bins(counts), [2, 2, 3, 3, 6, 6])
    np.testing.assert_array_equal(st.frequency_bins(np.array([5, 40, 41])), [5, 5, 5])  # lowest single goes up


def test_consistency_is_one_for_identity_routing_and_baseline_zero_for_disjoint_experts():
    """A router that reads only the token id: every id always gets its own experts, no two ids share one. Each id's
    same-id pairs give 1, its baseline pairs (other ids of its frequency) give 0; the pairs are all cross-window
    pairs when few, else --max_pairs of them."""
    sample = st.RouteSample(size=10, vocab=8)
    rng = np.random.default_rng(3)
    occurrences = [(token, window) for token in range(6) for window in range(8 + 2 * token)]
    ids = torch.tensor([t for t, _ in occurrences])
    windows = torch.tensor([w for _, w in occurrences])
    index = torch.stack([ids * 2, ids * 2 + 1], 1)
    weight = torch.tensor([[0.7, 0.3]]).expand(len(occurrences), 2)
    sample.add(ids, windows, torch.tensor(rng.random(len(occurrences))), [(index, weight), (index, weight.flip(1))])
    summary, tokens = st.consistency(sample, [3, 9], min_count=8, max_pairs=30, seed=0)
    table = pd.DataFrame(tokens)
    assert set(table.token_id) == set(range(6)) and set(table.layer) == {3, 9}
    assert (table.consistency == 1.0).all() and (table.baseline == 0.0).all()
    # 8–10 sampled occurrences, each in its own window: C(n, 2) pairs, capped at 30
    expected = {t: min(30, len(list(itertools.combinations(range(min(10, 8 + 2 * t)), 2)))) for t in range(6)}
    assert dict(zip(table[table.layer == 3].token_id, table[table.layer == 3].pairs, strict=True)) == expected
    assert (table.baseline_pairs == table.pairs).all()
    for row in summary:
        assert row["ids"] == 6 and row["same_id_mean"] == 1.0 and row["baseline_mean"] == 0.0
        assert row["difference_mean"] == 1.0 and row["difference_sem"] == 0.0
        assert row["pairs_same"] == sum(expected.values())


# ------------------------------------------------------------------------------------------ planted near-ties


def _routes(moe: MoEModel, ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    with capture(moe, moe.layers, ("logits", "topk")) as records:
        moe.forward(ids)
        return {m.layer: (records[m.layer].logits.float(), records[m.layer].topk_index, records[m.layer].topk_weight)
                for m in moe.layers}


def test_bfloat16_changes_exactly_the_near_tie_tokens(near_tie_model):
    full = load_moe(ModelSpec(model=str(near_tie_model), device="cpu", dtype="float32"))
    half = load_moe(ModelSpec(model=str(near_tie_model), device="cpu", dtype="bfloat16"))
    ids = torch.tensor([tiny_tokenizer()("the quick brown fox jumps over a lazy dog, quietly").input_ids])
    vowel = torch.tensor([_is_vowel(int(t)) for t in ids[0]])
    ref, var = _routes(full, ids), _routes(half, ids)
    e = int(ids[0].tolist().index(ord("e")))
    print("vowel 'e' logits of experts 4, 5 (float32, bfloat16):", ref[1][0][e, [4, 5]].tolist(),
          var[1][0][e, [4, 5]].tolist())
    # the construction: the two near logits swap order in bfloat16, and only the vowels have them
    assert ref[0][0][e, 5] > ref[0][0][e, 4] and var[0][0][e, 4] > var[0][0][e, 5]
    assert (ref[0][0][e, 5] - ref[0][0][e, 4]).item() < 2 * 2**-7
    changes = {layer: st.route_changes(ref[layer][1], ref[layer][2], var[layer][1], var[layer][2], 8) for layer in ref}
    assert torch.equal(changes[0].set_changed, vowel) and not changes[0].top1_changed.any()
    assert not changes[1].set_changed.any() and torch.equal(changes[1].top1_changed, vowel)
    assert (changes[0].abs_dw > 0.1)[vowel].all() and (changes[0].abs_dw < 0.01)[~vowel].all()

    router_only = st.RouterOnly(full.layers, ["bfloat16"])
    with router_only.active(), capture(full, full.layers, ("topk",)) as records:
        full.forward(ids)
        for m in full.layers:  # the router alone sees the same input rounded: the same tokens change
            alone = st.route_changes(records[m.layer].topk_index, records[m.layer].topk_weight,
                                     *router_only.routes[(m.layer, "bfloat16")], 8)
            assert torch.equal(alone.set_changed, changes[m.layer].set_changed)
            assert torch.equal(alone.top1_changed, changes[m.layer].top1_changed)


@pytest.mark.parametrize("arch", ["deepseek_v3", "llama4_text", "jetmoe", "gpt_oss"])
def test_router_alone_in_the_same_dtype_reads_exactly_the_routing_the_experts_receive(arch):
    """Biased grouped selection (DeepSeek-V3), dense sigmoid scores (Llama4), sorted gating (JetMoE), top-k on
    logits with a bias (gpt-oss): the router copy's decoded routing equals the captured one bit for bit."""
    model, tokenizer = build_random_model(arch)
    moe = MoEModel(model, tokenizer)
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    router_only = st.RouterOnly(moe.layers, ["float32"])
    with router_only.active(), capture(moe, moe.layers, ("topk",)) as records:
        moe.forward(ids)
        for m in moe.layers:
            index, weight = router_only.routes[(m.layer, "float32")]
            assert torch.equal(index.reshape(records[m.layer].topk_index.shape), records[m.layer].topk_index)
            assert torch.equal(weight.reshape(records[m.layer].topk_weight.shape), records[m.layer].topk_weight)
    assert not router_only.unsupported


def test_script_on_the_near_tie_model_counts_exactly_the_vowels(near_tie_model, letters, tmp_path):
    argv = ["--model", str(near_tie_model), "--data", f"letters={letters}", "--num_tokens", "400", "--seq_len", "64",
            "--batch_size", "4", "--dtypes", "bfloat16", "--compare", "dtype", "router", "--no-progress",
            "--no-figures", "--out", str(tmp_path)]
    assert stability.main(argv) == 0
    (run,) = tmp_path.glob("stability/*/*/*")
    table = pd.read_csv(run / "stability_summary.csv")
    table = table[table.domain == "all"].set_index(["comparison", "layer"])
    counted = 0
    vowels = 0  # the same counted tokens, read again through the data module
    for batch in token_batches(resolve_domains([f"letters={letters}"]), tiny_tokenizer(), num_tokens=400, seq_len=64,
                               batch_size=4, progress=False):
        tokens = batch.input_ids[batch.count_mask]
        counted += tokens.numel()
        vowels += sum(_is_vowel(int(t)) for t in tokens)
    assert vowels > 50
    for comparison in ("dtype", "router"):
        assert table.loc[(comparison, 0), "tokens"] == counted == 400
        assert table.loc[(comparison, 0), "topk_changed"] == vowels
        assert table.loc[(comparison, 0), "top1_changed_fraction"] == 0
        assert table.loc[(comparison, 1), "topk_changed"] == 0
        assert table.loc[(comparison, 1), "top1_changed_fraction"] == pytest.approx(vowels / counted)
    # near ties: at layer 0 the vowels' gap between the 2nd and 3rd logits is 0.0102 (bin [10^-2, 10^-1.5)), every
    # other token's 1.94 (bin [1, 10^0.5)); all the changes sit in the vowels' bin
    margin = pd.read_csv(run / "stability_margin.csv")
    first = margin[(margin.comparison == "dtype") & (margin.layer == 0)].set_index("bin")
    assert first.tokens[8] == vowels and first.left[8] == pytest.approx(0.01) and first.topk_changed[8] == vowels
    assert first.tokens[12] == counted - vowels and first.topk_changed.sum() == vowels


# ------------------------------------------------------------------------------------------ exactness, alignment


def test_padding_and_batch_comparisons_align_the_same_tokens():
    model, tokenizer = build_random_model("olmoe", dtype=torch.float64)
    model.set_experts_implementation("eager")
    moe = MoEModel(model, tokenizer)
    rng = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (4, 24), generator=rng)
    count = torch.ones(4, 24, dtype=torch.bool)
    count[:, 0] = False
    lengths = st.cut_lengths(torch.ones(4, 24, dtype=torch.long), rng)
    assert lengths.min() >= 12 and len(set(lengths.tolist())) > 1  # rows differ: padding happens
    right = st.cut_and_pad(ids, count, lengths, "right", 258)
    again = st.cut_and_pad(ids, count, lengths, "right", 258)
    left = st.cut_and_pad(ids, count, lengths, "left", 258)
    assert right.flat.numel() == int(sum(lengths) - 4)
    # the same tokens in the same order, on either side
    assert torch.equal(right.input_ids.reshape(-1)[right.flat], left.input_ids.reshape(-1)[left.flat])
    assert torch.equal(right.position_ids.reshape(-1)[right.flat], left.position_ids.reshape(-1)[left.flat])
    routes = {name: st.forward_routes(moe, moe.layers, p.input_ids, p.attention_mask, p.flat, p.position_ids)
              for name, p in (("right", right), ("again", again), ("left", left))}
    for i, m in enumerate(moe.layers):
        same = st.route_changes(*routes["right"][i], *routes["again"][i], m.num_choices)
        assert not same.set_changed.any() and float(same.abs_dw.max()) == 0.0  # right vs right: exactly 0
        sides = st.route_changes(*routes["right"][i], *routes["left"][i], m.num_choices)
        assert not sides.set_changed.any() and float(sides.abs_dw.max()) < 1e-6  # float64 weights stored as float32
    # batch: each row alone equals the row in its batch
    batched = st.forward_routes(moe, moe.layers, ids, torch.ones_like(ids), st.counted_flat(count))
    for row in range(4):
        alone = st.forward_routes(moe, moe.layers, ids[row:row + 1], torch.ones_like(ids[row:row + 1]),
                                  st.counted_flat(count[row:row + 1]))
        mine = slice(row * 23, (row + 1) * 23)
        for i, m in enumerate(moe.layers):
            change = st.route_changes(batched[i][0][mine], batched[i][1][mine], *alone[i], m.num_choices)
            assert not change.set_changed.any() and float(change.abs_dw.max()) < 1e-6


def test_float32_against_float32_is_exactly_zero_and_outputs_are_documented(tmp_path, capsys):
    argv = ["--model", "random:olmoe", "--num_tokens", "150", "--seq_len", "48", "--batch_size", "4", "--dtypes",
            "float32", "--min_count", "3", "--no-progress", "--out", str(tmp_path / "out")]
    assert stability.main(argv) == 0
    (run,) = (tmp_path / "out").glob("stability/*/*/*")
    summary = pd.read_csv(run / "stability_summary.csv")
    assert set(summary.comparison) == {"dtype", "router", "batch", "padding"}
    same = summary[summary.comparison.isin(["dtype", "router"])]
    assert (same.variant == "float32").all() and (same.tokens[same.domain == "all"] == 6 * 150).all()
    assert (same.topk_changed == 0).all() and (same.top1_changed_fraction == 0).all()
    assert (same.weight_changed_fraction == 0).all() and (same.mean_abs_dw == 0).all() and (same.max_abs_dw == 0).all()
    batch = summary[(summary.comparison == "batch") & (summary.domain == "all")]
    assert (batch.topk_changed_fraction < 0.01).all() and (batch.mean_abs_dw < 1e-5).all()
    consistency = pd.read_csv(run / "stability_consistency.csv")
    tokens = pd.read_csv(run / "stability_tokens.csv", keep_default_na=False, na_values=[""])
    assert list(consistency.layer) == [0, 1, 2, 3] and (consistency.ids > 0).all()
    assert (tokens["count"] >= 3).all() and (tokens.windows >= 2).all()
    by_layer = tokens[np.isfinite(tokens.difference)].groupby("layer")
    np.testing.assert_allclose(by_layer.consistency.mean().to_numpy(), consistency.same_id_mean, rtol=1e-9)
    for name in ("stability_by_layer", "stability_margin", "stability_consistency", "stability_consistency_tokens"):
        assert Image.open(run / "figures" / f"{name}.png").size[0] <= MAX_PNG_WIDTH, name
    margin = pd.read_csv(run / "stability_margin.csv")
    pooled = summary[summary.domain == "all"].set_index(["comparison", "layer"])
    by_layer = margin.groupby(["comparison", "layer"])[["tokens", "topk_changed"]].sum()
    assert (by_layer.tokens == pooled.tokens[by_layer.index]).all()  # every compared token sits in one gap bin
    assert (by_layer.topk_changed == pooled.topk_changed[by_layer.index]).all()
    assert stability.main(["--help"]) == 0
    capsys.readouterr()


def test_bad_input_is_refused_in_one_line_with_nothing_written(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n")
    base = ["--model", "random:olmoe", "--num_tokens", "50", "--no-progress"]
    bad = {
        "unknown dtype": (["--dtypes", "int8"], "argument --dtypes: unknown dtype 'int8'"),
        "unknown reference dtype": (["--dtype", "float8"], "argument --dtype: invalid choice"),
        "nothing routed": (["--data", f"e={empty}"], "has no token to count"),
        "dtype comparison without a dtype": (["--dtypes", "--compare", "dtype"], "--compare dtype/router needs"),
        "batch of one": (["--compare", "batch", "--batch_size", "1"], "--batch_size must be at least 2"),
        "min_count of one": (["--min_count", "1"], "argument --min_count"),
    }
    for case, (extra, message) in bad.items():
        assert stability.main([*base, *extra, "--out", str(tmp_path / "bad")]) == 2, case
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (case, err)
        assert not (tmp_path / "bad").exists(), case
