"""The ``onex-export`` command line. The only package that prints and chooses exit codes:
0 success, 1 a user error (bad file, failed check), 2 bad usage (malformed or unfitting option).

One module per group of commands: build (build, verify), generate (sample, generate), probe, serve."""
from __future__ import annotations

import click
import diffusers

from .. import __version__, interrupts
from ..config import SkipRange
from ..errors import UsageError
from ..exits import errors_reported
from ..export.precision import PRECISIONS
from ..export.shapes import DimRange
from ..models import DEFAULT_MODEL, TINY_MODELS
from ..models.zoo import TRAINED_MODELS

DTYPES = PRECISIONS  # --dtype names, the same as the build's precisions


class _Group(click.Group):
    """Runs every command under :func:`errors_reported`."""

    def invoke(self, ctx):
        with errors_reported():
            return super().invoke(ctx)


def _parsed_by(parse):
    """A click callback turning ``parse``'s :class:`UsageError` into click's usage error (exit 2)."""

    def callback(ctx, param, value):
        if value is None:
            return None
        try:
            return parse(value)
        except UsageError as exc:
            raise click.BadParameter(str(exc)) from exc

    return callback


def check_cuda_graph(backend: str, device: str, cuda_graph: bool) -> None:
    """--cuda-graph's combinations, in the flags' words (the runtime says the same of its arguments)."""
    if cuda_graph and backend in ("onnxruntime", "aoti"):
        raise UsageError(f"--cuda-graph is not available with --backend {backend} (it runs on the CPU)",
                         "use --backend tensorrt, or --backend torch --device cuda")
    if cuda_graph and backend == "torch" and not device.startswith("cuda"):
        raise UsageError(f"--cuda-graph with --backend torch needs --device cuda, not {device!r}",
                         "add --device cuda, or drop --cuda-graph")


_parse_skip = _parsed_by(SkipRange.parse)
_parse_range = _parsed_by(DimRange.parse)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onex-export")
def main():
    """onex-export: 1.x-Distill SD3/SD3.5 models from PyTorch to TensorRT engines."""
    interrupts.install()  # Ctrl-C and SIGTERM clean up and exit 130 / 143
    diffusers.utils.logging.set_verbosity_error()  # our own output says what matters
    from transformers.utils import logging as transformers_logging  # imported here: transformers is slow to load

    transformers_logging.set_verbosity_error()  # we report truncation ourselves


@main.command()
def models():
    """List the embedded models (trained ones shipped with the package, random ones built in code; no downloads)."""
    for name, trained in TRAINED_MODELS.items():
        default = " (the default)" if name == DEFAULT_MODEL else ""
        click.echo(f"{name:18s} trained{default}: {trained.description}")
    for name, spec in TINY_MODELS.items():
        click.echo(f"{name:18s} random weights: {spec.description}")
    click.echo("Real models: --model PATH, a local SD3/SD3.5 diffusers folder (or its transformer/ subfolder).")


from . import build, generate, probe, serve  # noqa: E402,F401  (registers their commands)
