"""Peak memory of logit_lens.py --data's NLL with the output head applied in chunks (`--logits_mb`) vs whole logits.

    uv run bench/lens_head_memory.py                         # vocabulary 151,936 (Qwen's), 8 rows × 512 tokens
    uv run bench/lens_head_memory.py --vocab 50304 --seq_len 2048

A narrow OLMoE-layout model (hidden 64, 2 layers, 8 experts) with a large vocabulary, so that the logits dominate
memory: whole, one batch's logits are rows × seq_len × vocabulary floats (2.5 GB here). Each way runs `TopkSweep`
(k′ = 1 and the full run) over the same batches in a fresh process; the kernel's peak resident memory of each
(`os.wait4`) and the mean NLLs are compared. Exit status 1 if the chunked NLLs differ from the whole ones beyond
1e-6 (relative) or the chunked way does not use less memory. Not a test: it allocates gigabytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def child(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, OlmoeConfig

    from common.analysis.lens import TopkSweep
    from common.config import ModelSpec
    from common.data import resolve_domains, token_batches
    from common.model import MoEModel
    from common.model.load import load_tokenizer

    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = OlmoeConfig(vocab_size=args.vocab, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
                         max_position_embeddings=max(4096, args.seq_len))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    moe = MoEModel(model, load_tokenizer(ModelSpec(model="demo")), name="wide-vocabulary")
    domains = resolve_domains(["demo:prose"])
    batches = token_batches(domains, moe.tokenizer, num_tokens=args.rows * (args.seq_len - 1), seq_len=args.seq_len,
                            batch_size=args.rows, progress=False)
    sweep = TopkSweep(moe, moe.layers, ["prose"], ks=[1], logits_mb=None if args.mode == "whole" else args.logits_mb)
    with torch.inference_mode():
        for batch in batches:
            sweep.update(batch)
    nll, counts = sweep.nll_arrays()
    Path(args.result).write_text(json.dumps({"nll": np.asarray(nll).tolist(), "tokens": int(np.asarray(counts).max()),
                                             "chunk_rows": sweep.chunk_rows}))


def run_child(mode: str, args: argparse.Namespace, result: Path) -> tuple[float, dict]:
    argv = [sys.executable, __file__, "--child", mode, "--result", str(result), "--vocab", str(args.vocab),
            "--seq_len", str(args.seq_len), "--rows", str(args.rows), "--logits_mb", str(args.logits_mb)]
    process = subprocess.Popen(argv, cwd=ROOT)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"the {mode} run failed")
    return usage.ru_maxrss / 2**20, json.loads(result.read_text())  # KiB -> GiB


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--rows", type=int, default=8, help="rows per batch (one batch)")
    p.add_argument("--logits_mb", type=float, default=256.0)
    p.add_argument("--child", choices=("whole", "chunked"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.mode = args.child
        child(args)
        return 0
    import numpy as np

    with tempfile.TemporaryDirectory() as scratch:
        peaks = {mode: run_child(mode, args, Path(scratch) / f"{mode}.json") for mode in ("whole", "chunked")}
    (whole_gib, whole), (chunked_gib, chunked) = peaks["whole"], peaks["chunked"]
    logits_gib = args.rows * args.seq_len * args.vocab * 4 / 2**30
    close = np.allclose(chunked["nll"], whole["nll"], rtol=1e-6, atol=0)
    print(f"vocabulary {args.vocab}, {args.rows} rows × {args.seq_len} tokens ({chunked['tokens']} counted; whole "
          f"logits {logits_gib:.2f} GiB): peak RSS whole {whole_gib:.2f} GiB, chunked ({chunked['chunk_rows']} "
          f"positions per chunk, --logits_mb {args.logits_mb:g}) {chunked_gib:.2f} GiB: {whole_gib / chunked_gib:.2f}x "
          f"less; NLL {'equal (1e-6)' if close else 'DIFFERENT'}: whole {whole['nll']}, chunked {chunked['nll']}")
    return 0 if close and chunked_gib < whole_gib else 1


if __name__ == "__main__":
    sys.exit(main())
