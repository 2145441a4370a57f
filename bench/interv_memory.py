"""Peak memory of interv.py's dataset mode does not grow with --num_tokens (running sums, streamed batches).

    uv run bench/interv_memory.py                                # demo model, layer 1, 2 domains, 2 experts
    uv run bench/interv_memory.py --small 2000 --large 20000 --extra --experts 0 1 2 3

Runs `interv.py --layer L --data ...` (dataset mode: one base forward + one forward per ablated expert per batch)
twice in fresh processes, reads each child's peak resident memory from the kernel (`os.wait4`), then prints both,
the ratio and the goal line (≤ 1.10), and the tokens each run counted (its run.json). Exit status 1 if the ratio
exceeds the goal or the large run counted under half the requested growth in tokens (`bench/memory_runs.py`).
Memory does not depend on how many experts are ablated (each forward's logits are dropped before the next), so the
default ablates two to keep the run short. Not a test: minutes on a CPU.
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
    parser.add_argument("--layer", default="1")
    parser.add_argument("--data", nargs="+", default=["demo"])
    parser.add_argument("--domains", nargs="+", default=["code", "bible"])
    parser.add_argument("--experts", nargs="+", default=["0", "1"])
    parser.add_argument("--small", type=int, default=2_000)
    parser.add_argument("--large", type=int, default=20_000)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more interv.py flags")
    args = parser.parse_args(argv)

    def flags(tokens: int, out: str) -> list[str]:
        return ["--model", args.model, "--layer", args.layer, "--data", *args.data, "--domains", *args.domains,
                "--experts", *args.experts, "--num_tokens", str(tokens), "--out", out, "--no-progress", *args.extra]

    return memory_flat("interv.py", flags, args.small, args.large)


if __name__ == "__main__":
    sys.exit(main())
