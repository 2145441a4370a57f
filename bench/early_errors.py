"""How long does a typo cost? The time from `uv run <script> --model <hub-sized folder> <bad flag>` to its one-line
error, for each kind of bad input that can be refused before a weight is read (goal: at most 3 s each).

    uv run bench/early_errors.py                      # every case once (~1-3 min on a 2-core CPU)
    uv run bench/early_errors.py --repeats 3          # the median of 3 runs per case
    uv run bench/early_errors.py --pycache /tmp/pyc   # with a bytecode cache, where the environment disables it

The checkpoint is width-true: OLMoE-1B-7B-0924's config.json (16 layers, hidden 2048, 64 experts of width 1024,
top-8, vocab 50304, context 4096) and a byte-level BPE tokenizer of 50,279 tokens, saved once into --folder; its
model.safetensors is not a checkpoint at all (a few bytes of text), so a script that tried to read weights fails
with another message, and the case fails. Beside it, a dense model of OLMo-1B's width (16 layers, hidden 2048, FFN
8192) for the "dense model where experts are needed" case. Nothing of either is ever loaded.

Cases: the data specs (a missing file, an unknown preset, an unknown domain, --num_domains above the preset's
count), refused before torch is imported; and what the model's config and tokenizer tell (--layers, --expert_id,
--target_idx against the tokenised prompt, --position, --seq_len against the context, a dense model), refused
from config.json and tokenizer.json read as files (`config_facts._file_facts`, `file_tokenizer.FileTokenizer`),
before torch is imported (`pipeline.check_config`). Each runs as a user runs it, `uv run` included, from a fresh
process; the clock is the wall clock (what a user waits). The floor line times `import torch, transformers` and
OLMoE's modelling code alone: what building the weightless model pays before it starts.

Results on the project's 2-core CPU box (torch 2.15, transformers 5.23), the box shared with a test run (load
average 1.6-2.2):
- now, with a bytecode cache (--pycache): data-spec cases 0.11-0.14 s; config-level cases 0.14 s, the two
  prompt cases (the tokenizer read) 0.26-0.30 s, the dense-model case 0.14 s; floor 6.3-7.5 s. Without the
  cache: 0.16-0.18 s and 0.31-0.33 s (floor 19.6 s).
- before (AutoConfig + AutoTokenizer, which import torch): config-level cases 3.4-4.9 s against a floor of
  7.3-7.4 s (load 2.4-3.4), the dense-model case, on the weightless model, 6.4-7.3 s; before that (on the
  weightless model, modelling code imported first) 5.5-12.7 s.
Without a bytecode cache (this container sets PYTHONDONTWRITEBYTECODE) a case that imports torch also pays for
compiling it and transformers from source (11-18 s, measured before); the cases above import neither.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_S = 3.0
FORMAT = 1  # bump when the saved checkpoints change, so that an old --folder is rebuilt

# allenai/OLMoE-1B-7B-0924's config.json (the OlmoeConfig defaults are the same; spelled out to be explicit).
OLMOE_1B_7B = {"vocab_size": 50_304, "hidden_size": 2048, "intermediate_size": 1024, "num_hidden_layers": 16,
               "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 64, "num_experts_per_tok": 8,
               "max_position_embeddings": 4096, "norm_topk_prob": False}
# allenai/OLMo-1B-0724-hf's widths: a dense model as large as OLMoE's active part.
OLMO_1B = {"vocab_size": 50_304, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 16, "num_key_value_heads": 16, "max_position_embeddings": 4096}
TOKENIZER_SIZE = 50_277  # GPT-NeoX-20B's BPE (OLMoE's tokenizer) before its special tokens
NOT_WEIGHTS = b"moescope bench/early_errors.py: not a checkpoint. A script that reads this file read weights.\n"


@dataclass(frozen=True)
class Case:
    name: str
    script: str
    flags: tuple[str, ...]  # after --model FOLDER; "{dense}" is the dense model's folder, "{tmp}" a scratch folder
    expected: str  # in the one-line error
    torch_free: bool = False  # a data-spec check: answered before torch is imported


PROMPT = "Hello world"
CASES = (
    Case("data: missing file", "router_decisive.py", ("--data", "{tmp}/missing.jsonl"),
         "missing.jsonl': no such file or folder", torch_free=True),
    Case("data: unknown preset", "router_decisive.py", ("--data", "olmo"), "unknown preset", torch_free=True),
    Case("data: unknown domain", "router_metrics.py", ("--data", "olmoe", "--domains", "wiki"),
         "--domains: unknown wiki", torch_free=True),
    Case("data: --num_domains above the preset's", "router_decisive.py", ("--data", "moe-lens", "--num_domains", "4"),
         "--num_domains 4: only 3 domains available", torch_free=True),
    Case("--layers beyond the model", "router_decisive.py", ("--layers", "16"), "layer 16 does not exist"),
    Case("--expert_id beyond the layer", "profiles.py", ("--layer", "1", "--expert_id", "64"),
         "--expert_id 64 out of range: layer 1 has experts 0..63"),
    Case("--target_idx beyond the prompt", "interv.py",
         ("--layer", "1", "--prompt", PROMPT, "--expert_id", "0", "--target_idx", "40"),
         "--target_idx 40 is beyond prompt 0"),
    Case("--position beyond the prompt", "logit_lens.py", ("--prompt", PROMPT, "--position", "40"),
         "--position 40 is beyond the prompt"),
    Case("--seq_len above the context", "router_decisive.py", ("--seq_len", "8192"),
         "--seq_len 8192 exceeds the model's context length 4096"),
    Case("dense model, experts needed", "router_decisive.py", ("--model", "{dense}"), "has no MoE layers"),
)


def _tokenizer():
    """A byte-level BPE as large as OLMoE's (GPT-NeoX-20B's 50,277 tokens + specials): merges built from letters,
    digits and the space marker, so that loading it costs what loading the real one costs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    pieces = list("Ġetaoinshrdlucmfwypvbgkjqxz0123456789_.,ETAOINSHRDLUCMFWYPVBGKJQXZ")
    merges: list[tuple[str, str]] = []
    frontier = list(pieces)
    while len(vocab) < TOKENIZER_SIZE:
        grown = []
        for left in frontier:
            for right in pieces:
                token = left + right
                if token in vocab:
                    continue
                vocab[token] = len(vocab)
                merges.append((left, right))
                grown.append(token)
                if len(vocab) == TOKENIZER_SIZE:
                    break
            if len(vocab) == TOKENIZER_SIZE:
                break
        frontier = grown
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|padding|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|padding|>")


def build_checkpoints(folder: Path) -> tuple[Path, Path]:
    """(OLMoE-1B-7B-shaped folder, OLMo-1B-shaped dense folder), saved once: configs, tokenizer, no weights."""
    moe, dense = folder / "olmoe-1b-7b-shaped", folder / "olmo-1b-shaped-dense"
    marker = folder / f"format-{FORMAT}"
    if marker.is_file():
        return moe, dense
    from transformers import OlmoConfig, OlmoeConfig

    tokenizer = _tokenizer()
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None}
    for path, config in ((moe, OlmoeConfig(**OLMOE_1B_7B, **ids)), (dense, OlmoConfig(**OLMO_1B, **ids))):
        path.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(path)
        tokenizer.save_pretrained(path)
        (path / "model.safetensors").write_bytes(NOT_WEIGHTS)
    marker.touch()
    return moe, dense


@dataclass
class Result:
    case: Case
    seconds: list[float]
    problem: str | None  # why the answer is not the expected one-line error (None: it is)


def problem_of(case: Case, done: subprocess.CompletedProcess, out: Path) -> str | None:
    """Why one run's answer is not the expected one-line error (None: it is): exit code 2, exactly one non-empty line
    on stderr, `<script>: error: ` followed by a message that contains `case.expected`, and no --out folder left."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    if done.returncode != 2:
        return f"exit code {done.returncode}: {(lines or ['(no output)'])[-1][:200]}"
    if len(lines) != 1:
        return f"{len(lines)} lines on stderr, not one: {lines[-1][:200] if lines else ''}"
    if not lines[0].startswith(f"{case.script}: error: ") or case.expected not in lines[0]:
        return f"another error than expected: {lines[0][:200]}"
    if out.exists():
        return f"left {out} behind"
    return None


def run_case(case: Case, moe: Path, dense: Path, scratch: Path, env: dict[str, str], repeats: int) -> Result:
    """Runs the case `repeats` times; its problem is the last one any run had (a run that passes clears none)."""
    flags = [f.format(dense=dense, tmp=scratch) for f in case.flags]
    model = [] if "--model" in flags else ["--model", str(moe)]
    seconds, problem = [], None
    for _ in range(repeats):
        out = Path(tempfile.mkdtemp(dir=scratch)) / "results"  # its own: a folder another run left is not blamed here
        command = ["uv", "run", case.script, *model, *flags, "--out", str(out), "--no-progress"]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        seconds.append(time.perf_counter() - started)
        problem = problem_of(case, done, out) or problem
    return Result(case, seconds, problem)


def floor_seconds(env: dict[str, str]) -> float:
    """What importing torch, transformers and OLMoE's modelling code costs in a fresh `uv run` process."""
    started = time.perf_counter()
    subprocess.run(["uv", "run", "python", "-c", "import torch, transformers.models.olmoe.modeling_olmoe"], cwd=ROOT,
                   env=env, check=True, capture_output=True, timeout=600)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "moescope-bench-early-errors",
                        help="where the checkpoints are saved once and reused")
    parser.add_argument("--repeats", type=int, default=1, help="runs per case; the median is reported")
    parser.add_argument("--limit", type=float, default=LIMIT_S, help="seconds allowed per case")
    parser.add_argument("--pycache", type=Path, default=None,
                        help="keep compiled bytecode in this folder (PYTHONPYCACHEPREFIX), also where the "
                        "environment sets PYTHONDONTWRITEBYTECODE: what a usual installation does")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    if args.pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(args.pycache)
    moe, dense = build_checkpoints(args.folder)
    bytecode = ("off (PYTHONDONTWRITEBYTECODE: every run compiles torch and transformers from source)"
                if env.get("PYTHONDONTWRITEBYTECODE") else f"cached in {env.get('PYTHONPYCACHEPREFIX', 'the packages')}")
    print(f"checkpoint: {moe} (and {dense.name}); bytecode {bytecode}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    floor_seconds(env)  # warm-up: the file cache, and the bytecode cache where it is kept
    floor = floor_seconds(env)
    print(f"floor: `uv run python -c 'import torch, transformers.models.olmoe.modeling_olmoe'` {floor:.2f} s")
    failures = 0
    with tempfile.TemporaryDirectory(prefix="early-errors-") as scratch:
        for case in CASES:
            result = run_case(case, moe, dense, Path(scratch), env, args.repeats)
            median = statistics.median(result.seconds)
            slow = median > args.limit
            verdict = "ok" if result.problem is None and not slow else "FAIL"
            failures += verdict == "FAIL"
            where = "data spec" if case.torch_free else "config+tokenizer"  # what the case checks, not measured here
            note = result.problem or (f"over {args.limit:g} s" if slow else "")
            print(f"{verdict:4} {median:6.2f} s  {case.name:40} ({case.script}, {where}) {note}".rstrip(), flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{len(CASES) - failures} of {len(CASES)} cases answered in one line within {args.limit:g} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
