"""Every file a script writes is described: each script runs once in-process, and its run folder's README.md must
name every file and CSV column with a working docs/METRICS.md link; count columns are written as integers."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import cluster
import profiles
import router_decisive
import router_metrics
import router_stats
import weights
from common.config import RunSpec
from common.model import tiny
from common.run import PROJECT_ROOT, Run, metrics_link, outputs, whole_number_columns

# Two layers (transitions need a pair) keep the figures, where most of the time goes, few; --revisions is added below.
SCRIPTS = {
    "router_decisive": (router_decisive, ["--layers", "0", "1"]),
    "router_stats": (router_stats, ["--layers", "0", "1"]),
    "router_metrics": (router_metrics, ["--layers", "0", "1"]),
    "profiles": (profiles, ["--layer", "1", "--expert_id", "0", "5"]),
    "weights": (weights, ["--layers", "0", "1", "--num_random", "50"]),
    "cluster": (cluster, ["--layers", "0", "1", "--clusters", "4", "16", "--baseline_draws", "5"]),
}
NO_DATA = {"weights"}  # scripts without data flags
LINK = re.compile(r"\]\(([^)#]*METRICS\.md)#([^)]+)\)")
WHOLE = re.compile(r"-?\d+")


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """name -> the run folder of that script (run once, on first use): random OLMoE, two small local domains,
    200 tokens each. A script that fails fails the tests that need it, not the others."""
    root = tmp_path_factory.mktemp("outputs")
    (root / "a.txt").write_text("Alpha beta gamma delta. " * 40)
    (root / "b.jsonl").write_text("\n".join(json.dumps({"text": f"print({i} + {i})"}) for i in range(60)))
    model, tokenizer = tiny.build_random_model("olmoe", seed=1)  # the earlier checkpoint for router saturation
    model.save_pretrained(root / "checkpoint")
    tokenizer.save_pretrained(root / "checkpoint")
    common = ["--model", "random:olmoe", "--data", f"prose={root / 'a.txt'}", f"code={root / 'b.jsonl'}",
              "--num_tokens", "200", "--seq_len", "32", "--batch_size", "8", "--out", str(root / "results"),
              "--no-progress"]
    done: dict[str, Path | str] = {}

    def get(name: str) -> Path:
        if name not in done:
            script, extra = SCRIPTS[name]
            if name == "router_metrics":
                extra = [*extra, "--revisions", str(root / "checkpoint")]
            argv = [*(common[:2] + common[-3:] if name in NO_DATA else common), *extra]
            try:
                assert script.main(argv) == 0, f"{name} exited with an error"
                (done[name],) = [p for p in (root / "results" / name).glob("*/*/*") if p.is_dir()]
            except Exception as err:
                done[name] = f"{name} failed: {err!r}"
        if isinstance(done[name], str):
            pytest.fail(done[name])
        return done[name]

    return get


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _sections(readme: str) -> dict[str, str]:
    """README text of each `### \\`pattern\\`` section."""
    parts = re.split(r"^### `([^`]+)`$", readme, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


@pytest.mark.parametrize("name", SCRIPTS)
def test_readme_describes_every_file_and_column(run_folder, name):
    folder = run_folder(name)
    readme = (folder / "README.md").read_text()
    assert "## Undocumented" not in readme and "undocumented" not in readme.lower()
    sections = _sections(readme)
    for relative in _files(folder):
        entry = outputs.lookup(relative)
        assert entry is not None, f"{relative} is not in common/run/outputs.py"
        assert [e for e in outputs.REGISTRY if e.matches(relative)] == [entry], f"{relative}: several entries"
        assert entry.pattern in sections, relative
        section = sections[entry.pattern]
        assert relative == entry.pattern or f"`{relative}`" in section, relative
        if entry.anchor:
            assert f"METRICS.md#{entry.anchor})" in section, relative
        if relative.endswith(".csv"):
            for column in pd.read_csv(folder / relative, nrows=0).columns:
                assert entry.column(column), f"{relative}: column {column} is undocumented"
                assert f"| `{column}` | {entry.column(column)}" in section.replace("\\|", "|"), (relative, column)
        if relative.endswith(".npy"):
            assert entry.axes and entry.dtype and f"Axes: `{entry.axes}`" in section, relative
            assert "shape " + str(np.load(folder / relative, mmap_mode="r").shape) in section, relative
        if relative.endswith(".json") and entry.keys:
            assert set(json.loads((folder / relative).read_text())) <= set(entry.keys), relative


@pytest.mark.parametrize("name", SCRIPTS)
def test_readme_links_resolve_to_metrics_anchors(run_folder, name):
    folder = run_folder(name)
    readme = (folder / "README.md").read_text()
    links = LINK.findall(readme)
    assert links, "no docs/METRICS.md link"
    anchors = outputs.metric_anchors()
    for target, anchor in links:
        path = Path(target) if Path(target).is_absolute() else folder / target
        assert path.resolve() == outputs.METRICS_DOC, target
        assert anchor in anchors, f"docs/METRICS.md has no #{anchor}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_count_columns_are_written_as_integers(run_folder, name):
    folder = run_folder(name)
    checked = 0
    for path in folder.glob("*.csv"):
        integers = outputs.integer_columns(path.name)
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        for column in integers & set(rows[0]):
            bad = [row[column] for row in rows if row[column] != "" and not WHOLE.fullmatch(row[column])]
            assert not bad, f"{path.name}: {column} holds {bad[:3]}"
            checked += 1
    assert checked, "no integer column checked"
    if name == "router_metrics":
        text = (folder / "frequency.csv").read_text().splitlines()
        assert text[0].startswith("layer,domain,expert,count_topk")
        assert pd.read_csv(folder / "frequency.csv")[["count_topk", "count_top1", "tokens"]].dtypes.map(
            pd.api.types.is_integer_dtype).all()


def test_registry_entries_and_columns_are_all_used(run_folder):
    """No stale documentation: every entry of these scripts is written, every documented column appears."""
    runs = {name: run_folder(name) for name in SCRIPTS}
    for entry in outputs.REGISTRY:
        scripts = [s for s in entry.scripts or SCRIPTS if s in runs]
        if not scripts:  # another script's entry (tested with that script)
            continue
        files = {s: [f for f in _files(runs[s]) if entry.matches(f)] for s in scripts}
        for script, matched in files.items():
            assert matched, f"{entry.pattern} is never written by {script}"
        assert entry.integers <= set(entry.columns), entry.pattern
        seen: set[str] = set()
        for script, matched in files.items():
            for f in matched:
                if f.endswith(".csv"):
                    seen.update(pd.read_csv(runs[script] / f, nrows=0).columns)
        for column in entry.columns:
            assert any(entry.column(c) == entry.columns[column] for c in seen), f"{entry.pattern}: {column} never written"


def test_registry_anchors_exist_in_metrics():
    anchors = outputs.metric_anchors()
    assert {"selection-frequency", "switch-auxiliary-loss", "coverage50", "lift", "conventions"} <= anchors
    for entry in outputs.REGISTRY:
        assert entry.anchor is None or entry.anchor in anchors, entry.pattern
    text = outputs.METRICS_DOC.read_text()
    for target in re.findall(r"\]\(#([^)]+)\)", text):  # the page's own links
        assert target in anchors, target
    assert outputs.github_anchor("Token-id specialization") == "token-id-specialization"
    assert outputs.github_anchor("Representations (coming)") == "representations-coming"


def test_whole_number_columns():
    table = pd.DataFrame({"count": [10000.0, 3.0], "gap": [1.0, np.nan], "share": [0.1 + 0.2, 1 / 3],
                          "layer": [0, 1], "rank": ["all", 2], "big": [2.0**60, 1.0], "inf": [np.inf, 1.0]})
    out = whole_number_columns(table, {"count", "gap", "share", "layer", "rank", "big", "inf", "absent"})
    assert str(out["count"].dtype) == "int64" and str(out["gap"].dtype) == "Int64" and out["layer"].dtype == np.int64
    assert out["share"].dtype == out["big"].dtype == out["inf"].dtype == np.float64 and out["rank"].dtype == object
    assert table["count"].dtype == np.float64  # the caller's table is left alone
    text = out.to_csv(index=False).splitlines()
    assert text[1].startswith("10000,1,0.30000000000000004,0,all,") and text[2].startswith("3,,0.3333333333333333,1,2,")
    back = pd.read_csv(io.StringIO(out.to_csv(index=False)))
    assert back["share"].tolist() == table["share"].tolist()  # floats round-trip exactly


def test_undocumented_outputs_are_loud(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MOESCOPE_STRICT_OUTPUTS")  # outside the test suite: a warning and a README section
    with Run(RunSpec(script="router_metrics", out=tmp_path), "random:olmoe") as run:
        run.save_table(pd.DataFrame({"layer": [0.0], "count_topk": [1.0], "mystery": [2.0]}), "frequency")
        run.save_table(pd.DataFrame({"x": [1.0]}), "not_registered")
        run.save_array(np.zeros(3), "unknown_array")
    readme = (run.final_dir / "README.md").read_text()
    undocumented = readme.split("## Undocumented", 1)[1]
    for item in ("`not_registered.csv`", "`unknown_array.npy`", "`frequency.csv: column mystery`"):
        assert item in undocumented
    assert "not described in common/run/outputs.py" in capsys.readouterr().err
    assert (run.final_dir / "frequency.csv").read_text().splitlines()[1] == "0,1,2.0"  # integer set of the registry only
    monkeypatch.setenv("MOESCOPE_STRICT_OUTPUTS", "1")  # inside it: the run fails
    with pytest.raises(RuntimeError, match=r"not described in common/run/outputs\.py"), \
            Run(RunSpec(script="router_metrics", out=tmp_path / "strict"), "random:olmoe") as strict:
        strict.save_table(pd.DataFrame({"x": [1.0]}), "not_registered")


def test_metrics_link_is_relative_inside_the_repository(tmp_path):
    assert metrics_link(PROJECT_ROOT / "results" / "s" / "m" / "d" / "r") == "../../../../../docs/METRICS.md"
    assert metrics_link(tmp_path) == outputs.METRICS_DOC.as_posix()


def test_run_readme_spells_similarity_methods_as_the_figures_do(tmp_path):
    """A sim.py run's README capitalises each file's description: 'cka similarity …' came out as 'Cka similarity …'.
    The registry names the methods as the figures label them (linear CKA, RBF CKA, …)."""
    from common.analysis.similarity import METHOD_LABELS
    from common.figures.outputs.representations import SIM_METHOD_NAMES, SIM_METHODS
    from common.run.folder import readme_text

    assert SIM_METHOD_NAMES == METHOD_LABELS and set(SIM_METHODS) == set(METHOD_LABELS)
    (tmp_path / "figures").mkdir()
    for method in SIM_METHODS:
        np.save(tmp_path / f"similarity_{method}.npy", np.zeros((1, 2, 2)))
        (tmp_path / "figures" / f"similarity_{method}_layer1.png").write_bytes(b"")
    text, undocumented = readme_text(tmp_path, {"script": "sim", "run_id": "r"}, "METRICS.md")
    assert undocumented == []
    assert not re.search(r"Cka|Rbf|cka similarity|cka-\w+ similarity", text), text
    for spelled in ("Mean cosine similarity matrices", "Linear CKA similarity matrices",
                    "Debiased linear CKA similarity matrices", "RBF CKA similarity matrices",
                    "Linear CKA similarity of one layer"):
        assert spelled in text, spelled
