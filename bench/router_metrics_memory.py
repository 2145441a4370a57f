"""Peak memory of router_metrics.py does not grow with --num_tokens (streamed counts, bounded token tables).

    uv run bench/router_metrics_memory.py                       # demo model: 20k vs 200k tokens per domain
    uv run bench/router_metrics_memory.py --model random:olmoe --small 2000 --large 20000

Runs router_metrics.py twice in fresh processes and reads each child's peak resident memory from the kernel
(`os.wait4`), then prints both, the ratio, the goal line (≤ 1.10) and the tokens each run counted (its run.json).
Exit status 1 if the ratio exceeds the goal or the large run counted under half the requested growth in tokens
(`bench/memory_runs.py`; the demo corpus' French domain runs out at ~15k tokens). Not a test: it takes minutes on a
CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a file: make `common` importable

from bench.memory_runs import memory_flat  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--small", type=int, default=20_000)
    parser.add_argument("--large", type=int, default=200_000)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more router_metrics.py flags")
    args = parser.parse_args(argv)

    def flags(tokens: int, out: str) -> list[str]:
        return ["--model", args.model, "--num_tokens", str(tokens), "--out", out, "--no-progress", *args.extra]

    return memory_flat("router_metrics.py", flags, args.small, args.large)


if __name__ == "__main__":
    sys.exit(main())
