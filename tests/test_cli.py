"""The command line as a user meets it, in real subprocesses: fast `--help` and flag errors that never import torch,
one-line errors, Ctrl-C that leaves nothing behind, and result files readable by collaborators."""

from __future__ import annotations

import os
import re
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


STOPS = {  # signal -> exit code: Ctrl-C, and what timeout, Slurm (its --signal warning), submitit and containers send
    "SIGINT": 130, "SIGTERM": 143, "SIGHUP": 129, "SIGUSR1": 138, "SIGUSR2": 140,
}


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM",
                                  *(pytest.param(s, marks=pytest.mark.slow) for s in ("SIGHUP", "SIGUSR1", "SIGUSR2"))])
@pytest.mark.parametrize("when", ["while importing", "mid-run"])
def test_a_stop_prints_one_line_and_exits_128_plus_signal(tmp_path, when, stop):
    """Before any work: nothing is left. Mid-run: the batch in progress finishes, its state is saved, and the one
    line says how to resume."""
    out = tmp_path / "results"
    # data for far longer than the test waits (900,000 tokens), so the run is mid-stream when interrupted on any
    # machine, never already past the end of its data (which would add the "ran out of data" warning)
    argv = [sys.executable, "router_metrics.py", "--model", "random:olmoe", "--data",
            f"a={_data_file(tmp_path, repeats=20_000)}", "--num_tokens", "1000000", "--seq_len", "64", "--batch_size", "2",
            "--out", str(out), "--no-progress", "--checkpoint_every", "0"]
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if when == "while importing":
            time.sleep(1.0)
        else:  # wait for a first checkpoint: the run is streaming
            deadline = time.monotonic() + 60
            while not list(out.glob("**/.*.partial/checkpoint/state.pt")) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert list(out.glob("**/.*.partial/checkpoint/state.pt")), "the run never started"
        process.send_signal(getattr(signal, stop))
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == STOPS[stop], err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    what = "interrupted" if stop == "SIGINT" else f"stopped by {stop}"
    if when == "while importing":
        assert err.strip() == f"router_metrics.py: {what}; nothing written"
        assert not out.exists()
        return
    (staging,) = out.glob("router_metrics/*/*/.*.partial")
    match = re.fullmatch(rf"router_metrics.py: {what}; checkpoint \((\d+) batch(es)? done\) kept in (.+): run the same "
                         r"command again to continue \(or add --resume (.+)\)", err.strip())
    assert match and match[3] == match[4] == str(staging), err
    assert int(match[1]) >= 1 and (staging / "checkpoint" / "state.pt").is_file()


@pytest.mark.parametrize(("umask", "readable", "figures"), [(0o022, True, True), (0o077, False, False)])
def test_written_files_follow_the_umask(tmp_path, umask, readable, figures):
    out = tmp_path / "results"
    argv = [sys.executable, "router_decisive.py", "--model", "random:olmoe", "--data", f"a={_data_file(tmp_path)}",
            "--num_tokens", "200", "--seq_len", "32", "--out", str(out), "--no-progress", "--layers", "0"]
    argv += [] if figures else ["--no-figures"]  # one run draws, to check the figures' modes too
    subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, preexec_fn=lambda: os.umask(umask))
    written = [p for p in out.rglob("*")]
    assert any(p.suffix == ".csv" for p in written) and any(p.suffix == ".png" for p in written) == figures
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


# --- flag conventions: both spellings of every flag, typo suggestions, --out checked early, --threads

# (script, argv spelled the other way round from the script's own declaration, {dest: the value it must give})
ALIASED = [
    ("router_decisive", ["--num-tokens", "300", "--batch-size", "4", "--seq-len=32", "--no_progress", "--keep_special",
                         "--num-domains", "2", "--device-map", "auto", "--trust-remote-code"],
     {"num_tokens": 300, "batch_size": 4, "seq_len": 32, "progress": False, "keep_special": True, "num_domains": 2,
      "device_map": "auto", "trust_remote_code": True}),
    ("router_metrics", ["--olmoe_compat", "--no_token_tables", "--stats-memory", "2.5", "--num-experts", "16",
                        "--min-count", "3"],
     {"olmoe_compat": True, "token_tables": False, "stats_memory": 2.5, "num_experts": 16, "min_count": 3}),
    ("sim", ["--routed_only", "--min-pair-tokens", "7", "--block-mb", "64", "--sigma-tokens", "100"],
     {"routed_only": True, "min_pair_tokens": 7, "block_mb": 64, "sigma_tokens": 100}),
    ("profiles", ["--layer", "1", "--expert-id", "3", "5", "--min-count", "2"],
     {"layer": 1, "expert_id": [3, 5], "min_count": 2}),
    ("weights", ["--routers_only", "--no_figures", "--num-random", "10"],
     {"routers_only": True, "figures": False, "num_random": 10}),
    ("label", ["--layer", "1", "--api_base", "http://127.0.0.1:9/v1", "--llm", "m", "--score_batch", "3",
               "--shuffle_windows", "--api_key_env", "NONE_SET"],
     {"api_base": "http://127.0.0.1:9/v1", "score_batch": 3, "shuffle_windows": True, "api_key_env": "NONE_SET"}),
]


@pytest.mark.parametrize(("script", "argv", "expected"), ALIASED, ids=[item[0] for item in ALIASED])
def test_every_flag_takes_both_spellings(script, argv, expected):
    import importlib

    parser = importlib.import_module(script).build_parser()
    args = parser.parse_args(argv)
    assert {dest: getattr(args, dest) for dest in expected} == expected


def test_help_and_errors_show_the_declared_spelling_only():
    import router_decisive
    from common.errors import InputError

    parser = router_decisive.build_parser()
    text = parser.format_help()
    for declared, alias in [("--num_tokens", "--num-tokens"), ("--no-progress", "--no_progress"),
                            ("--keep-special", "--keep_special"), ("--batch_size", "--batch-size")]:
        assert declared in text and alias not in text, declared
        assert parser.format_usage().count(declared) == 1, declared
    assert "'-' or '_'" in text  # the convention is stated once, at the end of --help
    with pytest.raises(InputError, match=r"^argument --num_tokens: must be at least 1 \(got 0\)$"):
        parser.parse_args(["--num-tokens", "0"])  # the alias's error names the declared flag
    # Unambiguous prefixes still work: an alias never makes '--batch' ambiguous with its own flag.
    assert parser.parse_args(["--batch", "4"]).batch_size == 4
    assert parser.parse_args(["--batch-s", "5"]).batch_size == 5
    with pytest.raises(InputError, match=r"^ambiguous option: --num could match --num_domains, --num_tokens$"):
        parser.parse_args(["--num", "4"])


def test_config_keys_take_both_spellings(tmp_path):
    import router_decisive
    import router_metrics

    config = tmp_path / "run.toml"
    config.write_text("no_progress = true\nkeep-special = true\nnum-tokens = 300\nbatch_size = 4\nseq-len = 32\n")
    args = router_decisive.build_parser().parse_args(["--config", str(config)])
    assert (args.progress, args.keep_special, args.num_tokens, args.batch_size, args.seq_len) == (False, True, 300, 4, 32)
    config.write_text("no_token_tables = true\nolmoe-compat = true\nstats-memory = 1.5\nno-progress = false\n")
    args = router_metrics.build_parser().parse_args(["--config", str(config)])
    assert (args.token_tables, args.olmoe_compat, args.stats_memory, args.progress) == (False, True, 1.5, True)


@pytest.mark.parametrize(("argv", "line"), [
    (["--num_tokns", "300"], "unrecognized arguments: --num_tokns 300; did you mean --num_tokens?"),
    (["--no-progess"], "unrecognized arguments: --no-progess; did you mean --no-progress?"),  # a prefix would be taken
    (["--seq-lenght=32"], "unrecognized arguments: --seq-lenght=32; did you mean --seq_len?"),
    (["--keepspecial", "--binz", "5"],
     "unrecognized arguments: --keepspecial --binz 5; did you mean --keep-special (for --keepspecial), --bins (for --binz)?"),
    (["--nonsense"], "unrecognized arguments: --nonsense"),
])
def test_a_typo_gets_the_closest_flag_in_one_line(capsys, tmp_path, argv, line):
    import router_decisive

    assert router_decisive.main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"router_decisive.py: error: {line}\n"
    assert not (tmp_path / "out").exists()


def test_a_typo_is_named_when_it_leaves_a_required_flag_missing(capsys):
    import label
    import profiles

    assert profiles.main(["--layr", "1", "--all"]) == 2
    assert capsys.readouterr().err == ("profiles.py: error: the following arguments are required: --layer/--layers; "
                                       "unrecognized arguments: --layr; did you mean --layer?\n")
    assert label.main(["--layer", "1", "--api_bse", "http://127.0.0.1:9/v1"]) == 2
    assert capsys.readouterr().err == ("label.py: error: one of the arguments --api-base --local-llm is required; "
                                       "unrecognized arguments: --api_bse; did you mean --api-base?\n")


def test_a_config_key_typo_gets_the_closest_key(tmp_path):
    import router_decisive
    from common.errors import InputError

    config = tmp_path / "run.toml"
    for text, message in [("num_tokns = 3", "unknown key 'num_tokns'; did you mean num_tokens?"),
                          ("no_progres = true", "unknown key 'no_progres'; did you mean no-progress?"),
                          ("zzz = 1", "unknown key 'zzz' (keys are the flags' names, e.g. num_tokens)")]:
        config.write_text(text + "\n")
        with pytest.raises(InputError) as caught:
            router_decisive.build_parser().parse_args(["--config", str(config)])
        assert str(caught.value) == f"--config {config}: {message}"


def test_out_that_is_a_file_is_refused_in_one_line_before_torch(tmp_path):
    existing = tmp_path / "results.txt"
    existing.write_text("not a folder\n")
    config = tmp_path / "run.toml"
    config.write_text(f'out = "{existing}"\n')
    cases = [(["--out", str(existing)], f"argument --out: {existing} is a file, not a folder"),
             (["--out", str(existing / "sub")], f"argument --out: {existing} is a file, not a folder"),
             (["--config", str(config)], f"--config {config}: out: {existing} is a file, not a folder")]
    for flags, message in cases:
        result, heavy = run_script("router_decisive.py", "--model", "random:olmoe", "--num_tokens", "300",
                                   "--no-progress", *flags)
        assert result.returncode == 2, (flags, result.stderr)
        assert result.stderr == f"router_decisive.py: error: {message}\n", flags
        assert heavy == [] and result.stdout == ""
    assert existing.read_text() == "not a folder\n" and sorted(p.name for p in tmp_path.iterdir()) == ["results.txt", "run.toml"]


def test_out_that_cannot_be_written_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    import router_decisive
    from common.cli import flags

    target = tmp_path / "new" / "results"

    def denied(folder: Path) -> None:
        raise PermissionError(13, "Permission denied", str(folder))

    # As root nothing is unwritable: simulate the OS refusing (raising=False: on code without the probe the run
    # goes ahead and the test fails on its exit code, not on a missing name).
    monkeypatch.setattr(flags, "_try_writing_in", denied, raising=False)
    argv = ["--model", "random:olmoe", "--num_tokens", "300", "--out", str(target), "--no-progress"]
    assert router_decisive.main(argv) == 2
    assert capsys.readouterr().err == (f"router_decisive.py: error: argument --out: cannot create {target}: "
                                       f"{tmp_path} is not writable (Permission denied)\n")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    # The real probe leaves nothing behind: no temporary file, no folder created at parse time.
    args = router_decisive.build_parser().parse_args(["--out", str(target)])
    assert args.out == str(target) and list(tmp_path.iterdir()) == []


def test_threads_are_applied_before_the_model_loads_recorded_and_restored(tmp_path, monkeypatch):
    import json

    import torch

    import router_decisive
    from common.errors import InputError

    before = torch.get_num_threads()
    wanted = 1 if before > 1 else 2
    at_load: list[int] = []
    import common.model

    real_load = common.model.load_moe

    def load_and_count(spec):
        at_load.append(torch.get_num_threads())
        return real_load(spec)

    monkeypatch.setattr(common.model, "load_moe", load_and_count)  # where the pipeline imports it from when it loads
    base = ["--model", "random:olmoe", "--data", f"a={_data_file(tmp_path)}", "--num_tokens", "200", "--seq_len", "32",
            "--layers", "0", "--no-progress"]
    try:
        assert router_decisive.main([*base, "--out", str(tmp_path / "set"), "--threads", str(wanted)]) == 0
        assert at_load == [wanted]
        assert torch.get_num_threads() == before  # an in-process caller gets its own setting back
        assert router_decisive.main([*base, "--out", str(tmp_path / "default")]) == 0
        assert at_load == [wanted, before]
    finally:
        torch.set_num_threads(before)
    recorded = json.loads(next((tmp_path / "set").rglob("run.json")).read_text())
    assert (recorded["arguments"]["threads"], recorded["torch_threads"]) == (wanted, wanted)
    recorded = json.loads(next((tmp_path / "default").rglob("run.json")).read_text())
    assert (recorded["arguments"]["threads"], recorded["torch_threads"]) == (None, before)
    with pytest.raises(InputError, match="argument --threads: must be at least 1"):
        router_decisive.build_parser().parse_args(["--threads", "0"])


def test_an_error_a_stop_causes_on_its_way_out_is_the_stop(tmp_path, capsys):
    """A library may turn the interrupt into another error (seen: a RecursionError out of transformers' lazy imports
    when SIGHUP arrived mid-import): it is still the stop, with its line and exit code, and the run's folder goes."""
    import os

    from common.cli import ArgumentParser, run_main
    from common.config import RunSpec
    from common.run import Run

    out = tmp_path / "results"

    def body(args) -> None:
        with Run(RunSpec(script="probe", out=out, seed=0), model="m", data="d"):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler interrupts the sleep
            except KeyboardInterrupt:
                raise RuntimeError("maximum recursion depth exceeded") from None

    assert run_main(ArgumentParser(prog="probe.py"), body, []) == 143
    assert capsys.readouterr().err == "probe.py: stopped by SIGTERM; nothing written\n"
    assert not out.exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the previous handler is back
