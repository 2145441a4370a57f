"""Native DeepSeekMoE v1 (common/model/deepseek_moe.py): the published layout, the forward semantics, the adapter, loading.

The reference below is written from the published description (the published config and the layout described in common/model/deepseek_moe.py's docstring):
token by token and layer by layer, with its own RoPE attention, each selected expert applied one at a time and the
shared experts added, so that it shares no code with the implementation it checks.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from common.errors import InputError
from common.hooks import RoutingEdit, capture, intervene
from common.model import ModelSpec, MoEModel, deepseek_moe, inspect_moe, load_moe, tiny
from common.model import load as models

deepseek_moe.register()

FIXTURE = Path(__file__).parent / "fixtures" / "deepseek-moe-16b-base"
PAD = 258  # the tiny byte tokenizer's <|pad|>

# The published config.json with tiny sizes (same keys); std 0.2 so routing is far from uniform.
TINY_SIZES = {
    "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 8,
    "num_experts_per_tok": 3, "n_shared_experts": 2, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "max_position_embeddings": 256, "initializer_range": 0.2, "bos_token_id": 256, "eos_token_id": 257,
    "pad_token_id": PAD, "torch_dtype": "float32",
}  # fmt: skip


def published_config() -> dict:
    return json.loads((FIXTURE / "config.json").read_text())


def tiny_config_dict() -> dict:
    dropped = ("auto_map", "architectures", "transformers_version")
    return {**{k: v for k, v in published_config().items() if k not in dropped}, **TINY_SIZES}


def published_keys(num_layers: int, num_experts: int, first_dense: int) -> list[str]:
    """Parameter names of the published layout (dense MLP in the first layers, then gate/experts/shared experts)."""
    keys = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for n in range(num_layers):
        layer = f"model.layers.{n}"
        keys += [f"{layer}.self_attn.{p}_proj.weight" for p in "qkvo"]
        keys += [f"{layer}.input_layernorm.weight", f"{layer}.post_attention_layernorm.weight"]
        if n < first_dense:
            keys += [f"{layer}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
            continue
        keys.append(f"{layer}.mlp.gate.weight")
        for e in range(num_experts):
            keys += [f"{layer}.mlp.experts.{e}.{p}_proj.weight" for p in ("gate", "up", "down")]
        keys += [f"{layer}.mlp.shared_experts.{p}_proj.weight" for p in ("gate", "up", "down")]
    return sorted(keys)


def build_tiny(seed: int = 0) -> deepseek_moe.DeepseekMoEForCausalLM:
    config = AutoConfig.for_model(**tiny_config_dict())  # model_type "deepseek" among the keys
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("deepseek-tiny")
    build_tiny().save_pretrained(path)
    tiny.tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_model(tiny_dir: Path) -> deepseek_moe.DeepseekMoEForCausalLM:
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------------------ reference


@torch.no_grad()
def reference_logits(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] logits of one unpadded sequence, positions 0..n-1."""
    cfg = tiny_config_dict()
    p = dict(model.state_dict())
    heads, dim = cfg["num_attention_heads"], cfg["hidden_size"] // cfg["num_attention_heads"]
    eps, theta, half = cfg["rms_norm_eps"], cfg["rope_theta"], dim // 2

    def rms(x, weight):
        return weight * (x / torch.sqrt(x.pow(2).mean() + eps))

    def swiglu(x, prefix):
        gate, up = p[f"{prefix}.gate_proj.weight"] @ x, p[f"{prefix}.up_proj.weight"] @ x
        return p[f"{prefix}.down_proj.weight"] @ (F.silu(gate) * up)

    def rope(v, pos):  # v [heads, dim]: pairs (i, i + dim/2) rotated by pos * theta^(-2i/dim)
        out = torch.empty_like(v)
        for i in range(half):
            c, s = math.cos(pos * theta ** (-2 * i / dim)), math.sin(pos * theta ** (-2 * i / dim))
            out[:, i] = v[:, i] * c - v[:, i + half] * s
            out[:, i + half] = v[:, i + half] * c + v[:, i] * s
        return out

    stream = [p["model.embed_tokens.weight"][t] for t in ids]
    for n in range(cfg["num_hidden_layers"]):
        layer = f"model.layers.{n}"
        keys, values, new_stream = [], [], []
        for pos, x in enumerate(stream):
            h = rms(x, p[f"{layer}.input_layernorm.weight"])
            q = rope((p[f"{layer}.self_attn.q_proj.weight"] @ h).view(heads, dim), pos)
            keys.append(rope((p[f"{layer}.self_attn.k_proj.weight"] @ h).view(heads, dim), pos))
            values.append((p[f"{layer}.self_attn.v_proj.weight"] @ h).view(heads, dim))
            attended = torch.zeros(heads, dim)
            for head in range(heads):
                scores = torch.stack([q[head] @ k[head] for k in keys]) / math.sqrt(dim)
                attended[head] = sum(w * v[head] for w, v in zip(scores.softmax(0), values, strict=True))
            x = x + p[f"{layer}.self_attn.o_proj.weight"] @ attended.reshape(-1)
            h = rms(x, p[f"{layer}.post_attention_layernorm.weight"])
            if n < cfg["first_k_dense_replace"]:
                mlp = swiglu(h, f"{layer}.mlp")
            else:
                probs = (p[f"{layer}.mlp.gate.weight"] @ h).softmax(0)
                weights, experts = probs.topk(cfg["num_experts_per_tok"])
                mlp = swiglu(h, f"{layer}.mlp.shared_experts")
                for w, e in zip(weights, experts.tolist(), strict=True):
                    mlp = mlp + w * swiglu(h, f"{layer}.mlp.experts.{e}")
            new_stream.append(x + mlp)
        stream = new_stream
    return torch.stack([p["lm_head.weight"] @ rms(x, p["model.norm.weight"]) for x in stream])


SEQ_A = [72, 101, 108, 108, 111, 44, 32, 119, 111]
SEQ_B = [84, 104, 101, 32, 99, 97]


def padded_batch(padding: str) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[list[int], slice]]]:
    """input_ids, attention_mask, and (sequence, where its real tokens sit in its row) per row."""
    if padding == "none":
        return torch.tensor([SEQ_A]), None, [(SEQ_A, slice(0, len(SEQ_A)))]
    gap = len(SEQ_A) - len(SEQ_B)
    row_b = [*SEQ_B, *[PAD] * gap] if padding == "right" else [*[PAD] * gap, *SEQ_B]
    mask_b = [1] * len(SEQ_B) + [0] * gap if padding == "right" else [0] * gap + [1] * len(SEQ_B)
    where_b = slice(0, len(SEQ_B)) if padding == "right" else slice(gap, len(SEQ_A))
    ids = torch.tensor([SEQ_A, row_b])
    mask = torch.tensor([[1] * len(SEQ_A), mask_b])
    return ids, mask, [(SEQ_A, slice(0, len(SEQ_A))), (SEQ_B, where_b)]


# ------------------------------------------------------------------------------------------------ tests


def test_fixture_keys_are_the_published_layout():
    listed = (FIXTURE / "state_dict_keys.txt").read_text().split()
    assert len(listed) == len(set(listed)) == 5466
    assert sorted(listed) == published_keys(28, 64, 1)


def test_save_and_load_back_natively(tiny_dir: Path, tiny_model):
    deepseek_moe.register()  # a second call (common.model.load made the first) changes nothing
    assert AutoConfig.for_model("deepseek").__class__ is deepseek_moe.DeepseekMoEConfig
    assert type(tiny_model) is deepseek_moe.DeepseekMoEForCausalLM
    assert type(tiny_model.config) is deepseek_moe.DeepseekMoEConfig
    assert json.loads((tiny_dir / "config.json").read_text())["model_type"] == "deepseek"
    with safe_open(str(tiny_dir / "model.safetensors"), framework="pt") as f:
        saved = sorted(f.keys())
    assert saved == published_keys(3, 8, 1)
    assert sorted(tiny_model.state_dict()) == saved
    built = build_tiny().state_dict()
    assert all(torch.equal(built[k], v) for k, v in tiny_model.state_dict().items())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_logits_match_per_token_reference(tiny_model, attn: str, padding: str):
    tiny_model.set_attn_implementation(attn)
    try:
        ids, mask, rows = padded_batch(padding)
        with torch.no_grad():
            logits = tiny_model(input_ids=ids, attention_mask=mask).logits
    finally:
        tiny_model.set_attn_implementation("sdpa")
    assert torch.isfinite(logits).all()
    for row, (seq, where) in enumerate(rows):
        expected = reference_logits(tiny_model, seq)
        torch.testing.assert_close(logits[row, where], expected, atol=1e-5, rtol=1e-5)


def test_generate_with_cache_matches_greedy_recompute(tiny_model):
    ids = torch.tensor([SEQ_A])
    mask = torch.ones_like(ids)
    generated = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    expected = ids
    with torch.no_grad():
        for _ in range(5):
            step = tiny_model(input_ids=expected, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, step], dim=1)
    assert torch.equal(generated, expected)


def test_published_config_builds_the_published_layout_on_meta():
    # The config has an auto_map: the native class must win without the flag.
    config = AutoConfig.from_pretrained(FIXTURE)
    assert type(config) is deepseek_moe.DeepseekMoEConfig
    assert (config.n_routed_experts, config.num_experts_per_tok, config.n_shared_experts) == (64, 6, 2)
    assert config.rope_parameters["rope_theta"] == 10000 and config.dtype == torch.bfloat16
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    assert type(skeleton) is deepseek_moe.DeepseekMoEForCausalLM
    listed = (FIXTURE / "state_dict_keys.txt").read_text().split()
    assert sorted(skeleton.state_dict()) == sorted(listed)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (10944, 2048)
    assert shapes["model.layers.1.mlp.gate.weight"] == (64, 2048)
    assert shapes["model.layers.1.mlp.experts.63.down_proj.weight"] == (2048, 1408)
    assert shapes["model.layers.27.mlp.shared_experts.up_proj.weight"] == (2816, 2048)
    assert round(sum(v.numel() for v in skeleton.state_dict().values()) / 1e9, 1) == 16.4

    moe = MoEModel(skeleton)
    assert [m.layer for m in moe.layers] == list(range(1, 28))
    assert all(m.kind == "standard" and m.num_experts == 64 and m.top_k == 6 for m in moe.layers)
    assert all(len(m.shared_experts) == 1 for m in moe.layers)
    with pytest.raises(InputError, match="dense"):
        moe.select([0])
    # The project's loader, config only: same layout, no flag needed despite the auto_map.
    assert [m.layer for m in inspect_moe(ModelSpec(model=str(FIXTURE))).layers] == list(range(1, 28))


def test_router_logits_capture_and_expert_ablation(tiny_model):
    moe = MoEModel(tiny_model)
    assert [m.layer for m in moe.layers] == [1, 2]
    assert all(m.kind == "standard" and m.num_experts == 8 and m.top_k == 3 for m in moe.layers)
    ids, mask, _ = padded_batch("right")
    gate_inputs: dict[int, torch.Tensor] = {}
    handles = [
        m.router.register_forward_pre_hook(lambda _, a, layer=m.layer: gate_inputs.__setitem__(layer, a[0]))
        for m in moe.layers
    ]
    try:
        with torch.no_grad(), capture(moe, moe.layers, ("logits", "topk")) as cap:
            out = tiny_model(input_ids=ids, attention_mask=mask, output_router_logits=True, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    assert len(out.router_logits) == len(moe.layers) and len(out.hidden_states) == 3 + 1
    torch.testing.assert_close(out.hidden_states[0], tiny_model.model.embed_tokens(ids), atol=0, rtol=0)
    for m, recorded in zip(moe.layers, out.router_logits, strict=True):
        h = gate_inputs[m.layer].reshape(-1, 32)
        torch.testing.assert_close(cap[m.layer].logits, F.linear(h, m.router.weight), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(cap[m.layer].logits, recorded, atol=0, rtol=0)
        probs = recorded.softmax(-1)
        top = probs.topk(3)
        assert torch.equal(cap[m.layer].topk_index, top.indices)
        torch.testing.assert_close(cap[m.layer].topk_weight, top.values)  # norm_topk_prob false: raw softmax
        assert probs.max(-1).values.mean() > 2.0 / 8  # routing is decisive, not uniform

    # Ablating expert e at the first MoE layer == zeroing its down projection (downstream routing included).
    layer = moe.layers[0].layer
    expert = int(torch.bincount(cap[layer].topk_index.flatten(), minlength=8).argmax())
    with torch.no_grad(), intervene(moe, [RoutingEdit(layer, expert, "scale", 0.0)]):
        ablated = tiny_model(input_ids=ids, attention_mask=mask).logits
    zeroed = copy.deepcopy(tiny_model)
    with torch.no_grad():
        zeroed.model.layers[layer].mlp.experts[expert].down_proj.weight.zero_()
        expected = zeroed(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ablated, expected, atol=1e-5, rtol=1e-5)
    assert (ablated - out.logits).abs().max() > 1e-3

    x = torch.randn(5, 32)
    experts = tiny_model.model.layers[layer].mlp.experts
    torch.testing.assert_close(moe.layers[0].expert_fn(expert, x), experts[expert](x))
    params = moe.layers[0].expert_params(expert)
    assert params.gate is experts[expert].gate_proj.weight and params.down is experts[expert].down_proj.weight


# ------------------------------------------------------------------------------------------------ remote code

BROKEN_MODELING = (
    "from transformers.utils.import_utils import is_torch_fx_available  # gone in transformers 5\n"
    "from transformers import PreTrainedModel\n\n\n"
    "class DeepseekModel(PreTrainedModel):\n    pass\n\n\n"
    "class DeepseekForCausalLM(PreTrainedModel):\n    pass\n"
)
CONFIGURATION = (
    "from transformers import PretrainedConfig\n\n\n"
    "class DeepseekConfig(PretrainedConfig):\n    model_type = {model_type!r}\n"
)
AUTO_MAP = {
    "AutoConfig": "configuration_deepseek.DeepseekConfig",
    "AutoModel": "modeling_deepseek.DeepseekModel",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
}


def remote_code_folder(path: Path, model_type: str, source: Path) -> Path:
    """A checkpoint folder as published: weights, tokenizer, config.json with an auto_map, and its own (broken) code."""
    path.mkdir()
    for item in source.iterdir():
        (path / item.name).write_bytes(item.read_bytes())
    config = json.loads((source / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": model_type, "auto_map": AUTO_MAP}))
    (path / "modeling_deepseek.py").write_text(BROKEN_MODELING)
    (path / "configuration_deepseek.py").write_text(CONFIGURATION.format(model_type=model_type))
    return path


def test_broken_remote_code_is_one_clear_line(tmp_path: Path, tiny_dir: Path):
    folder = remote_code_folder(tmp_path / "old-remote-code", "deepseek_remote_only", tiny_dir)
    spec = ModelSpec(model=str(folder), trust_remote_code=True, device="cpu", dtype="float32")
    for load in (inspect_moe, load_moe):
        with pytest.raises(InputError) as err:
            load(spec)
        message = str(err.value)
        assert "\n" not in message
        assert message.startswith(f"--trust_remote_code: {folder}'s own code cannot be imported under ")
        assert transformers.__version__ in message and "is_torch_fx_available" in message
    # For a DeepSeekMoE repository the message names the way out.
    hint = models._remote_code_error(spec, "deepseek", ImportError("cannot import name 'x'\nmore"))
    assert str(hint).endswith("(cannot import name 'x'); DeepSeekMoE checkpoints load natively without the flag")


def test_deepseek_checkpoint_with_auto_map_loads_natively(tmp_path: Path, tiny_dir: Path, tiny_model):
    folder = remote_code_folder(tmp_path / "deepseek-moe-tiny", "deepseek", tiny_dir)
    ids = torch.tensor([SEQ_A])
    with torch.no_grad():
        expected = tiny_model(input_ids=ids).logits
    # The repository's code is never imported: the natively registered class wins, with or without the flag.
    for trust in (False, True):
        moe = load_moe(ModelSpec(model=str(folder), trust_remote_code=trust, device="cpu", dtype="float32"))
        assert type(moe.model) is deepseek_moe.DeepseekMoEForCausalLM
        assert [m.layer for m in moe.layers] == [1, 2]
        torch.testing.assert_close(moe.forward(ids).logits, expected, atol=0, rtol=0)


@pytest.mark.slow  # 26 s: a whole router_metrics run; the adapter tests above cover the architecture
def test_router_metrics_runs_on_deepseek_moe(tmp_path: Path, tiny_dir: Path, capsys):
    import router_metrics

    text = tmp_path / "a.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    argv = ["--model", str(tiny_dir), "--data", f"a={text}", "--num_tokens", "300", "--seq_len", "32",
            "--batch_size", "4", "--out", str(tmp_path / "out"), "--no-progress"]
    assert router_metrics.main(argv) == 0
    [run] = list((tmp_path / "out").glob("router_metrics/*/*/*"))
    frequency = pd.read_csv(run / "frequency.csv")
    assert set(frequency.layer) == {1, 2}  # layer 0 is dense
    selected = frequency[frequency.domain == "a"].groupby("layer").count_topk.sum()
    assert (selected == 300 * 3).all()  # top-3 of the tiny config: every counted token picks 3 experts
    # The shared experts are always on and never counted as routed choices.
    assert set(frequency.expert) == set(range(8))
    assert router_metrics.main([*argv, "--trust_remote_code"]) == 0
    assert "--trust_remote_code is not needed" in capsys.readouterr().err
