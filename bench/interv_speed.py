"""How much faster is interv.py's dataset mode (expert ablation importance) than one whole forward per expert?

    uv run bench/interv_speed.py                     # the demo (layer 2 of 4) and an OLMoE-shaped model (layer 7 of 16)
    uv run bench/interv_speed.py --tokens 512 --repeats 3

The plain way runs, for every batch, the unedited forward and then one whole forward per ablated expert (E + 1
forwards). The fast way (`accumulate_importance`'s defaults) records the residual entering the ablated layer in the
unedited forward, then carries the ablation variants side by side in one forward that starts at that layer
(the layers below it are the same in every variant). Both run here on the same batches, in alternation, under
`torch.inference_mode()`; the clock is the process's CPU time on CPU (other processes barely move it), the
synchronised wall clock on a GPU. A third mode starts at the layer but runs one variant per forward, to tell the
two savings apart. The ΔNLL must agree with the plain way's to 1e-6 of the mean NLL per token (exit 1 otherwise):
resumed alone is bit-identical, batching changes the matrix shapes and so float32 rounding.

Measured on the project's 2-core CPU box (1 thread, median of 3, 512 counted tokens): the demo (layer 2 of 4, 16
experts) 1.22x faster resumed, 1.38x resumed+batched; the OLMoE-shaped model (layer 7 of 16, 64 experts) 1.65x
resumed (the ideal for skipping 7 of 16 layers is 16/9 = 1.78x) but only 1.25x resumed+batched: 64 variants side
by side are slower than one at a time on a CPU, so interv.py batches only on a GPU (no GPU was available to measure
that). ΔNLL: resumed bit-identical (0.0); batched within 7.1e-8 nats/token.

The OLMoE-shaped model has OLMoE-1B-7B's depth (16 layers), 64 experts, top-8 and softmax routing, with widths scaled
down to run on a small CPU (hidden 256, experts 128 wide, vocab 4096): the fraction of the work below layer 7 is
OLMoE's; what batching gains depends on the widths and the device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, OlmoeConfig  # noqa: E402

from common.analysis.importance import ImportanceAccumulator, ablations_per_forward, accumulate_importance  # noqa: E402
from common.config import ModelSpec  # noqa: E402
from common.data import resolve_domains, token_batches  # noqa: E402
from common.model import MoEModel, load_moe  # noqa: E402
from common.model.load import load_tokenizer  # noqa: E402

OLMOE_SHAPED = {"vocab_size": 4096, "hidden_size": 256, "intermediate_size": 128, "num_hidden_layers": 16,
                "num_attention_heads": 8, "num_key_value_heads": 8, "num_experts": 64, "num_experts_per_tok": 8,
                "norm_topk_prob": False, "max_position_embeddings": 4096,
                "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}  # the demo tokenizer's specials
AGREEMENT = 1e-6  # relative to the mean NLL: batched variants change matmul shapes, hence float32 rounding


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=256, help="counted tokens per domain (2 demo domains)")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="timed passes of each way (the median is reported)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = stable on a shared machine)")
    p.add_argument("--models", nargs="+", default=["demo", "olmoe-shaped"], choices=["demo", "olmoe-shaped"])
    return p


def build(name: str) -> tuple[MoEModel, int]:
    """(model, decoder layer ablated)."""
    if name == "demo":
        moe = load_moe(ModelSpec(model="demo", dtype="float32"))
        return moe, 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(OlmoeConfig(**OLMOE_SHAPED), dtype=torch.float32).eval()
    # the demo's tokenizer (vocabulary 4096) so that both models read the same batches
    return MoEModel(model, load_tokenizer(ModelSpec(model="demo")), name="OLMoE-shaped"), 7


MODES = {  # name -> (variants side by side: all that fit, or 1; start at the ablated layer)
    "plain": (False, False),
    "resumed": (False, True),
    "resumed+batched": (True, True),
}


def one_pass(moe: MoEModel, layer_index: int, args: argparse.Namespace, mode: str) -> tuple[float, np.ndarray, float, int]:
    """(seconds, ΔNLL per counted prediction [E, D], mean base NLL, forwards per batch) of one importance pass."""
    batched, resume = MODES[mode]
    layer = moe.layer(layer_index)
    domains = resolve_domains(["demo:code", "demo:prose"])
    experts = list(range(layer.num_experts))
    acc = ImportanceAccumulator(layer, experts, [d.name for d in domains], moe.device)
    batches = list(token_batches(domains, moe.tokenizer, num_tokens=args.tokens, seq_len=args.seq_len,
                                 batch_size=args.batch_size, progress=False))
    variants = ablations_per_forward(args.batch_size, args.seq_len, moe.vocab_size, len(experts)) if batched else 1
    start = time.process_time()
    accumulate_importance(moe, acc, iter(batches), False, variants=variants, resume=resume)
    seconds = time.process_time() - start
    arrays = acc.arrays()
    tokens = np.maximum(arrays["tokens"], 1)
    return seconds, arrays["delta"] / tokens, float(arrays["nll_base"].sum() / tokens.sum()), 1 + -(-len(experts) // variants)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    failed = False
    for name in args.models:
        moe, layer_index = build(name)
        layer = moe.layer(layer_index)
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        delta: dict[str, np.ndarray] = {}
        forwards: dict[str, int] = {}
        nll = 0.0
        for _ in range(args.repeats):
            for mode in MODES:  # alternated, so that drift on a shared machine hits every mode alike
                seconds, delta[mode], nll, forwards[mode] = one_pass(moe, layer_index, args, mode)
                times[mode].append(seconds)
        plain = statistics.median(times["plain"])
        print(f"{name}: layer {layer_index} of {moe.num_decoder_layers}, {layer.num_experts} experts, mean NLL "
              f"{nll:.3f} nats; plain {plain:.2f} s ({forwards['plain']} whole forwards per batch)")
        for mode in ("resumed", "resumed+batched"):
            seconds = statistics.median(times[mode])
            gap = float(np.abs(delta[mode] - delta["plain"]).max())
            allowed = AGREEMENT * nll  # float32 rounding of logits of this size
            ok = gap <= allowed
            failed |= not ok
            print(f"  {mode}: {seconds:.2f} s ({forwards[mode]} forwards per batch): {plain / seconds:.2f}x faster; "
                  f"largest ΔNLL difference {gap:.1e} nats/token (≤ {allowed:.1e} = {AGREEMENT:g} × mean NLL) -> "
                  f"{'OK' if ok else 'MISMATCH'}")
    print(f"(process CPU time, {args.threads} thread(s), median of {args.repeats}, {args.tokens} counted tokens per "
          f"domain × 2 demo domains)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
