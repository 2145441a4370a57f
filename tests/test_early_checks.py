"""Checks as early as they can be: a typo costs a second, not a model load.

- Data specs (a missing file, an unknown preset or domain, `--num_domains` above the preset's count) are refused at
  the flag stage, before torch is imported (a fresh interpreter per case: tests/script_probe.py).
- Everything knowable from the model's config and tokenizer (`--layers`, `--expert_id` / `--experts`,
  `--target_idx` against the tokenised prompt, `--target_token`, `--position`, `--seq_len` against the context,
  `--max_k`, a dense model where experts are needed) is refused before any weight is read: the loader is replaced by
  one that fails the test if it is ever called.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import interv
import label
import logit_lens
import profiles
import router_decisive
import weights
from common.model import load
from tests.script_probe import run_script, run_script_modules

# --------------------------------------------------------------------------------------------- data specs, no torch
DATA_SPECS = {  # --data flags -> what the one line must say
    "missing file": (["--data", "{tmp}/missing.jsonl"], "missing.jsonl': no such file or folder"),
    "unknown preset": (["--data", "olmo"], "--data 'olmo': unknown preset (presets: demo, olmoe, olmoe-pile, pile, moe-lens"),
    "unknown domain": (["--data", "olmoe", "--domains", "wiki"],
                       "--domains: unknown wiki (available: arxiv, github, wikipedia, books, c4)"),
    "too many domains": (["--data", "moe-lens", "--num_domains", "5"],
                         "--num_domains 5: only 4 domains available (english, french-qa, gsm8k, code)"),
}
# (script, its other flags): every script that reads data, each with the flags it needs to get that far
DATA_SCRIPTS = {
    "router_decisive.py": [], "router_stats.py": [], "router_metrics.py": [], "sim.py": [], "dim_reduc.py": [],
    "cluster.py": [], "probing.py": [], "profiles.py": ["--layer", "1", "--expert_id", "0"],
    "interv.py": ["--layer", "1"],  # dataset mode
    "logit_lens.py": [],  # data mode
    "label.py": ["--layer", "1", "--local-llm", "demo"],
}
# every kind of bad spec with one script, one kind with every script
DATA_CASES = [("router_decisive.py", case) for case in DATA_SPECS] + [
    (script, "missing file") for script in DATA_SCRIPTS if script != "router_decisive.py"]


@pytest.mark.parametrize(("script", "case"), DATA_CASES, ids=[f"{script}-{case}" for script, case in DATA_CASES])
def test_bad_data_specs_are_refused_before_torch_is_imported(script, case, tmp_path):
    flags = DATA_SCRIPTS[script]
    data, message = DATA_SPECS[case]
    argv = [*flags, *(item.format(tmp=tmp_path) for item in data), "--out", str(tmp_path / "results"), "--no-progress"]
    result, heavy = run_script(script, *argv)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: --"), result.stderr[-2000:]
    assert message in lines[0], lines[0]
    assert heavy == [], f"{case}: imported {heavy} before refusing"
    assert not (tmp_path / "results").exists()


# -------------------------------------------------------------------------------------- config-level, no weights
@pytest.fixture
def no_weights(monkeypatch):
    """Every path that reads a checkpoint's weights (load_moe, load_model: random models too) fails the test."""

    def refuse(spec):
        raise AssertionError(f"weights of {spec.model} were read before the bad input was refused")

    monkeypatch.setattr(load, "load_model_and_tokenizer", refuse)


@pytest.fixture(scope="module")
def olmoe_folder(saved_tiny_model) -> Path:
    """A saved tiny OLMoE (4 MoE layers of 8 experts, top-2, context 512) with its byte tokenizer (one token per
    byte, nothing added around a text)."""
    return saved_tiny_model("olmoe")


PROMPT = "hello world"  # 11 tokens with the byte tokenizer
# name -> (script module, flags after --model, what the one line must say)
CONFIG_CASES = {
    "layer out of range": (router_decisive, ["--layers", "4"], "layer 4 does not exist: the model has 4 decoder layers"),
    "seq_len above the context": (router_decisive, ["--seq_len", "600"],
                                  "--seq_len 600 exceeds the model's context length 512"),
    "expert_id out of range": (profiles, ["--layer", "1", "--expert_id", "3", "8"],
                               "--expert_id 8 out of range: layer 1 has experts 0..7"),
    "interv expert_id": (interv, ["--layer", "1", "--prompt", PROMPT, "--expert_id", "8"],
                         "--expert_id 8 out of range: layer 1 has experts 0..7"),
    "target_idx beyond the prompt": (interv, ["--layer", "1", "--prompt", PROMPT, "--expert_id", "0",
                                              "--target_idx", "11"],
                                     "--target_idx 11 is beyond prompt 0 ('hello world'): it has 11 tokens"),
    "target_token of two tokens": (interv, ["--layer", "1", "--prompt", PROMPT, "--expert_id", "0",
                                            "--target_token", "ab"], "--target_token 'ab' is 2 tokens"),
    "prompt longer than the context": (interv, ["--layer", "1", "--prompt", "x" * 500, "--expert_id", "0"],
                                       "prompt 0 (500 tokens) + --max_new_tokens 20 exceeds the model's context "
                                       "length 512"),
    "interv experts out of range": (interv, ["--layer", "1", "--experts", "9", "--data", "{data}"],
                                    "--experts 9 out of range: layer 1 has experts 0..7"),
    "label experts out of range": (label, ["--layer", "1", "--experts", "8", "--local-llm", "demo", "--data", "{data}"],
                                   "--experts 8 out of range: layer 1 has experts 0..7"),
    "position beyond the prompt": (logit_lens, ["--prompt", PROMPT, "--position", "11"],
                                   "--position 11 is beyond the prompt: it has 11 tokens"),
    "max_k above k": (logit_lens, ["--max_k", "3", "--data", "{data}"], "--max_k 3 exceeds k = 2"),
    "dense model": (router_decisive, ["--model", "{dense}"], "has no MoE layers"),
    "dense model, weights": (weights, ["--model", "{dense}"], "has no MoE layers"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_config_level_errors_are_refused_before_any_weight_is_read(case, olmoe_folder, saved_dense_model, no_weights,
                                                                    tmp_path, capsys):
    script, flags, message = CONFIG_CASES[case]
    text = tmp_path / "a.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    flags = [f.format(data=text, dense=saved_dense_model) for f in flags]
    argv = ["--model", str(olmoe_folder), *flags, "--num_tokens", "50", "--out", str(tmp_path / "results"),
            "--no-progress"]
    if script is weights:  # no data flags
        argv.remove("--num_tokens"), argv.remove("50")
    code = script.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert message in lines[0], lines[0]
    assert not (tmp_path / "results").exists()


def test_good_prompt_flags_still_run(olmoe_folder, tmp_path, capsys):
    """The checks moved ahead of the load keep their meaning: the last position and a single-token target pass."""
    out = tmp_path / "results"
    assert interv.main(["--model", str(olmoe_folder), "--layer", "1", "--prompt", PROMPT, "--expert_id", "7",
                        "--target_idx", "10", "-11", "--target_token", "!", "--value", "0", "--max_new_tokens", "2",
                        "--out", str(out), "--no-progress"]) == 0
    assert logit_lens.main(["--model", str(olmoe_folder), "--prompt", PROMPT, "--position", "-11", "--out", str(out),
                            "--no-progress"]) == 0
    capsys.readouterr()
    assert len(list(out.glob("*/*/*/*/run.json"))) == 2


# --------------------------------------------------------------------------- config-level, before torch is imported

# name -> (script, flags after --model, what the one line must say): answered from the config and tokenizer alone
EARLY_CASES = {
    "layer out of range": ("router_decisive.py", ["--layers", "4"],
                           "layer 4 does not exist: the model has 4 decoder layers (0..3)"),
    "negative layer out of range": ("router_decisive.py", ["--layers", "-5"],
                                    "layer -5 does not exist: the model has 4 decoder layers (0..3)"),
    "seq_len above the context": ("router_decisive.py", ["--seq_len", "600"],
                                  "--seq_len 600 exceeds the model's context length 512"),
    "expert_id out of range": ("profiles.py", ["--layer", "1", "--expert_id", "3", "8"],
                               "--expert_id 8 out of range: layer 1 has experts 0..7"),
    "interv expert_id": ("interv.py", ["--layer", "-3", "--prompt", PROMPT, "--expert_id", "8"],
                         "--expert_id 8 out of range: layer 1 has experts 0..7"),
    "interv experts": ("interv.py", ["--layer", "1", "--experts", "9", "--data", "{data}"],
                       "--experts 9 out of range: layer 1 has experts 0..7"),
    "target_idx beyond the prompt": ("interv.py", ["--layer", "1", "--prompt", PROMPT, "--expert_id", "0",
                                                   "--target_idx", "11"],
                                     "--target_idx 11 is beyond prompt 0 ('hello world'): it has 11 tokens"),
    "negative target_idx beyond the prompt": ("interv.py", ["--layer", "1", "--prompt", PROMPT, "--expert_id", "0",
                                                            "--target_idx", "-12"],
                                              "--target_idx -12 is beyond prompt 0 ('hello world'): it has 11 tokens"),
    "position beyond the prompt": ("logit_lens.py", ["--prompt", PROMPT, "--position", "11"],
                                   "--position 11 is beyond the prompt: it has 11 tokens"),
    "logit lens layer out of range": ("logit_lens.py", ["--prompt", PROMPT, "--layers", "7"],
                                      "layer 7 does not exist: the model has 4 decoder layers"),
    "dense model": ("router_decisive.py", ["--model", "{dense}"], "LlamaForCausalLM has no MoE layers (a dense model?)"),
}


@pytest.mark.parametrize("case", EARLY_CASES)
def test_config_level_errors_are_refused_before_torch_is_imported(case, olmoe_folder, saved_dense_model, tmp_path):
    script, flags, message = EARLY_CASES[case]
    text = tmp_path / "a.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    argv = ["--model", str(olmoe_folder), *(f.format(data=text, dense=saved_dense_model) for f in flags), "--num_tokens", "50",
            "--out", str(tmp_path / "results"), "--no-progress"]
    if script == "logit_lens.py":  # prompt mode reads no data
        argv.remove("--num_tokens"), argv.remove("50")
    result, modules = run_script_modules(script, *argv, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), result.stderr[-2000:]
    assert message in lines[0], lines[0]
    # config.json and tokenizer.json read as files: neither torch nor transformers is imported before the refusal
    heavy = sorted(m for m in modules if m.split(".")[0] in ("torch", "transformers"))
    assert not heavy, f"{case}: imported {heavy[:5]} before refusing"
    assert not (tmp_path / "results").exists()


@pytest.fixture
def bos_tokenizer():
    """The byte tokenizer with a BOS put before every text (as Llama's tokenizers do): a leading special token that
    prompt positions count."""
    from tokenizers import processors

    from common.model.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    assert tok("ab")["input_ids"] == [tok.bos_token_id, 97, 98]
    return tok


@pytest.mark.parametrize("with_bos", [False, True])
def test_early_position_check_agrees_with_the_lens(with_bos, bos_tokenizer):
    """logit_lens's early --position check (config tokenizer, before the lens module is imported) refuses exactly the
    positions that `resolve_position(position, len(prompt_ids(...)))` refuses, with its message."""
    from common.analysis.lens import prompt_ids, resolve_position
    from common.errors import InputError
    from common.model.config_facts import ConfigFacts
    from common.model.tiny import tiny_tokenizer

    tok = bos_tokenizer if with_bos else tiny_tokenizer()
    facts = ConfigFacts(model="m", config=None, num_decoder_layers=4, context_length=512, num_experts=8,
                        load_tokenizer=lambda: tok)
    length = len(prompt_ids(tok, PROMPT))
    assert length == 11 + with_bos
    refused = 0
    for position in range(-length - 3, length + 3):
        try:
            resolve_position(position, length)
            expected = None
        except InputError as err:
            expected = str(err)
        try:
            logit_lens.early_prompt_checks(position, PROMPT, facts)
            early = None
        except InputError as err:
            early = str(err)
        assert early == expected, position
        refused += expected is not None
    assert refused == 6


def test_early_checks_never_refuse_what_the_skeleton_accepts(olmoe_folder):
    """The config's counts are the skeleton's: every layer and expert the weightless model has passes the early
    checks, and the first index past each is refused by both."""
    from common.config import ModelSpec
    from common.errors import InputError
    from common.model.config_facts import read_config_facts

    spec = ModelSpec(model=str(olmoe_folder))
    facts = read_config_facts(spec)
    skeleton = load.inspect_moe(spec)
    assert (facts.num_decoder_layers, facts.context_length) == (skeleton.num_decoder_layers, skeleton.context_length)
    for index in range(-skeleton.num_decoder_layers, skeleton.num_decoder_layers):
        assert facts.resolve_layer(index) == skeleton.resolve_layer(index)
    for layer in skeleton.layers:
        facts.check_expert("--expert_id", layer.num_experts - 1, layer.layer)
        with pytest.raises(InputError, match=f"--expert_id {layer.num_experts} out of range"):
            facts.check_expert("--expert_id", layer.num_experts, layer.layer)
    for missing in (skeleton.num_decoder_layers, -skeleton.num_decoder_layers - 1):
        with pytest.raises(InputError) as early:
            facts.resolve_layer(missing)
        with pytest.raises(InputError) as late:
            skeleton.resolve_layer(missing)
        assert str(early.value) == str(late.value)


# Architectures whose configs spell the counts differently (num_experts, num_local_experts, n_routed_experts, a
# text_config, dense first layers): the files read as files say what AutoConfig says.
FILE_FACT_TYPES = ["olmoe", "mixtral", "deepseek_v3", "qwen3_moe", "gpt_oss", "llama4"]


@pytest.mark.parametrize("model_type", FILE_FACT_TYPES)
def test_file_facts_equal_auto_config_facts(model_type, saved_tiny_model):
    from common.config import ModelSpec
    from common.model.config_facts import _auto_facts, read_config_facts

    folder = saved_tiny_model(model_type)
    spec = ModelSpec(model=str(folder))
    from_files, from_auto = read_config_facts(spec), _auto_facts(spec, folder)
    assert not hasattr(from_files.config, "to_dict")  # the JSON path, not AutoConfig
    counts = [(f.num_decoder_layers, f.context_length, f.num_experts) for f in (from_files, from_auto)]
    assert counts[0] == counts[1] and counts[0][0] is not None and counts[0][1] is not None


TEXTS = ["hello world", " leading space", "ünïcödé → ∑", "<|bos|> inside", "a", ""]


@pytest.mark.parametrize("variant", ["byte tokenizer", "with BOS", "demo"])
def test_file_tokenizer_gives_transformers_ids(variant, bos_tokenizer, tmp_path):
    """Where `FileTokenizer` stands in for transformers' tokenizer it gives the same ids, with and without the
    special tokens, and decodes alike; a tokenizer_config.json asking transformers to rebuild the post-processor
    (add_bos_token) is left to transformers."""
    import json

    from transformers import AutoTokenizer

    from common.config import SHIPPED_MODELS
    from common.data.framing import special_frame
    from common.model.file_tokenizer import FileTokenizer
    from common.model.tiny import tiny_tokenizer

    if variant == "demo":
        folder = SHIPPED_MODELS["demo"]  # shipped with the repository: its absence is a failure, not a skip
    else:
        folder = tmp_path
        (bos_tokenizer if variant == "with BOS" else tiny_tokenizer()).save_pretrained(folder)
    light, full = FileTokenizer.load(folder), AutoTokenizer.from_pretrained(folder)
    assert light is not None
    for text in TEXTS:
        for specials in (True, False):
            assert light(text, add_special_tokens=specials)["input_ids"] == full(text, add_special_tokens=specials)["input_ids"]
    assert special_frame(light) == special_frame(full) and (len(special_frame(full)[0]) == 1) == (variant != "byte tokenizer")
    ids = full("hello ü")["input_ids"]
    assert light.decode(ids) == full.decode(ids)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    rebuilt = tmp_path / "rebuilt"
    rebuilt.mkdir(exist_ok=True)
    (rebuilt / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    (rebuilt / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    assert FileTokenizer.load(rebuilt) is None


def test_dense_architectures_are_those_whose_modelling_code_has_no_expert(saved_dense_model, olmoe_folder):
    """`dense_class` names Llama (its modelling code never says "expert": no Llama has an MoE layer) and not OLMoE;
    the dense demo model (OLMo-shaped) is refused early the same way, and a model_type transformers does not know is
    left to the skeleton."""
    import json

    from common.model.config_facts import dense_class

    assert dense_class(json.loads((saved_dense_model / "config.json").read_text())) == "LlamaForCausalLM"
    assert dense_class(json.loads((olmoe_folder / "config.json").read_text())) is None
    assert dense_class({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}) is None
    assert dense_class({"model_type": "olmo2"}) == "olmo2"
    assert dense_class({"model_type": "no_such_type"}) is None
    assert dense_class({"model_type": "llama", "auto_map": {"AutoModel": "x.Y"}}) is None
