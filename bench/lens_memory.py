"""Peak memory of logit_lens.py's data analyses does not grow with --num_tokens (streamed NLL and cosine statistics).

    uv run bench/lens_memory.py                                  # demo model, code + prose: 5k vs 50k tokens per domain
    uv run bench/lens_memory.py --model random:deepseek_v3 --small 2000 --large 20000

Runs `logit_lens.py` (no --prompt: top-k restriction perplexity and hidden-state cosines) twice in fresh processes,
reads each child's peak resident memory from the kernel (`os.wait4`), then prints both, the ratio and the goal
line (≤ 1.10), and the tokens each run counted (its run.json). Exit status 1 if the ratio exceeds the goal or the
large run counted under half the requested growth in tokens (`bench/memory_runs.py`). Not a test: it takes minutes
on a CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a file: make `common` importable

from bench.memory_runs import memory_flat  # noqa: E402

GOAL = 1.10


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--small", type=int, default=5_000, help="--num_tokens of the first run")
    parser.add_argument("--large", type=int, default=50_000, help="--num_tokens of the second run")
    parser.add_argument("--domains", nargs="+", default=["code", "prose"], help="demo domains read (large ones)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more logit_lens.py flags")
    args = parser.parse_args(argv)

    def flags(tokens: int, out: str) -> list[str]:
        return ["--model", args.model, "--domains", *args.domains, "--num_tokens", str(tokens), "--out", out,
                "--no-progress", *args.extra]

    return memory_flat("logit_lens.py", flags, args.small, args.large, goal=GOAL)


if __name__ == "__main__":
    sys.exit(main())
