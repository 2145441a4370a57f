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
from tests.script_probe import run_script

# --------------------------------------------------------------------------------------------- data specs, no torch
DATA_SPECS = {  # --data flags -> what the one line must say
    "missing file": (["--data", "{tmp}/missing.jsonl"], "missing.jsonl': no such file or folder"),
    "unknown preset": (["--data", "olmo"], "--data 'olmo': unknown preset (presets: demo, olmoe, pile, moe-lens"),
    "unknown domain": (["--data", "olmoe", "--domains", "wiki"],
                       "--domains: unknown wiki (available: arxiv, github, wikipedia, books, c4)"),
    "too many domains": (["--data", "moe-lens", "--num_domains", "4"],
                         "--num_domains 4: only 3 domains available (english, french-qa, gsm8k)"),
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
