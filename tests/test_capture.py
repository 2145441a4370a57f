"""The open capture vocabulary, the all-experts helper and top-k restriction, against independent references.

References: transformers' own `output_hidden_states`, Σ_k w_k · expert_fn(e_k, x) computed expert by expert, the
model's logits without hooks, and hand computations on a tiny OLMoE. Every MoE type transformers has is covered,
each saved and loaded back with `from_pretrained`.
"""

from __future__ import annotations

import pytest
import torch

from common.hooks import (
    RoutingEdit,
    TopKRestriction,
    capture,
    intervene,
    registered_hook_count,
    restrict_topk,
)
from common.model import ModelSpec, MoEModel, all_expert_outputs, expert_output_chunks, load_moe
from tests.conftest import ALL_MOE_TYPES

BATCH, SEQ = 2, 9
OUTPUT_ITEMS = ("topk", "input", "moe_output", "routed_output", "shared_output", "residual")
# Models whose last residual is mixed with other state before the final norm, so output_hidden_states[-1] is not a
# function of it alone: hyper-connection streams (DeepSeek-V4, HY-V4, Qwen4-exp) and Inkling2's block states.
FINAL_STATE_MIXED = {"deepseek_v4", "hy_v4", "qwen4_exp_text", "inkling2_text"}
# Beam multiplies the experts' weighted sum by routed_scaling_factor after the experts return it.
POST_SCALED = {"beam"}


def _ids(vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def _load(saved_tiny_model, arch: str) -> MoEModel:
    return load_moe(ModelSpec(model=str(saved_tiny_model(arch)), device="cpu", dtype="float32"))


def _expected_routed(moe_layer, rec) -> torch.Tensor:
    """Σ_k w_k · E_{e_k}(x), expert by expert (Llama4: Σ_k E_{e_k}(w_k · x), its scores scale the inputs;
    LongCat's zero-compute choices e ≥ E return their input)."""
    x, index, weight = rec.expert_input, rec.topk_index, rec.topk_weight
    total = torch.zeros_like(x)
    for e in range(moe_layer.num_choices):
        w = (weight * (index == e)).sum(1, keepdim=True)
        if not bool((w != 0).any()):
            continue
        if e >= moe_layer.num_experts:
            total += w * x
        elif moe_layer.kind == "llama4":
            total += moe_layer.expert_fn(e, w * x) * (w != 0)
        else:
            total += w * moe_layer.expert_fn(e, x)
    return total


@pytest.mark.parametrize("arch", ALL_MOE_TYPES)
def test_capture_vocabulary_on_every_architecture(arch, saved_tiny_model):
    moe = _load(saved_tiny_model, arch)
    ids = _ids()
    with torch.no_grad():
        reference = moe.model(input_ids=ids, use_cache=False, output_hidden_states=True)
    baseline_hooks = registered_hook_count(moe.model)
    with torch.no_grad(), capture(moe, what=OUTPUT_ITEMS) as records:
        captured = moe.model(input_ids=ids, use_cache=False)
    assert registered_hook_count(moe.model) == baseline_hooks
    assert torch.equal(captured.logits, reference.logits)

    # Residual after layer ℓ = transformers' hidden_states[ℓ + 1]; the last one before the final norm.
    hidden = reference.hidden_states
    assert len(hidden) == moe.num_decoder_layers + 1
    for index in range(moe.num_decoder_layers - 1):
        torch.testing.assert_close(records[index].residual, hidden[index + 1].flatten(0, 1), rtol=0, atol=1e-6)
    if arch not in FINAL_STATE_MIXED:
        last, expected = records[moe.num_decoder_layers - 1].residual, hidden[-1].flatten(0, 1)
        with torch.no_grad():
            normed = moe.final_norm()(last)
        assert min((last - expected).abs().max(), (normed - expected).abs().max()) <= 1e-5

    for moe_layer in moe.layers:
        rec = records[moe_layer.layer]
        with torch.no_grad():
            expected_routed = _expected_routed(moe_layer, rec)
            torch.testing.assert_close(rec.routed_output, expected_routed, rtol=1e-4, atol=1e-5)
            shared = rec.shared_output if rec.shared_output is not None else 0
            scale = moe_layer.block.routed_scaling_factor if arch in POST_SCALED else 1.0
            torch.testing.assert_close(rec.moe_output, scale * rec.routed_output + shared, rtol=1e-4, atol=1e-5)
            assert (rec.shared_output is not None) == bool(moe_layer.shared_experts)

            x = rec.expert_input
            every = all_expert_outputs(moe_layer, x, max_elements=4096)  # small budget: several token chunks
            assert every.shape == (moe_layer.num_experts, x.shape[0], x.shape[1])
            for e in range(moe_layer.num_experts):
                one = moe_layer.expert_fn(e, x)
                torch.testing.assert_close(every[e], one, rtol=1e-4, atol=1e-5)
                from_neurons = moe_layer.expert_output_from_neurons(e, moe_layer.expert_neurons(e, x))
                torch.testing.assert_close(from_neurons, one, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ALL_MOE_TYPES)
def test_topk_restriction_to_k_is_bit_identical(arch, saved_tiny_model):
    moe = _load(saved_tiny_model, arch)
    ids = _ids()
    baseline_hooks = registered_hook_count(moe.model)
    with torch.no_grad():
        reference = moe.model(input_ids=ids, use_cache=False).logits
        with intervene(moe, [TopKRestriction(m.layer, m.top_k) for m in moe.layers]):
            restricted = moe.model(input_ids=ids, use_cache=False).logits
    assert torch.equal(restricted, reference)
    assert registered_hook_count(moe.model) == baseline_hooks


@pytest.fixture(scope="module")
def olmoe(saved_tiny_model):
    return _load(saved_tiny_model, "olmoe")


@pytest.mark.parametrize("renormalize", [False, True])
def test_topk_restriction_to_one_equals_hand_computation(olmoe, renormalize):
    ids = _ids()
    layer = olmoe.layers[1]
    with torch.no_grad(), capture(olmoe, [layer], ("topk", "input")) as base:
        full_logits = olmoe.model(input_ids=ids, use_cache=False).logits
    x, index, weight = base[layer.layer].expert_input, base[layer.layer].topk_index, base[layer.layer].topk_weight
    with torch.no_grad():
        with intervene(olmoe, [TopKRestriction(layer.layer, 1, renormalize)]), capture(
            olmoe, [layer], ("routed_output", "topk")
        ) as restricted:
            logits = olmoe.model(input_ids=ids, use_cache=False).logits
        top = weight.argmax(1)
        top_expert = index.gather(1, top.view(-1, 1)).squeeze(1)
        top_weight = weight.sum(1) if renormalize else weight.gather(1, top.view(-1, 1)).squeeze(1)
        expected = torch.stack([top_weight[t] * layer.expert_fn(int(top_expert[t]), x[t : t + 1])[0] for t in range(x.shape[0])])
    torch.testing.assert_close(restricted[layer.layer].routed_output, expected, rtol=1e-5, atol=1e-6)
    kept = (restricted[layer.layer].topk_weight != 0).sum(1)
    assert torch.all(kept == 1)
    # Earlier layers are untouched, so only the restricted layer's routing differs: the logits change.
    assert not torch.allclose(logits, full_logits)


def test_restrict_topk_ties_renormalisation_and_hooks_after_exception(olmoe):
    index = torch.tensor([[3, 1, 2], [0, 5, 4]])
    weight = torch.tensor([[0.2, 0.5, 0.3], [0.4, 0.4, 0.2]])
    _, two = restrict_topk(index, weight, 2, renormalize=False)
    assert torch.equal(two, torch.tensor([[0.0, 0.5, 0.3], [0.4, 0.4, 0.0]]))
    _, one = restrict_topk(index, weight, 1, renormalize=True)
    torch.testing.assert_close(one, torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))  # tie: the earlier slot
    before = registered_hook_count(olmoe.model)
    restriction = [TopKRestriction(olmoe.layers[0].layer, 1)]
    with pytest.raises(IndexError), torch.no_grad(), intervene(olmoe, restriction), capture(olmoe, what=OUTPUT_ITEMS):
        olmoe.model(input_ids=torch.full((1, 4), 10_000))
    assert registered_hook_count(olmoe.model) == before


def test_expert_output_chunks_cover_every_token_once(olmoe):
    layer = olmoe.layers[0]
    x = torch.randn(37, olmoe.hidden_size, generator=torch.Generator().manual_seed(0))
    slices = [s for s, block in expert_output_chunks(layer, x, experts=[2, 5], max_elements=2 * 128 * 5)]
    assert len(slices) > 1
    assert [s.start for s in slices] == sorted(s.start for s in slices)
    assert sum(s.stop - s.start for s in slices) == 37 and slices[-1].stop == 37


@pytest.mark.parametrize("arch", ["olmoe", "gpt_oss", "dbrx", "llama4_text", "jetmoe", "qwen2_moe"])
def test_expert_fn_is_invisible_to_captures_and_interventions(arch, saved_tiny_model):
    """expert_fn runs the model's own experts module: a capture must not record that call over the forward's
    routing, and an active ablation must not edit it."""
    moe = _load(saved_tiny_model, arch)
    layer = moe.layers[0]
    with torch.no_grad(), capture(moe, [layer], OUTPUT_ITEMS) as records:
        moe.model(input_ids=_ids(), use_cache=False)
        rec = records[layer.layer]
        before = {name: getattr(rec, name).clone() for name in ("topk_index", "topk_weight", "expert_input", "routed_output")}
        x = rec.expert_input
        outside = layer.expert_fn(0, x[:3])
        after = {name: getattr(records[layer.layer], name) for name in before}
    assert all(torch.equal(before[name], after[name]) for name in before)
    with torch.no_grad(), intervene(moe, [RoutingEdit(layer.layer, 0, "scale", 0.0)]):
        inside = layer.expert_fn(0, x[:3])
    assert torch.equal(inside, outside) and outside.abs().sum() > 0
