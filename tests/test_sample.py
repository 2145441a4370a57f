"""The streamed token sample against a naive store-everything reference, and its merge (the torchrun path)."""

from __future__ import annotations

import pytest
import torch

from common.analysis.sample import TokenSample
from common.config import ModelSpec
from common.data import Domain, token_batches
from common.hooks import capture
from common.model import load_moe


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sample-data")
    (folder / "a.txt").write_text("alpha beta gamma delta " * 200)
    (folder / "b.txt").write_text("def f(x): return x + 1\n" * 200)
    moe = load_moe(ModelSpec(model="random:olmoe", device="cpu", dtype="float32"))
    domains = [Domain("a", str(folder / "a.txt")), Domain("b", str(folder / "b.txt"))]
    batches = list(token_batches(domains, moe.tokenizer, num_tokens=300, seq_len=32, batch_size=4, progress=False))
    return moe, batches


def _captured(moe, batches):
    layers = moe.layers[:2]
    with capture(moe, layers, ("input", "topk")) as records:
        for batch in batches:
            moe.forward(batch.input_ids, batch.attention_mask)
            yield records, batch


def test_sample_equals_the_smallest_keys_of_everything(setup):
    moe, batches = setup
    sample = TokenSample(moe.layers[:2], num_domains=2, per_domain=50, seed=3, device=torch.device("cpu"))
    everything: dict[str, list] = {"key": [], "domain": [], "token_id": [], "input": []}
    for records, batch in _captured(moe, batches):
        sample.update(records, batch)
        counted = batch.count_mask.reshape(-1)
        keys = torch.rand(counted.shape[0], generator=torch.Generator().manual_seed(3 * 1_000_003 + batch.number))
        everything["key"].append(keys[counted])
        everything["domain"].append(batch.token_domains()[counted])
        everything["token_id"].append(batch.input_ids.reshape(-1)[counted])
        everything["input"].append(records[moe.layers[1].layer].expert_input[counted])
    result = sample.all_reduce().result()
    full = {k: torch.cat(v) for k, v in everything.items()}
    for d in range(2):
        mine = result["domain"] == d
        index = torch.nonzero(full["domain"] == d).view(-1)
        expected = index[full["key"][index].argsort()[:50]]
        assert int(mine.sum()) == 50
        assert torch.equal(result["key"][mine], full["key"][expected])
        assert torch.equal(result["token_id"][mine], full["token_id"][expected])
        assert torch.equal(result[f"input_{moe.layers[1].layer}"][mine], full["input"][expected])
    assert result[f"topk_index_{moe.layers[0].layer}"].shape == (100, moe.layers[0].top_k)


def test_two_halves_merge_to_the_whole(setup):
    moe, batches = setup
    whole = TokenSample(moe.layers[:2], 2, 40, seed=0, device=torch.device("cpu"))
    halves = [TokenSample(moe.layers[:2], 2, 40, seed=0, device=torch.device("cpu")) for _ in range(2)]
    for records, batch in _captured(moe, batches):
        whole.update(records, batch)
        halves[batch.number % 2].update(records, batch)
    merged = TokenSample(moe.layers[:2], 2, 40, seed=0, device=torch.device("cpu"))
    merged._keep({k: torch.cat([halves[0].kept[k], halves[1].kept[k]]) for k in halves[0].kept})
    a, b = whole.result(), merged.result()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
