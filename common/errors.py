"""The one exception type for bad user input.

Scripts turn an `InputError` into a one-line message on stderr and exit code 2 (see `common.cli.run_main`);
anything else is a bug and keeps its traceback.
"""


class InputError(Exception):
    """Raised for invalid user input: bad flags, missing files, unknown models, impossible layer choices."""
