"""Errors a user can fix. Entry points print them as one line and exit non-zero, without a traceback."""

import contextlib
import sys

# The exit status of every entry point refusing the user's input; the launcher's agent does not
# restart workers that end with it (a restart would only be refused again).
USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """A problem with the user's input: configuration, model files or data. The message names it."""


class ConfigError(UserError):
    """A configuration key has a value the schema or its checks refuse."""


class ModelFilesError(UserError):
    """A model directory, config.json or safetensors file is missing, malformed or inconsistent."""


class DataError(UserError):
    """A data set is missing, empty, or has a row the chosen format cannot use."""


class TrainingDiverged(UserError):
    """A loss or gradient became NaN or inf (and checkpoint.on_nonfinite says to stop)."""


@contextlib.contextmanager
def exit_on_user_error():
    """Turn a UserError into one line on stderr and USER_ERROR_EXIT_CODE; anything else stays a traceback."""
    try:
        yield
    except UserError as exc:
        print(f"fsdpqlora: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT_CODE)
