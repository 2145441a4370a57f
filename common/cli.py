"""Shared command-line flags and the `main(argv)` wrapper of every script.

Bad input anywhere (a flag, a layer, a model path, a data file) raises `InputError`; `run_main` turns it into one
line on stderr and exit code 2, with no traceback and no results folder left behind.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from common.config import Config, DataSpec, ModelSpec, RunSpec
from common.errors import InputError
from common.models import default_model


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports errors as `InputError` (one line, exit 2) instead of usage + message."""

    def error(self, message: str):  # type: ignore[override]
        raise InputError(message)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def base_parser(description: str, *, layers: bool = True, data: bool = True) -> ArgumentParser:
    """A parser with the flags every script shares; scripts add their own to it."""
    parser = ArgumentParser(description=description, formatter_class=_Formatter)
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default=default_model(),
        help="'demo' (shipped, offline), 'random:<model_type>' (tiny random MoE of any transformers architecture), "
        "a local directory, or a hub id",
    )
    model.add_argument("--revision", default=None, help="hub branch, tag or commit of --model")
    model.add_argument("--dtype", default="auto", help="auto = bfloat16 on CUDA, float32 on CPU; or float32/bfloat16/float16")
    model.add_argument("--device", default="auto", help="auto = cuda if available, else cpu")
    model.add_argument("--device_map", default=None, help="'auto' spreads a model too large for one GPU over all GPUs")
    model.add_argument("--trust_remote_code", action="store_true", help="allow the model repository's own code")
    if layers:
        parser.add_argument(
            "--layers", "-l", nargs="+", default=None, metavar="L",
            help="0-based decoder-layer indices (negatives count from the end) or 'all'; default: every MoE layer",
        )
    if data:
        group = parser.add_argument_group("data")
        group.add_argument(
            "--data", nargs="+", default=["demo"],
            help="a preset (demo, olmoe, pile, moe-lens, router-study) or sources [name=]SOURCE: "
            "hf:ID[:CONFIG][:SPLIT][#FIELD][?key=value], a .txt/.jsonl/.json/.parquet/.csv file, glob or folder, demo:<domain>",
        )
        group.add_argument("--domains", nargs="+", default=None, help="use only these domains of the preset")
        group.add_argument("--num_domains", type=int, default=None, help="use the first N domains of the preset")
        group.add_argument("--num_tokens", type=int, default=10_000,
                           help="tokens counted per domain (padding and specials never count); the demo's smallest training split (french) holds ~14.8k")
        group.add_argument("--seq_len", type=int, default=None, help="window length; default min(512, the model's context)")
        group.add_argument("--batch_size", type=int, default=16, help="windows per forward pass")
        group.add_argument("--keep-special", dest="keep_special", action="store_true", help="count BOS/special tokens too")
        group.add_argument("--pack", action="store_true", help="let windows cross document boundaries")
    parser.add_argument("--seed", type=int, default=0, help="seed of data order, sampling and random models")
    parser.add_argument("--out", default="results", help="root folder of run outputs")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    return parser


def validate_common(args: argparse.Namespace) -> None:
    for name, low in (("num_tokens", 1), ("batch_size", 1), ("seq_len", 2), ("num_domains", 1)):
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise InputError(f"--{name} must be at least {low} (got {value})")


def model_spec(args: argparse.Namespace) -> ModelSpec:
    return ModelSpec(
        model=args.model,
        revision=args.revision,
        dtype=args.dtype,
        device=args.device,
        device_map=args.device_map,
        trust_remote_code=args.trust_remote_code,
        seed=args.seed,
    )


def data_spec(args: argparse.Namespace) -> DataSpec | None:
    if getattr(args, "data", None) is None:
        return None
    return DataSpec(
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


def config(args: argparse.Namespace, script: str, *, layers: Sequence[int | str] | None = None) -> Config:
    """The typed configuration of a run, from parsed arguments (once; `common/` never sees the Namespace).

    `layers` overrides `--layers` (scripts that take one `--layer`).
    """
    chosen = layers if layers is not None else getattr(args, "layers", None)
    return Config(
        model=model_spec(args),
        run=RunSpec(script=script, out=Path(args.out), seed=args.seed, progress=args.progress,
                    arguments=tuple(vars(args).items())),
        data=data_spec(args),
        layers=tuple(str(item) for item in chosen) if chosen is not None else None,
    )


def run_main(parser: ArgumentParser, body: Callable[[argparse.Namespace], None], argv: Sequence[str] | None) -> int:
    """Parse, validate and run; `InputError` -> one line on stderr, exit code 2. Warnings print as one line too."""

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        print(f"{parser.prog}: warning: {message}", file=sys.stderr)

    previous, warnings.showwarning = warnings.showwarning, one_line_warning
    try:
        args = parser.parse_args(argv)
        validate_common(args)
        body(args)
    except InputError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help / --version
        return int(exit_.code or 0)
    finally:
        warnings.showwarning = previous
    return 0
