"""Tokens per second of a bare forward vs router_metrics' and router_decisive's statistics, on an OLMoE-1B-7B-shaped
random model (full size, bf16) on one GPU; and, everywhere, the aten ops each update dispatches per batch.

    uv run bench/gpu_throughput.py                  # on a GPU: full OLMoE-1B-7B shape, bf16
    uv run bench/gpu_throughput.py --small          # on a CPU: same layer/expert graph, small widths (op counts)

The batch starts at --batch_size windows of --seq_len tokens and halves on an out-of-memory error (common/cli/oom.py);
the largest that fits is reported. Each mode is timed over --repeats batches after a warm-up. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: make `common` importable

from transformers import OlmoeConfig, OlmoeForCausalLM

from common.analysis.routing import DecisivenessStats
from common.analysis.specialization import RoutingCounts
from common.cli.oom import with_oom_backoff
from common.data import Batch
from common.hooks import capture
from common.measure import OpCounter
from common.model import MoEModel

# OLMoE-1B-7B (allenai/OLMoE-1B-7B-0924 config.json): 16 layers, hidden 2048, 64 experts of width 1024, top-8.
FULL = {"vocab_size": 50_304, "hidden_size": 2048, "intermediate_size": 1024, "num_hidden_layers": 16,
        "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 64, "num_experts_per_tok": 8}
SMALL = {**FULL, "hidden_size": 64, "intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 4}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="small widths (CPU); default on a machine without CUDA")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = args.small or device.type == "cpu"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = OlmoeConfig(**(SMALL if small else FULL))
    torch.manual_seed(0)
    with torch.device(device):
        model = OlmoeForCausalLM(config).to(dtype).eval()
    moe = MoEModel(model)
    print(f"{'small' if small else 'full'} OLMoE-1B-7B shape on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
          f"{dtype}, {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters")

    def batch_of(size: int) -> Batch:
        ids = torch.randint(0, config.vocab_size, (size, args.seq_len), device=device)
        return Batch(ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool),
                     torch.zeros(size, dtype=torch.long, device=device), torch.zeros_like(ids))

    def modes(batch: Batch) -> dict:
        counts = RoutingCounts(moe.layers, ["d"], config.vocab_size, device)
        decisive = DecisivenessStats(moe.layers, ["d"], device)

        def bare() -> None:
            moe.forward(batch.input_ids, batch.attention_mask)

        def metrics() -> None:
            with capture(moe, moe.layers, ("logits", "topk")) as records:
                logits = moe.forward(batch.input_ids, batch.attention_mask).logits
                counts.update(records, batch, predicted=logits.argmax(-1))

        def decisiveness() -> None:
            with capture(moe, moe.layers, ("logits", "topk")) as records:
                moe.forward(batch.input_ids, batch.attention_mask)
                decisive.update(records, batch.token_domains(), batch.token_weights())

        return {"bare forward": bare, "router_metrics statistics": metrics, "router_decisive statistics": decisiveness}

    def measure(size: int) -> dict[str, float]:
        batch = batch_of(size)
        times = {}
        for name, step in modes(batch).items():
            step()  # warm-up (and the first-batch setup of some accumulators)
            runs = []
            for _ in range(args.repeats):
                sync(device)
                start = time.perf_counter()
                step()
                sync(device)
                runs.append(time.perf_counter() - start)
            times[name] = statistics.median(runs)
        return times

    size, times = with_oom_backoff(measure, args.batch_size)
    tokens = size * args.seq_len
    print(f"largest batch that fit: {size} × {args.seq_len} = {tokens} tokens")
    for name, seconds in times.items():
        print(f"  {name:28} {tokens / seconds:12,.0f} tokens/s   {seconds / times['bare forward']:.3f}× the bare forward")

    # Aten ops per batch (on a GPU each is about one kernel launch): each update against the forward itself.
    batch = batch_of(2)
    with capture(moe, moe.layers, ("logits", "topk")) as records:
        with OpCounter() as forward_ops:
            logits = moe.forward(batch.input_ids, batch.attention_mask).logits
        counts = RoutingCounts(moe.layers, ["d"], config.vocab_size, device)
        decisive = DecisivenessStats(moe.layers, ["d"], device)
        decisive.update(records, batch.token_domains(), batch.token_weights())
        with OpCounter() as metrics_ops:
            counts.update(records, batch, predicted=logits.argmax(-1))
        with OpCounter() as decisive_ops:
            decisive.update(records, batch.token_domains(), batch.token_weights())
    print(f"aten ops per batch: bare forward {forward_ops.count}, router_metrics update {metrics_ops.count} "
          f"({metrics_ops.count / forward_ops.count:.2f}×), router_decisive update {decisive_ops.count} "
          f"({decisive_ops.count / forward_ops.count:.2f}×)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
