"""tools/sweep.py: jobs are the product of models × layer sets × data; a re-run after a crash runs only what did not
finish; one job per GPU sees only its GPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tools import sweep

FAKE = '''
import json, os, sys
from pathlib import Path
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
