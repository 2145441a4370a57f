"""The README's "Use from Python" block runs as written, and the names it uses are the packages' public surface."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.analysis import expert_frequency

ROOT = Path(__file__).resolve().parent.parent


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use from Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def snippet_output() -> str:
    result = subprocess.run([sys.executable, "-c", readme_snippet()], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _value(output: str, prefix: str) -> str:
    line = next(line for line in output.splitlines() if line.startswith(prefix))
    return line[len(prefix):].strip()


def test_readme_snippet_runs_and_prints_sensible_numbers(snippet_output):
    assert _value(snippet_output, "router logits").startswith("(") and "chosen experts (" in snippet_output
    tokens, experts = map(int, re.search(r"router logits \((\d+), (\d+)\)", snippet_output).groups())
    assert experts == 16 and tokens > 10
    frequencies = ast.literal_eval(_value(snippet_output, "selection frequency"))
    assert len(frequencies) == 16 and abs(sum(frequencies) - 2) < 0.01  # top-2: every token picks two experts
    entropy = float(_value(snippet_output, "mean router entropy (nats)"))
    assert 0 < entropy <= torch.log(torch.tensor(16.0)).item()
    assert 0 <= float(_value(snippet_output, "linear CKA of experts 0 and 1")) <= 1
    for edit in ("ablate the most used expert", "top-1 only"):
        assert float(_value(snippet_output, f"{edit}: largest change of a last-token logit")) > 0


def test_snippet_uses_only_public_names():
    tree = ast.parse(readme_snippet())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module.startswith("common"):
            public = importlib.import_module(node.module).__all__
            for alias in node.names:
                assert alias.name in public, f"{node.module}.{alias.name} is not in its package's __all__"


def test_a_broken_snippet_fails(tmp_path):
    broken = readme_snippet().replace("expert_frequency,", "expert_frequencies,", 1)  # a renamed public name
    assert broken != readme_snippet()
    result = subprocess.run([sys.executable, "-c", broken], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "ImportError" in result.stderr


def test_expert_frequency_equals_a_counting_loop():
    generator = torch.Generator().manual_seed(0)
    index = torch.randint(0, 6, (50, 2), generator=generator)
    weight = torch.rand(50, 2, generator=generator)
    weight[3, 1] = 0.0  # an ablated pick does not count
    expected = [0.0] * 6
    for t in range(50):
        for slot in range(2):
            if weight[t, slot] != 0:
                expected[int(index[t, slot])] += 1 / 50
    assert torch.allclose(expert_frequency(index, 6, weight), torch.tensor(expected, dtype=torch.float64))
    assert abs(expert_frequency(index, 6).sum().item() - 2.0) < 1e-12
