"""Run one script over models × layer sets × data presets, sequentially or one job per GPU, resuming after a crash.

    uv run tools/sweep.py router_metrics.py --models allenai/OLMoE-1B-7B-0924 demo --layers all "1 7 15" \\
        --data olmoe pile --gpus 0 1 2 3 -- --num_tokens 100000
    uv run tools/sweep.py router_decisive.py --models demo random:mixtral --dry-run

Every job is the script's own command line (its flags after `--` are passed to every job). A job that finishes is
recorded in `<out>/.sweep/<job key>.json` with the run folder it wrote; running the same sweep again skips every job
whose record and run folder exist, so a sweep killed halfway resumes without recomputing. A failed job is reported
and left unrecorded (the next sweep runs it again); the sweep's exit code is 1 if any job failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_RESULTS_LINE = re.compile(r"^results: (.+)$", re.MULTILINE)


@dataclass(frozen=True)
class Job:
    script: str
    argv: tuple[str, ...]

    @property
    def key(self) -> str:
        return hashlib.sha1("\0".join((Path(self.script).name, *self.argv)).encode()).hexdigest()[:16]

    def describe(self) -> str:
        return " ".join([Path(self.script).name, *self.argv])


def jobs(script: str, models: Sequence[str], layer_sets: Sequence[str | None], data: Sequence[str | None],
         out: str, extra: Sequence[str]) -> list[Job]:
    found = []
    for model in models:
        for layers in layer_sets:
            for preset in data:
                argv = ["--model", model, "--out", out, "--no-progress"]
                if layers is not None:
                    argv += ["--layers", *layers.split()]
                if preset is not None:
                    argv += ["--data", *preset.split()]
                found.append(Job(script, tuple(argv + list(extra))))
    return found


def _record(out: Path, job: Job) -> Path:
    return out / ".sweep" / f"{job.key}.json"


def completed(out: Path, job: Job) -> bool:
    record = _record(out, job)
    if not record.is_file():
        return False
    try:
        run = Path(json.loads(record.read_text())["run"])
    except (ValueError, KeyError):
        return False
    return (run / "run.json").is_file()


def run_job(job: Job, out: Path, gpu: str | None) -> tuple[bool, str]:
    """(succeeded, the job's last stderr line); on success the job is recorded as completed."""
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    process = subprocess.run([sys.executable, job.script, *job.argv], cwd=ROOT, env=env, capture_output=True, text=True)
    lines = process.stderr.strip().splitlines()
    match = _RESULTS_LINE.search(process.stderr)
    if process.returncode != 0 or match is None:
        return False, lines[-1] if lines else f"exit code {process.returncode}"
    record = _record(out, job)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"job": job.describe(), "run": match.group(1).strip()}, indent=2) + "\n")
    return True, match.group(1).strip()


def sweep(all_jobs: Sequence[Job], out: Path, gpus: Sequence[str] | None) -> int:
    pending = [job for job in all_jobs if not completed(out, job)]
    print(f"sweep: {len(all_jobs)} jobs, {len(all_jobs) - len(pending)} already done, {len(pending)} to run", flush=True)
    todo: queue.Queue[Job] = queue.Queue()
    for job in pending:
        todo.put(job)
    failures: list[str] = []
    lock = threading.Lock()

    def worker(gpu: str | None) -> None:
        while True:
            try:
                job = todo.get_nowait()
            except queue.Empty:
                return
            ok, message = run_job(job, out, gpu)
            with lock:
                where = f" [GPU {gpu}]" if gpu is not None else ""
                print(f"{'done' if ok else 'FAILED'}{where}: {job.describe()} -> {message}", flush=True)
                if not ok:
                    failures.append(job.describe())

    threads = [threading.Thread(target=worker, args=(gpu,)) for gpu in (gpus or [None])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        print(f"sweep: {len(failures)} job(s) failed; run the same command again to retry them", file=sys.stderr)
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        extra, argv = argv[argv.index("--") + 1 :], argv[: argv.index("--")]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="examples:\n" + __doc__.split("\n\n")[1] + "\n\n" + __doc__.split("\n\n")[2])
    parser.add_argument("script", help="the script to run, e.g. router_metrics.py")
    parser.add_argument("--models", nargs="+", required=True, help="--model of each job")
    parser.add_argument("--layers", nargs="+", default=None, help="layer sets, each one string: 'all' '1 7 15'")
    parser.add_argument("--data", nargs="+", default=None, help="--data of each job (a preset, or sources in one string)")
    parser.add_argument("--out", default="results", help="results root of every job (and of the sweep's records)")
    parser.add_argument("--gpus", nargs="+", default=None, help="run one job per listed GPU at a time")
    parser.add_argument("--dry-run", action="store_true", help="list the jobs and whether each is done, run nothing")
    args = parser.parse_args(argv)
    script = str(ROOT / args.script) if not Path(args.script).is_absolute() else args.script
    if not Path(script).is_file():
        parser.error(f"no such script: {args.script}")
    out = Path(args.out)
    found = jobs(script, args.models, args.layers or [None], args.data or [None], str(out), extra)
    if args.dry_run:
        for job in found:
            print(f"{'done' if completed(out, job) else 'todo'}: {job.describe()}")
        return 0
    return sweep(found, out, args.gpus)


if __name__ == "__main__":
    sys.exit(main())
