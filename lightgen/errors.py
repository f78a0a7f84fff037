"""How the command lines report bad input: one line ``error: ...`` on stderr and exit code 2, no traceback.

Every entry point uses it: ``lightgen`` (and ``lightgen shapes``), ``lightgen-data`` and the trainers.
"""

from __future__ import annotations

import csv
import pickle
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer
from safetensors import SafetensorError

# What bad input raises: a bad value or file (ValueError, incl. JSON and Unicode errors), a missing or unreadable
# file or image (OSError, incl. PIL's UnidentifiedImageError), a file that ends early (EOFError), a weights file
# that is not safetensors or a pickle refused by torch's restricted loader, a bad CSV / tar / zip, input nested
# deeper than Python's recursion limit (a JSON line of 100,000 brackets).
USER_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    OSError,
    EOFError,
    SafetensorError,
    pickle.UnpicklingError,
    csv.Error,
    tarfile.TarError,
    zipfile.BadZipFile,
    RecursionError,
)
TERSE = (EOFError, pickle.UnpicklingError, csv.Error, SafetensorError, tarfile.TarError, zipfile.BadZipFile)
MAX_MESSAGE = 2000  # characters of a message shown; a library's message can quote a whole file


def library_errors() -> tuple[type[Exception], ...]:
    """The user-error types of heavy libraries, for those already imported (only a loaded library can raise
    them, and importing pyarrow or PIL here would slow every command's start): pyarrow's ``ArrowException``
    (ArrowInvalid, ArrowTypeError, ...: a malformed Parquet / Arrow file) and PIL's decompression-bomb error and
    warning (an image over ``Image.MAX_IMAGE_PIXELS``)."""
    found: list[type[Exception]] = []
    if (arrow := sys.modules.get("pyarrow.lib")) is not None:
        found.append(arrow.ArrowException)
    if (image := sys.modules.get("PIL.Image")) is not None:
        found += [image.DecompressionBombError, image.DecompressionBombWarning]
    return tuple(found)


def is_user_error(e: BaseException) -> bool:
    """Whether ``e`` is bad input (reported in one line) rather than a bug (which keeps its traceback)."""
    return isinstance(e, USER_ERRORS + library_errors())


def error_line(e: BaseException) -> str:
    """The one-line message for ``e``: its text with line breaks folded, or its type's name when it has none."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, RecursionError):
        text = f"input nested too deeply to read ({text})"
    elif isinstance(e, TERSE) or type(e).__module__.startswith("pyarrow"):
        text = f"{type(e).__name__}: {text}"  # their messages rarely say what kind of file was bad
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + " ..."


def exit_with_error(e: BaseException) -> NoReturn:
    """Print ``error: <message>`` on stderr and exit with code 2."""
    typer.echo(f"error: {error_line(e)}", err=True)
    raise typer.Exit(2) from None


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn user errors raised inside (``USER_ERRORS`` and ``library_errors()``) into ``error: <message>`` on
    stderr and exit code 2.

    A context manager (``with user_errors(): ...``) and, like every ``contextmanager``, a decorator
    (``@user_errors()``). Anything else is a bug and keeps its traceback.
    """
    try:
        yield
    except Exception as e:
        if not is_user_error(e):
            raise
        exit_with_error(e)


def run_app(app: typer.Typer) -> NoReturn:
    """Run a typer app as a console script, with a usage error (a bad or missing option value) as one
    ``error: <message>`` line and exit code 2, like every other user error."""
    # typer ships its own click; its UsageError is the base of the public typer.BadParameter.
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    try:
        code = app(standalone_mode=False)
    except usage_error as e:
        if type(e).__name__ == "NoArgsIsHelpError" and e.ctx is not None:
            typer.echo(e.ctx.get_help())
            sys.exit(2)
        typer.echo(f"error: {e.format_message()}", err=True)
        sys.exit(2)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
