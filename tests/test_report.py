"""report.py: one self-contained page per run folder and an index, rendered in headless Chromium: every figure
loads and every table has rows. Skipped where Debian's chromium is absent (CI installs it and must not skip)."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

import report
from common.plots import MAX_PNG_WIDTH
from tests.figure_checks import assert_every_table_has_a_figure
from tests.llm_stub import Stub

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
         "--disable-background-networking", "--disable-component-update", "--virtual-time-budget=10000"]


def _render(page: Path, profile: Path) -> dict[str, int]:
    """The page's DOM after load in headless Chromium: the counters its own script sets on <body>."""
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    return {k: int(v) for k, v in re.findall(r'data-([a-z-]+)="(\d+)"', body)}


# Every script on the shipped demo model with its defaults, except a smaller token budget (the default runs take
# 15-60 s each here; their pages were checked the same way by hand) and the flags a script cannot run without.
SCRIPTS: dict[str, list[str]] = {
    "router_decisive": [], "router_stats": [], "router_metrics": [], "profiles": ["--layer", "1", "--expert_id", "9"],
    "sim": [], "dim_reduc": [], "weights": [], "interv": ["--layer", "1"], "logit_lens": [], "probing": [],
    "cluster": [], "label": ["--layer", "1", "--top", "4", "--llm", "stub", "--api-key-env", "none"],
    "prune": ["--fractions", "0", "0.5", "--draws", "2"],
    "contrast": ["--prompts", "4", "--draws", "2", "--max_new_tokens", "8", "--bootstrap", "200"],
    "outliers": ["--draws", "2"],
    "stability": ["--dtypes", "bfloat16"],
}
NUM_TOKENS = 600
# The default run renders the scripts that take seconds here; `-m slow` renders every script (router_stats,
# router_metrics, dim_reduc, weights and interv take 30-80 s each on the 2-core box; their figures are also checked
# by tests/test_figures.py, test_dim_reduc.py, test_weights.py and test_interv.py).
QUICK = ("router_decisive", "profiles", "sim", "logit_lens", "probing", "cluster", "label")


@pytest.fixture(scope="module", params=["quick", pytest.param("every script", marks=pytest.mark.slow)])
def results(request, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "results"
    scripts = QUICK if request.param == "quick" else tuple(SCRIPTS)
    stub = Stub()
    try:
        for script, extra in ((name, SCRIPTS[name]) for name in scripts):
            if script == "label":
                extra = [*extra, "--api-base", stub.url]
            tokens = [] if script == "weights" else ["--num_tokens", str(NUM_TOKENS)]
            assert importlib.import_module(script).main([*extra, *tokens, "--out", str(out), "--no-progress"]) == 0
    finally:
        stub.close()
    assert report.main([str(out), "--rows", "50"]) == 0
    return out


def test_pages_are_self_contained_and_list_every_file(results):
    pages = sorted(results.rglob("report.html"))
    scripts = sorted(page.relative_to(results).parts[0] for page in pages)
    assert set(QUICK) <= set(scripts) <= set(SCRIPTS)
    for page in pages:
        text = page.read_text()
        assert not re.search(r"(src|href)=['\"]?https?:", text)  # no network: figures are embedded
        run = page.parent
        pngs = list((run / "figures").glob("*.png"))
        assert pngs, f"{run}: no figure"
        for png in pngs:
            assert f"alt='{png.stem}'" in text
        for csv in run.glob("*.csv"):
            assert f"<h3>{csv.name}</h3>" in text
    index = (results / "index.html").read_text()
    assert index.count("/report.html'") == len(scripts) and all(script in index for script in scripts)
    assert "demo" in index
    # label ran on layer 1 with NUM_TOKENS tokens per domain of the demo data (6 domains); weights reads no data
    label_row = next(row for row in index.split("<tr>") if "label/demo" in row)
    assert "<td class=t>1</td>" in label_row and f"<td class=n>{6 * NUM_TOKENS:,}</td>" in label_row
    if "weights" in scripts:
        assert "<td class=n>—</td>" in next(row for row in index.split("<tr>") if "weights/demo" in row)


def test_every_script_writes_figures_that_fit_the_page(results):
    """What tests/test_figures.py checks for the routing scripts, for every script's default run: each table has
    its figure (TABLE_FIGURES), each figure a PDF beside its PNG, and none is wider than the page."""
    for folder in sorted(p.parent for p in results.rglob("run.json")):
        pngs = sorted(p.stem for p in (folder / "figures").glob("*.png"))
        assert pngs and sorted(p.stem for p in (folder / "figures").glob("*.pdf")) == pngs, folder
        assert_every_table_has_a_figure(folder, folder.relative_to(results).parts[0])
        for stem in pngs:
            with Image.open(folder / "figures" / f"{stem}.png") as image:
                width, height = image.size
            assert width <= MAX_PNG_WIDTH and height <= 2 * MAX_PNG_WIDTH, (folder, stem, image.size)


def test_bad_input(tmp_path, capsys):
    assert report.main([str(tmp_path / "missing")]) == 2
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no such folder" in err[0] and "no run folder" in err[1]


def test_a_broken_run_is_skipped_with_one_line_and_costs_nothing_else(tmp_path, capsys):
    good, broken = tmp_path / "good", tmp_path / "broken"
    good.mkdir()
    broken.mkdir()
    (good / "run.json").write_text(json.dumps({"script": "router_decisive", "model": "demo"}))
    (good / "numbers.csv").write_text("expert,share\n10,0.123456789\n2,0.5\n")
    (good / "empty.csv").write_text("")
    (broken / "run.json").write_text("{not json")
    assert report.main([str(tmp_path)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("report: skipped ") and "broken/run.json" in err[0]
    assert err[1].endswith("(1 run)")
    page = (good / "report.html").read_text()
    assert "<td class=n>0.123457</td>" in page  # 6 significant digits shown; the CSV keeps them all
    assert "<h3>empty.csv</h3>" in page and "could not be read" in page
    assert not (broken / "report.html").exists() and (tmp_path / "index.html").read_text().count("report.html'") == 1
    assert report.main([str(broken)]) == 2
    assert "not a readable run record" in capsys.readouterr().err


def test_a_sampled_run_shows_its_sample_size_not_the_tokens_read_to_draw_it(tmp_path, capsys):
    """sim.py --num_tokens 10000 over 6 domains reads max(quota) = 1667 tokens of each (6 × 1667 = 10,002) and keeps
    a 10,000-token sample (quotas 1667 ×4, 1666 ×2): the index showed 10,002 for a 10,000-token request."""
    domains = ["code", "prose", "legal", "bible", "french", "math"]
    sampled = tmp_path / "sim" / "demo" / "demo" / "r1"
    streamed = tmp_path / "router_decisive" / "demo" / "demo" / "r2"
    for folder in (sampled, streamed):
        folder.mkdir(parents=True)
    (sampled / "run.json").write_text(json.dumps({
        "script": "sim", "model": "demo", "run_id": "r1",
        "tokens": {"num_tokens_requested": 1667, "domains": {d: {"counted": 1667} for d in domains}},
        "sample": {"num_tokens_requested": 10000, "num_tokens": 10000,
                   "per_domain": {d: 1667 if i < 4 else 1666 for i, d in enumerate(domains)}}}))
    (streamed / "run.json").write_text(json.dumps({
        "script": "router_decisive", "model": "demo", "run_id": "r2",
        "tokens": {"num_tokens_requested": 10000, "domains": {d: {"counted": 10000} for d in domains[:2]}}}))
    assert report.main([str(tmp_path)]) == 0
    capsys.readouterr()
    index = (tmp_path / "index.html").read_text()
    sim_row = next(row for row in index.split("<tr>") if "sim/demo" in row)
    assert "<td class=n>10,000 sampled (10,002 read)</td>" in sim_row, sim_row
    assert "<td class=n>20,000</td>" in next(row for row in index.split("<tr>") if "router_decisive/demo" in row)
    assert "summed over the domains" in index  # the column says what it counts
    page = (sampled / "report.html").read_text()
    assert "token sample" in page and "10,000 of the 10,002 tokens read (code: 1667, " in page and "math: 1666" in page


def test_a_comparison_gets_a_page_listing_the_compared_runs_and_its_own_index_section(tmp_path, monkeypatch, capsys):
    """A compare.py folder (fabricated here: run.json, comparison.csv, one figure) renders like a run, headed by the
    compared script and the compared runs linked to their pages, and the index lists it under Comparisons. One
    compared folder is recorded absolute, the other relative to where compare.py ran (`--out results`)."""
    monkeypatch.chdir(tmp_path)  # report.py runs elsewhere than compare.py did: the relative folder is not found here
    results = tmp_path / "elsewhere" / "results"
    runs = {"demo": results / "router_decisive" / "demo" / "demo" / "r1",
            "random:mixtral": results / "router_decisive" / "random-mixtral" / "demo" / "r2"}
    for model, folder in runs.items():
        folder.mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps({"script": "router_decisive", "model": model, "run_id": folder.name,
                                                     "arguments": {"data": ["demo"]}}))
    comparison = results / "compare" / "demo+random-mixtral" / "router_decisive" / "r3"
    (comparison / "figures").mkdir(parents=True)
    recorded = [str(runs["demo"]), "results/router_decisive/random-mixtral/demo/r2"]
    (comparison / "run.json").write_text(json.dumps({
        "script": "compare", "model": "demo+random:mixtral", "run_id": "r3", "started": "2026-12-05T10:00:00",
        "arguments": {"runs": recorded, "out": "results"}, "compared_script": "router_decisive",
        "runs": [{"folder": folder, "label": model, "model": model, "revision": None, "run_id": Path(folder).name}
                 for folder, model in zip(recorded, runs, strict=True)]}))
    (comparison / "comparison.csv").write_text("label,layer,relative_depth,entropy_normalized_mean\n"
                                               "demo,0,0.0,0.8123456\ndemo,1,1.0,0.75\nrandom:mixtral,0,0.0,0.99\n")
    Image.new("RGB", (40, 30), "white").save(comparison / "figures" / "by_depth_entropy_normalized_mean.png")

    assert report.main([str(results)]) == 0
    assert capsys.readouterr().err.strip().endswith("(3 runs)")
    index = (results / "index.html").read_text()
    runs_table, comparisons = index.split("<h2>Comparisons</h2>")
    assert "2 runs;" in runs_table and "compare/" not in runs_table  # the comparison is not one of the runs
    row = next(row for row in comparisons.split("<tr>") if "r3/report.html" in row)
    assert "href='compare/demo+random-mixtral/router_decisive/r3/report.html'" in row
    assert "<td class=t>router_decisive</td>" in row and "<td class=t>2: demo, random:mixtral</td>" in row
    assert "<td class=t>demo</td>" in row  # the compared runs' data

    page = (comparison / "report.html").read_text()
    assert "<h1>Comparison of router_decisive runs — demo, random:mixtral</h1>" in page
    compared = page.split("<h2>Compared runs</h2>")[1].split("</table>")[0]
    for model in runs:  # each compared run listed by label, model and folder, linked to its page
        assert f"<td class=t>{model}</td>" in compared
    for folder in (runs["demo"], runs["random:mixtral"]):
        link = "../../../../" + folder.relative_to(results).as_posix() + "/report.html"
        assert f"href='{link}'" in compared and (comparison / link).resolve() == (folder / "report.html").resolve()
        assert (folder / "report.html").is_file()
    assert "alt='by_depth_entropy_normalized_mean' src='data:image/png;base64," in page
    assert "<h3>comparison.csv</h3>" in page and "<td class=n>0.812346</td>" in page and "3 rows" in page


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("MOESCOPE_REQUIRE_CHROMIUM"),
                    reason="Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
def test_every_figure_loads_and_every_table_has_rows_in_chromium(results, tmp_path):
    assert CHROMIUM is not None, ".ci/run installed chromium, but it is not on PATH"
    for page in [*sorted(results.rglob("report.html")), results / "index.html"]:
        counters = _render(page, tmp_path / "profile")
        assert counters["tables"] >= 1 and counters["tables-with-rows"] == counters["tables"], (page, counters)
        assert counters["images-loaded"] == counters["images"], (page, counters)
        if page.name == "report.html":
            assert counters["images"] >= 1, (page, counters)
