"""tools/sweep.py: jobs are the product of models × layer sets × data; a re-run after a crash runs only what did not
finish; one job per GPU sees only its GPU."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import shutil
from pathlib import Path

import pytest

from tools import sweep

FAKE = '''
import json, os, sys
from pathlib import Path

import pytest
argv = sys.argv[1:]
model, out = argv[argv.index("--model") + 1], Path(argv[argv.index("--out") + 1])
with open(os.environ["SWEEP_LOG"], "a") as log:
    log.write(json.dumps({"argv": argv, "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\\n")
if model == "crash" and Path(os.environ["SWEEP_CRASH"]).exists():
    sys.exit("boom")
run = out / "fake" / model / str(len(list((out / "fake").glob("*/*"))) if (out / "fake").exists() else 0)
run.mkdir(parents=True)
(run / "run.json").write_text("{}")
print(f"results: {run}", file=sys.stderr)
'''


def _calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_resume_after_a_crash_runs_only_what_did_not_finish(tmp_path, monkeypatch, capsys):
    script, log, crash = tmp_path / "fake.py", tmp_path / "calls.jsonl", tmp_path / "crash-now"
    script.write_text(FAKE)
    crash.touch()
    monkeypatch.setenv("SWEEP_LOG", str(log))
    monkeypatch.setenv("SWEEP_CRASH", str(crash))
    argv = [str(script), "--models", "a", "crash", "b", "--layers", "all", "1 2", "--out", str(tmp_path / "out"),
            "--", "--num_tokens", "10"]
    assert sweep.main(argv) == 1  # the crashing job fails, the others are recorded
    first = _calls(log)
    assert len(first) == 6 and all(c["argv"][-2:] == ["--num_tokens", "10"] for c in first)
    assert {tuple(c["argv"][c["argv"].index("--layers") + 1 : c["argv"].index("--num_tokens")]) for c in first} == {
        ("all",), ("1", "2")}
    crash.unlink()
    assert sweep.main(argv) == 0
    second = _calls(log)[len(first):]
    assert sorted(c["argv"][1] for c in second) == ["crash", "crash"]  # only the failed jobs ran again
    assert sweep.main(argv) == 0 and len(_calls(log)) == len(first) + 2  # nothing left to do
    # A recorded run whose folder is gone is not "done".
    shutil.rmtree(tmp_path / "out" / "fake" / "a")
    assert sweep.main(argv) == 0
    assert sorted(c["argv"][1] for c in _calls(log)[len(first) + 2 :]) == ["a", "a"]
    assert "0 to run" in capsys.readouterr().out


def test_one_job_per_gpu(tmp_path, monkeypatch):
    script, log = tmp_path / "fake.py", tmp_path / "calls.jsonl"
    script.write_text(FAKE)
    monkeypatch.setenv("SWEEP_LOG", str(log))
    monkeypatch.setenv("SWEEP_CRASH", str(tmp_path / "never"))
    assert sweep.main([str(script), "--models", "a", "b", "c", "d", "--gpus", "0", "1", "--out", str(tmp_path / "o")]) == 0
    calls = _calls(log)
    assert len(calls) == 4 and {c["gpu"] for c in calls} <= {"0", "1"}
    assert sweep.main([str(script), "--models", "a", "b", "c", "d", "--dry-run", "--out", str(tmp_path / "o")]) == 0
    assert len(_calls(log)) == 4


def test_dry_run_checks_every_jobs_inputs_and_reads_no_weight(tmp_path, monkeypatch, capsys, saved_tiny_model):
    from common.model import load

    def refuse(spec):
        raise AssertionError(f"the dry run read the weights of {spec.model}")

    monkeypatch.setattr(load, "load_model_and_tokenizer", refuse)
    model, missing = saved_tiny_model("olmoe"), tmp_path / "no-such-model"
    text, gone = tmp_path / "a.txt", tmp_path / "gone.jsonl"
    text.write_text("the quick brown fox. " * 20)
    out = tmp_path / "out"
    argv = ["router_decisive.py", "--models", str(missing), str(model), "--layers", "1", "7", "--data", str(text),
            str(gone), "--out", str(out), "--dry-run", "--", "--num_tokens", "100"]
    capsys.readouterr()  # the fixture's saving progress bar
    assert sweep.main(argv) == 2
    captured = capsys.readouterr()
    no_model = f"--model {missing}: no such directory"
    no_data = f"--data '{gone}': no such file or folder, and not a preset (demo, olmoe, olmoe-pile, pile, moe-lens, router-study)"
    no_layer = "layer 7 does not exist: the model has 4 decoder layers (0..3); MoE layers: 0, 1, 2, 3"
    expected = []
    for name, model_problem in ((missing, no_model), (model, None)):
        for layer in ("1", "7"):
            for data in (text, gone):
                job = (f"router_decisive.py --model {name} --out {out} --no-progress --layers {layer} --data {data} "
                       "--num_tokens 100")
                problem = no_data if data == gone else model_problem or (no_layer if layer == "7" else None)
                expected.append(f"invalid: {job} -> {problem}" if problem else f"todo: {job}")
    assert captured.out.splitlines() == expected
    assert captured.err == "sweep: 7 of 8 job(s) would be refused; fix their inputs before running\n"
    assert not out.exists()  # a dry run writes nothing


def test_a_job_whose_data_has_no_token_fails_and_is_not_recorded(tmp_path, capsys):
    blank, out = tmp_path / "blank.txt", tmp_path / "out"
    blank.write_text("\n\n   \n")
    argv = ["router_decisive.py", "--models", "random:olmoe", "--data", str(blank), "--out", str(out), "--",
            "--num_tokens", "50", "--layers", "0"]
    assert sweep.main(argv) == 1
    report = capsys.readouterr().out
    assert (f"FAILED: router_decisive.py --model random:olmoe --out {out} --no-progress --data {blank} --num_tokens 50 "
            f"--layers 0 -> router_decisive.py: error: --data: domain 'blank' ({blank}) has no token to count") in report
    assert not (out / ".sweep").exists() and not list(out.rglob("run.json"))


def test_dry_run_lists_hub_inputs_as_unchecked_when_the_hub_is_unreachable(tmp_path, monkeypatch, capsys):
    from common import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "reachable", lambda: False)
    out, missing = tmp_path / "out", tmp_path / "no-such-model"
    argv = ["router_decisive.py", "--models", "allenai/OLMoE-1B-7B-0924", str(missing), "--data", "olmoe-pile", "--out",
            str(out), "--dry-run"]
    assert sweep.main(argv) == 2  # the missing folder is still invalid
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("todo: router_decisive.py --model allenai/OLMoE-1B-7B-0924 ")
    assert lines[0].endswith("(inputs the Hugging Face hub is unreachable from this machine; not checked: --model "
                             "allenai/OLMoE-1B-7B-0924, --data arxiv, --data github, --data wikipedia, --data books, "
                             "--data c4)")
    assert lines[1].startswith("invalid: ") and lines[1].endswith(f"--model {missing}: no such directory")
    assert not out.exists()


def _comparisons(out: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((out / "compare").rglob("run.json"))]


def _record_runs(out: Path, argv: list[str], data: str) -> set[str]:
    """The run folders the records of this sweep's jobs on `data` name."""
    found = sweep.jobs(str(sweep.ROOT / argv[0]), argv[argv.index("--models") + 1 : argv.index("--data")], [None],
                       [data], str(out), argv[argv.index("--") + 1 :])
    return {json.loads((out / ".sweep" / f"{job.key}.json").read_text())["run"] for job in found
            if (out / ".sweep" / f"{job.key}.json").is_file()}


def _in_process(job: sweep.Job, gpu: str | None) -> tuple[int, str]:
    """A job run by the script's own main() in this process (imports paid once: a job's process spends ~15 s
    importing torch and transformers on a shared 2-core box); its exit code and stderr, as sweep.execute gives."""
    module = importlib.import_module(Path(job.script).stem)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = module.main(list(job.argv))
    return code, stderr.getvalue()


@pytest.mark.slow  # real runs and comparisons of tiny models; the fast tests below cover the rest
def test_compare_makes_one_comparison_per_data_value_of_this_sweeps_runs(tmp_path, monkeypatch, capsys):
    """--compare: compare.py (run through `sweep.execute`, like a job) over the runs this sweep's jobs wrote, one comparison per --data
    value; another sweep's run of the same model on the same data (same .sweep folder) is left out; a failed job
    leaves the others compared and the exit code 1; a data value with one run is skipped with a note. The jobs and
    the comparisons run in-process here (the subprocess path is tested above)."""
    monkeypatch.setattr(sweep, "execute", _in_process)
    out, missing = tmp_path / "out", tmp_path / "no-such-model"
    tiny = ["--", "--num_tokens", "64", "--seq_len", "32", "--layers", "0"]
    # Another sweep first: one job, so nothing to compare; its run is of a model and data the next sweep also runs.
    other = ["router_decisive.py", "--models", "random:olmoe", "--data", "demo:code", "--out", str(out), "--compare",
             *tiny, "--seed", "1"]
    assert sweep.main(other) == 0
    report = capsys.readouterr().out
    assert "compare: data 'demo:code': 1 run(s); a comparison needs two or more, skipped" in report
    assert not (out / "compare").exists()
    (other_run,) = _record_runs(out, other, "demo:code")

    data = ["demo:code", "demo:math demo:legal"]
    argv = ["router_decisive.py", "--models", "random:olmoe", "random:mixtral", str(missing), "--data", *data,
            "--out", str(out), "--compare", *tiny]
    split = argv.index("--")
    assert sweep.main([*argv[:split], "--dry-run", *argv[split:]]) == 2  # the missing model's jobs are invalid
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("compare")]
    assert listed == [f"compare: data {d!r}: would compare the runs of 3 jobs (0 done, 3 to run) with compare.py, "
                      f"results under {out / 'compare'}" for d in data]
    assert not (out / "compare").exists()

    # The jobs first, without --compare; then the same sweep with --compare: its jobs are done (skipped), the
    # missing model's fail again, and the runs that exist are compared.
    without = [item for item in argv if item != "--compare"]
    assert sweep.main(without) == 1
    assert "\ncompare" not in capsys.readouterr().out and not (out / "compare").exists()
    assert sweep.main(argv) == 1  # the missing model's jobs failed: still 1, the comparisons made
    report = capsys.readouterr().out
    assert "sweep: 6 jobs, 4 already done, 2 to run" in report
    comparisons = _comparisons(out)
    assert len(comparisons) == 2
    for value in data:
        assert f"compare: data {value!r}: 1 of 3 job(s) failed; comparing the 2 runs that exist" in report
        runs = _record_runs(out, argv, value)
        assert len(runs) == 2 and other_run not in runs
        (made,) = [c for c in comparisons if {r["folder"] for r in c["runs"]} == runs]
        assert made["script"] == "compare" and made["compared_script"] == "router_decisive"
        assert sorted(r["model"] for r in made["runs"]) == ["random:mixtral", "random:olmoe"]
        line = next(line for line in report.splitlines() if line.startswith(f"compare: data {value!r}: 2 runs"))
        folder = Path(line.split("results: ", 1)[1])
        assert (folder / "run.json").is_file() and json.loads((folder / "run.json").read_text()) == made
        table = (folder / "comparison.csv").read_text()
        assert "random:mixtral" in table and "random:olmoe" in table
        assert list((folder / "figures").glob("*.png"))


def test_compare_is_refused_for_a_script_compare_does_not_compare(tmp_path, capsys):
    script = tmp_path / "fake.py"
    script.write_text(FAKE)
    with pytest.raises(SystemExit) as stop:
        sweep.main([str(script), "--models", "a", "b", "--compare", "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert "--compare: compare.py compares runs of router_decisive, " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_compare_skips_a_data_value_with_fewer_than_two_runs_and_keeps_the_exit_code(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "scripts"
    folder.mkdir()
    script, log, crash = folder / "router_decisive.py", tmp_path / "calls.jsonl", tmp_path / "crash-now"
    script.write_text(FAKE)  # a stand-in named as a script compare.py compares: nothing gets as far as comparing
    crash.touch()
    monkeypatch.setenv("SWEEP_LOG", str(log))
    monkeypatch.setenv("SWEEP_CRASH", str(crash))
    out = tmp_path / "out"
    assert sweep.main([str(script), "--models", "a", "crash", "--data", "x", "y z", "--out", str(out), "--compare"]) == 1
    report = capsys.readouterr().out.splitlines()
    assert [line for line in report if line.startswith("compare")] == [
        f"compare: data {d!r}: 1 run(s) (1 of 2 job(s) failed); a comparison needs two or more, skipped"
        for d in ("x", "y z")]
    assert len(_calls(log)) == 4 and not (out / "compare").exists()


# ------------------------------------------------------------------------------------------------ Slurm (submitit)


def _signal_task(job_id: str, signum: int) -> None:
    """Send `signum` to the task process of submitit local job `job_id` (found in /proc by its environment)."""
    import os

    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            command = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"SUBMITIT_LOCAL_JOB_ID={job_id}".encode() in environ and b"submitit.core._submit" in command:
            os.kill(int(proc.name), signum)
            return
    raise AssertionError(f"no task process of job {job_id}")


@pytest.mark.slow  # ~40 s: three job processes and three reference runs
def test_submitit_sweep_with_a_preempted_job_equals_an_uninterrupted_sweep(tmp_path):
    """The `--executor slurm` path on submitit's local executor (real processes): three jobs, the second pre-empted
    (its task sent submitit's pre-emption signal, as Slurm does) once it has saved a checkpoint; submitit requeues
    it, it resumes, and all three runs' data files equal the same commands run uninterrupted."""
    import signal
    import time

    import submitit

    import router_decisive

    data = {}
    for name, text in {"a": "alpha beta gamma delta. ", "b": "one two three four five. ", "c": "red green blue. "}.items():
        (tmp_path / f"{name}.txt").write_text(text * 3000)
        data[name] = f"{name}={tmp_path / f'{name}.txt'}"
    flags = ["--num_tokens", "12000", "--seq_len", "32", "--batch_size", "2", "--layers", "0", "--threads", "1",
             "--checkpoint_every", "0", "--no-figures"]
    out = tmp_path / "out"
    all_jobs = sweep.jobs("router_decisive.py", ["random:olmoe"], [None], list(data.values()), str(out), flags)

    executor = submitit.LocalExecutor(folder=out / ".sweep" / "submitit" / "%j")
    executor.update_parameters(timeout_min=10)
    submitted = sweep.submit(all_jobs, out, executor, stop_wait_s=60)
    deadline = time.monotonic() + 120
    while not list(out.glob("router_decisive/*/b/.*.partial/checkpoint/state.pt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(out.glob("router_decisive/*/b/.*.partial/checkpoint/state.pt")), "job b never checkpointed"
    _signal_task(submitted[1][1].job_id, signal.SIGUSR2)  # what Slurm does to a task it pre-empts (submitit's signal)
    assert sweep.wait_for(submitted) == 0

    for job, name in zip(all_jobs, data, strict=True):
        run = sweep.recorded_run(out, job)
        assert run is not None and run.parent.name == name
        info = json.loads((run / "run.json").read_text())
        assert ("resumed" in info) == (name == "b"), info.get("resumed")
        reference = tmp_path / "reference" / name
        argv = [a if a != str(out) else str(reference) for a in job.argv]
        assert router_decisive.main(argv) == 0
        (expected,) = reference.glob("router_decisive/*/*/*")
        for path in expected.glob("*.*"):
            if path.suffix in {".csv", ".npy"}:
                assert (run / path.name).read_bytes() == path.read_bytes(), (name, path.name)


def test_slurm_options_from_flags_over_a_toml_file_and_refusals(tmp_path, capsys, monkeypatch):
    config = tmp_path / "slurm.toml"
    config.write_text('partition = "gpu"\ntime = 30\nmem_gb = 64\n[additional]\naccount = "lab"\nqos = "high"\n')
    parser_args = ["router_decisive.py", "--models", "demo", "--executor", "slurm", "--out", str(tmp_path / "o")]

    def parameters(*extra):
        import argparse

        namespace = argparse.Namespace(slurm_config=str(config), partition=None, gpus_per_job=None, cpus_per_job=None,
                                       mem_gb=None, time=None, max_parallel=None, signal_delay_s=None,
                                       max_timeouts=None)
        for key, value in extra:
            setattr(namespace, key, value)
        return sweep.slurm_parameters(namespace)

    assert parameters(("time", 90), ("max_parallel", 4)) == {
        "timeout_min": 90, "gpus_per_node": 1, "cpus_per_task": 8, "tasks_per_node": 1, "nodes": 1,
        "slurm_signal_delay_s": 120, "slurm_max_num_timeout": 3, "slurm_partition": "gpu", "mem_gb": 64.0,
        "slurm_array_parallelism": 4, "slurm_additional_parameters": {"account": "lab", "qos": "high"}}
    config.write_text('partition = "gpu"\nwalltime = 30\n')
    with pytest.raises(SystemExit) as stop:
        sweep.main([*parser_args, "--slurm_config", str(config)])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == (f"sweep: error: --slurm_config {config}: unknown key(s) walltime (known: "
                                               f"{', '.join(sweep.SLURM_FLAGS)}, [additional])")
    monkeypatch.setattr(sweep.shutil, "which", lambda name: None)  # no Slurm here
    with pytest.raises(SystemExit) as stop:
        sweep.main(parser_args)
    assert stop.value.code == 2 and "no Slurm on this machine" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
