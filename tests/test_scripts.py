"""Every script runs in-process through `main(argv)`, writes a complete run folder, is deterministic, and refuses
bad input with one line on stderr, exit code 2 and no results folder."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import router_decisive
import router_stats

SCRIPTS = {"router_decisive": router_decisive, "router_stats": router_stats}
EXPECTED = {
    "router_decisive": ["entropy_summary.csv", "entropy_histograms.csv", "entropy_normalized_hist.npy",
                        "figures/entropy_violin.pdf", "figures/entropy_violin.png", "figures/decisiveness_by_layer.png"],
    "router_stats": ["distribution_summary.csv", "distribution_histograms.csv", "weight_hist.npy",
                     "figures/distributions_layer0.pdf", "figures/distributions_layer0.png"],
}


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    (folder / "a.txt").write_text("Alpha beta gamma delta. " * 40)
    (folder / "b.jsonl").write_text("\n".join(json.dumps({"text": f"print({i} + {i})"}) for i in range(60)))
    (folder / "empty.txt").write_text("")
    (folder / "blank.txt").write_text("\n\n   \n\t\n")  # not empty, but blank lines only: no token to count
    (folder / "short.txt").write_text("Only a few words here.")
    return folder


def _argv(out: Path, data_files: Path, *extra: str) -> list[str]:
    return ["--model", "random:olmoe", "--data", f"prose={data_files / 'a.txt'}", f"code={data_files / 'b.jsonl'}",
            "--num_tokens", "200", "--seq_len", "32", "--batch_size", "4", "--out", str(out), "--no-progress", *extra]


def _run_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("*/*/*/*") if p.is_dir())


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_writes_complete_deterministic_run(name, tmp_path, data_files):
    script = SCRIPTS[name]
    assert script.main(_argv(tmp_path, data_files, "--layers", "0", "-1")) == 0
    assert script.main(_argv(tmp_path, data_files, "--layers", "0", "-1")) == 0
    first, second = _run_dirs(tmp_path)
    assert first != second  # a re-run never overwrites
    for run in (first, second):
        for relative in ["run.json", *EXPECTED[name]]:
            assert (run / relative).is_file(), relative
    info = json.loads((first / "run.json").read_text())
    assert info["seed"] == 0 and info["model"] == "random:olmoe" and info["arguments"]["layers"] == ["0", "-1"]
    assert info["command"].startswith(f"{name}.py --model random:olmoe --data ")  # the script's, even in-process
    assert info["world_size"] == 1
    assert {d: c["counted"] for d, c in info["tokens"]["domains"].items()} == {"prose": 200, "code": 200}
    assert {"torch", "transformers"} <= set(info["packages"]) and "git_commit" in info and info["wall_time_s"] > 0
    assert [m["layer"] for m in info["model_info"]["moe_layers"]] == [0, 1, 2, 3]
    for csv in first.glob("*.csv"):
        assert (second / csv.name).read_bytes() == csv.read_bytes(), csv.name
    summary = pd.read_csv(next(first.glob("*_summary.csv")))
    assert set(summary.layer) == {0, 3}
    assert set(summary.domain) == {"prose", "code", "all"}
    assert (summary[summary.domain == "all"]["count"] > 0).all()


def test_help_exits_zero(capsys):
    assert router_decisive.main(["--help"]) == 0
    assert "--num_tokens" in capsys.readouterr().out



BAD_INPUT = {
    "missing layer": (["--layers", "7"], "layer 7 does not exist"),
    "dense layer": (["--model", "random:deepseek_v3", "--layers", "0"], "dense (non-MoE) layer; MoE layers: 1, 2, 3"),
    "missing model path": (["--model", "./no/such/model"], "no such directory"),
    "non-MoE model": (["--model", "{dense}"], "has no MoE layers"),
    "unknown random type": (["--model", "random:nonesuch"], "unknown random model type 'nonesuch'"),
    "empty data file": (["--data", "{data}/empty.txt"], "empty"),
    "blank data file": (["--data", "prose={data}/a.txt", "{data}/blank.txt"],
                        "--data: domain 'blank' ({data}/blank.txt) has no token to count"),
    "missing data file": (["--data", "{data}/missing.txt"], "missing.txt"),
    "malformed data spec": (["--data", "hf:"], "hf:"),
    "zero tokens": (["--num_tokens", "0"], "argument --num_tokens: must be at least 1 (got 0)"),
    "unknown flag": (["--nonsense"], "unrecognized arguments"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
@pytest.mark.parametrize("name", SCRIPTS)
def test_bad_input_one_line_exit_2_no_output(name, case, tmp_path, data_files, saved_dense_model, capsys):
    extra, message = BAD_INPUT[case]
    extra = [e.format(dense=saved_dense_model, data=data_files) for e in extra]
    code = SCRIPTS[name].main(_argv(tmp_path / "results", data_files, *extra))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{name}.py: error: ")
    assert "Traceback" not in err and message.format(data=data_files) in lines[0]
    assert not (tmp_path / "results").exists()  # not even an empty root


def test_a_short_domain_still_runs_warned_and_recorded(tmp_path, data_files, capsys):
    """Fewer tokens than asked is not an error: the run goes on, says so once and records the shortfall."""
    argv = _argv(tmp_path, data_files, "--layers", "0")
    argv[argv.index("--data") + 2] = f"short={data_files / 'short.txt'}"
    assert router_decisive.main(argv) == 0
    err = capsys.readouterr().err
    assert "warning: domain 'short' ran out of data: 22 of 200 tokens (1 documents)" in err
    [run] = _run_dirs(tmp_path)
    tokens = json.loads((run / "run.json").read_text())["tokens"]["domains"]
    assert (tokens["short"]["counted"], tokens["short"]["complete"]) == (22, False)
    assert (tokens["prose"]["counted"], tokens["prose"]["complete"]) == (200, True)


def test_a_model_offloaded_to_disk_gives_the_numbers_of_one_device(tmp_path, capsys):
    """--device_map auto with a --max_memory the CPU cannot hold the demo in: its decoder layers are offloaded to
    --offload_folder (accelerate's disk offload, a second "device" on a CPU-only machine), and router_decisive
    writes the same tables as on one device; a --max_memory without --device_map is refused in one line."""
    import router_decisive

    common = ["--model", "demo", "--data", "demo:code", "--num_tokens", "200", "--no-progress", "--no-figures"]
    assert router_decisive.main([*common, "--out", str(tmp_path / "one")]) == 0
    assert router_decisive.main([*common, "--device_map", "auto", "--max_memory", "cpu=6MB", "--offload_folder",
                                 str(tmp_path / "offload"), "--out", str(tmp_path / "offloaded")]) == 0
    (one,), (offloaded,) = (list((tmp_path / w).rglob("entropy_summary.csv")) for w in ("one", "offloaded"))
    pd.testing.assert_frame_equal(pd.read_csv(offloaded), pd.read_csv(one))
    assert any((tmp_path / "offload").iterdir())  # the layers really went to disk
    capsys.readouterr()
    assert router_decisive.main([*common, "--max_memory", "cpu=6MB", "--out", str(tmp_path / "refused")]) == 2
    assert "--max_memory and --offload_folder apply with --device_map auto only" in capsys.readouterr().err
