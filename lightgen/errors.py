"""How the command lines report bad input: one line ``error: ...`` on stderr and exit code 2, no traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from safetensors import SafetensorError

# What bad input raises: a bad value or file (ValueError, incl. JSON errors), a missing or unreadable file or
# image (OSError, incl. PIL's UnidentifiedImageError), a weights file that is not safetensors.
USER_ERRORS: tuple[type[Exception], ...] = (ValueError, OSError, SafetensorError)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn ``USER_ERRORS`` raised inside into ``error: <message>`` on stderr and exit code 2.

    A context manager (``with user_errors(): ...``) and, like every ``contextmanager``, a decorator
    (``@user_errors()``). Anything else is a bug and keeps its traceback.
    """
    try:
        yield
    except USER_ERRORS as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
