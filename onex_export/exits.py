"""How an entry point ends: a user error, Ctrl-C / SIGTERM or a full disk becomes a message, a hint,
``FAILED`` and an exit code (1 or 2, 130 or 143); bugs keep their traceback. Used by the ``onex-export``
command line, ``train`` and ``bench``, none of which needs the CLI's commands for it."""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import click

from . import interrupts
from .errors import OnexError
from .fileio import as_disk_error


def exit_on_interrupt(exc: KeyboardInterrupt) -> None:
    """Report a Ctrl-C or SIGTERM (the temporary files are already gone) and exit 130 or 143."""
    name = str(exc) if isinstance(exc, interrupts.Interrupted) else "SIGINT"
    click.secho(f"interrupted ({name}): stopped; what was being written was removed, earlier results are as they were",
                fg="yellow", err=True)
    click.echo("FAILED", err=True)
    sys.exit(exc.exit_code if isinstance(exc, interrupts.Interrupted) else 130)


def exit_on_user_error(exc: OnexError) -> None:
    """Print a user error (message, hint, FAILED) without a traceback and exit with its code."""
    click.secho(f"error: {exc.message}", fg="red", err=True)
    if exc.hint:
        click.echo(f"  hint: {exc.hint}", err=True)
    click.echo("FAILED", err=True)
    sys.exit(exc.exit_code)


@contextlib.contextmanager
def errors_reported() -> Iterator[None]:
    """An entry point's body: user errors, Ctrl-C / SIGTERM and full disks become a message and an exit code
    (1 or 2, 130 or 143); bugs keep their traceback."""
    try:
        yield
    except OnexError as exc:
        exit_on_user_error(exc)
    except KeyboardInterrupt as exc:
        exit_on_interrupt(exc)
    except Exception as exc:
        if (signum := interrupts.raised()) is not None:  # native code turned the interrupt into its own error
            exit_on_interrupt(interrupts.Interrupted(signum))
        if isinstance(exc, OSError):  # a full disk or a folder not ours to write, met outside fileio.writing
            error = as_disk_error(exc, exc.filename or "a file")
            if error is not None:
                exit_on_user_error(error)
        raise
