"""prune.py: removing nothing is the model's own perplexity; `drop` equals a checkpoint with the experts deleted
(saved and loaded back with from_pretrained) on three architectures; `zero` equals zeroed down projections; the
random control is reproducible by seed; the script writes its documented outputs and refuses bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import prune
from common.analysis import pruning
from common.analysis.lens import next_token_labels
from common.config import ModelSpec
from common.data import resolve_domains, token_batches
from common.model import MoEModel, load_moe


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("prune-data")
    (folder / "a.txt").write_text("the quick brown fox jumps over the lazy dog; alpha beta gamma. " * 40)
    (folder / "b.jsonl").write_text("\n".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + 1"})
                                              for i in range(60)))
    return [f"prose={folder / 'a.txt'}", f"code={folder / 'b.jsonl'}"]


def _batches(moe: MoEModel, data: list[str]):
    return list(token_batches(resolve_domains(data), moe.tokenizer, num_tokens=150, seq_len=32, batch_size=4,
                              progress=False))


def _mean(result) -> np.ndarray:
    return pruning.nll_table(*result)[0]


def _load(path: Path) -> MoEModel:
    return load_moe(ModelSpec(model=str(path), device="cpu", dtype="float32"))


def test_removing_nothing_is_transformers_own_perplexity(saved_tiny_model, data):
    moe = _load(saved_tiny_model("olmoe"))
    batches = _batches(moe, data)
    ours = _mean(pruning.perplexity(moe, batches, [()] * len(moe.layers), moe.layers, 2))
    loss_sum, tokens = np.zeros(2), np.zeros(2)
    with torch.no_grad():
        for batch in batches:
            labels = next_token_labels(batch)
            loss = moe.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels,
                             use_cache=False).loss
            n = int((labels[:, 1:] != -100).sum())
            loss_sum[int(batch.domain_ids[0])] += float(loss) * n
            tokens[int(batch.domain_ids[0])] += n
    expected = np.append(loss_sum / tokens, loss_sum.sum() / tokens.sum())
    np.testing.assert_allclose(np.exp(ours), np.exp(expected), rtol=1e-5)


@pytest.mark.parametrize("arch", ["olmoe", "mixtral", "qwen3_moe"])
def test_drop_equals_a_checkpoint_with_the_experts_deleted(arch, saved_tiny_model, data, tmp_path):
    moe = _load(saved_tiny_model(arch))
    batches = _batches(moe, data)
    removed = [(0, 3), (1, 6), (2, 5), (0, 7)][: len(moe.layers)]
    removed += [(4, 5)] * (len(moe.layers) - len(removed))
    keep = [[e for e in range(m.num_experts) if e not in gone] for m, gone in zip(moe.layers, removed, strict=True)]
    pruned = _load(pruning.save_pruned(moe, keep, tmp_path / "pruned"))
    assert [m.num_experts for m in pruned.layers] == [m.num_experts - 2 for m in moe.layers]
    dropped = _mean(pruning.perplexity(moe, batches, removed, moe.layers, 2, "drop"))
    checkpoint = _mean(pruning.perplexity(pruned, batches, [()] * len(pruned.layers), pruned.layers, 2))
    whole = _mean(pruning.perplexity(moe, batches, [()] * len(moe.layers), moe.layers, 2))
    np.testing.assert_allclose(dropped, checkpoint, rtol=1e-5)
    assert not np.allclose(dropped, whole, rtol=1e-6)  # the removal changed the model


def test_zero_equals_zeroed_down_projections(saved_tiny_model, data):
    moe = _load(saved_tiny_model("olmoe"))
    batches = _batches(moe, data)
    removed = [(1, 4)] * len(moe.layers)
    zeroed_model = copy.deepcopy(moe.model)
    for layer in zeroed_model.model.layers:
        with torch.no_grad():
            layer.mlp.experts.down_proj[[1, 4]] = 0.0
    zeroed = MoEModel(zeroed_model, moe.tokenizer, name="zeroed")
    ours = _mean(pruning.perplexity(moe, batches, removed, moe.layers, 2, "zero"))
    reference = _mean(pruning.perplexity(zeroed, batches, [()] * len(zeroed.layers), zeroed.layers, 2))
    np.testing.assert_allclose(ours, reference, rtol=1e-6)


def test_removal_orders_and_caps():
    layers = [type("L", (), {"num_experts": 8, "top_k": 2, "layer": i})() for i in range(2)]
    scores = [np.array([5, 1, 3, 3, 0, 9, 2, 7.0]), np.array([1, 1, 1, 1, 1, 1, 1, 0.5])]
    orders = pruning.removal_order(scores)
    assert orders == [[4, 1, 6, 2, 3, 0, 7, 5], [7, 0, 1, 2, 3, 4, 5, 6]]  # ties: the lower index first
    assert pruning.removed_sets(layers, orders, 0.25, "layer") == [(1, 4), (0, 7)]
    assert pruning.removed_sets(layers, orders, 0.95, "layer") == [(0, 1, 2, 3, 4, 6),
                                                                  (0, 1, 2, 3, 4, 7)]  # capped at E − k
    # global: the 4 lowest scores over both layers (0 at layer 0; 0.5, then the tie at 1 by layer order)
    assert pruning.removed_sets(layers, orders, 0.25, "global", scores) == [(1, 4), (0, 7)]
    first, again = pruning.random_order(layers, 0, 0), pruning.random_order(layers, 0, 0)
    assert first == again and first != pruning.random_order(layers, 0, 1) and first != pruning.random_order(layers, 1, 0)


def test_script_writes_documented_outputs_and_refuses_bad_input(tmp_path, data, capsys):
    argv = ["--model", "random:olmoe", "--data", *data, "--num_tokens", "120", "--seq_len", "32", "--batch_size", "4",
            "--fractions", "0", "0.25", "0.5", "--draws", "2", "--no-progress", "--out", str(tmp_path / "out")]
    assert prune.main(argv) == 0
    (run,) = [p for p in (tmp_path / "out").glob("prune/*/*/*") if p.is_dir()]
    table = pd.read_csv(run / "prune_perplexity.csv")
    assert set(table.criterion) == {"frequency", "weight", "saliency", "random"} and set(table.fraction) == {0, 0.25, 0.5}
    at_zero = table[table.fraction == 0].groupby("domain")["nll"]
    assert (at_zero.max() - at_zero.min()).max() == 0  # every criterion's 0% is the same unedited model
    assert table[(table.criterion == "random")].draw.nunique() == 2
    assert np.load(run / "prune_perplexity.npy").shape == (4, 3, 3)
    scores = pd.read_csv(run / "prune_scores.csv")
    np.testing.assert_allclose(scores.groupby("layer")["frequency"].sum(), 2.0)  # top-2: two experts per token
    assert (run / "figures" / "prune_perplexity.png").is_file()
    assert prune.main(["--help"]) == 0
    capsys.readouterr()
    bad = {  # one line, exit 2, nothing written
        "100% removal": (["--fractions", "1"], "a fraction of experts must lie in [0, 1)"),
        "fewer than top-k with drop": (["--fractions", "0.875"], "--fractions 0.875 with --how drop: layer 0 would keep "
                                       "1 of its 8 experts, fewer than top-k = 2"),
        "importance of another model": (["--importance", str(run)], "a run of prune.py, not of interv.py --data"),
        "more clusters than experts": (["--merge", "9", "--similarity", str(run)], "--merge 9: more clusters than the 8 "
                                       "experts of layer 0"),
        "merge without a similarity": (["--merge", "4"], "--merge needs --similarity RUN"),
    }
    for case, (extra, message) in bad.items():
        assert prune.main([*argv[:-2], *extra, "--out", str(tmp_path / "bad")]) == 2, case
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (case, err)
        assert not (tmp_path / "bad").exists(), case
    # zero may remove past top-k: the routing is not asked to choose among fewer experts
    assert prune.main([*argv[:-2], "--fractions", "0.875", "--how", "zero", "--criteria", "frequency",
                       "--out", str(tmp_path / "zero")]) == 0
    zero = pd.read_csv(next((tmp_path / "zero").glob("prune/*/*/*/prune_perplexity.csv")))
    assert zero[zero.fraction == 0.875].experts_removed.iloc[0] == 7 * 4


def test_importance_computed_here_equals_an_interv_run_and_redundancy_follows_similarity(tmp_path, data, capsys):
    import interv

    common = ["--model", "random:olmoe", "--data", *data, "--num_tokens", "60", "--seq_len", "32", "--batch_size", "4",
              "--no-progress", "--no-figures"]
    for layer in range(4):
        assert interv.main([*common, "--layer", str(layer), "--out", str(tmp_path / "interv")]) == 0
    runs = [str(p) for p in (tmp_path / "interv").glob("interv/*/*/*") if p.is_dir()]
    argv = [*common, "--fractions", "0", "0.25", "--out"]
    assert prune.main([*argv, str(tmp_path / "read"), "--criteria", "importance", "--importance", *runs]) == 0
    assert prune.main([*argv, str(tmp_path / "computed"), "--criteria", "importance"]) == 0
    read, computed = (next(p for p in (tmp_path / w).glob("prune/*/*/*") if p.is_dir()) for w in ("read", "computed"))
    a, b = (pd.read_csv(run / "prune_importance.csv") for run in (read, computed))
    np.testing.assert_allclose(b.delta_nll, a.delta_nll, rtol=1e-9, atol=1e-12)
    pd.testing.assert_frame_equal(pd.read_csv(read / "prune_perplexity.csv"), pd.read_csv(computed / "prune_perplexity.csv"))
    other = [a if a != "random:olmoe" else "random:mixtral" for a in argv]
    capsys.readouterr()
    assert prune.main([*other, str(tmp_path / "other"), "--criteria", "importance", "--importance", *runs]) == 2
    assert "a run of model random:olmoe, not of random:mixtral" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()

    similarity = np.array([[1.0, 0.9, 0.1, 0.2], [0.9, 1.0, 0.3, 0.2], [0.1, 0.3, 1.0, 0.5], [0.2, 0.2, 0.5, 1.0]])
    # (0, 1) is the most similar pair: 1 is more similar to the rest on average (0.47 vs 0.40) and goes; then (2, 3):
    # 3 (0.35 vs 0.30); then (0, 2), a tie (0.1 each): the higher index, 2, goes and 0 stays last
    assert pruning.redundancy_order(similarity) == [1, 3, 2, 0]


def test_planted_carriers_saliency_keeps_them_until_last_while_random_removes_them_early(tmp_path):
    """The planted model's two carrier experts (tests/planted.py, layer 1) alone make domain d0 predictable (NLL
    ~2.8 nats instead of ~18): frequency, saliency and ablation importance remove them last, so d0's perplexity
    stays exactly flat up to 75% removed (zero mode: routing unchanged); random orders lose them early."""
    from tests.planted import carriers, save_planted, write_domains

    model = save_planted(tmp_path / "model", carry_layer=1)
    specs = write_domains(tmp_path)
    argv = ["--model", str(model), "--data", *specs, "--num_tokens", "300", "--seq_len", "64", "--layers", "1",
            "--criteria", "frequency", "saliency", "importance", "random", "--draws", "4", "--fractions", "0", "0.25", "0.5",
            "0.75", "--how", "zero", "--no-progress", "--no-figures", "--out", str(tmp_path / "out")]
    assert prune.main(argv) == 0
    (run,) = [p for p in (tmp_path / "out").glob("prune/*/*/*") if p.is_dir()]
    scores = pd.read_csv(run / "prune_scores.csv")
    assert set(scores.nlargest(2, "saliency").expert) == set(scores.nlargest(2, "frequency").expert) == set(carriers(1))
    assert (scores[~scores.expert.isin(carriers(1))].saliency == 0).all()
    d0 = pd.read_csv(run / "prune_perplexity.csv").query("domain == 'd0'").groupby(["criterion", "fraction"])["nll"].mean()
    base = d0[("saliency", 0.0)]
    assert base < 3.5
    for criterion in ("frequency", "saliency", "importance"):
        assert all(d0[(criterion, f)] == base for f in (0.25, 0.5, 0.75)), criterion
    assert d0[("random", 0.25)] > base + 1 and d0[("random", 0.75)] > base + 10


def test_merge_averages_clusters_by_frequency_and_identical_twins_merge_losslessly(saved_tiny_model, data, tmp_path):
    import sim

    moe = _load(saved_tiny_model("olmoe"))
    with torch.no_grad():  # expert 0 becomes a copy of expert 1 at every layer: a pair the merge must find first
        for layer in moe.layers:
            for param in layer.experts.parameters():
                if param.dim() and param.shape[0] == layer.num_experts:
                    param[0] = param[1]
    moe.model.save_pretrained(tmp_path / "twins")
    moe.tokenizer.save_pretrained(tmp_path / "twins")
    common = ["--model", str(tmp_path / "twins"), "--data", *data, "--seq_len", "32", "--batch_size", "4",
              "--no-progress", "--no-figures"]
    assert sim.main([*common, "--num_tokens", "200", "--method", "cosine", "--out", str(tmp_path / "sim")]) == 0
    (sim_run,) = [p for p in (tmp_path / "sim").glob("sim/*/*/*") if p.is_dir()]
    argv = [*common, "--num_tokens", "120", "--criteria", "random", "--draws", "1", "--similarity", str(sim_run),
            "--merge", "--fractions", "0", "0.125", "0.5", "--out", str(tmp_path / "prune")]
    assert prune.main(argv) == 0
    (run,) = [p for p in (tmp_path / "prune").glob("prune/*/*/*") if p.is_dir()]
    merge = pd.read_csv(run / "prune_perplexity.csv").query("criterion == 'merge'").set_index(["fraction", "domain"])
    np.testing.assert_allclose(merge.loc[0.125].nll, merge.loc[0.0].nll, rtol=1e-6)  # the twins, merged: nothing lost
    assert not np.allclose(merge.loc[0.5].nll, merge.loc[0.0].nll, rtol=1e-6)
    assert (merge.loc[0.125].experts_removed == len(moe.layers)).all()

    layer = moe.layers[0]
    before = layer.experts.down_proj.detach().clone()
    frequency = np.array([0.0, 0.0, 0.3, 0.1, 0.0, 0.0, 0.0, 0.0])
    with pruning.merged([layer], [[[0], [1], [2, 3], [4], [5], [6], [7]]], [frequency]):
        expected = 0.75 * before[2].double() + 0.25 * before[3].double()
        torch.testing.assert_close(layer.experts.down_proj[2].double(), expected, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(layer.experts.down_proj[3], layer.experts.down_proj[2])
        assert torch.equal(layer.experts.down_proj[0], before[0])
    assert torch.equal(layer.experts.down_proj, before)  # restored


def test_include_shared_counts_the_shared_experts_as_one_unit_and_removes_them_whole(saved_tiny_model, data, tmp_path):
    moe = _load(saved_tiny_model("qwen2_moe"))
    assert all(m.shared_experts for m in moe.layers)
    batches = _batches(moe, data)
    E = moe.layers[0].num_experts
    removed = [(E,)] * len(moe.layers)  # the shared unit of every layer
    ours = _mean(pruning.perplexity(moe, batches, removed, moe.layers, 2))
    zeroed = MoEModel(copy.deepcopy(moe.model), moe.tokenizer, name="zeroed")
    with torch.no_grad():  # the shared experts' own down projections zeroed
        for layer in zeroed.layers:
            for module in layer.shared_experts:
                module.down_proj.weight.zero_()
    reference = _mean(pruning.perplexity(zeroed, batches, [()] * len(zeroed.layers), zeroed.layers, 2))
    np.testing.assert_allclose(ours, reference, rtol=1e-6)
    assert not np.allclose(ours, _mean(pruning.perplexity(moe, batches, [()] * len(moe.layers), moe.layers, 2)))

    argv = ["--model", str(saved_tiny_model("qwen2_moe")), "--data", *data, "--num_tokens", "100", "--seq_len", "32",
            "--batch_size", "4", "--criteria", "saliency", "random", "--draws", "1", "--include-shared", "--fractions",
            "0", "0.5", "--no-progress", "--no-figures", "--out", str(tmp_path / "out")]
    assert prune.main(argv) == 0
    (run,) = [p for p in (tmp_path / "out").glob("prune/*/*/*") if p.is_dir()]
    scores = pd.read_csv(run / "prune_scores.csv")
    shared = scores[scores.expert == "shared"]
    assert len(shared) == len(moe.layers) and (shared.frequency == 1).all() and (shared.saliency > 0).all()
    table = pd.read_csv(run / "prune_perplexity.csv")
    half = table[(table.fraction == 0.5) & (table.domain == "all")]
    assert (half.experts_removed == len(moe.layers) * round(0.5 * (E + 1))).all()
