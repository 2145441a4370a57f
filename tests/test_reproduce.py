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


def test_wandb_is_an_optional_dependency_group_that_the_flag_error_names(monkeypatch):
    """`--wandb` needs a package the default environment leaves out: a declared, locked dependency group, and the
    refusal (and the Reproduce.md row) give the exact command that installs it."""
    import tomllib

    import router_metrics
    from common.errors import InputError

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert any(spec.startswith("wandb") for spec in project["dependency-groups"]["wandb"])
    assert "wandb" not in project["tool"]["uv"]["default-groups"]  # not part of the default `uv sync`
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    assert "wandb" in {package["name"] for package in lock["package"]}  # `uv lock` was run: the group resolves
    find_spec = importlib.util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(InputError, match=r"the wandb package is not installed.*uv sync --group wandb"):
        router_metrics.build_parser().parse_args(["--wandb", "moe-routing-study"])
    row = next(line for line in (ROOT / "Reproduce.md").read_text().splitlines() if "--wandb" in line)
    assert "uv sync --group wandb" in row


def _rows_with(flag: str) -> list[str]:
    """The table rows (or lines) of Reproduce.md whose command uses `flag`."""
    return [line for line in (ROOT / "Reproduce.md").read_text().splitlines()
            if re.search(rf"uv run [^`]*{re.escape(flag)}\b", line)]


def test_router_saturation_compares_every_checkpoint_with_the_final_model():
    """As the OLMoE study did: router_metrics compares each --revisions item with the last one, so the final model
    (the hub's main branch of allenai/OLMoE-1B-7B-0924, the demo series' step2000) must come last, after the
    intermediate checkpoints."""
    (row,) = _rows_with("--revisions")  # the table's row; the compare.py section has more, in code blocks
    assert "final" in row and "main" in row
    runs = [argv for argv in commands() if "--revisions" in argv]
    assert len(runs) >= 3, runs  # the table's, the hub series' and the demo's
    for argv in runs:
        revisions = argv[argv.index("--revisions") + 1:]
        revisions = revisions[:next((i for i, r in enumerate(revisions) if r.startswith("-")), len(revisions))]
        steps = [int(m.group(1)) for r in revisions if (m := re.match(r"step(\d+)", r))]
        assert len(revisions) >= 2 and steps == sorted(steps), revisions  # in training order
        # the final model last: the hub's main, or the series' last step (the demo's checkpoints end at step2000)
        assert revisions[-1] == "main" or revisions[-1] == f"step{max(steps)}", revisions


def test_commands_with_token_positions_say_they_depend_on_the_tokenizer():
    rows = _rows_with("--target_idx") + _rows_with("--position")
    assert rows  # the interv steering row at least
    for row in rows:
        assert "tokenizer" in row and "prompt_tokens.csv" in row, row


def test_the_label_command_reaches_a_local_server_without_an_api_key(monkeypatch):
    """The page's label command points at a server on this machine: it must run with no key in the environment."""
    import urllib.parse

    import label

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    argv = next(argv for argv in commands() if argv[0] == "label.py")
    args = label.build_parser().parse_args(argv[1:])
    assert "--api-key-env" not in argv and label.is_loopback(urllib.parse.urlparse(args.api_base))
