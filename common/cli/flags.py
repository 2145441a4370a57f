"""Shared command-line flags and the `main(argv)` wrapper of every script.

Light on purpose: nothing here imports torch or transformers, so `--help` and every flag-level error answer in
well under a second; scripts import their heavy modules inside `run`, after the flags are validated.

Flags of several words take '-' or '_' between their words (the declared spelling is shown, the other is an
alias; see `ArgumentParser`); `--out` is checked (a folder, writable) with the flags; `--threads N` sets torch's CPU
threads for the run.

Bad input anywhere (a flag, a layer, a model path, a data file) raises `InputError`; `run_main` turns it into one
line on stderr and exit code 2, with no traceback and no results folder left behind. Ctrl-C prints one line and
exits with 130, leaving nothing behind either.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import re
import shutil
import signal
import sys
import tempfile
import textwrap
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from common import stops
from common.config import (
    DTYPES,
    PROJECT_ROOT,
    SHIPPED_MODELS,
    Config,
    DataSpec,
    ModelSpec,
    RunSpec,
    default_model,
)
from common.errors import InputError

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports errors as `InputError` (one line, exit 2) instead of usage + message, and reads
    `--config FILE` (TOML, the flags' own names as keys) as defaults that command-line flags override.

    Every long flag of several words is accepted with '-' and with '_' between its words (`--num_tokens` and
    `--num-tokens`, `--no-progress` and `--no_progress`), on the command line and as a TOML key: the spelling the
    script declares is the one --help, usage and error messages show; the other is registered as an alias at parse
    time, so flags added through argument groups get one too. An unknown flag or key is answered with the closest
    declared one."""

    def error(self, message: str):  # type: ignore[override]
        raise InputError(message)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        argv = list(sys.argv[1:] if args is None else args)
        self._add_spelling_aliases()
        config_file = _config_option(argv)
        if config_file is not None:
            self._apply_config(config_file)
        try:
            parsed, unknown = self.parse_known_args(argv, namespace)
        except InputError as err:
            # argparse reports a missing required flag before unknown ones, yet a typo is often why it is missing
            # ('--api_bse URL'): name the typo too
            typos = self._unknown_options(argv)
            if typos and str(err).startswith(("the following arguments are required", "one of the arguments")):
                raise InputError(f"{err}; {self._unrecognized(typos)}") from None
            raise
        if unknown:
            self.error(self._unrecognized(unknown))
        return parsed

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self._add_spelling_aliases()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        text = super().format_help()
        if any(_other_spellings(option) for option in self._declared_long_options()):
            text += "\n" + textwrap.fill(SPELLING_NOTE, width=max(shutil.get_terminal_size().columns - 2, 40)) + "\n"
        return text

    def _add_spelling_aliases(self) -> None:
        """Map each long flag's other spelling to its action. Only the parser's option table learns the alias, not
        the action's `option_strings`, so help, usage and errors keep the declared spelling; a spelling that is
        itself declared (by any flag) is left alone."""
        for action in self._actions:
            for option in action.option_strings:
                for alias in _other_spellings(option):
                    self._option_string_actions.setdefault(alias, action)

    def _get_option_tuples(self, option_string: str) -> list[tuple]:
        # A prefix ('--batch') matches a flag and its alias ('--batch_size', '--batch-size'): one action, so not
        # ambiguous. The declared spelling comes first in the option table, so it is the one kept.
        by_action: dict[int, tuple] = {}
        for match in super()._get_option_tuples(option_string):
            by_action.setdefault(id(match[0]), match)
        return list(by_action.values())

    def _declared_long_options(self) -> list[str]:
        return [option for action in self._actions for option in action.option_strings if option.startswith("--")]

    def _unknown_options(self, argv: Sequence[str]) -> list[str]:
        """The long flags of `argv` no declared flag, alias or unambiguous prefix of one accounts for."""
        words = argv[: argv.index("--")] if "--" in argv else argv
        return [item for item in words if item.startswith("--")
                and item.split("=", 1)[0] not in self._option_string_actions
                and len(self._get_option_tuples(item)) != 1]

    def _unrecognized(self, unknown: Sequence[str]) -> str:
        """argparse's message, plus the closest declared flag of each unknown one."""
        guesses = []
        for item in unknown:
            name = item.split("=", 1)[0]
            if name.startswith("--") and name != "--":
                closest = _closest(name, self._declared_long_options())
                if closest is not None:
                    guesses.append((name, closest))
        message = f"unrecognized arguments: {' '.join(unknown)}"
        if len(guesses) == 1:
            return f"{message}; did you mean {guesses[0][1]}?"
        if guesses:
            return f"{message}; did you mean {', '.join(f'{closest} (for {name})' for name, closest in guesses)}?"
        return message

    def _apply_config(self, path: str) -> None:
        import tomllib

        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except OSError as err:
            raise InputError(f"--config {path}: {err.strerror or err}") from None
        except tomllib.TOMLDecodeError as err:
            raise InputError(f"--config {path}: not valid TOML ({err})") from None
        actions = {a.dest: a for a in self._actions
                   if a.dest not in ("help", "config", "list") and a.default is not argparse.SUPPRESS}
        for key, value in values.items():
            dest = key.replace("-", "_")
            by_flag = self._option_string_actions.get(f"--{key}")  # declared spellings and their aliases
            if by_flag not in actions.values():
                by_flag = None
            action = actions.get(dest) or by_flag
            if action is None:
                keys = [option[2:] for a in actions.values() for option in a.option_strings if option.startswith("--")]
                closest = _closest(key, keys)
                hint = f"; did you mean {closest}?" if closest else " (keys are the flags' names, e.g. num_tokens)"
                raise InputError(f"--config {path}: unknown key '{key}'{hint}")
            converted = _config_value(action, value, f"--config {path}: {key}")
            if action.nargs == 0 and action is by_flag and dest != action.dest:  # `no-progress = true` = progress off
                converted = not converted if action.const is False else converted
            self.set_defaults(**{action.dest: converted})
            action.required = False  # given by the file; a flag on the command line still overrides it
            for group in self._mutually_exclusive_groups:
                if action in group._group_actions:
                    group.required = False


SPELLING_NOTE = ("A flag of several words takes '-' or '_' between them, whichever is shown above, on the command line "
                 "and as a --config key.")


def _other_spellings(option: str) -> list[str]:
    """'--num_tokens' -> ['--num-tokens']; '--no-progress' -> ['--no_progress']; short and one-word flags: none."""
    if not option.startswith("--"):
        return []
    words = option[2:]
    return sorted({f"--{words.replace('-', '_')}", f"--{words.replace('_', '-')}"} - {option})


def _closest(name: str, candidates: Sequence[str]) -> str | None:
    """The candidate most like `name`, compared without leading dashes, in lower case and with '-' read as '_' (so a
    typo is matched whichever spelling it used); None when nothing is close."""

    def plain(text: str) -> str:
        return text.lstrip("-").lower().replace("-", "_")

    by_plain = {plain(candidate): candidate for candidate in reversed(candidates)}  # first declared wins a tie
    found = difflib.get_close_matches(plain(name), list(by_plain), n=1)
    return by_plain[found[0]] if found else None


def _config_option(argv: Sequence[str]) -> str | None:
    for i, item in enumerate(argv):
        if item == "--config":
            if i + 1 >= len(argv):
                raise InputError("argument --config: expected one argument")
            return argv[i + 1]
        if item.startswith("--config="):
            return item.split("=", 1)[1]
    return None


def _config_value(action: argparse.Action, value, where: str):
    """A TOML value checked and converted exactly as the flag's own argument would be."""
    if action.nargs == 0:  # store_true / store_false switches: the value of the flag's destination
        if not isinstance(value, bool):
            raise InputError(f"{where}: expected true or false")
        return value
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    items = value if isinstance(value, list) else [value]
    if not many and isinstance(value, list):
        raise InputError(f"{where}: expected a single value, got a list")
    converted = []
    for item in items:
        text = str(item).lower() if isinstance(item, bool) else str(item)
        try:
            item = action.type(text) if action.type is not None else text
        except (argparse.ArgumentTypeError, ValueError) as err:
            raise InputError(f"{where}: {err}") from None
        if action.choices is not None and item not in action.choices:
            raise InputError(f"{where}: invalid choice {item!r} (choose from {', '.join(map(str, action.choices))})")
        converted.append(item)
    return converted if many else converted[0]


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown for valued flags only: an on/off switch's default says nothing ('--no-progress (default: True)')."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if isinstance(action.default, bool) or action.default is None or action.nargs == 0:
            return action.help or ""
        return super()._get_help_string(action)


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= low (the flag is named by argparse in the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low} (got {value})")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive (got {text})")
    return value


def open_fraction(text: str) -> float:
    """A number strictly between 0 and 1 (a test fraction, a false discovery rate)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1 (got {text})")
    return value


def _device(text: str) -> str:
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"'{text}' is not a device: auto, cpu, cuda, cuda:N or mps")
    return text


def output_root(text: str) -> str:
    """An argparse type for `--out`: a folder that exists or can be created, and can be written in. Checked with the
    flags, before torch is imported and the model and data are set up, instead of failing when the run first writes."""
    path = Path(text)
    existing = path  # the nearest part of the path that exists: --out itself, or the folder it would be created in
    while not (existing.exists() or existing.is_symlink()) and existing.parent != existing:
        existing = existing.parent
    shown = str(existing) if str(existing) != "." else f"the current folder ({Path.cwd()})"
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{shown} is a file, not a folder")
    try:
        _try_writing_in(existing)
    except OSError as err:
        reason = err.strerror or str(err)
        if existing == path:
            raise argparse.ArgumentTypeError(f"{shown} is not writable ({reason})") from None
        raise argparse.ArgumentTypeError(f"cannot create {text}: {shown} is not writable ({reason})") from None
    return text


def _try_writing_in(folder: Path) -> None:
    """Create and remove a file in `folder` (OSError if refused). Not `os.access`: it says yes to root, while root's
    writes can still fail (a read-only mount, NFS root squashing, a full disk)."""
    descriptor, name = tempfile.mkstemp(prefix=".moescope-write-check-", dir=folder)
    os.close(descriptor)
    os.unlink(name)


class _ListAction(argparse.Action):
    """`--list`: data presets with their sources, shipped models and supported architectures, then exit."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(listing())
        parser.exit(0)


def listing() -> str:
    from common.data.presets import PRESETS, PROVENANCE  # imported only when asked: --list is rare
    from common.model import moe_model_types

    lines = ["data presets (--data NAME; --domains / --num_domains pick among their domains); each domain's source, "
             "then whether its texts are exactly the study's or a stand-in:"]
    lines.append("  demo: offline corpus shipped with the project (code, prose, legal, bible, french, math)")
    for name, domains in PRESETS.items():
        lines.append(f"  {name}:")
        for domain, source in domains:
            lines.append(f"    {domain}: {source}")
            if (name, domain) in PROVENANCE:
                lines.append(f"      {PROVENANCE[(name, domain)]}")
    lines.append("shipped models (--model NAME, offline):")
    lines.extend(f"  {name}: {path}" for name, path in SHIPPED_MODELS.items())
    lines.append("random models (--model random:<model_type>, tiny and offline), one per MoE architecture:")
    lines.extend(f"  {model_type}" for model_type in moe_model_types())
    lines.append("any hub id or local folder of these architectures works too (--model ORG/NAME or PATH).")
    return "\n".join(lines)


def base_parser(description: str, *, layers: bool = True, data: bool = True) -> ArgumentParser:
    """A parser with the flags every script shares; scripts add their own to it.

    Its program name is the calling script's file name, also when `main(argv)` runs in another process's
    interpreter (the tests), so errors and run.json name the script, not the host program.
    """
    caller = Path(sys._getframe(1).f_code.co_filename)
    prog = caller.name if caller.suffix == ".py" and caller.parent == PROJECT_ROOT else None
    parser = ArgumentParser(prog=prog, description=description, formatter_class=_Formatter)
    parser.add_argument("--list", action=_ListAction, help="list data presets, shipped models and architectures, then exit")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="TOML file of flag values (keys = flag names, e.g. num_tokens = 100000, layers = [1, 7]); "
                        "flags given on the command line override it")
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default=default_model(),
        help="'demo' (shipped, offline), 'random:<model_type>' (tiny random MoE of any transformers architecture), "
        "a local directory, or a hub id",
    )
    model.add_argument("--revision", default=None, help="hub branch, tag or commit of --model (hub ids), or a shipped checkpoint of demo: step100 step500 step1000 "
                       "step2000 (main = the shipped model)")
    model.add_argument("--dtype", default="auto", choices=DTYPES, help="auto = bfloat16 on CUDA, float32 on CPU")
    model.add_argument("--device", default="auto", type=_device, help="auto = cuda if available, else cpu")
    model.add_argument("--device_map", default=None, choices=("auto",),
                       help="'auto' spreads a model too large for one GPU over all GPUs (then CPU memory, then disk)")
    model.add_argument("--max_memory", nargs="+", default=None, type=_memory_limit, metavar="DEVICE=SIZE",
                       help="with --device_map auto: the most each device may hold, e.g. 0=20GiB 1=20GiB cpu=64GiB; "
                       "what does not fit goes to --offload_folder")
    model.add_argument("--offload_folder", default=None, metavar="DIR",
                       help="with --device_map auto: where weights that fit no device are kept (disk offload)")
    model.add_argument("--trust_remote_code", action="store_true", help="allow the model repository's own code")
    if layers:
        parser.add_argument(
            "--layers", "--layer", "-l", dest="layers", nargs="+", default=None, metavar="L",
            help="0-based decoder-layer indices (negatives count from the end) or 'all'; default: every MoE layer",
        )
    if data:
        group = parser.add_argument_group("data")
        group.add_argument(
            "--data", nargs="+", default=["demo"],
            help="a preset (demo, olmoe, pile, moe-lens, router-study; see --list) or sources [name=]SOURCE: "
            "hf:ID[:CONFIG][:SPLIT][#FIELD][?key=value], a .txt/.jsonl/.json/.parquet/.csv file, glob or folder, demo:<domain>",
        )
        group.add_argument("--domains", nargs="+", default=None, help="use only these domains of the preset")
        group.add_argument("--num_domains", type=at_least(1), default=None, help="use the first N domains of the preset")
        group.add_argument("--num_tokens", type=at_least(1), default=10_000,
                           help="tokens counted per domain (padding and specials never count); the demo's smallest training split (french) holds ~14.8k")
        group.add_argument("--seq_len", type=at_least(2), default=None, help="window length; default min(512, the model's context)")
        group.add_argument("--batch_size", type=at_least(1), default=16, help="windows per forward pass")
        group.add_argument("--keep-special", dest="keep_special", action="store_true", help="count BOS/special tokens too")
        group.add_argument("--pack", action="store_true", help="let windows cross document boundaries")
        group.add_argument("--cache_dir", metavar="DIR", default=None,
                           help="where https:// data files are downloaded once (default: <HF_HOME>/moescope/urls)")
        resume = parser.add_argument_group(
            "checkpoints", "a stopped run (SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2: the state after the batch in progress is "
            "saved; SIGKILL or a crash: the last checkpoint) continues where it stopped when the same command runs "
            "again, to results identical to an uninterrupted run's")
        resume.add_argument("--checkpoint_every", type=_non_negative_float, default=10.0, metavar="MINUTES",
                            help="save the streaming state (accumulators or sample, data position, RNGs) in the run's "
                            "staging folder at most this often; 0 = after every batch")
        resume.add_argument("--resume", metavar="RUN_FOLDER", default=None,
                            help="continue this stopped run (its .<run-id>.partial or <run-id>.failed folder); default: "
                            "the newest stopped run of the same command under --out, if any")
        resume.add_argument("--no-resume", dest="fresh", action="store_true",
                            help="start afresh even when a stopped run of the same command exists")
    parser.add_argument("--seed", type=int, default=0, help="seed of data order, sampling and random models")
    parser.add_argument("--out", default="results", type=output_root,
                        help="root folder of run outputs (created if missing; refused at once if a file or not writable)")
    parser.add_argument("--threads", type=at_least(1), default=None, metavar="N",
                        help="CPU threads torch may use (torch.set_num_threads); default: torch's own, one per core. "
                        "On a shared box give your share of the cores: threads beyond the free cores wait on each other")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    parser.add_argument("--no-figures", dest="figures", action="store_false",
                        help="write the data files only (tables, arrays, JSON), no figures/: for batch runs whose "
                        "numbers are read by compare.py or your own code")
    parser.add_argument("--wandb", metavar="PROJECT", type=_wandb_project, default=None,
                        help="also log the finished run (metadata, tables, figures) to this Weights & Biases project; "
                        "needs the wandb package")
    return parser


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of minutes, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of minutes >= 0, got {text!r}")
    return value


def _wandb_project(text: str) -> str:
    import importlib.util

    if importlib.util.find_spec("wandb") is None:  # asked for, but absent: refuse before any work
        raise argparse.ArgumentTypeError("the wandb package is not installed; it is the optional dependency "
                                         "group 'wandb': install it with `uv sync --group wandb`")
    return text


_SIZE = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?$", re.IGNORECASE)


def _memory_limit(text: str) -> tuple[str, str]:
    """'0=20GiB' / 'cpu=64GiB' / 'mps=8GB' -> (device, size), as accelerate's max_memory takes them."""
    device, sep, size = text.partition("=")
    device, size = device.strip(), size.strip()
    if not sep or not (device.isdigit() or device in ("cpu", "mps", "disk")) or not _SIZE.match(size):
        raise argparse.ArgumentTypeError(f"{text!r}: give DEVICE=SIZE, e.g. 0=20GiB or cpu=64GiB")
    return device, size


def model_spec(args: argparse.Namespace) -> ModelSpec:
    if (args.max_memory or args.offload_folder) and args.device_map != "auto":
        raise InputError("--max_memory and --offload_folder apply with --device_map auto only")
    return ModelSpec(
        model=args.model,
        revision=args.revision,
        dtype=args.dtype,
        device=args.device,
        device_map=args.device_map,
        max_memory=tuple(args.max_memory or ()),
        offload_folder=args.offload_folder,
        trust_remote_code=args.trust_remote_code,
        seed=args.seed,
    )


def data_spec(args: argparse.Namespace) -> DataSpec | None:
    """The data part of the run, checked at once (files, presets, domain names, --num_domains): a typo costs no
    torch import and no model load. Hub datasets are left to the run's hub probe."""
    from common.data.domains import check_data  # torch-free; imported here so that --help does not pay for it

    if getattr(args, "data", None) is None:
        return None
    spec = DataSpec(
        sources=tuple(args.data),
        domains=tuple(args.domains) if args.domains else None,
        num_domains=args.num_domains,
        num_tokens=args.num_tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        keep_special=args.keep_special,
        pack=args.pack,
        seed=args.seed,
    )
    check_data(list(spec.sources), num_domains=spec.num_domains, domains=spec.domains)
    return spec


def config(args: argparse.Namespace, script: str, *, layers: Sequence[int | str] | None = None) -> Config:
    """The typed configuration of a run, from parsed arguments (once; `common/` never sees the Namespace).

    `layers` overrides `--layers` (scripts that take one `--layer`).
    """
    chosen = layers if layers is not None else getattr(args, "layers", None)
    arguments = {k: v for k, v in vars(args).items() if k != "_command"}
    if getattr(args, "cache_dir", None):  # read by common.data.urls wherever a URL source is fetched
        os.environ["MOESCOPE_URL_CACHE"] = str(Path(args.cache_dir).expanduser())
    return Config(
        model=model_spec(args),
        run=RunSpec(script=script, out=Path(args.out), seed=args.seed, progress=args.progress,
                    arguments=tuple(arguments.items()), command=getattr(args, "_command", None),
                    wandb=getattr(args, "wandb", None), figures=getattr(args, "figures", True),
                    checkpoint_every=getattr(args, "checkpoint_every", None),
                    resume=Path(args.resume).expanduser() if getattr(args, "resume", None) else None,
                    fresh=getattr(args, "fresh", False)),
        data=data_spec(args),
        layers=tuple(str(item) for item in chosen) if chosen is not None else None,
    )


def _out_of_memory(err: BaseException) -> bool:
    if "torch" not in sys.modules:  # nothing could have allocated device memory
        return False
    from common.cli.oom import is_out_of_memory

    return is_out_of_memory(err)


# flag -> what to do with it when the device runs out of memory (only the flags the script has are named)
MEMORY_FLAGS = {
    "--batch_size": "a smaller --batch_size",
    "--seq_len": "a shorter --seq_len",
    "--stats_memory": "a smaller --stats_memory (statistics' device budget)",
    "--block_mb": "a smaller --block_mb",
    "--device_map": "--device_map auto to spread the model over all GPUs",
}


def _memory_hint(parser: argparse.ArgumentParser) -> str:
    options = [text for flag, text in MEMORY_FLAGS.items() if flag in parser._option_string_actions]
    return "try " + ", or ".join(options) if options else "free the device's memory or use a larger device"


@contextlib.contextmanager
def _torch_threads(count: int | None) -> Iterator[None]:
    """`--threads N`: torch's CPU threads while the script runs, set before its model loads (here, not in the model
    loader, so every script and mode gets it); the caller's setting comes back afterwards, for in-process callers.
    None leaves torch's default and does not import torch."""
    if count is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _stopped(parser: argparse.ArgumentParser) -> int:
    """One line and the exit code of a stop: 130 for Ctrl-C, 128 + the signal's number otherwise (143 for SIGTERM)."""
    signum = stops.requested() or signal.SIGINT
    what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    print(f"{parser.prog}: {what}; {stops.resume_hint() or 'nothing written'}", file=sys.stderr)
    return 128 + signum


def run_main(parser: ArgumentParser, body: Callable[[argparse.Namespace], None], argv: Sequence[str] | None) -> int:
    """Parse, validate and run; `InputError` -> one line on stderr, exit 2; Ctrl-C -> one line, exit 130; SIGTERM
    or SIGHUP -> one line, exit 128 + the signal's number (143, 129), the run's folders removed as for Ctrl-C; the
    device out of memory -> one line naming the flags that lower memory, exit 1 (the run's folder is kept as
    <run-id>.failed, see `Run`)."""

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        print(f"{parser.prog}: warning: {message}", file=sys.stderr)

    previous, warnings.showwarning = warnings.showwarning, one_line_warning
    try:
        with stops.handled():
            args = parser.parse_args(argv)
            command = [parser.prog, *(sys.argv[1:] if argv is None else argv)]
            with _torch_threads(getattr(args, "threads", None)):
                body(argparse.Namespace(**vars(args), _command=tuple(command)))
    except InputError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _stopped(parser)
    except SystemExit as exit_:  # --help / --list
        return int(exit_.code or 0)
    except Exception as err:
        if stops.requested() is not None:  # an error the stop caused on its way out (e.g. inside an import)
            return _stopped(parser)
        if not _out_of_memory(err):
            raise
        print(f"{parser.prog}: error: out of memory ({str(err).strip().splitlines()[0][:200]}); "
              + _memory_hint(parser), file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = previous
    return 0
