"""`onex-export serve`: a build behind a Triton Inference Server."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import click

from ..exits import errors_reported
from ..runtime.pipeline import BACKENDS
from ..params import FiniteFloat
from . import check_cuda_graph, main


@main.command(name="serve")
@click.option("--build", "build_dir", type=click.Path(path_type=Path), required=True,
              help="A build folder written by `onex-export build` (with its text encoders and VAE).")
@click.option("--backend", type=click.Choice(list(BACKENDS)), default="onnxruntime", show_default=True,
              help="tensorrt needs an NVIDIA GPU.")
@click.option("--device", default="cpu", show_default=True, help="torch device for the torch backend.")
@click.option("--cuda-graph", is_flag=True, help="Capture each transformer step as a CUDA graph (GPU only).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="The IPv4 address Triton listens on. The default keeps the server on this machine; --host 0.0.0.0 "
                   "exposes it on every interface, where inference needs no token (put a gateway with "
                   "authentication in front; the management endpoints ask for the access token below).")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True,
              help="Prometheus metrics at /metrics.")
@click.option("--max-queue-delay-us", type=click.IntRange(0, 10_000_000), default=2000, show_default=True,
              help="How long Triton's dynamic batcher holds a request for others to batch it with.")
@click.option("--max-queue-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Requests waiting beyond this many are refused at once instead of queued.")
@click.option("--max-prompt-chars", type=click.IntRange(1, 1_000_000), default=2000, show_default=True,
              help="Longer prompts are refused (HTTP 400); the text encoders keep 77 + 256 tokens of a prompt anyway.")
@click.option("--drain-seconds", type=FiniteFloat(min=0), default=60.0, show_default=True,
              help="On SIGTERM, how long the requests in flight may still take.")
@click.option("--access-token-env", default="ONEX_SERVE_ACCESS_TOKEN", show_default=True,
              help="Environment variable holding the token for Triton's management endpoints (statistics, model "
                   "repository, logging, trace; HTTP header `triton-access-token`, gRPC metadata "
                   "`triton-grpc-protocol-triton-access-token`). Unset: a random token, so they stay closed.")
def serve_cmd(build_dir, backend, device, cuda_graph, host, http_port, grpc_port, metrics_port, max_queue_delay_us,
              max_queue_size, max_prompt_chars, drain_seconds, access_token_env):
    """Serve a build with a Triton Inference Server (model `onex`: prompt -> image) until SIGTERM or Ctrl-C,
    which let the requests in flight finish and exit 0."""
    from ..supervisor import supervise

    check_cuda_graph(backend, device, cuda_graph)  # before the guardian starts a server process

    workspace = supervise(click.echo)  # from here on, the server process: the guardian stops what it leaves
    from ..serving import ServeConfig, serve

    token = os.environ.get(access_token_env) or None  # from the environment: a command line is visible to `ps`
    reference = None
    if backend == "torch":  # the float32 reference comes from the checks; the server imports only the runtime
        from ..check.reference import reference_graphs as reference
    config = ServeConfig(build_dir, backend, device, cuda_graph, http_port=http_port, grpc_port=grpc_port,
                         metrics_port=metrics_port, host=host, max_prompt_chars=max_prompt_chars,
                         max_queue_delay_us=max_queue_delay_us, max_queue_size=max_queue_size,
                         drain_seconds=drain_seconds, access_token=token, reference=reference, workspace=workspace)
    try:
        with errors_reported():
            images = serve(config, log=click.echo)
            click.echo(f"PASSED serve: {images} image(s) served from {build_dir}")
    except SystemExit as exc:
        _leave(exc.code, workspace)
    _leave(0, workspace)


def _leave(code: int | None, workspace: Path | None) -> None:
    """End the process without the interpreter's finalisation, its workspace removed (also when no guardian is
    left to do it). Triton has stopped and nothing of ours is half written, but native threads of the process
    (ONNX Runtime's, torch's, the proxy's) can still be alive then, and finalising under them aborted it with
    SIGABRT ("terminate called without an active exception") in 3 of 6 runs of a second SIGTERM here, turning
    exit 143 into -6."""
    if workspace is not None:
        shutil.rmtree(workspace, ignore_errors=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
