"""Checkpoints and resume: every streaming and sample-based script, stopped by SIGTERM at one batch and killed with
SIGKILL at a later one (both test-chosen from a seeded draw), then resumed, writes tables, arrays and JSON that are
byte-identical to an uninterrupted run's; the SIGTERM prints one line saying how to resume and exits 143; another
command's checkpoint is refused in one line with exit 2.

The interrupted runs are forked children of the test process (the model code is already imported: no interpreter
start-up per run) that stop themselves through `MOESCOPE_FAULT_AT_BATCH`: SIGKILL after a batch's work and before its
checkpoint (so that batch is lost and redone), or SIGTERM while a batch is being processed (delivered, deferred to
the batch's end, saved, exit). All runs use one thread, which the fork needs and the byte equality asks for anyway.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import zlib
from pathlib import Path

import pytest

import cluster
import dim_reduc
import interv
import label
import logit_lens
import outliers
import probing
import profiles
import prune
import router_decisive
import router_metrics
import router_stats
import sim
from common.run.checkpoint import FAULT_ENV
from tests.llm_stub import Stub

COMMON = ["--no-progress", "--no-figures", "--threads", "1", "--checkpoint_every", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("resume-data")
    (folder / "a.txt").write_text("The quick brown fox jumps over the lazy dog; alpha beta gamma delta. " * 40)
    (folder / "b.jsonl").write_text("\n".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + 1  # Note {i}."})
                                              for i in range(80)))
    return folder


@pytest.fixture(scope="module")
def stub():
    server = Stub()
    yield server
    server.close()


def _base(data: Path, tokens: int = 160, model: str = "random:olmoe") -> list[str]:
    return ["--model", model, "--data", f"prose={data / 'a.txt'}", f"code={data / 'b.jsonl'}",
            "--num_tokens", str(tokens), "--seq_len", "32", "--batch_size", "2"]


# script -> (module, its flags beyond the data); each reads 10-12 batches
CASES = {
    "router_decisive": (router_decisive, lambda d, s: _base(d)),
    "router_stats": (router_stats, lambda d, s: _base(d)),
    "router_metrics": (router_metrics, lambda d, s: _base(d)),
    "profiles": (profiles, lambda d, s: [*_base(d), "--layer", "1", "--all", "--top", "4"]),
    "interv": (interv, lambda d, s: [*_base(d), "--layer", "1"]),
    "logit_lens": (logit_lens, lambda d, s: _base(d)),
    "cluster": (cluster, lambda d, s: [*_base(d), "--layers", "0", "-1", "--clusters", "4", "--baseline_draws", "3"]),
    "sim": (sim, lambda d, s: [*_base(d, 300), "--layers", "1"]),
    "dim_reduc": (dim_reduc, lambda d, s: [*_base(d), "--layers", "1", "--per_expert", "20", "--method", "pca"]),
    "probing": (probing, lambda d, s: [*_base(d, 300, "random:deepseek_v3"), "--k", "1", "2", "--max_examples", "40",
                                       "--min_examples", "5", "--concepts", "digits", "capitalized", "--dense_model",
                                       "same"]),
    "prune": (prune, lambda d, s: [*_base(d), "--layers", "1", "--fractions", "0", "0.5", "--draws", "2"]),
    "outliers": (outliers, lambda d, s: [*_base(d), "--draws", "1"]),
    "label": (label, lambda d, s: [*_base(d), "--layer", "1", "--top", "3", "--window", "4", "--api-base", s.url,
                                   "--llm", "stub", "--api-key-env", "none", "--backoff", "0.01", "--timeout", "2"]),
}


def _results(out: Path, script: str) -> Path:
    (folder,) = [p for p in out.glob(f"{script}/*/*/*") if p.is_dir() and not p.name.startswith(".")]
    return folder


def _staging(out: Path, script: str) -> Path:
    (folder,) = out.glob(f"{script}/*/*/.*.partial")
    return folder


def _data_files(folder: Path) -> dict[str, bytes]:
    """Every table, array and JSON of a run folder, run.json (times, the resume record) and README.md aside."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix in {".csv", ".npy", ".json"} and p.name != "run.json"}


def _forked(module, argv: list[str], fault: str, stderr: Path) -> int:
    """Run `module.main(argv)` in a forked child that stops itself at `fault`; its wait status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            os.environ[FAULT_ENV] = fault
            sys.stderr = open(stderr, "w", buffering=1)  # noqa: SIM115
            code = module.main(argv)
        finally:
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def _batches(info: dict) -> int:
    return sum(-(-d["windows"] // 2) for d in info["tokens"]["domains"].values())  # batch_size 2, one domain per batch


@pytest.mark.parametrize("script", CASES)
def test_stopped_and_killed_run_resumes_to_identical_results(script, data, stub, tmp_path):
    module, flags = CASES[script]
    argv = [*flags(data, stub), *COMMON]
    reference, out = tmp_path / "reference", tmp_path / "interrupted"
    assert module.main([*argv, "--out", str(reference)]) == 0
    expected = _data_files(_results(reference, script))
    assert expected, "the run wrote no data files"
    total = _batches(json.loads((_results(reference, script) / "run.json").read_text()))
    assert total >= 6
    draw = random.Random(zlib.crc32(script.encode()))
    term_at = draw.randrange(2, total // 2 + 1)
    kill_at = draw.randrange(term_at + 1, total)

    # SIGTERM while batch `term_at` is processed: it finishes, its state is saved, one line, exit 143
    status = _forked(module, [*argv, "--out", str(out)], f"{term_at}:SIGTERM", tmp_path / "term.err")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 128 + signal.SIGTERM
    lines = (tmp_path / "term.err").read_text().strip().splitlines()
    staging = _staging(out, script)
    assert lines == [f"{script}.py: stopped by SIGTERM; checkpoint ({term_at} batches done) kept in {staging}: run the "
                     f"same command again to continue (or add --resume {staging})"]

    # resumed, then SIGKILLed after batch `kill_at`'s work, before its checkpoint: that batch is lost
    status = _forked(module, [*argv, "--out", str(out)], str(kill_at), tmp_path / "kill.err")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert _staging(out, script) == staging
    assert "resuming the stopped run" in (tmp_path / "kill.err").read_text()

    assert module.main([*argv, "--out", str(out)]) == 0  # the same command again: resumes at batch kill_at - 1
    finished = _results(out, script)
    assert finished.name == staging.name[1:-len(".partial")]
    assert not (finished / "checkpoint").exists() and not (finished / ".lock").exists()
    info = json.loads((finished / "run.json").read_text())
    assert [r["batches_done"].get("data") for r in info["resumed"]] == [term_at, kill_at - 1]
    assert _data_files(finished) == expected


def test_another_commands_checkpoint_is_refused_and_no_resume_starts_afresh(data, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [*_base(data), "--no-progress", "--threads", "1", "--checkpoint_every", "0", "--out", str(out)]
    status = _forked(router_decisive, argv, "3:SIGTERM", tmp_path / "term.err")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 143
    staging = _staging(out, "router_decisive")
    capsys.readouterr()

    # another command, named with --resume: one line, exit 2, nothing touched (refused before the model loads)
    assert router_decisive.main([*argv, "--bins", "100", "--resume", str(staging)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"router_decisive.py: error: --resume {staging}: refused, it is a checkpoint of another command: "
                   "--bins 100 (checkpoint: 200)"]
    fingerprint = staging / "checkpoint" / "fingerprint.json"
    saved = json.loads(fingerprint.read_text())
    fingerprint.write_text(json.dumps({**saved, "code": "0" * 40}))
    assert router_decisive.main([*argv, "--resume", str(staging)]) == 2
    assert "refused, it was written by another code version (" + "0" * 40 in capsys.readouterr().err
    assert router_decisive.main([*argv, "--resume", str(tmp_path)]) == 2
    assert "not a stopped run's folder" in capsys.readouterr().err
    fingerprint.write_text(json.dumps(saved))

    # --no-resume: a new run beside the stopped one, which stays
    assert router_decisive.main([*argv, "--no-resume"]) == 0
    fresh = _results(out, "router_decisive")
    assert staging.is_dir() and fresh.name != staging.name[1:-len(".partial")]
    assert "resuming" not in capsys.readouterr().err

    # the same command again continues the stopped run, figures included, to the fresh run's numbers
    assert router_decisive.main(argv) == 0
    assert f"resuming the stopped run in {staging} from its checkpoint (3 batches done)" in capsys.readouterr().err
    resumed = out / "router_decisive" / fresh.parent.relative_to(out / "router_decisive") / staging.name[1:-len(".partial")]
    assert not staging.exists() and (resumed / "figures" / "entropy_violin.png").is_file()
    assert _data_files(resumed) == _data_files(fresh)
    assert router_decisive.main([*argv, "--resume", str(resumed)]) == 2
    assert "this run finished; there is nothing to resume" in capsys.readouterr().err


def test_a_crashed_run_resumes_from_its_failed_folder(data, tmp_path, monkeypatch, capsys):
    """A crash keeps its folder as <run-id>.failed with the last checkpoint; the same command continues it there."""
    from common.analysis import routing

    out = tmp_path / "out"
    argv = [*_base(data), "--no-progress", "--no-figures", "--threads", "1", "--checkpoint_every", "0", "--out", str(out)]
    assert router_decisive.main([*argv, "--out", str(tmp_path / "reference")]) == 0
    calls = {"n": 0}
    update = routing.DecisivenessStats.update

    def crash_at_the_fifth(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("a planted crash")
        return update(self, *args, **kwargs)

    monkeypatch.setattr(routing.DecisivenessStats, "update", crash_at_the_fifth)
    with pytest.raises(RuntimeError, match="a planted crash"):
        router_decisive.main(argv)
    (failed,) = out.glob("router_decisive/*/*/*.failed")
    monkeypatch.setattr(routing.DecisivenessStats, "update", update)
    assert router_decisive.main(argv) == 0
    assert "(4 batches done)" in capsys.readouterr().err
    assert not failed.exists()
    finished = _results(out, "router_decisive")
    assert finished.name == failed.name[: -len(".failed")]
    assert _data_files(finished) == _data_files(_results(tmp_path / "reference", "router_decisive"))
