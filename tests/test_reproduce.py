"""Every command in Reproduce.md parses with its script's own parser (no model is loaded), so the page cannot rot."""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from tools import sweep

ROOT = Path(__file__).resolve().parent.parent


def commands() -> list[list[str]]:
    text = (ROOT / "Reproduce.md").read_text()
    text = re.sub(r"\\\n\s*", " ", text)  # continuation lines of code blocks
    found = re.findall(r"uv run ([\w/]+\.py(?: [^`\n|]*)?)", text)
    return [shlex.split(command) for command in found]


def test_the_page_has_commands_for_every_study():
    scripts = {argv[0] for argv in commands()}
    assert {"router_decisive.py", "router_stats.py", "router_metrics.py", "sim.py", "dim_reduc.py", "profiles.py",
            "interv.py", "weights.py", "probing.py", "cluster.py", "label.py", "logit_lens.py",
            "tools/sweep.py"} <= scripts


@pytest.mark.parametrize("argv", commands(), ids=lambda argv: " ".join(argv)[:80])
def test_every_command_parses(argv, tmp_path, monkeypatch):
    script, *args = argv
    if "--wandb" in args:  # an optional package the suite does not install: the flag is what is checked here
        find_spec = importlib.util.find_spec
        monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object() if name == "wandb" else find_spec(name, *a))
    if script == "tools/sweep.py":
        split = args.index("--") if "--" in args else len(args)
        assert sweep.main([*args[:split], "--dry-run", "--out", str(tmp_path), *args[split:]]) == 0
        return
    module = importlib.import_module(Path(script).stem)
    parsed = module.build_parser().parse_args(args)
    assert parsed is not None
