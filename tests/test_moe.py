"""The MoE adapter and hooks against independent references, on tiny models of every required architecture.

Each model is saved with `save_pretrained` and loaded back through `common.model.load_moe` (the real
`from_pretrained` path). References: transformers' own `output_router_logits`, a copy of the model with an
expert's down-projection zeroed or scaled, and a SwiGLU computed by hand from the expert's parameters.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from common.errors import InputError
from common.hooks import RoutingEdit, capture, intervene, registered_hook_count
from common.model import ModelSpec, MoEModel, load_moe
from tests.conftest import ALL_MOE_TYPES, ARCHS, MIXED_ARCHS
from tests.legacy_moe import build_legacy_model, register

BATCH, SEQ = 2, 9


def _load(saved_tiny_model, arch: str) -> MoEModel:
    moe = load_moe(ModelSpec(model=str(saved_tiny_model(arch)), device="cpu", dtype="float32"))
    # Routers with a selection-only bias: make the bias matter, so the experts' real top-k differs from top-k(p).
    torch.manual_seed(1)
    for name, buffer in moe.model.named_buffers():
        if name.endswith(("e_score_correction_bias", "expert_bias")):
            buffer.uniform_(0, 0.1)
    return moe


def _ids(vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def _forward(moe: MoEModel, ids: torch.Tensor, **kwargs):
    with torch.no_grad():
        return moe.model(input_ids=ids, use_cache=False, **kwargs)


def _activation(moe_layer):
    if moe_layer.kind == "legacy":
        return F.silu  # tests/legacy_moe.py's experts are SiLU-gated
    for owner, name in ((moe_layer.experts, "act_fn"), (moe_layer.block, "activation")):
        if hasattr(owner, name):
            return getattr(owner, name)
    return moe_layer.experts.mlp.activation_fn  # DBRX


def _manual_expert(moe_layer, expert: int, x: torch.Tensor) -> torch.Tensor:
    """Textbook SwiGLU from the expert's own parameters; gpt-oss' clamped variant written out from its paper/config."""
    p = moe_layer.expert_params(expert)
    gate = F.linear(x, p.gate, p.gate_bias) if p.gate is not None else None
    up = F.linear(x, p.up, p.up_bias)
    experts = moe_layer.experts
    if p.gate is None:  # ungated experts (Nemotron-H): act(up x)
        hidden = experts.act_fn(up)
    elif hasattr(experts, "limit") and hasattr(experts, "alpha"):  # gpt-oss: (up + 1) * g * sigmoid(alpha * g), clamped
        gate = gate.clamp(max=experts.limit)
        up = up.clamp(-experts.limit, experts.limit)
        hidden = (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
    elif "_apply_gate" in type(experts).__dict__:
        # Other custom gates (softcapped / clamped SwiGLUs): the module's own gate on [gate; up], so what is checked
        # here is the parameter layout and the routing path, not the gate formula.
        hidden = experts._apply_gate(torch.cat([gate, up], dim=-1))
    else:
        hidden = _activation(moe_layer)(gate) * up
    return F.linear(hidden, p.down, p.down_bias)


@pytest.fixture(scope="module")
def legacy_dir(tmp_path_factory):
    from common.model import tiny_tokenizer

    register()
    path = tmp_path_factory.mktemp("legacy-moe")
    build_legacy_model().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_every_required_architecture_is_covered():
    assert set(ARCHS) <= set(ALL_MOE_TYPES)


@pytest.mark.parametrize("arch", ALL_MOE_TYPES)
def test_adapter_exact_on_every_architecture(arch, saved_tiny_model):
    moe = _load(saved_tiny_model, arch)
    ids = _ids()
    reference = _forward(moe, ids, output_router_logits=True)
    baseline_hooks = registered_hook_count(moe.model)  # after transformers' own lazily installed recorders

    assert len(moe.layers) >= 2
    if arch in MIXED_ARCHS:
        assert len(moe.layers) < moe.num_decoder_layers

    with capture(moe) as records:
        captured = _forward(moe, ids)
    assert registered_hook_count(moe.model) == baseline_hooks
    # Capture hooks leave the model's logits bit-identical.
    assert torch.equal(captured.logits, reference.logits)

    # Captured router logits equal transformers' own output_router_logits exactly, layer by layer.
    ours = [records[m.layer].logits for m in moe.layers]
    theirs = [r.reshape(-1, r.shape[-1]) for r in reference.router_logits]
    if arch == "jetmoe":  # its list interleaves the mixture-of-attention routers (notes §2): find ours among them
        assert all(any(torch.equal(o, t) for t in theirs) for o in ours)
    else:
        assert len(ours) == len(theirs)
        for o, t in zip(ours, theirs, strict=True):
            assert torch.equal(o, t)

    for m in moe.layers:
        rec = records[m.layer]
        assert rec.topk_index.shape == (BATCH * SEQ, m.top_k) == rec.topk_weight.shape
        assert rec.expert_input.shape == (BATCH * SEQ, moe.config.hidden_size)
        assert rec.logits.shape == (BATCH * SEQ, m.num_choices)
        assert int(rec.topk_index.min()) >= 0 and int(rec.topk_index.max()) < m.num_choices

    # expert_fn equals a computation from the expert's own parameters.
    first = moe.layers[0]
    x = records[first.layer].expert_input
    routed = records[first.layer].topk_index
    expert = int(routed[routed < first.num_experts][0])
    with torch.no_grad():
        torch.testing.assert_close(first.expert_fn(expert, x), _manual_expert(first, expert, x), rtol=1e-5, atol=1e-6)

    # Ablating an expert by routing weight equals zeroing its down-projection; scaling likewise (not for Llama4,
    # whose score multiplies the expert's input: only the ablation is an output operation there).
    factors = [0.0] if first.kind == "llama4" else [0.0, 2.5]
    for alpha in factors:
        with intervene(moe, [RoutingEdit(first.layer, expert, "scale", alpha)]):
            edited = _forward(moe, ids).logits
        twin = copy.deepcopy(moe.model)
        params = MoEModel(twin).layers[0].expert_params(expert)
        with torch.no_grad():
            params.down.mul_(alpha)
            if params.down_bias is not None:
                params.down_bias.mul_(alpha)
        expected = _forward(MoEModel(twin), ids).logits
        assert (edited - expected).abs().max() <= 1e-5, alpha
        assert not torch.equal(edited, reference.logits)
    assert registered_hook_count(moe.model) == baseline_hooks


def test_legacy_layout_through_auto_classes(legacy_dir):
    moe = load_moe(ModelSpec(model=str(legacy_dir), device="cpu", dtype="float32"))
    assert [m.layer for m in moe.layers] == [1, 2]
    assert all(m.kind == "legacy" and m.num_experts == 6 and m.top_k == 2 for m in moe.layers)
    assert all(len(m.shared_experts) == 1 for m in moe.layers)
    ids = _ids()
    reference = _forward(moe, ids).logits
    with capture(moe) as records:
        assert torch.equal(_forward(moe, ids).logits, reference)
    first = moe.layers[0]
    rec = records[first.layer]
    # The gate's logits, recomputed independently: softmax top-k of them is the routing the gate returned.
    probs = torch.softmax(rec.logits, -1)
    torch.testing.assert_close(probs.topk(2, dim=-1).values, rec.topk_weight)
    expert = int(rec.topk_index[0, 0])
    with torch.no_grad():
        torch.testing.assert_close(first.expert_fn(expert, rec.expert_input), _manual_expert(first, expert, rec.expert_input))
    with intervene(moe, [RoutingEdit(first.layer, expert, "scale", 0.0)]):
        edited = _forward(moe, ids).logits
    twin = copy.deepcopy(moe.model)
    with torch.no_grad():
        MoEModel(twin).layers[0].expert_params(expert).down.zero_()
    assert (edited - _forward(MoEModel(twin), ids).logits).abs().max() <= 1e-5
    assert registered_hook_count(moe.model) == 0


def test_hooks_removed_when_forward_raises():
    moe = MoEModel(build_legacy_model())
    bad_ids = torch.full((1, 4), 10_000)  # out of the embedding's range: the forward raises
    with pytest.raises(IndexError), capture(moe):
        moe.model(bad_ids)
    with pytest.raises(IndexError), intervene(moe, [RoutingEdit(1, 0, "logit", 1.0), RoutingEdit(2, 1, "scale", 0.0)]):
        moe.model(bad_ids)
    assert registered_hook_count(moe.model) == 0
    assert "forward" not in moe.layers[0].router.__dict__


@pytest.fixture(scope="module")
def olmoe(saved_tiny_model):
    return _load(saved_tiny_model, "olmoe")


def _routing(moe, edits, ids):
    with intervene(moe, edits), capture(moe, what=("logits", "topk")) as records:
        logits = _forward(moe, ids).logits
    return logits, records


def test_token_local_ablation_changes_only_later_positions(olmoe):
    ids = _ids()
    layer = olmoe.layers[1].layer
    base, base_records = _routing(olmoe, [], ids)
    expert = int(base_records[layer].topk_index.view(BATCH, SEQ, -1)[0, 4, 0])
    edited, records = _routing(olmoe, [RoutingEdit(layer, expert, "scale", 0.0, positions=[4])], ids)
    weights = records[layer].topk_weight.view(BATCH, SEQ, -1)
    index = records[layer].topk_index.view(BATCH, SEQ, -1)
    base_weights = base_records[layer].topk_weight.view(BATCH, SEQ, -1)
    assert torch.all(weights[:, 4][index[:, 4] == expert] == 0)
    keep = torch.ones(SEQ, dtype=torch.bool)
    keep[4] = False
    assert torch.equal(weights[:, keep], base_weights[:, keep])
    # Causality: earlier positions unchanged (tolerance: grouped kernels batch tokens per expert), position 4 changed.
    torch.testing.assert_close(edited[:, :4], base[:, :4], atol=1e-5, rtol=0)
    assert (edited[0, 4] - base[0, 4]).abs().max() > 1e-6


def test_set_force_logit_and_renormalize(olmoe):
    ids = _ids()
    baseline_hooks = registered_hook_count(olmoe.model)
    layer = olmoe.layers[0].layer
    _, base = _routing(olmoe, [], ids)
    base_index, base_weight = base[layer].topk_index, base[layer].topk_weight
    unused = int(torch.bincount(base_index.flatten(), minlength=8).argmin())

    _, forced = _routing(olmoe, [RoutingEdit(layer, unused, "force", None, positions=[-1])], ids)
    last = forced[layer].topk_index.view(BATCH, SEQ, -1)[:, -1]
    assert torch.all((last == unused).any(-1))
    assert torch.equal(forced[layer].topk_index.view(BATCH, SEQ, -1)[:, :-1], base_index.view(BATCH, SEQ, -1)[:, :-1])
    # The forced expert takes the weight of the slot it replaced (the smallest).
    torch.testing.assert_close(forced[layer].topk_weight.sum(-1), base_weight.sum(-1))

    _, set_to = _routing(olmoe, [RoutingEdit(layer, int(base_index[0, 0]), "set", 0.75)], ids)
    hit = base_index == int(base_index[0, 0])
    assert torch.all(set_to[layer].topk_weight[hit] == 0.75)
    assert torch.equal(set_to[layer].topk_weight[~hit], base_weight[~hit])

    renorm_edit = RoutingEdit(layer, int(base_index[0, 0]), "scale", 0.0, renormalize=True)
    _, renormalized = _routing(olmoe, [renorm_edit], ids)
    torch.testing.assert_close(renormalized[layer].topk_weight.sum(-1), base_weight.sum(-1))

    _, shifted = _routing(olmoe, [RoutingEdit(layer, unused, "logit", 50.0, positions=[2])], ids)
    delta = (shifted[layer].logits - base[layer].logits).view(BATCH, SEQ, -1)
    assert torch.all(delta[:, 2, unused] == 50.0)
    delta[:, 2, unused] = 0
    assert torch.all(delta == 0)
    assert torch.all(shifted[layer].topk_index.view(BATCH, SEQ, -1)[:, 2, 0] == unused)
    assert registered_hook_count(olmoe.model) == baseline_hooks


@pytest.mark.parametrize("arch", ["olmoe", "granitemoe", "dbrx", "gpt_oss", "deepseek_v3", "llama4_text", "cohere2_moe"])
def test_unembed_reproduces_model_logits(arch, saved_tiny_model):
    """Final norm + unembedding (+ the head's logit scaling) of the last layer's residual gives the model's logits."""
    moe = _load(saved_tiny_model, arch)
    residual = {}

    def keep(module, args, out):
        residual["h"] = out[0] if isinstance(out, tuple) else out

    layers = moe.decoder_layers()
    assert len(layers) == moe.num_decoder_layers
    handle = layers[-1].register_forward_hook(keep)
    try:
        logits = _forward(moe, _ids()).logits
    finally:
        handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(moe.unembed(residual["h"]), logits)


def test_layer_selection_and_errors(saved_tiny_model):
    moe = _load(saved_tiny_model, "deepseek_v3")  # first layer dense
    moe_layers = [m.layer for m in moe.layers]
    assert moe.select(None) == moe.layers == moe.select(["all"])
    assert moe.select([-1])[0].layer == moe.num_decoder_layers - 1
    dense = next(i for i in range(moe.num_decoder_layers) if i not in moe_layers)
    with pytest.raises(InputError, match=r"dense \(non-MoE\).*MoE layers: " + ", ".join(map(str, moe_layers))):
        moe.select([dense])
    with pytest.raises(InputError, match="does not exist"):
        moe.select([moe.num_decoder_layers])
    with pytest.raises(InputError, match="not a layer index"):
        moe.select(["x"])
    with pytest.raises(InputError, match="out of range"):
        moe.layers[0].expert_fn(moe.layers[0].num_experts, torch.zeros(1, moe.config.hidden_size))


def test_dense_and_unknown_models_are_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4))
    with pytest.raises(InputError, match="no MoE layers"):
        MoEModel(dense)
    dense.config.num_local_experts = 8  # says MoE, but has no layout the adapter knows
    with pytest.raises(InputError, match="layout is unknown"):
        MoEModel(dense)
    with pytest.raises(InputError, match="no such directory"):
        load_moe(ModelSpec(model=str(tmp_path / "missing"), device="cpu"))
    with pytest.raises(InputError, match="unknown random model type"):
        load_moe(ModelSpec(model="random:not_a_model", device="cpu"))


def test_position_edits_follow_absolute_positions_during_cached_generation(olmoe):
    """generate() feeds one token per step at its absolute position: an edit at position 0 must touch the prompt's
    token 0 only, never the generated tokens (each arrives as the only token, index 0, of its forward)."""
    ids = _ids()[:1, :5]
    layer = olmoe.layers[0].layer
    edited_positions = []

    def spy(module, args, kwargs):
        weight = args[2]
        edited_positions.append(int((weight == 0).any(-1).sum()))

    baseline = registered_hook_count(olmoe.model)
    with torch.no_grad(), intervene(olmoe, [RoutingEdit(layer, e, "scale", 0.0, positions=[0]) for e in range(8)]):
        handle = olmoe.layers[0].experts.register_forward_pre_hook(spy, with_kwargs=True)
        try:
            olmoe.model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        finally:
            handle.remove()
    # The prompt forward zeroes every expert of token 0 (one token); the 3 cached steps (positions 5, 6, 7) none.
    assert edited_positions[0] == 1 and edited_positions[1:] == [0] * (len(edited_positions) - 1)
    assert len(edited_positions) == 4 and registered_hook_count(olmoe.model) == baseline
