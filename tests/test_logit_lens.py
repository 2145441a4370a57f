"""logit_lens.py: the prompt lens is exact where the MoE output is added to the residual stream and refused where it
is not; top-k restriction's perplexity and cosines against transformers' own loss and a hand-written top-1 model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import logit_lens
from common.analysis.lens import TopkSweep, next_token_labels, prompt_lens
from common.data import resolve_domains, token_batches
from common.errors import InputError
from common.hooks import TopKRestriction, capture, intervene
from common.model import ModelSpec, MoEModel, load_moe, tiny
from tests.script_probe import run_script

ROOT = Path(__file__).resolve().parent.parent
ADDITIVE = ["olmoe", "mixtral", "qwen2_moe", "deepseek_v3"]  # pre-norm blocks: r = (r − m) + m, α = 1
IDS = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]  # "Hello, world" in the byte tokenizer
POSITION = 8


def _load(saved_tiny_model, arch: str) -> MoEModel:
    return load_moe(ModelSpec(model=str(saved_tiny_model(arch)), device="cpu", dtype="float32"))


def _mid_residuals(moe: MoEModel, ids: list[int]) -> dict[int, torch.Tensor]:
    """Reference: the residual stream entering each MoE block's norm, read off the decoder layer itself (these
    architectures name that norm post_attention_layernorm; its input is the hidden state after attention)."""
    seen: dict[int, torch.Tensor] = {}
    layers = moe.decoder_layers()
    handles = [layers[m.layer].post_attention_layernorm.register_forward_pre_hook(
        lambda mod, args, i=m.layer: seen.__setitem__(i, args[0][0].detach().clone())) for m in moe.layers]
    try:
        moe.forward(torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("arch", ADDITIVE)
def test_lens_columns_are_exact_where_the_moe_output_is_added(arch, saved_tiny_model):
    moe = _load(saved_tiny_model, arch)
    mid = _mid_residuals(moe, IDS)
    with torch.no_grad(), capture(moe, what=("moe_output", "shared_output", "residual")) as records:
        logits = moe.forward(torch.tensor([IDS])).logits[0]
    lens = prompt_lens(moe, IDS, POSITION, moe.layers)
    shared = any(m.shared_experts for m in moe.layers)
    assert lens.layers == [m.layer for m in moe.layers]
    assert [c.key for c in lens.columns if c.in_figure] == [
        "layer_output", "before_moe", "top1", "top2", *(["all_shared"] if shared else [])]
    for moe_layer in moe.layers:
        rec = records[moe_layer.layer]
        # The identity: residual after the layer − MoE output = the residual stream at the MoE input.
        torch.testing.assert_close(rec.residual - rec.moe_output, mid[moe_layer.layer], rtol=0, atol=1e-6)
        check = next(c for c in lens.checks if c.layer == moe_layer.layer)
        assert check.alpha == 1.0 and check.additivity_defect < 1e-5 and check.rebuild_error < 1e-5
        cell = lambda key, layer=moe_layer.layer: lens.cell(layer, key)  # noqa: E731
        torch.testing.assert_close(cell("before_moe").vector, mid[moe_layer.layer][POSITION], rtol=0, atol=1e-6)
        everything = cell("all_shared" if shared else "top2")
        torch.testing.assert_close(everything.vector, cell("layer_output").vector, rtol=0, atol=1e-5)
        assert everything.token_ids == cell("layer_output").token_ids
        np.testing.assert_allclose(everything.probs, cell("layer_output").probs, rtol=1e-5)
        # + top-k' = the layer's output had it kept only its top k' experts (shared experts kept), earlier layers untouched.
        with torch.no_grad(), intervene(moe, [TopKRestriction(moe_layer.layer, 1)]), capture(
            moe, [moe_layer], ("residual", "shared_output", "topk")
        ) as restricted:
            moe.forward(torch.tensor([IDS]))
        got = restricted[moe_layer.layer]
        expected = got.residual[POSITION] - (got.shared_output[POSITION] if shared else 0)
        torch.testing.assert_close(cell("top1").vector, expected, rtol=0, atol=1e-5)
        kept = got.topk_weight[POSITION] != 0
        assert cell("top1").expert == int(got.topk_index[POSITION][kept])
        assert cell("top1").weight == pytest.approx(float(got.topk_weight[POSITION][kept]))
    # The last layer's lens is the model's own output.
    last = moe.num_decoder_layers - 1
    torch.testing.assert_close(moe.unembed(records[last].residual), logits, rtol=1e-5, atol=1e-5)
    assert lens.last_layer_error < 1e-5
    if lens.layers[-1] == last:
        top = logits[POSITION].softmax(-1).topk(5)
        assert lens.cell(last, "layer_output").token_ids == top.indices.tolist()


def test_residual_multiplier_is_fitted_granite():
    config = tiny.tiny_config("granitemoe", vocab_size=len(tiny.tiny_tokenizer()))
    config.residual_multiplier = 0.5
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    moe = MoEModel(AutoModelForCausalLM.from_config(config).eval(), tiny.tiny_tokenizer())
    lens = prompt_lens(moe, IDS, POSITION, moe.layers)
    for check in lens.checks:
        assert check.alpha == pytest.approx(0.5, rel=1e-4)
        torch.testing.assert_close(lens.cell(check.layer, "top2").vector, lens.cell(check.layer, "layer_output").vector,
                                   rtol=0, atol=1e-5)


def test_post_feedforward_norm_is_refused(saved_tiny_model, tmp_path, capsys):
    moe = _load(saved_tiny_model, "flex_olmo")
    with pytest.raises(InputError, match="post-feed-forward norm"):
        prompt_lens(moe, IDS, POSITION, moe.layers)
    capsys.readouterr()
    code = logit_lens.main(["--model", str(saved_tiny_model("flex_olmo")), "--prompt", "Hello, world",
                            "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "FlexOlmoForCausalLM is not supported by the prompt lens" in err[0], err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- top-k restriction


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lens-data")
    (folder / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 30)
    (folder / "b.jsonl").write_text("\n".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}"}) for i in range(40)))
    return folder


def _batches(moe: MoEModel, data_files: Path, num_tokens: int = 150):
    domains = resolve_domains([f"prose={data_files / 'a.txt'}", f"code={data_files / 'b.jsonl'}"])
    return token_batches(domains, moe.tokenizer, num_tokens=num_tokens, seq_len=32, batch_size=3, progress=False)


@pytest.mark.parametrize("arch", ["olmoe", "deepseek_v3"])
def test_perplexity_at_k_is_transformers_loss_and_cosine_at_k_is_one(arch, saved_tiny_model, data_files):
    moe = _load(saved_tiny_model, arch)
    k = max(m.top_k for m in moe.layers)
    sweep = TopkSweep(moe, moe.layers, ["prose", "code"], ks=[1, k])  # k' = k restricted: must change nothing
    loss_sum, tokens = np.zeros(2), np.zeros(2)
    for batch in _batches(moe, data_files):
        sweep.update(batch)
        labels = next_token_labels(batch)
        with torch.no_grad():
            loss = moe.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels, use_cache=False).loss
        n = int((labels[:, 1:] != -100).sum())
        loss_sum[int(batch.domain_ids[0])] += float(loss) * n
        tokens[int(batch.domain_ids[0])] += n
    sweep.all_reduce()
    nll, counts = sweep.nll_arrays()  # runs: k'=1, k'=k restricted, full; domains: prose, code, all
    expected = np.exp(np.append(loss_sum / tokens, loss_sum.sum() / tokens.sum()))
    np.testing.assert_allclose(np.exp(nll[2]), expected, rtol=1e-5)
    np.testing.assert_allclose(np.exp(nll[1]), expected, rtol=1e-5)
    assert (counts == np.append(tokens, tokens.sum())).all()
    assert not np.allclose(nll[0], nll[2])
    table = sweep.cosine_table()
    at_k = table[table.k_prime == k]
    assert (at_k["min"] > 1 - 1e-6).all() and (at_k["count"] > 0).all()
    top1 = table[(table.k_prime == 1) & table.restricted]
    assert (top1["mean"] < 1 - 1e-6).all()
    perplexity = sweep.perplexity_table()
    full = perplexity.drop_duplicates(["domain", "k_prime"], keep="last")
    assert (full[full.k_prime == k].normalized_log_ppl == 1.0).all()
    assert list(full.domain.unique()) == ["prose", "code", "all"]


def _hand_top1(moe: MoEModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, renormalize: bool):
    """OLMoE computed layer by layer with each MoE replaced by its top-1 expert: expert_fn weighted as the router
    weights it (softmax over all experts, then the top-k weights normalised if the config says so)."""
    from transformers.masking_utils import create_causal_mask

    base = moe.model.model
    hidden = base.embed_tokens(input_ids)
    positions = torch.arange(input_ids.shape[1]).view(1, -1)
    mask = create_causal_mask(config=base.config, inputs_embeds=hidden, attention_mask=attention_mask,
                              past_key_values=None, position_ids=positions)
    rotary = base.rotary_emb(hidden, positions)
    residuals = []
    for moe_layer, layer in zip(moe.layers, base.layers, strict=True):
        attended, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden), attention_mask=mask,
                                      position_embeddings=rotary, position_ids=positions)
        hidden = hidden + attended
        x = layer.post_attention_layernorm(hidden).reshape(-1, hidden.shape[-1])
        probs = (x @ layer.mlp.gate.weight.T).softmax(-1)
        top, index = probs.topk(moe_layer.top_k, dim=-1)
        if base.config.norm_topk_prob:
            top = top / top.sum(-1, keepdim=True)
        weight = top.sum(-1) if renormalize else top[:, 0]
        out = torch.zeros_like(x)
        for e in range(moe_layer.num_experts):
            routed = index[:, 0] == e
            if routed.any():
                out[routed] = weight[routed, None] * moe_layer.expert_fn(e, x[routed])
        hidden = hidden + out.view_as(hidden)
        residuals.append(hidden.reshape(-1, hidden.shape[-1]))
    return moe.model.lm_head(base.norm(hidden)), residuals


@pytest.mark.parametrize("renormalize", [False, True])
def test_top1_run_equals_a_hand_implementation(renormalize, saved_tiny_model, data_files):
    moe = _load(saved_tiny_model, "olmoe")
    (batch, *_) = list(_batches(moe, data_files, num_tokens=60))
    sweep = TopkSweep(moe, moe.layers, ["prose", "code"], ks=[1], renormalize=renormalize)
    sweep.update(batch)
    with torch.no_grad():
        logits, residuals = _hand_top1(moe, batch.input_ids, batch.attention_mask, renormalize)
        with capture(moe, what=("residual",)) as full:
            moe.forward(batch.input_ids, batch.attention_mask)
    labels = next_token_labels(batch)
    counted = labels[:, 1:] != -100
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
    mean, count = sweep.nll_arrays()
    assert count[0, 0] == int(counted.sum())
    assert mean[0, 0] == pytest.approx(float(nll[counted].mean()), rel=1e-5)
    weights = batch.count_mask.reshape(-1)
    cosine = sweep.cosine.moments.result().mean  # [run, layer, domain]
    for layer, hand in enumerate(residuals):
        expected = F.cosine_similarity(hand, full[layer].residual, dim=-1)[weights].mean()
        assert cosine[0, layer, 0] == pytest.approx(float(expected), abs=1e-5)


# --------------------------------------------------------------------------------------------- the script


def _data_argv(out: Path, data_files: Path, *extra: str) -> list[str]:
    return ["--model", "random:olmoe", "--data", f"prose={data_files / 'a.txt'}", f"code={data_files / 'b.jsonl'}",
            "--num_tokens", "120", "--seq_len", "32", "--batch_size", "4", "--out", str(out), "--no-progress", *extra]


def _run_dir(out: Path) -> Path:
    (folder,) = [p for p in out.glob("logit_lens/*/*/*") if p.is_dir()]
    return folder


def test_script_data_mode(tmp_path, data_files):
    assert logit_lens.main(_data_argv(tmp_path, data_files, "--renormalize")) == 0
    run = _run_dir(tmp_path)
    for name in ["run.json", "perplexity.csv", "cosine_summary.csv", "cosine_hist.npy", "cosine_hist_edges.npy",
                 "figures/perplexity_vs_k.png", "figures/cosine_by_layer.pdf"]:
        assert (run / name).is_file(), name
    perplexity = pd.read_csv(run / "perplexity.csv")
    assert list(perplexity.columns[:6]) == ["domain", "k_prime", "renormalize", "tokens", "nll", "ppl"]
    assert set(perplexity.k_prime) == {1, 2} and perplexity.renormalize.all()
    np.testing.assert_allclose(perplexity.ppl, np.exp(perplexity.nll))
    cosine = pd.read_csv(run / "cosine_summary.csv")
    assert set(cosine.layer) == {0, 1, 2, 3} and set(cosine.k_prime) == {1}
    assert (cosine[cosine.domain == "all"]["count"] == 240).all()  # every counted token, both domains
    assert np.load(run / "cosine_hist.npy").shape == (1, 4, 3, 400)
    info = json.loads((run / "run.json").read_text())
    assert info["k_primes"] == [1, 2] and info["restricted_layers"] == [0, 1, 2, 3]


def test_script_prompt_mode_shared_experts_and_dense_first_layer(tmp_path):
    argv = ["--model", "random:deepseek_v3", "--prompt", r"def add(a, b):\n    return", "--out", str(tmp_path),
            "--no-progress"]
    assert logit_lens.main(argv) == 0
    run = _run_dir(tmp_path)
    table = pd.read_csv(run / "lens_grid.csv", keep_default_na=False)
    assert set(table.layer) == {1, 2, 3}  # layer 0 is dense
    assert list(dict.fromkeys(table.column)) == ["layer_output", "before_moe", "top1", "top2", "all_shared", "alone2"]
    assert (table.groupby(["layer", "column"]).size() == 5).all()
    assert (run / "figures" / "lens_grid.png").is_file()
    info = json.loads((run / "run.json").read_text())
    assert info["prompt"] == "def add(a, b):\n    return" and info["position"] == len(info["input_ids"]) - 1



def test_dense_model_gets_the_layer_output_column_only(tmp_path, saved_dense_model, data_files, capsys):
    capsys.readouterr()
    assert logit_lens.main(["--model", str(saved_dense_model), "--prompt", "Hello", "--out", str(tmp_path),
                            "--no-progress"]) == 0
    table = pd.read_csv(_run_dir(tmp_path) / "lens_grid.csv")
    assert set(table.column) == {"layer_output"} and set(table.layer) == {0, 1}
    capsys.readouterr()
    code = logit_lens.main(_data_argv(tmp_path / "data", data_files, "--model", str(saved_dense_model)))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "top-k restriction needs experts" in err[0]
    assert not (tmp_path / "data").exists()


BAD = {
    "position beyond the prompt": (["--prompt", "abc", "--position", "3"], "--position 3 is beyond the prompt"),
    "negative position beyond": (["--prompt", "abc", "--position", "-4"], "--position -4 is beyond the prompt"),
    "k' > k (prompt)": (["--prompt", "abc", "--max_k", "3"], "--max_k 3 exceeds k = 2"),
    "k' > k (data)": (["--max_k", "3"], "--max_k 3 exceeds k = 2"),
    "empty prompt": (["--prompt", ""], "--prompt is empty"),
    "dense layer": (["--model", "random:deepseek_v3", "--prompt", "abc", "--layers", "0"],
                    "dense (non-MoE) layer; MoE layers: 1, 2, 3"),
    "dense layer (data)": (["--model", "random:deepseek_v3", "--layers", "0"], "dense (non-MoE) layer; MoE layers: 1, 2, 3"),
    "prompt with data": (["--prompt", "abc", "--data", "demo"], "--data belongs to the data analyses"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_one_line_exit_2_nothing_written(case, tmp_path, data_files, capsys):
    extra, message = BAD[case]
    argv = [*extra, "--out", str(tmp_path / "out"), "--no-progress"]
    if "--prompt" not in extra:
        argv = _data_argv(tmp_path / "out", data_files, *extra)
    elif "--model" not in extra:
        argv = ["--model", "random:olmoe", *argv]
    assert logit_lens.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "out").exists()


def test_help_and_flag_errors_never_import_torch():
    for args, code in ((["--help"], 0), (["--prompt", " "], 2), (["--bins", "3"], 2)):
        result, heavy = run_script("logit_lens.py", *args)
        assert result.returncode == code, result.stderr
        assert heavy == [], (args, heavy)


@pytest.mark.parametrize("arch", ["olmoe", "deepseek_v3", "jamba"])
def test_restricted_runs_resumed_at_the_first_moe_layer_equal_whole_forwards(arch, saved_tiny_model, data_files):
    """The top-k′ runs started at the first restricted layer from the full run's residual give the perplexities and
    cosine histograms of whole forwards, bit for bit (DeepSeek-V3's first layer is dense: it is skipped too)."""
    moe = _load(saved_tiny_model, arch)
    first = min(m.layer for m in moe.layers)
    sweeps = {resume: TopkSweep(moe, moe.layers, ["prose", "code"], ks=[1], resume=resume) for resume in (False, True)}
    for batch in _batches(moe, data_files):
        for sweep in sweeps.values():
            sweep.update(batch)
    assert sweeps[True].resumed == (first > 0) and not sweeps[False].resumed
    (nll_whole, counts_whole), (nll_resumed, counts_resumed) = (sweeps[r].nll_arrays() for r in (False, True))
    np.testing.assert_array_equal(nll_resumed, nll_whole)
    np.testing.assert_array_equal(counts_resumed, counts_whole)
    for whole, resumed in zip(sweeps[False].cosine_histogram(), sweeps[True].cosine_histogram(), strict=True):
        np.testing.assert_array_equal(resumed, whole)


@pytest.mark.parametrize("arch", ["olmoe", "granitemoe", "qwen3_moe", "mixtral"])
def test_head_applied_in_chunks_gives_the_whole_logits_perplexities(arch, saved_tiny_model, data_files):
    """The head applied to a few positions at a time, from the residual entering the final norm (Granite's logits
    divided by its scale as its own head does), gives the NLL of the model's whole logits; chunks of 1 and 7
    positions, with the model's vocabulary (a 1 MiB bound: whole rows at once)."""
    moe = _load(saved_tiny_model, arch)
    if arch == "granitemoe":
        moe.model.config.logits_scaling = 4.0  # the tiny config's 1.0 would leave the division untested
    row_bytes = 4 * moe.vocab_size
    bounds = {"whole": None, "1": row_bytes / 2**20, "7": 7 * row_bytes / 2**20}
    sweeps = {name: TopkSweep(moe, moe.layers, ["prose", "code"], ks=[1], logits_mb=mb) for name, mb in bounds.items()}
    assert sweeps["1"].chunk_rows == 1 and sweeps["7"].chunk_rows == 7 and sweeps["whole"].chunk_rows is None
    for batch in _batches(moe, data_files):
        for sweep in sweeps.values():
            sweep.update(batch)
    whole, counts = sweeps["whole"].nll_arrays()
    assert np.isfinite(whole).all() and (counts > 0).all()
    for name in ("1", "7"):
        nll, chunk_counts = sweeps[name].nll_arrays()
        np.testing.assert_allclose(nll, whole, rtol=1e-6, atol=0)
        np.testing.assert_array_equal(chunk_counts, counts)
