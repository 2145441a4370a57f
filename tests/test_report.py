"""report.py: one self-contained page per run folder and an index, rendered in headless Chromium: every figure
loads and every table has rows. Skipped where Debian's chromium is absent (CI installs it and must not skip)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import report
import router_decisive
import router_metrics

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
         "--disable-background-networking", "--disable-component-update", "--virtual-time-budget=10000"]


def _render(page: Path, profile: Path) -> dict[str, int]:
    """The page's DOM after load in headless Chromium: the counters its own script sets on <body>."""
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    return {k: int(v) for k, v in re.findall(r'data-([a-z-]+)="(\d+)"', body)}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "results"
    data = out.parent / "a.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 100)
    common = ["--model", "random:olmoe", "--data", f"a={data}", "--num_tokens", "300", "--seq_len", "32",
              "--out", str(out), "--no-progress"]
    assert router_decisive.main(common) == 0
    assert router_metrics.main([*common, "--layers", "0", "1"]) == 0
    assert report.main([str(out), "--rows", "50"]) == 0
    return out


def test_pages_are_self_contained_and_list_every_file(results):
    pages = sorted(results.rglob("report.html"))
    assert len(pages) == 2 and (results / "index.html").is_file()
    for page in pages:
        text = page.read_text()
        assert "http://" not in text and "https://" not in text  # no network: figures are embedded
        run = page.parent
        for png in (run / "figures").glob("*.png"):
            assert f"alt='{png.stem}'" in text
        for csv in run.glob("*.csv"):
            assert f"<h3>{csv.name}</h3>" in text
    index = (results / "index.html").read_text()
    assert index.count("/report.html'") == 2 and "router_metrics" in index and "random:olmoe" in index


def test_bad_input(tmp_path, capsys):
    assert report.main([str(tmp_path / "missing")]) == 2
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no such folder" in err[0] and "no run folder" in err[1]


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("MOESCOPE_REQUIRE_CHROMIUM"),
                    reason="Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
def test_every_figure_loads_and_every_table_has_rows_in_chromium(results, tmp_path):
    assert CHROMIUM is not None, ".ci/run installed chromium, but it is not on PATH"
    for page in [*sorted(results.rglob("report.html")), results / "index.html"]:
        counters = _render(page, tmp_path / "profile")
        assert counters["tables"] >= 1 and counters["tables-with-rows"] == counters["tables"], (page, counters)
        assert counters["images-loaded"] == counters["images"], (page, counters)
        if page.name == "report.html":
            assert counters["images"] >= 2, (page, counters)
