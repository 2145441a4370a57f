"""Dense-model views: the shipped dense twin and the dense layers of MoE models, against transformers' own outputs."""

from __future__ import annotations

import pytest
import torch

import router_metrics
from common.config import ModelSpec
from common.errors import InputError
from common.hooks import capture
from common.model_view import LanguageModel
from common.models import inspect_model, load_model, load_moe
from common.moe import MoEModel


@pytest.fixture(scope="module")
def dense() -> LanguageModel:
    return load_model(ModelSpec(model="demo-dense", device="cpu", dtype="float32"))


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(0))


def test_dense_view_of_the_demo_twin(dense):
    assert type(dense) is LanguageModel
    assert sorted(dense.ffns) == list(range(dense.num_decoder_layers)) == list(range(dense.config.num_hidden_layers))
    assert dense.vocab_size == dense.config.vocab_size and dense.context_length == dense.config.max_position_embeddings
    assert dense.dtype == torch.float32
    assert inspect_model(ModelSpec(model="demo-dense")).num_decoder_layers == dense.num_decoder_layers


def test_dense_ffn_neurons_times_down_equal_the_mlp_output(dense):
    ids = _ids(dense.vocab_size)
    outputs: dict[int, torch.Tensor] = {}
    handles = [
        ffn.module.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out.reshape(-1, out.shape[-1])))
        for i, ffn in dense.ffns.items()
    ]
    try:
        with torch.no_grad(), capture(dense, what=("ffn_input", "ffn_neurons", "residual")) as records:
            result = dense.model(input_ids=ids, use_cache=False, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    for i, ffn in dense.ffns.items():
        rec = records[i]
        params = ffn.params()
        assert rec.ffn_neurons.shape == (ids.numel(), params.width)
        torch.testing.assert_close(rec.ffn_neurons @ params.down.T, outputs[i], rtol=1e-5, atol=1e-6)
        if i < dense.num_decoder_layers - 1:
            torch.testing.assert_close(records[i].residual, result.hidden_states[i + 1].flatten(0, 1), rtol=0, atol=1e-6)
    # The final residual through the model's own norm and head gives its logits (the dense logit lens is exact).
    last = records[dense.num_decoder_layers - 1].residual
    with torch.no_grad():
        torch.testing.assert_close(dense.unembed(last), result.logits.flatten(0, 1), rtol=1e-5, atol=1e-5)


def test_dense_layers_of_a_moe_model(saved_tiny_model):
    moe = load_model(ModelSpec(model=str(saved_tiny_model("deepseek_v3")), device="cpu", dtype="float32"))
    assert isinstance(moe, MoEModel)
    moe_layers = {m.layer for m in moe.layers}
    assert moe.ffns and not set(moe.ffns) & moe_layers
    assert set(moe.ffns) | moe_layers == set(range(moe.num_decoder_layers))
    index = min(moe.ffns)
    ffn = moe.ffns[index]
    seen = {}
    handle = ffn.module.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out.reshape(-1, out.shape[-1])))
    try:
        with torch.no_grad(), capture(moe, what=("ffn_neurons",), decoder_layers=[index]) as records:
            moe.model(input_ids=_ids(256), use_cache=False)
    finally:
        handle.remove()
    torch.testing.assert_close(records[index].ffn_neurons @ ffn.params().down.T, seen["out"], rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="no dense feed-forward network; dense layers"):
        moe.select_ffns([min(moe_layers)])


def test_routing_scripts_refuse_dense_models(capsys, tmp_path):
    assert router_metrics.main(["--model", "demo-dense", "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "demo-dense" in err and "no MoE layers" in err
    assert not any(tmp_path.iterdir())
    with pytest.raises(InputError, match="no MoE layers"):
        load_moe(ModelSpec(model="demo-dense", device="cpu"))
