"""The out-of-memory back-off halves the batch until it fits, and re-raises other errors or at the minimum."""

from __future__ import annotations

import pytest
import torch

from common.cli.oom import is_out_of_memory, with_oom_backoff


def _fits_up_to(limit: int, calls: list[int]):
    def step(size: int) -> str:
        calls.append(size)
        if size > limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {size} GiB")
        return f"ran {size}"

    return step


def test_halves_until_it_fits():
    calls: list[int] = []
    messages: list[str] = []
    assert with_oom_backoff(_fits_up_to(20, calls), 128, say=messages.append) == (16, "ran 16")
    assert calls == [128, 64, 32, 16] and len(messages) == 3 and "batch size 128" in messages[0]


def test_gives_up_at_the_minimum_and_never_hides_other_errors():
    with pytest.raises(torch.cuda.OutOfMemoryError):
        with_oom_backoff(_fits_up_to(0, []), 8, minimum=2, say=lambda _: None)

    def broken(size: int):
        raise ValueError("not memory")

    with pytest.raises(ValueError):
        with_oom_backoff(broken, 8)
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory")) and not is_out_of_memory(RuntimeError("other"))


def test_a_script_that_runs_out_of_memory_says_which_flags_lower_it(tmp_path, capsys, monkeypatch):
    """Simulated CUDA OOM in the forward of router_metrics.py: exit 1, one error line naming the script's own
    memory flags, no traceback, and the run's folder kept as <run-id>.failed with the error in its run.json."""
    import json

    import router_metrics
    from common.model import MoEModel

    def forward(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(MoEModel, "forward", forward)
    data = tmp_path / "a.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "results"
    code = router_metrics.main(["--model", "random:olmoe", "--data", f"a={data}", "--num_tokens", "100",
                                "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith("router_metrics.py: error: out of memory (CUDA out of memory. Tried to allocate")
    assert "--batch_size" in err[-1] and "--stats_memory" in err[-1] and "--block_mb" not in err[-1]
    (failed,) = out.glob("router_metrics/*/*/*.failed")
    assert "OutOfMemoryError" in json.loads((failed / "run.json").read_text())["error"]


def test_other_errors_still_raise():
    from common.cli import ArgumentParser, run_main

    def body(args):
        raise ValueError("a bug, not a resource limit")

    with pytest.raises(ValueError):
        run_main(ArgumentParser(prog="x.py"), body, [])


@pytest.mark.parametrize("script", ["router_decisive", "router_stats", "router_metrics"])
def test_a_batch_that_does_not_fit_is_forwarded_in_parts_with_the_same_results(script, tmp_path, capsys,
                                                                                 monkeypatch):
    """A simulated CUDA OOM for forwards of more than 3 rows: the routing scripts cut their batches (8 rows) into
    parts of 2 rows, warn once, and write the same tables as a run where everything fits (counts exactly, float
    statistics to rounding)."""
    import importlib

    import pandas as pd

    from common.model import MoEModel

    module = importlib.import_module(script)
    data = tmp_path / "a.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    argv = ["--model", "random:olmoe", "--data", f"a={data}", "--num_tokens", "600", "--seq_len", "32",
            "--batch_size", "8", "--no-progress", "--layers", "0", "1", "--no-figures"]  # the tables are compared
    assert module.main([*argv, "--out", str(tmp_path / "fits")]) == 0
    capsys.readouterr()

    forward, attempts = MoEModel.forward, []

    def small_device(self, input_ids, *args, **kwargs):
        attempts.append(input_ids.shape[0])
        if input_ids.shape[0] > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(MoEModel, "forward", small_device)
    assert module.main([*argv, "--out", str(tmp_path / "parts")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "out of memory" in line]
    assert warnings == [f"{script}.py: warning: out of memory at 8 rows of 32 tokens: forwarding batches in parts "
                        "of 4 rows from here on",
                        f"{script}.py: warning: out of memory at 4 rows of 32 tokens: forwarding batches in parts "
                        "of 2 rows from here on"]
    assert attempts[:3] == [8, 4, 2] and set(attempts[3:]) <= {2, 1}  # later batches go straight to parts

    (fits,) = [p for p in (tmp_path / "fits").glob(f"{script}/*/*/*") if p.is_dir()]
    (parts,) = [p for p in (tmp_path / "parts").glob(f"{script}/*/*/*") if p.is_dir()]
    tables = sorted(p.name for p in fits.glob("*.csv"))
    assert tables and tables == sorted(p.name for p in parts.glob("*.csv"))
    for name in tables:
        expected, got = pd.read_csv(fits / name), pd.read_csv(parts / name)
        if name.startswith("indicator_correlation"):  # its shuffled control permutes within each forwarded part
            expected = expected.drop(columns=[c for c in expected.columns if "shuffled" in c])
            got = got.drop(columns=[c for c in got.columns if "shuffled" in c])
        pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-5, atol=1e-6, obj=name)
