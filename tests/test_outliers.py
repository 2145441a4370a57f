"""outliers.py: a planted expert neuron with a known peak on one known token is reported exactly (value, neuron,
token, position, expert, and the output dimension it writes); the streamed running maxima equal a whole-pass argmax
computed by hand from the captured inputs on the demo model; removing experts through the script's consequence pass
equals prune.py's perplexity; the script writes its documented outputs and refuses bad input in one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import outliers
from common.analysis import outliers as analysis
from common.analysis import pruning
from common.config import ModelSpec
from common.data import resolve_domains, token_batches
from common.hooks import capture
from common.model import load_moe, tiny_tokenizer
from common.plots import MAX_PNG_WIDTH
from tests import planted

PEAK_LAYER, NEURON, OUT_DIM = 1, 3, planted.GROUP_DIMS + 200  # dim 200's token never occurs in the text
GATE, UP, DOWN = 5.0, 4.0, 0.5
PEAK_CHAR = "c"  # group 0 (letters a-d): routed at layer 1 to planted_experts(1, 0)


def _planted_peak_model(path: Path) -> Path:
    """The planted-routing model with one more planted neuron: at layer 1 the top-1 expert of group 0 has neuron 3
    reading only the coordinate of the token 'c' (gate weight 5, up weight 4), so it is silu(5x)·4x on 'c' and 0
    elsewhere; its down projection writes 0.5 × the neuron into a dimension no other token uses."""
    model = planted.build_planted_model()
    expert = planted.planted_experts(PEAK_LAYER, 0)[0]
    inner = model.config.intermediate_size
    column = planted.GROUP_DIMS + ord(PEAK_CHAR)
    with torch.no_grad():
        experts = model.model.layers[PEAK_LAYER].mlp.experts
        experts.gate_up_proj[expert, NEURON].zero_()
        experts.gate_up_proj[expert, inner + NEURON].zero_()
        experts.gate_up_proj[expert, NEURON, column] = GATE
        experts.gate_up_proj[expert, inner + NEURON, column] = UP
        experts.down_proj[expert, OUT_DIM, NEURON] = DOWN
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _expected_peak(eps: float) -> float:
    """The neuron on 'c' by hand: the residual is the embedding (one-hot 1 on the token, 4 on its group), so the
    RMS-normed input holds 1/rms on the token's coordinate, rms = sqrt((1 + 16)/H + eps)."""
    x = 1 / math.sqrt((1 + 16) / planted.HIDDEN + eps)
    gate = GATE * x
    return gate / (1 + math.exp(-gate)) * UP * x


@pytest.fixture(scope="module")
def peak_run(tmp_path_factory) -> tuple[Path, list[str], Path]:
    root = tmp_path_factory.mktemp("outliers")
    model = _planted_peak_model(root / "model")
    rng = np.random.default_rng(0)
    documents = ["".join(rng.choice(list("abdefgh"), 50)) for _ in range(12)]
    documents[7] = documents[7][:23] + PEAK_CHAR + documents[7][24:]  # the only 'c' of the data
    (root / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in documents))
    (root / "b.jsonl").write_text("\n".join(json.dumps({"text": "".join(rng.choice(list("ijklmnop"), 50))})
                                            for _ in range(12)))
    data = [f"a={root / 'a.jsonl'}", f"b={root / 'b.jsonl'}"]
    argv = ["--model", str(model), "--data", *data, "--num_tokens", "500", "--seq_len", "64", "--batch_size", "4",
            "--dtype", "float32", "--device", "cpu", "--no-progress", "--out", str(root / "out"), "--draws", "2"]
    assert outliers.main(argv) == 0
    (run,) = [p for p in (root / "out").glob("outliers/*/*/*") if p.is_dir()]
    return model, data, run


def test_a_planted_peak_is_reported_exactly(peak_run):
    model, data, run = peak_run
    moe = load_moe(ModelSpec(model=str(model), device="cpu", dtype="float32"))
    batches = list(token_batches(resolve_domains(data), moe.tokenizer, num_tokens=500, seq_len=64, batch_size=4,
                                 progress=False))
    where = [(b, r, p) for b, batch in enumerate(batches) for r, p in (batch.input_ids == ord(PEAK_CHAR)).nonzero().tolist()]
    assert len(where) == 1  # the planted token occurs once
    position = where[0][2]
    expert = planted.planted_experts(PEAK_LAYER, 0)[0]
    peaks = pd.read_csv(run / "expert_peaks.csv")
    row = peaks[(peaks.layer == PEAK_LAYER) & (peaks.expert == expert) & (peaks.domain == "all")].iloc[0]
    expected = _expected_peak(moe.model.config.rms_norm_eps)
    assert row.input_peak == pytest.approx(expected, rel=1e-5)
    assert (row.input_neuron, row.input_token, row.input_position) == (NEURON, PEAK_CHAR, position)
    assert row.output_peak == pytest.approx(DOWN * expected, rel=1e-5)
    assert (row.output_dim, row.output_position) == (OUT_DIM, position)
    layer = peaks[(peaks.layer == PEAK_LAYER) & (peaks.domain == "all")]
    assert layer.input_peak.idxmax() == row.name  # the layer's largest peak, by far
    named = pd.read_csv(run / "super_experts.csv")
    assert [(int(r.layer), int(r.expert)) for r in named.itertuples()] == [(PEAK_LAYER, expert)]
    assert named.iloc[0].token == PEAK_CHAR and named.iloc[0].position == position
    assert "[[c]]" in named.iloc[0].context
    # 'c' occurs in domain a only: the expert stands out there, and in b (group 0 never occurs) it saw no token
    assert (named.iloc[0].domains_above, named.iloc[0].domains_seen) == (1, 1)
    # the write into dimension OUT_DIM is the residual stream's largest entry after layer 1, on that token
    massive = pd.read_csv(run / "massive_activations.csv")
    top = massive[(massive.layer == PEAK_LAYER) & (massive.domain == "all") & (massive["rank"] == 1)].iloc[0]
    weight = torch.softmax(torch.tensor([1.0, 0.6, *[0.0] * 12]) * 16, 0)[0].item()  # the planted top-1 weight
    assert (top.dim, top.token, top.position) == (OUT_DIM, PEAK_CHAR, position)
    assert top.value == pytest.approx(DOWN * expected * weight, rel=1e-4)
    # and removing the named expert takes that entry away: after layer 1 the peak is the embedding's 4.0
    sink = pd.read_csv(run / "sink_mass.csv")
    after = sink[(sink.layer == PEAK_LAYER) & (sink.domain == "all")].set_index("condition").residual_peak
    assert after["none"] == pytest.approx(top.value, rel=1e-5) and after["super"] == pytest.approx(4.0, rel=1e-5)


def test_streamed_maxima_equal_a_whole_pass_argmax_on_the_demo():
    moe = load_moe(ModelSpec(model="demo", device="cpu", dtype="float32"))
    batches = list(token_batches(resolve_domains(["demo:code", "demo:french"]), moe.tokenizer, num_tokens=400,
                                 seq_len=64, batch_size=4, progress=False))
    streamed = analysis.ExpertPeaks(moe.layers, 2, torch.device("cpu"))
    inputs, topk, where = {m.layer: [] for m in moe.layers}, {m.layer: [] for m in moe.layers}, []
    with capture(moe, moe.layers, ("topk", "input")) as records, torch.no_grad():
        for number, batch in enumerate(batches):
            moe.forward(batch.input_ids, batch.attention_mask)
            streamed.update(records, batch, number)
            for m in moe.layers:
                inputs[m.layer].append(records[m.layer].expert_input.clone())
                topk[m.layer].append(records[m.layer].topk_index.clone())
            rows, positions = torch.meshgrid(torch.arange(batch.input_ids.shape[0]),
                                             torch.arange(batch.input_ids.shape[1]), indexing="ij")
            real = batch.attention_mask.bool().reshape(-1)
            where.append(torch.stack([torch.full_like(rows, number).reshape(-1), rows.reshape(-1),
                                      positions.reshape(-1)], 1)[real])
            for m in moe.layers:  # the whole pass keeps only real tokens, in stream order
                inputs[m.layer][-1] = inputs[m.layer][-1][real]
                topk[m.layer][-1] = topk[m.layer][-1][real]
            records.clear()
    where = torch.cat(where)
    checked = 0
    for i, layer in enumerate(moe.layers):
        x, index = torch.cat(inputs[layer.layer]), torch.cat(topk[layer.layer])
        experts = layer.experts  # OLMoE's fused layout: gate_up_proj [E, 2I, H], down_proj [E, H, I]
        inner = experts.down_proj.shape[-1]
        for e in range(layer.num_experts):
            mine = (index == e).any(1)
            if not mine.any():
                continue
            fused = x[mine] @ experts.gate_up_proj[e].detach().T
            neurons = torch.nn.functional.silu(fused[:, :inner]) * fused[:, inner:]
            output = neurons @ experts.down_proj[e].detach().T
            for peak, values in ((streamed.inputs[i].peak(e, 2), neurons), (streamed.outputs[i].peak(e, 2), output)):
                flat = values.abs().reshape(-1)
                best = int(torch.argmax(flat))
                token, unit = divmod(best, values.shape[1])
                assert peak.value == pytest.approx(float(flat[best]), rel=1e-5)
                assert (peak.index, peak.batch, peak.row, peak.position) == (unit, *where[mine][token].tolist())
                checked += 1
    assert checked >= 2 * 3 * moe.layers[0].num_experts  # most experts of the demo see a token


def test_consequences_agree_with_prune_perplexity(peak_run):
    model, data, _ = peak_run
    moe = load_moe(ModelSpec(model=str(model), device="cpu", dtype="float32"))
    batches = list(token_batches(resolve_domains(data), moe.tokenizer, num_tokens=200, seq_len=64, batch_size=4,
                                 progress=False))
    removed = [(), (5, 9), ()]
    for how in ("zero", "drop"):
        ours = analysis.consequences(moe, batches, removed, moe.layers, 2, how)
        reference = pruning.perplexity(moe, batches, removed, moe.layers, 2, how)
        np.testing.assert_allclose(ours.nll_sum, reference[0], rtol=1e-6)
        np.testing.assert_array_equal(ours.count, reference[1])
    # the attention-sink mass is a fraction, and uniform attention over q + 1 keys gives the harmonic mean
    assert np.all((ours.sink >= 0) & (ours.sink <= 1))
    assert np.all(ours.uniform > 0) and np.all(ours.uniform < 0.5)


def test_super_expert_rule():
    peaks = [np.array([1.0, 2.0, 30.0, np.nan, 3.0]), np.array([5.0, 5.0, 5.0])]
    assert analysis.super_experts(peaks, 10) == [(0, 2, 30.0, 2.5)]  # median of the four routed experts: 2.5
    # at 0.9 × the median: layer 0's threshold is 2.25 (experts 2 and 4), layer 1's 4.5 (all three)
    assert [(i, e) for i, e, _, _ in analysis.super_experts(peaks, 0.9)] == [(0, 2), (0, 4), (1, 0), (1, 1), (1, 2)]


def test_script_writes_documented_outputs_and_refuses_bad_input(peak_run, tmp_path, capsys):
    _, _, run = peak_run
    assert set(pd.read_csv(run / "outlier_perplexity.csv").condition) == {"none", "super", "random"}
    for stem in ("expert_peaks", "massive_activations", "sink_mass", "outlier_perplexity"):
        assert Image.open(run / "figures" / f"{stem}.png").size[0] <= MAX_PNG_WIDTH, stem  # within the page width
    assert np.load(run / "expert_peaks.npy").shape == (3, planted.NUM_EXPERTS, 3, 2)
    model, data, _ = peak_run
    base = ["--model", str(model), "--data", *data, "--num_tokens", "100", "--seq_len", "64", "--no-progress",
            "--out", str(tmp_path / "bad")]
    for extra, message in ((["--remove", "1:99"], "layer 1 has experts 0..13"),
                           (["--remove", "7:0"], "--remove 7:0"),
                           (["--remove", "one"], "is not LAYER:EXPERT"),
                           (["--multiple", "0"], "--multiple")):
        capsys.readouterr()
        assert outliers.main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").rglob("run.json"))
