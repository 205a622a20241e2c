"""Errors a user can fix. Entry points print them as one line and exit non-zero, without a traceback."""

import contextlib
import os
import sys

# The exit status of every entry point refusing the user's input; the launcher's agent does not
# restart workers that end with it (a restart would only be refused again).
USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """A problem with the user's input: configuration, model files or data. The message names it."""

    # Raised on every worker alike (decided on rank 0 and handed to all, or from values all ranks
    # agreed on): rank 0 alone prints it. An error of one rank only is printed by that rank.
    agreed = False


class ConfigError(UserError):
    """A configuration key has a value the schema or its checks refuse."""


class ModelFilesError(UserError):
    """A model directory, config.json or safetensors file is missing, malformed or inconsistent."""


class DataError(UserError):
    """A data set is missing, empty, or has a row the chosen format cannot use."""


class TrainingDiverged(UserError):
    """A loss or gradient became NaN or inf (and checkpoint.on_nonfinite says to stop)."""

    agreed = True  # the loss and gradient norm are agreed on across ranks


@contextlib.contextmanager
def exit_on_user_error():
    """Turn a UserError into one line on stderr (once for the workers of a run when every rank raised it)
    and USER_ERROR_EXIT_CODE; anything else stays a traceback."""
    try:
        yield
    except UserError as exc:
        if not exc.agreed or os.environ.get("RANK", "0") == "0":
            print(f"fsdpqlora: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT_CODE)
