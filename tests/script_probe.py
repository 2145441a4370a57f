"""Run a script as `python SCRIPT ARGS` would, in a fresh interpreter, and report which heavy modules it imported:
`--help` and flag errors must answer before torch, transformers, scikit-learn or umap are loaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "sklearn", "umap")
_PROBE = """
import runpy, sys
script, *args = sys.argv[1:]
sys.argv = [script, *args]
code = 0
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as exit_:
    code = exit_.code or 0
print("MODULES:" + ",".join(sorted(sys.modules)))
sys.exit(code)
"""


def run_script_modules(script: str, *args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, set[str]]:
    """(the finished process, its stdout without the probe's line; every module it had imported when it ended)."""
    result = subprocess.run([sys.executable, "-c", _PROBE, script, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout)
    *lines, last = result.stdout.rstrip("\n").split("\n")
    assert last.startswith("MODULES:"), result.stdout[-500:] + result.stderr[-500:]
    result.stdout = "\n".join(lines)
    return result, set(last.removeprefix("MODULES:").split(","))


def run_script(script: str, *args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, list[str]]:
    """(the finished process, its stdout without the probe's line; the heavy modules it imported)."""
    result, modules = run_script_modules(script, *args, timeout=timeout)
    return result, [m for m in HEAVY if m in modules]
