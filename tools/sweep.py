"""Run one script over models × layer sets × data presets: sequentially, one job per GPU, or on Slurm; resumable.

    uv run tools/sweep.py router_metrics.py --models allenai/OLMoE-1B-7B-0924 demo --layers all "1 7 15" \\
        --data olmoe pile --gpus 0 1 2 3 -- --num_tokens 100000
    uv run tools/sweep.py interv.py --models allenai/OLMoE-1B-7B-0924 --executor slurm --partition gpu --time 180 \\
        --data demo -- --layer 7 --num_tokens 20000
    uv run tools/sweep.py router_decisive.py --models demo random:mixtral --dry-run
    uv run tools/sweep.py router_decisive.py --models demo random:mixtral --data demo "demo:code demo:math" --compare

Every job is the script's own command line (its flags after `--` are passed to every job). A job that finishes is
recorded in `<out>/.sweep/<job key>.json` with the run folder it wrote; running the same sweep again skips every job
whose record and run folder exist, so a sweep killed halfway resumes without recomputing. A failed job is reported
and left unrecorded (the next sweep runs it again); the sweep's exit code is 1 if any job failed. A job stopped
halfway (pre-empted, timed out, killed) resumes from its own checkpoint when it runs again (the scripts'
`--checkpoint_every`).

`--executor slurm` submits the jobs not done as one Slurm array job through submitit (partition, GPUs, CPUs, memory,
time limit as flags or `--slurm_config FILE`) and waits for them; a job that Slurm pre-empts or that reaches its
time limit is told to stop (it saves its state after the batch in progress), requeued by submitit and resumes from
that checkpoint. Logs: `<out>/.sweep/submitit/` and `<out>/.sweep/logs/`.

`--dry-run` lists every job as done, todo or invalid, and checks each job's inputs without running it or reading a
weight: its flags and data specs (the script's own parser), its model (a folder that exists, a config that loads;
hub ids through the hub probe), its layers and `--seq_len` against the model's config. It exits with 2 if any job
is invalid. Where the hub cannot be reached (and HF_HUB_OFFLINE is not set), a job whose model or data only the hub
has is listed as todo with what could not be checked: an unreachable hub says nothing about the job itself. A script's own checks beyond those (an expert id, a prompt position) still run when the job starts.

`--compare` (for a script whose runs compare.py compares; anything else is refused before any job runs) then runs
compare.py over the run folders this sweep's jobs wrote (the `run` of their records; other sweeps' records in the same `.sweep`
folder are left out), one comparison per `--data` value, since runs on different data are not comparable. Each
comparison needs two runs or more; a data value with fewer is skipped with a note. When a job failed, the runs that
exist are still compared and the sweep says so; its exit code stays 1 (also when a comparison fails). Every sweep
with `--compare` writes new comparison folders, `<out>/compare/<models>/<script>/<run-id>/`, even when all its jobs
were already done. With `--dry-run` it lists the comparisons it would make.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from common.config import Config, ModelSpec
    from common.errors import InputError
    from common.model import LanguageModel

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a file (uv run tools/sweep.py): the dry run imports `common`
    sys.path.insert(0, str(ROOT))
_RESULTS_LINE = re.compile(r"^results: (.+)$", re.MULTILINE)


@dataclass(frozen=True)
class Job:
    script: str
    argv: tuple[str, ...]
    data: str | None = None  # the sweep's --data value of this job (None: the script's default); not in its key

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
                found.append(Job(script, tuple(argv + list(extra)), preset))
    return found


def _record(out: Path, job: Job) -> Path:
    return out / ".sweep" / f"{job.key}.json"


def recorded_run(out: Path, job: Job) -> Path | None:
    """The run folder the job's record names, if the record and the run's run.json exist; else None."""
    record = _record(out, job)
    if not record.is_file():
        return None
    try:
        run = Path(json.loads(record.read_text())["run"])
    except (ValueError, KeyError, TypeError):
        return None
    return run if (run / "run.json").is_file() else None


def completed(out: Path, job: Job) -> bool:
    return recorded_run(out, job) is not None


def execute(job: Job, gpu: str | None) -> tuple[int, str]:
    """Run the job's command line in its own process (seeing only `gpu`); its exit code and stderr."""
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    process = subprocess.run([sys.executable, job.script, *job.argv], cwd=ROOT, env=env, capture_output=True, text=True)
    return process.returncode, process.stderr


def run_job(job: Job, out: Path, gpu: str | None) -> tuple[bool, str]:
    """(succeeded, the job's last stderr line); on success the job is recorded as completed."""
    return finish_job(job, out, *execute(job, gpu))


def finish_job(job: Job, out: Path, returncode: int, stderr: str) -> tuple[bool, str]:
    """(succeeded, the run folder or the job's last stderr line); on success the job is recorded as completed."""
    lines = stderr.strip().splitlines()
    match = _RESULTS_LINE.search(stderr)
    if returncode != 0 or match is None:
        return False, lines[-1] if lines else f"exit code {returncode}"
    record = _record(out, job)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"job": job.describe(), "run": match.group(1).strip()}, indent=2) + "\n")
    return True, match.group(1).strip()


@functools.cache
def _script_module(script: str) -> ModuleType | None:
    """The script imported without running it (its `main` is guarded); None for a script that does not follow the
    project's layout (no `build_parser`): such a job's inputs are the script's own business."""
    path = Path(script)
    text = path.read_text(encoding="utf-8", errors="replace")
    if "def build_parser" not in text or 'if __name__ == "__main__"' not in text:
        return None
    spec = importlib.util.spec_from_file_location(f"_sweep_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the script look their module up there
    spec.loader.exec_module(module)
    return module


class Unchecked(Exception):
    """An input only the hub can confirm (a hub model or dataset), while the hub cannot be reached from here."""


class InputChecks:
    """The dry run's checks of each job's inputs, with each model's structure read once (config only)."""

    def __init__(self) -> None:
        self._models: dict[ModelSpec, LanguageModel | InputError] = {}  # the weightless model, or why there is none

    def problem(self, job: Job) -> str | None:
        """Why the job would be refused at once (the one line the script would print), or None."""
        from common import cli
        from common.errors import InputError

        module = _script_module(job.script)
        if module is None:
            return None
        parser = module.build_parser()  # a fresh one per job: `--config FILE` sets a parser's defaults
        try:
            args = parser.parse_args(list(job.argv))  # the flags, as the script reads them
            layers = getattr(args, "layers", None)
            if layers is None and getattr(args, "layer", None) is not None:  # scripts that take one --layer
                layers = [args.layer]
            config = cli.config(args, Path(job.script).stem, layers=layers)  # data specs checked here
            self._check_model(config)
        except InputError as err:
            return str(err)
        return None

    @staticmethod
    def _hub_inputs(config: Config) -> list[str]:
        """What of the job only the hub has: a hub model id (not shipped, random or on disk), hf: data sources."""
        from common.config import RANDOM_PREFIX, SHIPPED_MODELS
        from common.data import resolve_domains
        from common.model.config_facts import model_source

        found = []
        name = config.model.model
        if name not in SHIPPED_MODELS and not name.startswith(RANDOM_PREFIX) and isinstance(model_source(config.model), str):
            found.append(f"--model {name}")
        if config.data is not None:
            data = config.data
            domains = resolve_domains(list(data.sources), num_domains=data.num_domains, domains=data.domains)
            found += [f"--data {d.name}" for d in domains if d.source.startswith("hf:")]
        return found

    def _check_model(self, config: Config) -> None:
        """The model, its layers and --seq_len from its config and the data's hub sources; no weight is read."""
        from common.cli.pipeline import window_length
        from common.data import check_hub_sources, resolve_domains
        from common.errors import InputError
        from common.hub import offline_requested, reachable, unreachable_reason
        from common.model import MoEModel, inspect_model

        if not reachable() and not offline_requested() and (needs := self._hub_inputs(config)):
            # an unreachable hub says nothing about the job's inputs: the job may run fine where the hub is reachable
            raise Unchecked(f"{unreachable_reason()}; not checked: {', '.join(needs)}")
        if config.data is not None:
            data = config.data
            check_hub_sources(resolve_domains(list(data.sources), num_domains=data.num_domains, domains=data.domains))
        if config.model not in self._models:
            try:
                self._models[config.model] = inspect_model(config.model)
            except InputError as err:
                self._models[config.model] = err
        skeleton = self._models[config.model]
        if isinstance(skeleton, InputError):
            raise skeleton
        if isinstance(skeleton, MoEModel):
            skeleton.select(config.layers)  # also refuses a dense layer, naming the MoE ones
        else:  # a dense model: which scripts take one is theirs to say when the job starts
            for item in config.layers or ():
                if str(item).lower() != "all":
                    skeleton.resolve_layer(item)
        window_length(config.data, skeleton.context_length)


def dry_run(all_jobs: Sequence[Job], out: Path) -> int:
    """List every job as done, todo or invalid (with the reason); 2 if any is invalid."""
    checks = InputChecks()
    invalid = 0
    for job in all_jobs:
        if completed(out, job):
            print(f"done: {job.describe()}", flush=True)
            continue
        with warnings.catch_warnings():  # skipped demo domains and the like are the job's to say when it runs
            warnings.simplefilter("ignore")
            try:
                problem = checks.problem(job)
            except Unchecked as why:
                print(f"todo: {job.describe()} (inputs {why})", flush=True)
                continue
        print(f"invalid: {job.describe()} -> {problem}" if problem else f"todo: {job.describe()}", flush=True)
        invalid += problem is not None
    if invalid:
        print(f"sweep: {invalid} of {len(all_jobs)} job(s) would be refused; fix their inputs before running",
              file=sys.stderr)
    return 2 if invalid else 0


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


# ------------------------------------------------------------------------------------------------ Slurm (submitit)

SLURM_FLAGS = ("partition", "gpus_per_job", "cpus_per_job", "mem_gb", "time", "max_parallel", "signal_delay_s",
               "max_timeouts")


class ClusterJob:
    """A sweep job as submitit runs it on a cluster node: the script in a child process, its stderr appended to
    `<out>/.sweep/logs/<job key>.err`. On pre-emption or the time limit, submitit's signal calls `checkpoint`: the
    script is asked to stop (SIGTERM: it saves its state after the batch in progress) and the same job is requeued;
    when it starts again, the script finds its checkpoint and resumes. Returns the run folder; raises when the
    script fails (submitit reports the error)."""

    def __init__(self, job: Job, out: str, stop_wait_s: float) -> None:
        self.job, self.out, self.stop_wait_s = job, out, stop_wait_s
        self._process: subprocess.Popen | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_process": None}  # a process does not travel with the pickled job

    def __call__(self) -> str:
        log = Path(self.out) / ".sweep" / "logs" / f"{self.job.key}.err"
        log.parent.mkdir(parents=True, exist_ok=True)
        start = log.stat().st_size if log.exists() else 0
        with open(log, "a") as err:
            self._process = subprocess.Popen([sys.executable, self.job.script, *self.job.argv], cwd=ROOT,
                                             stdout=subprocess.DEVNULL, stderr=err)
            while self._process.poll() is None:  # polled, not waited: submitit's signal handler runs in this thread
                time.sleep(0.2)
        with open(log) as f:
            f.seek(start)
            stderr = f.read()
        ok, message = finish_job(self.job, Path(self.out), self._process.returncode, stderr)
        if not ok:
            raise RuntimeError(f"{self.job.describe()} failed: {message} (log: {log})")
        return message

    def checkpoint(self, *args, **kwargs):
        import submitit

        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)  # the script saves its state after the batch in progress and exits
            deadline = time.monotonic() + self.stop_wait_s
            while process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
        return submitit.helpers.DelayedSubmission(ClusterJob(self.job, self.out, self.stop_wait_s))


def _refuse(message: str) -> NoReturn:
    """One line on stderr, exit code 2, before any job is submitted."""
    print(f"sweep: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def slurm_parameters(args: argparse.Namespace) -> dict:
    """submitit's executor parameters from the sweep's Slurm flags, over those of `--slurm_config FILE` (TOML: the
    same names, and a table `[additional]` of any other sbatch option, e.g. account, qos, constraint)."""
    import tomllib

    settings: dict = {}
    if args.slurm_config:
        try:
            settings = tomllib.loads(Path(args.slurm_config).read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            _refuse(f"--slurm_config {args.slurm_config}: {err}")
        unknown = set(settings) - {*SLURM_FLAGS, "additional"}
        if unknown:
            _refuse(f"--slurm_config {args.slurm_config}: unknown key(s) {', '.join(sorted(unknown))} (known: "
                    f"{', '.join(SLURM_FLAGS)}, [additional])")
    for name in SLURM_FLAGS:
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    defaults = {"gpus_per_job": 1, "cpus_per_job": 8, "time": 240, "signal_delay_s": 120, "max_timeouts": 3}
    settings = {**defaults, **settings}
    parameters = {"timeout_min": int(settings["time"]), "gpus_per_node": int(settings["gpus_per_job"]),
                  "cpus_per_task": int(settings["cpus_per_job"]), "tasks_per_node": 1, "nodes": 1,
                  "slurm_signal_delay_s": int(settings["signal_delay_s"]), "slurm_max_num_timeout": int(settings["max_timeouts"])}
    if settings.get("partition"):
        parameters["slurm_partition"] = settings["partition"]
    if settings.get("mem_gb"):
        parameters["mem_gb"] = float(settings["mem_gb"])
    if settings.get("max_parallel"):
        parameters["slurm_array_parallelism"] = int(settings["max_parallel"])
    if settings.get("additional"):
        parameters["slurm_additional_parameters"] = dict(settings["additional"])
    return parameters


def submit_sweep(all_jobs: Sequence[Job], out: Path, executor, stop_wait_s: float) -> int:
    """The jobs not done yet, submitted through a submitit executor as one array job; waits for them, reporting each
    as it ends. Pre-empted jobs are requeued by submitit and resume from their checkpoints."""
    pending = [job for job in all_jobs if not completed(out, job)]
    print(f"sweep: {len(all_jobs)} jobs, {len(all_jobs) - len(pending)} already done, {len(pending)} to submit",
          flush=True)
    return wait_for(submit(pending, out, executor, stop_wait_s))


def submit(pending: Sequence[Job], out: Path, executor, stop_wait_s: float) -> list[tuple[Job, object]]:
    """(job, submitit job) pairs: `pending` submitted as one array job."""
    if not pending:
        return []
    with executor.batch():
        submitted = [(job, executor.submit(ClusterJob(job, str(out), stop_wait_s))) for job in pending]
    print(f"sweep: submitted {len(submitted)} job(s): {', '.join(str(j.job_id) for _, j in submitted)}; logs in "
          f"{out / '.sweep'}", flush=True)
    return submitted


def wait_for(submitted: Sequence[tuple[Job, object]]) -> int:
    """Waits for every submitted job, reporting each; 1 if any failed."""
    failures = 0
    for job, handle in submitted:
        try:
            message = handle.result()
            print(f"done: {job.describe()} -> {message}", flush=True)
        except Exception as err:  # the job's own error, raised again by submitit; the others go on
            failures += 1
            lines = str(err).strip().splitlines()
            print(f"FAILED: {job.describe()} -> {lines[-1] if lines else repr(err)}", flush=True)
    if failures:
        print(f"sweep: {failures} job(s) failed; run the same command again to retry them", file=sys.stderr)
    return 1 if failures else 0


def make_executor(args: argparse.Namespace, out: Path):
    """submitit's executor for `--executor slurm` (or `submitit-local`: the same path on this machine's processes)."""
    try:
        import submitit
    except ImportError:
        _refuse("--executor slurm needs the submitit package (uv sync installs it)")
    folder = out / ".sweep" / "submitit" / "%j"
    if args.executor == "submitit-local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=int(args.time or 240))
        return executor
    parameters = slurm_parameters(args)  # a bad --slurm_config is refused anywhere, Slurm or not
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        _refuse("--executor slurm: no Slurm on this machine (sbatch/srun not found); submit from a login node of "
                "the cluster, or rehearse here with --executor submitit-local")
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(**parameters)
    return executor


def comparable_scripts() -> tuple[str, ...] | None:
    """The scripts whose runs compare.py compares (its SCRIPTS), or None where it does not say."""
    spec = importlib.util.spec_from_file_location("_sweep_compare", ROOT / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # a light import: compare.py imports pandas and the figures only when it runs
    scripts = getattr(module, "SCRIPTS", None)
    return tuple(scripts) if scripts else None


def _by_data(all_jobs: Sequence[Job]) -> dict[str | None, list[Job]]:
    """The sweep's jobs grouped by their --data value, in the order the values were given."""
    groups: dict[str | None, list[Job]] = {}
    for job in all_jobs:
        groups.setdefault(job.data, []).append(job)
    return groups


def _data_name(data: str | None) -> str:
    return f"data {data!r}" if data is not None else "the script's default data"


def dry_run_comparisons(all_jobs: Sequence[Job], out: Path) -> None:
    """What --compare would do after the sweep: one comparison per --data value with two jobs or more."""
    for data, group in _by_data(all_jobs).items():
        done = sum(completed(out, job) for job in group)
        if len(group) < 2:
            print(f"compare: {_data_name(data)}: {len(group)} job; a comparison needs two runs or more, none would "
                  "be made", flush=True)
            continue
        print(f"compare: {_data_name(data)}: would compare the runs of {len(group)} jobs ({done} done, "
              f"{len(group) - done} to run) with compare.py, results under {out / 'compare'}", flush=True)


def run_comparisons(all_jobs: Sequence[Job], out: Path) -> int:
    """compare.py over the run folders this sweep's jobs recorded, one comparison per --data value; the number of
    comparisons that failed. A value with fewer than two runs is skipped with a note."""
    failed = 0
    for data, group in _by_data(all_jobs).items():
        runs = [run for run in (recorded_run(out, job) for job in group) if run is not None]
        name = _data_name(data)
        missing = len(group) - len(runs)
        failed_jobs = f"{missing} of {len(group)} job(s) failed" if missing else ""
        if len(runs) < 2:
            print(f"compare: {name}: {len(runs)} run(s){f' ({failed_jobs})' if missing else ''}; a comparison needs "
                  "two or more, skipped", flush=True)
            continue
        if missing:
            print(f"compare: {name}: {failed_jobs}; comparing the {len(runs)} runs that exist", flush=True)
        # compare.py run like a job (its own process, from the repository root)
        returncode, stderr = execute(Job(str(ROOT / "compare.py"), (*map(str, runs), "--out", str(out))), None)
        match = _RESULTS_LINE.search(stderr)
        lines = stderr.strip().splitlines()
        for line in lines:  # compare.py's warnings (different --num_tokens, ...) reach the user as they are
            if not _RESULTS_LINE.match(line) and (returncode == 0 or line != lines[-1]):
                print(line, file=sys.stderr, flush=True)
        if returncode != 0 or match is None:
            failed += 1
            reason = lines[-1] if lines else f"exit code {returncode}"
            print(f"compare FAILED: {name}: {len(runs)} runs -> {reason}", flush=True)
            continue
        print(f"compare: {name}: {len(runs)} runs -> results: {match.group(1).strip()}", flush=True)
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        extra, argv = argv[argv.index("--") + 1 :], argv[: argv.index("--")]
    paragraphs = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(description=paragraphs[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="examples:\n" + "\n\n".join([paragraphs[1], paragraphs[2], paragraphs[4]]))
    parser.add_argument("script", help="the script to run, e.g. router_metrics.py")
    parser.add_argument("--models", nargs="+", required=True, help="--model of each job")
    parser.add_argument("--layers", nargs="+", default=None, help="layer sets, each one string: 'all' '1 7 15'")
    parser.add_argument("--data", nargs="+", default=None, help="--data of each job (a preset, or sources in one string)")
    parser.add_argument("--out", default="results", help="results root of every job (and of the sweep's records)")
    parser.add_argument("--gpus", nargs="+", default=None, help="run one job per listed GPU at a time")
    parser.add_argument("--executor", choices=("local", "slurm", "submitit-local"), default="local",
                        help="local: this machine, one job per --gpus entry at a time; slurm: one Slurm array job "
                        "through submitit (pre-empted or timed-out jobs are requeued and resume from their "
                        "checkpoints); submitit-local: the slurm path on this machine's processes, to rehearse")
    slurm = parser.add_argument_group("slurm", "with --executor slurm (also read from --slurm_config FILE, TOML with "
                                      "these names and an [additional] table of other sbatch options)")
    slurm.add_argument("--partition", default=None, help="Slurm partition")
    slurm.add_argument("--gpus_per_job", type=int, default=None, help="GPUs per job (default 1)")
    slurm.add_argument("--cpus_per_job", type=int, default=None, help="CPU cores per job (default 8)")
    slurm.add_argument("--mem_gb", type=float, default=None, help="memory per job in GB (default: the partition's)")
    slurm.add_argument("--time", type=int, default=None, metavar="MINUTES", help="time limit per job (default 240)")
    slurm.add_argument("--max_parallel", type=int, default=None, help="most jobs of the array running at once")
    slurm.add_argument("--signal_delay_s", type=int, default=None,
                       help="seconds before the time limit at which a job is told to stop and save (default 120)")
    slurm.add_argument("--max_timeouts", type=int, default=None,
                       help="times a job may hit its time limit and be requeued (default 3; pre-emptions do not count)")
    slurm.add_argument("--slurm_config", metavar="FILE", default=None, help="TOML file of the options above")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the jobs as done, todo or invalid (each job's flags, data, model, layers and "
                        "--seq_len checked, no weight read), run nothing; exit code 2 if any is invalid")
    parser.add_argument("--compare", action="store_true",
                        help="after the jobs, run compare.py over the runs they wrote, one comparison per --data "
                        "value (two runs or more each); with --dry-run, list the comparisons it would make")
    args = parser.parse_args(argv)
    script = str(ROOT / args.script) if not Path(args.script).is_absolute() else args.script
    if not Path(script).is_file():
        parser.error(f"no such script: {args.script}")
    if args.compare and (scripts := comparable_scripts()) is not None and Path(script).stem not in scripts:
        parser.error(f"--compare: compare.py compares runs of {', '.join(scripts)}, not of {Path(script).name}")
    out = Path(args.out)
    found = jobs(script, args.models, args.layers or [None], args.data or [None], str(out), extra)
    if args.dry_run:
        code = dry_run(found, out)
        if args.compare:
            dry_run_comparisons(found, out)
        return code
    if args.executor == "local":
        code = sweep(found, out, args.gpus)
    else:
        if args.gpus:
            parser.error("--gpus is for --executor local; Slurm gives each job --gpus_per_job GPUs")
        executor = make_executor(args, out)
        code = submit_sweep(found, out, executor, stop_wait_s=max(10, (args.signal_delay_s or 120) - 30))
    if args.compare and run_comparisons(found, out):
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
