"""Peak memory of logit_lens.py's data analyses does not grow with --num_tokens (streamed NLL and cosine statistics).

    uv run bench/lens_memory.py                                  # demo model, code + prose: 5k vs 50k tokens per domain
    uv run bench/lens_memory.py --model random:deepseek_v3 --small 2000 --large 20000

Runs `logit_lens.py` (no --prompt: top-k restriction perplexity and hidden-state cosines) twice in fresh processes,
reads each child's peak resident memory from the kernel (`os.wait4`), then prints both, the ratio and the goal
line (≤ 1.10). Not a test: it takes minutes on a CPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a file: make `common` importable

from common.measure import peak_rss_mib  # noqa: E402

GOAL = 1.10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--small", type=int, default=5_000, help="--num_tokens of the first run")
    parser.add_argument("--large", type=int, default=50_000, help="--num_tokens of the second run")
    parser.add_argument("--domains", nargs="+", default=["code", "prose"], help="demo domains read (large ones)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more logit_lens.py flags")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as out:
        for tokens in (args.small, args.large):
            argv = ["--model", args.model, "--domains", *args.domains, "--num_tokens", str(tokens), "--out", out,
                    "--no-progress", *args.extra]
            results[tokens] = peak_rss_mib("logit_lens.py", argv)
            print(f"--num_tokens {tokens:>8}: peak RSS {results[tokens][0]:8.1f} MiB, {results[tokens][1]:6.1f} s", flush=True)
    ratio = results[args.large][0] / results[args.small][0]
    print(f"ratio large/small: {ratio:.3f}  (goal ≤ {GOAL:.2f}: {'PASS' if ratio <= GOAL else 'FAIL'})")


if __name__ == "__main__":
    main()
