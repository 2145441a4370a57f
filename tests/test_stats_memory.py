"""Statistics memory at real-model scale: integer token tables equal the float64 ones on every architecture, the plan
moves tables to the host or refuses in one line from the config alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import router_metrics
from common.analysis.memory import GiB, plan_routing_counts
from common.analysis.specialization import TOKEN_TABLES, RoutingCounts, token_overlap, token_specialization
from common.config import ModelSpec
from common.data import Domain, token_batches
from common.errors import InputError
from common.hooks import capture
from common.model import load_moe
from tests.conftest import ALL_MOE_TYPES


def _tables(moe, batches, dtype: str) -> dict[str, np.ndarray]:
    counts = RoutingCounts(moe.layers, ["a", "b"], moe.vocab_size, moe.device, table_dtype=dtype)
    with capture(moe, moe.layers, ("logits", "topk")) as records:
        for batch in batches:
            logits = moe.forward(batch.input_ids, batch.attention_mask).logits
            counts.update(records, batch, predicted=logits.argmax(-1))
    return counts.arrays()


def _assert_same_tables_and_metrics(moe, batches) -> None:
    new, old = _tables(moe, batches, "int32"), _tables(moe, batches, "float64")
    for table in TOKEN_TABLES:
        assert new[f"token_{table}"].dtype == np.int32 and old[f"token_{table}"].dtype == np.float64
        np.testing.assert_array_equal(new[f"token_{table}"], old[f"token_{table}"])
        np.testing.assert_array_equal(new[f"occurrences_{table}"], old[f"occurrences_{table}"])
        for li, moe_layer in enumerate(moe.layers):
            args = (moe_layer.top_k, 1)
            assert token_specialization(new[f"token_{table}"][li], new[f"occurrences_{table}"], *args) == \
                token_specialization(old[f"token_{table}"][li], old[f"occurrences_{table}"], *args)
    for li in range(len(moe.layers)):
        for a, b in zip(token_overlap(new["token_current"][li]), token_overlap(old["token_current"][li]), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tables")
    (folder / "a.txt").write_text("the cat sat on the mat. " * 80)
    (folder / "b.txt").write_text("for i in range(10): print(i)\n" * 80)
    return [Domain("a", str(folder / "a.txt")), Domain("b", str(folder / "b.txt"))]


def test_int32_tables_equal_float64_tables_on_the_demo_model(data):
    moe = load_moe(ModelSpec(model="demo", device="cpu"))
    batches = list(token_batches(data, moe.tokenizer, num_tokens=400, seq_len=64, batch_size=4, progress=False))
    _assert_same_tables_and_metrics(moe, batches)


@pytest.mark.parametrize("arch", ALL_MOE_TYPES)
def test_int32_tables_equal_float64_tables_on_every_architecture(arch, saved_tiny_model, data):
    moe = load_moe(ModelSpec(model=str(saved_tiny_model(arch)), device="cpu", dtype="float32"))
    batches = list(token_batches(data, moe.tokenizer, num_tokens=60, seq_len=16, batch_size=4, progress=False))
    _assert_same_tables_and_metrics(moe, batches)


def test_plan_moves_tables_to_the_host_then_refuses(saved_tiny_model):
    moe = load_moe(ModelSpec(model=str(saved_tiny_model("olmoe")), device="cpu"))
    sizes = RoutingCounts(moe.layers, ["a"], moe.vocab_size, torch.device("meta")).nbytes()
    tables = sum(v for k, v in sizes.items() if k.startswith(("token_", "occurrences_")))
    rest = sum(sizes.values()) - tables
    # The sizes are the real ones: int32 cells for the tables, float64 elsewhere.
    C = max(m.num_choices for m in moe.layers)
    assert sizes["token_current"] == (len(moe.layers) * moe.vocab_size * C + 1) * 4
    gpu = torch.device("cuda")  # a plan only: nothing is allocated there
    everything = plan_routing_counts(moe.layers, ["a"], moe.vocab_size, gpu, device_budget_gib=1.0)
    assert not everything.tables_on_host and everything.table_device == gpu
    spilled = plan_routing_counts(moe.layers, ["a"], moe.vocab_size, gpu, device_budget_gib=(rest + 1) / GiB,
                                  host_budget_gib=1.0)
    assert spilled.tables_on_host and spilled.table_device == torch.device("cpu")
    assert sum(spilled.on_device.values()) == rest and sum(spilled.on_host.values()) == tables
    with pytest.raises(InputError, match=r"--host_stats_memory .*--no-token-tables"):
        plan_routing_counts(moe.layers, ["a"], moe.vocab_size, gpu, device_budget_gib=(rest + 1) / GiB,
                            host_budget_gib=tables / 2 / GiB)
    with pytest.raises(InputError, match=r"--stats_memory .*fewer --layers"):
        plan_routing_counts(moe.layers, ["a"], moe.vocab_size, gpu, device_budget_gib=rest / 2 / GiB)


def test_tiny_budget_is_refused_in_one_line_before_any_weight_is_loaded(tmp_path, capsys, monkeypatch):
    def no_weights(spec):
        raise AssertionError("weights were loaded before the memory check")

    import common.model

    monkeypatch.setattr(common.model, "load_moe", no_weights)  # where the pipeline imports it from when it loads
    argv = ["--model", "demo", "--stats_memory", "0.0001", "--out", str(tmp_path / "out"), "--no-progress"]
    assert router_metrics.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--stats_memory 0.0001: the routing statistics need" in err and "--no-token-tables" in err
    assert not (tmp_path / "out").exists()
