"""What the benchmarks' commands share with the tool: click parameter types that refuse a bad value at parse time
(exit 2, before any model is built, instead of failing late with an IndexError or a silently rounded size), the
library's own parsers for skip ranges and shape ranges, and the CLI's error reporting."""
from __future__ import annotations

import click

from onex_export.config import SkipRange
from onex_export.errors import UsageError


class _Int(click.ParamType):
    """An integer of at least ``low``: batch sizes and repeats (1), warm-up rounds (0)."""

    name = "integer"

    def __init__(self, low: int):
        self.low = low

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            number = value
        else:
            try:
                number = int(value)
            except ValueError:
                self.fail(f"{value!r} is not an integer", param, ctx)
        if number < self.low:
            self.fail(f"{number} must be at least 1" if self.low == 1 else f"{number} must be 0 or more", param, ctx)
        return number


class _Resolution(_Int):
    """Pixels: a positive multiple of 16 (SD3's VAE factor 8 times patch size 2), so the size measured is the size
    reported."""

    name = "pixels"

    def __init__(self):
        super().__init__(1)

    def convert(self, value, param, ctx) -> int:
        number = super().convert(value, param, ctx)
        if number % 16:
            lower, upper = number // 16 * 16, (number // 16 + 1) * 16
            self.fail(f"{number} is not a multiple of 16 (VAE factor 8 x patch 2): use "
                      f"{f'{lower} or {upper}' if lower else upper}", param, ctx)
        return number


class _Skip(click.ParamType):
    """A skip range, parsed by the library (:meth:`SkipRange.parse`): 1-based, inclusive, as in the paper."""

    name = "range"

    def convert(self, value, param, ctx) -> SkipRange:
        if isinstance(value, SkipRange):
            return value
        try:
            return SkipRange.parse(value)
        except UsageError as exc:
            self.fail(f"{exc.message} ({exc.hint})" if exc.hint else exc.message, param, ctx)


def replace_option(command: click.Command) -> click.Command:
    """``--replace``: a benchmark writes into a folder holding an earlier run's results (the committed ones in
    bench/results too) only when asked to; a file onex-export did not write there is refused even so."""
    return click.option("--replace", is_flag=True,
                        help="replace the results of an earlier run in the output folder (default: refuse, so that a "
                             "run never replaces committed results by accident)")(command)


POSITIVE_INT, NON_NEGATIVE_INT = _Int(1), _Int(0)
RESOLUTION, SKIP = _Resolution(), _Skip()


def command_help(doc: str) -> str:
    """A benchmark module's docstring as its command's help: indented paragraphs (examples) keep their lines."""
    return "\n\n".join("\b\n" + part if part.startswith("    ") else part for part in doc.strip().split("\n\n"))


def invoke(command: click.Command, argv: list[str] | None, prog_name: str) -> int:
    """Run a benchmark's ``command`` on ``argv`` (None: the process's arguments) and return what it returns. Bad
    usage prints click's message and exits 2, as the tool's commands do; the library's errors go on to
    :func:`run_main`'s reporting."""
    try:
        return command.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from None


def run_main(main) -> int:
    """A benchmark's entry point, run as the CLI's commands are: Ctrl-C and SIGTERM stop it (and its children)
    with exit 130 / 143; a user error or a full disk prints its message and hint and exits 1 or 2; only bugs
    keep their traceback."""
    from onex_export import interrupts
    from onex_export.exits import errors_reported

    interrupts.install()
    with errors_reported():
        return main()
