"""The command line as a user meets it, in real subprocesses: fast `--help` and flag errors that never import torch,
one-line errors, Ctrl-C that leaves nothing behind, and result files readable by collaborators."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.script_probe import run_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["router_decisive.py", "router_stats.py", "router_metrics.py", "profiles.py"]
# (flags, the words the one-line error must contain: the flag at fault)
BAD_FLAGS = {
    "router_decisive.py": [(["--bins", "0"], "argument --bins: must be at least 1"),
                           (["--dtype", "foo"], "argument --dtype: invalid choice"),
                           (["--num_tokens", "-5"], "argument --num_tokens: must be at least 1")],
    "router_stats.py": [(["--bins", "x"], "argument --bins: 'x' is not an integer"),
                        (["--device", "gpu0"], "argument --device: 'gpu0' is not a device"),
                        (["--batch_size", "0"], "argument --batch_size: must be at least 1")],
    "router_metrics.py": [(["--topk", "0"], "argument --topk: must be at least 1"),
                          (["--seq_len", "1"], "argument --seq_len: must be at least 2"),
                          (["--nonsense"], "unrecognized arguments: --nonsense")],
    "profiles.py": [(["--layer", "1"], "one of the arguments --expert_id --all is required"),
                    (["--layer", "1", "--expert_id", "-1"], "argument --expert_id: must be at least 0"),
                    (["--layer", "1", "--all", "--top", "0"], "argument --top: must be at least 1")],
}


def _probe(script: str, *args: str) -> tuple[subprocess.CompletedProcess, list[str], float]:
    started = time.perf_counter()
    result, heavy = run_script(script, *args)
    return result, heavy, time.perf_counter() - started


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_flag_errors_are_fast_one_line_and_never_import_torch(script):
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import argparse"], check=True)
    baseline = time.perf_counter() - started

    result, heavy, seconds = _probe(script, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout and "--model" in result.stdout
    assert heavy == [] and result.stderr == ""
    assert seconds < baseline + 1.5, seconds

    for flags, fault in BAD_FLAGS[script]:
        result, heavy, seconds = _probe(script, *flags)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (flags, result.stderr)
        assert len(lines) == 1 and "Traceback" not in result.stderr, (flags, result.stderr)
        assert lines[0].startswith(f"{script}: error: ") and fault in lines[0], (flags, lines[0])
        assert heavy == [] and result.stdout.strip() == ""
        assert seconds < baseline + 1.5, (flags, seconds)


def _data_file(tmp_path: Path, repeats: int = 400) -> Path:
    path = tmp_path / "a.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * repeats)
    return path


STOPS = {  # signal -> (exit code, the one line): Ctrl-C, and what timeout, Slurm and container stops send
    "SIGINT": (130, "router_metrics.py: interrupted; nothing written"),
    "SIGTERM": (143, "router_metrics.py: stopped by SIGTERM; nothing written"),
    "SIGHUP": (129, "router_metrics.py: stopped by SIGHUP; nothing written"),
}


@pytest.mark.parametrize("stop", list(STOPS))
@pytest.mark.parametrize("when", ["while importing", "mid-run"])
def test_a_stop_prints_one_line_exits_128_plus_signal_and_leaves_nothing(tmp_path, when, stop):
    out = tmp_path / "results"
    # data for far longer than the test waits (900,000 tokens), so the run is mid-stream when interrupted on any
    # machine, never already past the end of its data (which would add the "ran out of data" warning)
    argv = [sys.executable, "router_metrics.py", "--model", "random:olmoe", "--data",
            f"a={_data_file(tmp_path, repeats=20_000)}", "--num_tokens", "1000000", "--seq_len", "64", "--batch_size", "2", "--out", str(out), "--no-progress"]
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if when == "while importing":
            time.sleep(1.0)
        else:  # wait for the staging folder: the run has started and is computing
            deadline = time.monotonic() + 60
            while not list(out.glob("**/.*.partial")) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert list(out.glob("**/.*.partial")), "the run never started"
            time.sleep(1.0)
        process.send_signal(getattr(signal, stop))
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    code, line = STOPS[stop]
    assert process.returncode == code, err
    assert err.strip().splitlines()[-1] == line
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize(("umask", "readable"), [(0o022, True), (0o077, False)])
def test_written_files_follow_the_umask(tmp_path, umask, readable):
    out = tmp_path / "results"
    argv = [sys.executable, "router_decisive.py", "--model", "random:olmoe", "--data", f"a={_data_file(tmp_path)}",
            "--num_tokens", "200", "--seq_len", "32", "--out", str(out), "--no-progress", "--layers", "0"]
    subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, preexec_fn=lambda: os.umask(umask))
    written = [p for p in out.rglob("*")]
    assert any(p.suffix == ".csv" for p in written) and any(p.suffix == ".png" for p in written)
    for path in written:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert bool(mode & 0o044 == 0o044) == readable, (path, oct(mode))
        assert mode & 0o022 == 0, (path, oct(mode))  # never group/world-writable under these masks


def test_config_file_gives_defaults_that_flags_override(tmp_path):
    import profiles
    import router_decisive
    from common.errors import InputError

    config = tmp_path / "run.toml"
    config.write_text('model = "random:olmoe"\nnum_tokens = 300\nlayers = [0, -1]\nno-progress = true\ndata = ["a=x.txt"]\n')
    args = router_decisive.build_parser().parse_args(["--config", str(config), "--num_tokens", "500"])
    assert (args.model, args.num_tokens, args.layers, args.progress, args.data) == (
        "random:olmoe", 500, ["0", "-1"], False, ["a=x.txt"])
    # A required flag can come from the file.
    (tmp_path / "profile.toml").write_text("layer = 1\nall = true\ntop = 5\n")
    args = profiles.build_parser().parse_args(["--config", str(tmp_path / "profile.toml")])
    assert (args.layer, args.all, args.top) == (1, True, 5)
    for text, message in [("num_tokens = 0", "num_tokens: must be at least 1"), ("nonsense = 1", "unknown key 'nonsense'"),
                          ('dtype = "fp8"', "dtype: invalid choice"), ("num_tokens = [1, 2]", "expected a single value"),
                          ("pack = 3", "expected true or false"), ("num_tokens = ", "not valid TOML")]:
        (tmp_path / "bad.toml").write_text(text + "\n")
        with pytest.raises(InputError, match=message):
            router_decisive.build_parser().parse_args(["--config", str(tmp_path / "bad.toml")])
    with pytest.raises(InputError, match="No such file"):
        router_decisive.build_parser().parse_args(["--config", str(tmp_path / "missing.toml")])


def test_wandb_logging_is_optional_and_logs_tables_and_figures(tmp_path, monkeypatch, capsys):
    import sys as system
    import types

    import router_decisive

    calls: dict[str, object] = {}

    class FakeRun:
        def __init__(self) -> None:
            self.summary: dict = {}

        def log(self, payload):
            calls["log"] = payload

        def finish(self):
            calls["finished"] = True

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.setdefault("init", kwargs) and FakeRun()
    fake.Table = lambda dataframe: ("table", len(dataframe))
    fake.Image = lambda path: ("image", Path(path).name)
    data = _data_file(tmp_path)
    argv = ["--model", "random:olmoe", "--data", f"a={data}", "--num_tokens", "200", "--seq_len", "32",
            "--layers", "0", "--out", str(tmp_path / "out"), "--no-progress", "--wandb", "moe-study"]
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else object())
    assert router_decisive.main(argv) == 2  # asked for but not installed: refused before any work
    assert "argument --wandb: the wandb package is not installed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    monkeypatch.setitem(system.modules, "wandb", fake)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object())
    assert router_decisive.main(argv) == 0
    assert calls["init"]["project"] == "moe-study" and calls["finished"] is True
    logged = calls["log"]
    assert logged["table/entropy_summary"][0] == "table" and logged["table/entropy_summary"][1] > 0
    assert logged["figure/entropy_violin"] == ("image", "entropy_violin.png")
