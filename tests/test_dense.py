"""Dense-model views: the shipped dense twin and the dense layers of MoE models, against transformers' own outputs."""

from __future__ import annotations

import pytest
import torch

import router_metrics
from common.config import ModelSpec
from common.errors import InputError
from common.hooks import capture
from common.model import LanguageModel, MoEModel, inspect_model, load_model, load_moe


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


def _neurons_times_down(ffn, neurons: torch.Tensor) -> torch.Tensor:
    """neurons @ down^T (+ down bias): the FFN output the captured neurons imply."""
    params = ffn.params()
    out = neurons @ params.down.T
    return out if params.down_bias is None else out + params.down_bias


def _check_captured_neurons(model: LanguageModel, ids: torch.Tensor) -> None:
    """Every dense FFN: captured ffn_neurons @ down (+bias) equals the module's own output."""
    outputs: dict[int, torch.Tensor] = {}
    handles = [
        ffn.module.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out.reshape(-1, out.shape[-1])))
        for i, ffn in model.ffns.items()
    ]
    try:
        with torch.no_grad(), capture(model, what=("ffn_neurons",), decoder_layers=list(model.ffns)) as records:
            model.model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    assert set(outputs) == set(model.ffns)
    for i, ffn in model.ffns.items():
        neurons = records[i].ffn_neurons
        assert neurons.shape == (ids.numel(), ffn.width)
        torch.testing.assert_close(_neurons_times_down(ffn, neurons), outputs[i], rtol=1e-5, atol=1e-6)


# Tiny random MoE models with dense (non-MoE) FFN layers, and which layers those are. LFM2-MoE spells its dense MLP
# w1/w3/w2 with SiLU hard-coded in forward (no activation attribute, no hidden_act in its config: the SiLU default);
# Nemotron-H keeps its dense MLP (ungated relu2) under `mixer`, and its attention/Mamba layers have no FFN at all.
DENSE_LAYERS = {"deepseek_v3": [0], "lfm2_moe": [0], "nemotron_h": [4]}


@pytest.mark.parametrize("arch", sorted(DENSE_LAYERS))
def test_dense_layers_of_a_moe_model(arch, saved_tiny_model):
    moe = load_model(ModelSpec(model=str(saved_tiny_model(arch)), device="cpu", dtype="float32"))
    assert isinstance(moe, MoEModel)
    moe_layers = {m.layer for m in moe.layers}
    assert sorted(moe.ffns) == DENSE_LAYERS[arch] and not set(moe.ffns) & moe_layers
    if arch != "nemotron_h":  # every other layer is MoE
        assert set(moe.ffns) | moe_layers == set(range(moe.num_decoder_layers))
    # The structure-only view (meta weights) of `random:<arch>` finds the same dense layers.
    assert sorted(inspect_model(ModelSpec(model=f"random:{arch}")).ffns) == DENSE_LAYERS[arch]
    index = min(moe.ffns)
    ffn = moe.ffns[index]
    seen = {}
    handle = ffn.module.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out.reshape(-1, out.shape[-1])))
    try:
        with torch.no_grad(), capture(moe, what=("ffn_neurons",), decoder_layers=[index]) as records:
            moe.model(input_ids=_ids(256), use_cache=False)
    finally:
        handle.remove()
    torch.testing.assert_close(_neurons_times_down(ffn, records[index].ffn_neurons), seen["out"], rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="no dense feed-forward network; dense layers"):
        moe.select_ffns([min(moe_layers)])


def _tiny_dense(kind: str):
    """A tiny random dense causal LM whose MLP uses another spelling than gate/up/down_proj."""
    import transformers as tf

    common = {"vocab_size": 64}
    if kind == "gpt2":  # c_fc / c_proj Conv1D (weights stored [in, out]), `act`
        config = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_inner=48, **common)
        return tf.GPT2LMHeadModel(config)
    if kind == "gptj":  # fc_in / fc_out, `act`
        config = tf.GPTJConfig(n_embd=32, n_layer=2, n_head=4, n_inner=48, rotary_dim=4, **common)
        return tf.GPTJForCausalLM(config)
    if kind == "gpt_neox":  # dense_h_to_4h / dense_4h_to_h, `act`
        config = tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                  **common)
        return tf.GPTNeoXForCausalLM(config)
    if kind == "phi":  # fc1 / fc2, `activation_fn`
        config = tf.PhiConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                              **common)
        return tf.PhiForCausalLM(config)
    if kind == "granitemoehybrid":  # no experts: the layer's FFN is `shared_mlp`, fused input_linear, `activation`
        config = tf.GraniteMoeHybridConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
            shared_intermediate_size=48, num_local_experts=0, mamba_n_heads=8, mamba_d_head=8,
            layers_block_type=["attention", "attention"], **common,
        )
        return tf.GraniteMoeHybridForCausalLM(config)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["gpt2", "gptj", "gpt_neox", "phi", "granitemoehybrid"])
def test_other_dense_ffn_spellings(kind):
    torch.manual_seed(0)
    model = _tiny_dense(kind).eval()
    for param in model.parameters():  # biases are zero-initialised: make them count
        torch.nn.init.normal_(param, std=0.1)
    view = LanguageModel(model)
    assert sorted(view.ffns) == list(range(view.num_decoder_layers)) == [0, 1]
    _check_captured_neurons(view, _ids(64))


class _HardCodedGelu(torch.nn.Module):
    """A w1/w3/w2 FFN that fixes its activation in forward: no attribute names it, the config's hidden_act does."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.w1 = torch.nn.Linear(hidden, width, bias=False)
        self.w3 = torch.nn.Linear(hidden, width, bias=False)
        self.w2 = torch.nn.Linear(width, hidden, bias=False)

    def forward(self, x):
        return self.w2(torch.nn.functional.gelu(self.w1(x)) * self.w3(x))


class _NoActivation(torch.nn.Module):
    """A fused gate_up_proj FFN with a custom gate and no activation attribute (like MiniMax-M3's dense MLP)."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_up_proj = torch.nn.Linear(hidden, 2 * width, bias=False)
        self.down_proj = torch.nn.Linear(width, hidden, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj((up + 1) * gate * torch.sigmoid(1.7 * gate))


def test_hard_coded_activation_comes_from_the_config():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, hidden_act="gelu")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.model.layers[0].mlp = _HardCodedGelu(32, 48)
    model.model.layers[1].mlp = _NoActivation(32, 48)
    view = LanguageModel(model)
    assert sorted(view.ffns) == [0]  # a custom gate without an activation attribute is not taken for act(gate)·up
    _check_captured_neurons(view, _ids(64))


def test_routing_scripts_refuse_dense_models(capsys, tmp_path):
    assert router_metrics.main(["--model", "demo-dense", "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "demo-dense" in err and "no MoE layers" in err
    assert not any(tmp_path.iterdir())
    with pytest.raises(InputError, match="no MoE layers"):
        load_moe(ModelSpec(model="demo-dense", device="cpu"))
