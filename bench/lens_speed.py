"""How much faster are logit_lens.py --data's top-k′ runs when they start at the first restricted layer?

    uv run bench/lens_speed.py                  # OLMoE-shaped model, the second half of its 16 layers restricted
    uv run bench/lens_speed.py --from_layer 0   # every layer restricted: nothing below to share (ratio ≈ 1)

`TopkSweep` runs the full model once per batch and then one run per k′ with only each token's k′ highest-weighted
experts kept in the restricted layers. Resumed (the default), a k′ run starts at the first restricted layer from
the full run's residual; whole, it runs from the embeddings. Both on the same batches, alternated, median of
--repeats, process CPU time. Perplexities must be bit-identical (exit 1 otherwise).

Measured on the project's 2-core CPU box (1 thread, layers 8-15 of 16 restricted, k′ ∈ {1, 2, 4}, 512 counted
tokens): 1.55x faster (the ideal, (4 × 16) / (16 + 3 × 8), is 1.6x), perplexities identical.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from interv_speed import build  # noqa: E402

from common.analysis.lens import TopkSweep  # noqa: E402
from common.data import resolve_domains, token_batches  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from_layer", type=int, default=8, help="restrict the MoE layers from this decoder layer on")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4], help="the k′ of the restricted runs")
    p.add_argument("--tokens", type=int, default=256, help="counted tokens per domain (2 demo domains)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    moe, _ = build("olmoe-shaped")
    layers = [m for m in moe.layers if m.layer >= args.from_layer]
    domains = resolve_domains(["demo:code", "demo:prose"])
    batches = list(token_batches(domains, moe.tokenizer, num_tokens=args.tokens, seq_len=128, batch_size=4,
                                 progress=False))
    times: dict[bool, list[float]] = {False: [], True: []}
    nll: dict[bool, np.ndarray] = {}
    for _ in range(args.repeats):
        for resume in (False, True):
            sweep = TopkSweep(moe, layers, [d.name for d in domains], ks=args.ks, resume=resume)
            start = time.process_time()
            with torch.inference_mode():
                for batch in batches:
                    sweep.update(batch)
            times[resume].append(time.process_time() - start)
            nll[resume] = sweep.nll_arrays()[0]
    whole, resumed = statistics.median(times[False]), statistics.median(times[True])
    same = bool(np.array_equal(nll[True], nll[False]))
    print(f"OLMoE-shaped, layers {args.from_layer}-{moe.num_decoder_layers - 1} restricted, k′ {args.ks}: whole "
          f"{whole:.2f} s, resumed {resumed:.2f} s: {whole / resumed:.2f}x faster; perplexities "
          f"{'identical' if same else 'DIFFER'} (process CPU time, {args.threads} thread(s), median of {args.repeats})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
