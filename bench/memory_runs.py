"""The memory benches' shared check (not a bench itself): a script's peak resident memory at two --num_tokens, and the
tokens each run really counted (its run.json → tokens → domains → counted), so that a large run whose data ran out
cannot pass for one that read more tokens (its memory would be flat because it read the same).

Used by interv_memory.py, lens_memory.py and router_metrics_memory.py; `memory_flat` returns their exit status.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file: make `common` importable

from common.measure import peak_rss_ratio

GOAL = 1.10  # peak RSS at --large over that at --small
# The large run must count at least this share of the requested growth in tokens (--large / --small): a domain may run
# out of data (the demo corpus' French has ~15k tokens), but a run that read about as much as the small one would
# show flat memory whatever the script keeps per token.
GROWTH_SHARE = 0.5


def counted_tokens(folder: Path) -> dict[str, int]:
    """Counted tokens per domain of the one run written under `folder`, from its run.json."""
    records = sorted(folder.rglob("run.json"))
    if len(records) != 1:
        raise SystemExit(f"{folder}: {len(records)} run.json files, expected one run")
    info = json.loads(records[0].read_text(encoding="utf-8"))
    return {name: int(domain["counted"]) for name, domain in info["tokens"]["domains"].items()}


def token_growth_failure(counted: dict[int, dict[str, int]], small: int, large: int) -> str | None:
    """Prints what each run counted; returns why the two runs do not compare --small with --large tokens (or None)."""
    totals = {tokens: sum(per_domain.values()) for tokens, per_domain in counted.items()}
    for tokens, per_domain in counted.items():
        short = [f"{name} ({n:,} of {tokens:,})" for name, n in per_domain.items() if n < tokens]
        print(f"--num_tokens {tokens:>8}: counted {totals[tokens]:,} tokens in {len(per_domain)} domains (run.json)"
              + (f"; ran out of data: {', '.join(short)}" if short else ""))
    requested = large / small
    growth = totals[large] / totals[small] if totals[small] else 0.0
    needed = GROWTH_SHARE * requested
    print(f"tokens counted large/small: {growth:.2f}x of {requested:.2f}x requested (≥ {needed:.2f}x required: "
          f"{'PASS' if growth >= needed else 'FAIL'})")
    if growth < needed:
        return f"tokens: the large run counted {growth:.2f}x the small run's tokens, < {needed:.2f}x"
    return None


def memory_flat(script: str, argv_for: Callable[[int, str], Sequence[str]], small: int, large: int,
                goal: float = GOAL) -> int:
    """Runs `script` at --num_tokens small and large (`argv_for(tokens, out)` gives the flags, each run its own
    folder), prints peak RSS, the ratio and the tokens counted; 1 if the ratio exceeds `goal` or the tokens did not
    grow (the failure is named), else 0."""
    with tempfile.TemporaryDirectory() as scratch:
        folders = {tokens: Path(scratch) / f"num_tokens-{tokens}" for tokens in (small, large)}
        ratio = peak_rss_ratio(script, lambda tokens, _out: argv_for(tokens, str(folders[tokens])), small, large,
                               goal=goal)
        counted = {tokens: counted_tokens(folder) for tokens, folder in folders.items()}
    failures = [] if ratio <= goal else [f"peak RSS: large/small {ratio:.3f} > {goal:.2f}"]
    growth = token_growth_failure(counted, small, large)
    failures += [growth] if growth else []
    for failure in failures:
        print(f"FAIL {failure}")
    return 1 if failures else 0
