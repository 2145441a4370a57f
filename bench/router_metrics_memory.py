"""Peak memory of router_metrics.py does not grow with --num_tokens (streamed counts, bounded token tables).

    uv run bench/router_metrics_memory.py                       # demo model: 20k vs 200k tokens per domain
    uv run bench/router_metrics_memory.py --model random:olmoe --small 2000 --large 20000

Runs router_metrics.py twice in fresh processes and reads each child's peak resident memory from the kernel
(`os.wait4`), then prints both, the ratio, and the goal line (≤ 1.10). Not a test: it takes minutes on a CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a file: make `common` importable

from common.measure import peak_rss_ratio  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--small", type=int, default=20_000)
    parser.add_argument("--large", type=int, default=200_000)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more router_metrics.py flags")
    args = parser.parse_args()

    def argv(tokens: int, out: str) -> list[str]:
        return ["--model", args.model, "--num_tokens", str(tokens), "--out", out, "--no-progress", *args.extra]

    peak_rss_ratio("router_metrics.py", argv, args.small, args.large)


if __name__ == "__main__":
    main()
