"""argparse types shared by the benchmarks: a bad number is refused at parse time (exit 2),
before any model is built, instead of failing late with an IndexError or a silently rounded size."""
import argparse
import re


def positive_int(text: str) -> int:
    """An integer >= 1 (batch sizes, repeats)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (warm-up rounds)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def resolution(text: str) -> int:
    """Pixels: a positive multiple of 16 (VAE factor 8 times patch size 2), so the size measured is
    the size reported."""
    value = positive_int(text)
    if value % 16:
        lower, upper = value // 16 * 16, (value // 16 + 1) * 16
        hint = f"{lower} or {upper}" if lower else str(upper)
        raise argparse.ArgumentTypeError(f"{value} is not a multiple of 16 (VAE factor 8 x patch 2): use {hint}")
    return value


def device_spec(text: str) -> str:
    """`cpu`, `cuda` or `cuda:N`."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu, cuda or cuda:N")
    return text


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def run_main(main) -> int:
    """A benchmark's entry point, run as the CLI's commands are: Ctrl-C and SIGTERM stop it (and its children)
    with exit 130 / 143; a user error or a full disk prints its message and hint and exits 1 or 2; only bugs
    keep their traceback."""
    from onex_export import interrupts
    from onex_export.exits import errors_reported

    interrupts.install()
    with errors_reported():
        return main()
