"""The command line: flags shared by every script, the pipeline from flags to a model, a token stream and a run
folder, and what to do when the device runs out of memory.

`common.cli` itself is light (no torch import), so `--help` and flag errors answer before the heavy modules load;
import `common.cli.pipeline` (model + data set-up, captured batches) and `common.cli.oom` inside a script's `run`.

Public surface:
- `base_parser(description, *, layers, data)`: the shared flags (`--model`, `--data`, `--layers`, ...).
- `ArgumentParser`: argparse with `--config FILE` (TOML) and one-line errors.
- `at_least(n)`, `positive_float`, `open_fraction`: argument types.
- `config(args, script)`: the typed, frozen `common.config.Config` of a parsed command line.
- `model_spec(args)`, `data_spec(args)`: its model and data parts.
- `run_main(parser, body, argv)`: parse, run, turn an `InputError` into one line and exit code 2.
- `listing()`: the text of `--list`.
"""

from common.cli.flags import (
    MEMORY_FLAGS,
    ArgumentParser,
    at_least,
    base_parser,
    config,
    data_spec,
    listing,
    model_spec,
    open_fraction,
    positive_float,
    run_main,
)

__all__ = [
    "MEMORY_FLAGS", "ArgumentParser", "at_least", "base_parser", "config", "data_spec", "listing", "model_spec",
    "open_fraction", "positive_float", "run_main",
]
