"""Serving throughput and latency: `onex-export serve` (Triton, dynamic batching) against the in-process pipeline.

    python -m bench.serve                                  # builds tiny-sd3 into a temporary folder, CPU
    python -m bench.serve --build engines/my-build --backend tensorrt --clients 1 --clients 4 --clients 16 --clients 64

At each client count, the same requests (one of 4 prompts that fit the model's tokenizers, one image, each its own
seed) go first to one in-process :class:`BuildPipeline` from that many threads (its calls run one at a time), then
to a real `onex-export serve` process through tritonclient over gRPC on loopback. Reports images/s and p50/p99
latency per request, the mean batch Triton formed (from its statistics), and whether every served image equals the
in-process one. Writes JSON, a Markdown table and a PNG into a new folder (default
bench/results/serve-<model>-<backend>-<device>; --replace to replace an earlier run's). Progress goes to stderr.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import click
import numpy as np

from onex_export.errors import OnexError, UsageError
from onex_export.fileio import pyplot, save_figure
from onex_export.check.reference import open_pipeline
from onex_export.contract import read_manifest
from onex_export.outputs import report_folder
from onex_export.probe.run import calibration_prompts
from onex_export.runtime.pipeline import BACKENDS, BuildPipeline
from onex_export.serving import STAGES

from .arguments import NON_NEGATIVE_INT, POSITIVE_INT, command_help, invoke, replace_option, run_main
from .report import write_results

FILES = ("serve.json", "serve.md", "serve.png")


def progress(line: str) -> None:
    """Progress goes to stderr, so that stdout carries only the final table."""
    print(line, file=sys.stderr, flush=True)


def require_serving() -> None:
    """The serve extra, before anything is built or timed: tritonclient (this benchmark's client) and PyTriton
    (the server's)."""
    try:
        importlib.import_module("tritonclient.grpc")
        found = importlib.util.find_spec("pytriton") is not None
    except ImportError:
        found = False
    if not found:
        raise UsageError("bench.serve needs tritonclient[grpc] and nvidia-pytriton, which are not installed",
                         "pip install -c constraints.txt -e '.[serve]'")


def free_ports(n: int) -> list[int]:
    """``n`` loopback ports free at the moment of asking."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _summary(latencies: list[float], wall: float) -> dict:
    ms = np.array(latencies) * 1000
    return {"requests": len(ms), "images_per_s": len(ms) / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "wall_s": wall}


def _run(clients: int, requests: list[tuple[str, int]], call) -> tuple[dict, list]:
    """``requests`` spread over ``clients`` threads; ``call(thread, prompt, seed) -> pixels``."""
    def worker(k):
        out = []
        for prompt, seed in requests[k::clients]:
            start = time.perf_counter()
            pixels = call(k, prompt, seed)
            out.append((time.perf_counter() - start, prompt, seed, pixels))
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = [r for rs in pool.map(worker, range(clients)) for r in rs]
    return _summary([d[0] for d in done], time.perf_counter() - start), done


class _Server:
    """`onex-export serve` in a process of its own, as a user starts it."""

    def __init__(self, args, log: Path):
        http, self.grpc, metrics = free_ports(3)
        self.log = log
        command = [sys.executable, "-m", "onex_export.cli", "serve", "--build", str(args.build), "--backend",
                   args.backend, "--device", args.device, "--http-port", str(http), "--grpc-port", str(self.grpc),
                   "--metrics-port", str(metrics), "--max-queue-delay-us", str(args.max_queue_delay_us)]
        self.token = secrets.token_urlsafe(24)  # opens Triton's statistics endpoint to this benchmark only
        env = {**os.environ, "ONEX_SERVE_ACCESS_TOKEN": self.token}
        with open(log, "w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                            env=env)
        deadline = time.monotonic() + 300
        while "ready     model 'onex'" not in log.read_text(errors="replace"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise OnexError(f"`onex-export serve` did not become ready; its output:\n{self.tail()}")
            time.sleep(0.2)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it; its exit code (killed after 120 s: -9)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.process.returncode

    def kill(self) -> None:
        """The server's whole session: tritonserver and its stubs too."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


def _infer(client, prompt: str, seed: int) -> tuple[np.ndarray, float]:
    """One request's image (H, W, 3) and the milliseconds the pipeline spent on the batch it ran in."""
    from tritonclient.grpc import InferInput

    inputs = [InferInput("prompt", [1, 1], "BYTES"), InferInput("seed", [1, 1], "INT64")]
    inputs[0].set_data_from_numpy(np.array([[prompt.encode()]], dtype=object))
    inputs[1].set_data_from_numpy(np.array([[seed]], dtype=np.int64))
    response = client.infer("onex", inputs)
    return response.as_numpy("image")[0, 0], sum(float(response.as_numpy(f"{s}_ms")[0, 0]) for s in STAGES)


def _batches(client, token: str) -> tuple[int, int]:
    """Triton's counts for model onex: (requests' rows inferred, executions of the model)."""
    stats = client.get_inference_statistics("onex", headers={"triton-grpc-protocol-triton-access-token": token},
                                            as_json=True)["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def _in_process(args) -> list[dict]:
    """Every client count against one in-process pipeline, released on return (the server loads its own)."""
    pipeline = open_pipeline(args.build, args.backend, args.device)
    pipeline.warm_up(batch=1)

    def local(k, prompt, seed):
        return pipeline.generate([prompt], seed).pixels()[0]

    levels = []
    for clients in args.clients:
        count = max(args.requests, clients)
        requests = [(args.prompts[i % len(args.prompts)], 1000 * clients + i) for i in range(count + args.warmup)]
        if args.warmup:
            _run(clients, requests[:args.warmup], local)
        summary, done = _run(clients, requests[args.warmup:], local)
        levels.append({"clients": clients, "in_process": summary, "_reference": {(p, s): x for _, p, s, x in done},
                       "_requests": requests})
        progress(f"in-process  {clients:3d} clients: {summary['images_per_s']:.2f} images/s, p50 "
                 f"{summary['p50_ms']:.0f} ms, p99 {summary['p99_ms']:.0f} ms")
    return levels


def run(args) -> dict:
    from tritonclient.grpc import InferenceServerClient  # thread-safe (the HTTP client is tied to its thread)

    levels = _in_process(args)
    with tempfile.TemporaryDirectory(prefix="onex-bench-serve-") as tmp:
        progress("starting  onex-export serve (up to 300 s)")
        server = _Server(args, Path(tmp) / "serve.log")
        try:
            for level in levels:
                clients, requests = level["clients"], level.pop("_requests")
                connections = [InferenceServerClient(f"127.0.0.1:{server.grpc}")
                               for _ in range(clients)]
                if args.warmup:
                    _run(clients, requests[:args.warmup], lambda k, p, s: _infer(connections[k], p, s))
                rows0, runs0 = _batches(connections[0], server.token)
                summary, done = _run(clients, requests[args.warmup:], lambda k, p, s: _infer(connections[k], p, s))
                rows, runs = _batches(connections[0], server.token)
                reference = level.pop("_reference")
                summary["mean_batch"] = (rows - rows0) / max(1, runs - runs0)
                summary["identical_images"] = all(np.array_equal(x[0], reference[(p, s)]) for _, p, s, x in done)
                # the time the pipeline spent on the batch each request ran in; the rest of p50 is Triton, the
                # proxy between Triton and the Python model, gRPC and waiting in the queue
                summary["pipeline_p50_ms"] = float(np.percentile([x[1] for *_, x in done], 50))
                summary["throughput_ratio"] = summary["images_per_s"] / level["in_process"]["images_per_s"]
                level["served"] = summary
                for c in connections:
                    c.close()
                progress(f"served      {clients:3d} clients: {summary['images_per_s']:.2f} images/s, p50 "
                         f"{summary['p50_ms']:.0f} ms, p99 {summary['p99_ms']:.0f} ms, mean batch "
                         f"{summary['mean_batch']:.2f} (pipeline p50 {summary['pipeline_p50_ms']:.0f} ms), images "
                         f"identical: {summary['identical_images']}")
        finally:
            code, tail = server.stop(), server.tail()  # the log goes with the temporary folder
    if code != 0:
        raise OnexError(f"`onex-export serve` exited {code} on SIGTERM (0 expected); its output:\n{tail}")
    manifest = BuildPipeline(args.build, check_files=False).manifest
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
        "backend": args.backend, "device": args.device,
        "config": {"build": str(args.build), "model": manifest.model.source, "precision": manifest.precision,
                   "resolution": manifest.shapes.ranges.resolution.opt,
                   "max_batch": manifest.shapes.ranges.batch.max, "requests": args.requests,
                   "warmup": args.warmup, "max_queue_delay_us": args.max_queue_delay_us},
        "levels": levels,
    }


def markdown(report: dict) -> str:
    c = report["config"]
    lines = [f"# Serving: {c['model']} ({c['precision']}, {c['resolution']} px, batch up to {c['max_batch']}), "
             f"{report['backend']} on {report['device']} ({report['machine']['processor']})", "",
             f"{c['requests']} requests per client count (or one per client, if more; one prompt and one image "
             f"each), after {c['warmup']} warm-up; "
             f"Triton's queue delay {c['max_queue_delay_us']} us. p99 of {c['requests']} samples is close to the "
             "maximum.", "",
             "| clients | in-process images/s | p50 ms | p99 ms | served images/s | p50 ms | p99 ms | mean batch | "
             "served / in-process | images identical |", "|---|---|---|---|---|---|---|---|---|---|"]
    for level in report["levels"]:
        a, s = level["in_process"], level["served"]
        lines.append(f"| {level['clients']} | {a['images_per_s']:.2f} | {a['p50_ms']:.0f} | {a['p99_ms']:.0f} | "
                     f"{s['images_per_s']:.2f} | {s['p50_ms']:.0f} | {s['p99_ms']:.0f} | {s['mean_batch']:.2f} | "
                     f"{s['throughput_ratio']:.2f}x | {'yes' if s['identical_images'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Path:
    """Throughput, and p50 / p99 latency, against concurrent clients, in-process and served."""
    plt = pyplot("bench.serve")
    clients = [level["clients"] for level in report["levels"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, colour in (("in_process", "tab:blue"), ("served", "tab:orange")):
        label = "in-process pipeline" if mode == "in_process" else "onex-export serve (Triton)"
        left.plot(clients, [lv[mode]["images_per_s"] for lv in report["levels"]], "o-", color=colour, label=label)
        right.plot(clients, [lv[mode]["p50_ms"] for lv in report["levels"]], "o-", color=colour, label=f"{label} p50")
        right.plot(clients, [lv[mode]["p99_ms"] for lv in report["levels"]], "s--", color=colour, label=f"{label} p99")
    for level in report["levels"]:
        left.annotate(f"batch {level['served']['mean_batch']:.1f}", (level["clients"], level["served"]["images_per_s"]),
                      textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    for ax, title, unit in ((left, "throughput", "images / s"), (right, "latency per request", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(clients, [str(c) for c in clients])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    c = report["config"]
    fig.suptitle(f"{c['model']} {c['resolution']} px, {report['backend']} on {report['device']}")
    return save_figure(fig, path)


@click.command(name="bench.serve", help=command_help(__doc__))
@click.option("--build", type=click.Path(path_type=Path), default=None,
              help="a build folder with text encoders and VAE (default: build tiny-sd3 into a temporary folder)")
@click.option("--backend", type=click.Choice(list(BACKENDS)), default="onnxruntime", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="torch device for the torch backend")
@click.option("--clients", type=POSITIVE_INT, multiple=True, help="concurrent clients (repeatable; default: 1, 4, 16)")
@click.option("--requests", type=POSITIVE_INT, default=64, show_default=True, help="requests per client count")
@click.option("--warmup", type=NON_NEGATIVE_INT, default=4, show_default=True,
              help="requests per client count before timing")
@click.option("--max-queue-delay-us", type=NON_NEGATIVE_INT, default=2000, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="a new folder for JSON/Markdown/PNG (default bench/results/serve-<model>-<backend>-<device>)")
@replace_option
def command(**options) -> int:
    args = SimpleNamespace(**options)
    args.clients = list(args.clients) or [1, 4, 16]
    require_serving()
    pyplot("bench.serve")
    model = "tiny-sd3" if args.build is None else read_manifest(args.build).model.source
    args.prompts = calibration_prompts(model, None, 4)  # prompts that fit the model's tokenizers
    name = f"serve-{Path(model).name}-{args.backend}-{args.device.replace(':', '')}"
    out = args.out or Path(__file__).parent / "results" / name
    with report_folder(out, FILES, replace=args.replace), \
            tempfile.TemporaryDirectory(prefix="onex-bench-build-") as tmp:
        if args.build is None:
            from onex_export.config import SkipRange
            from onex_export.build import BuildConfig, build
            from onex_export.export.shapes import DimRange

            args.build = Path(tmp) / "tiny-sd3"
            progress("building  tiny-sd3, skip 3-10, ONNX only, batch up to 4")
            build(BuildConfig(model="tiny-sd3", skip=SkipRange(3, 10), out=args.build, trt="none",
                              batch=DimRange(1, 1, 4)))
        report = run(args)
        plot(report, out / "serve.png")  # the figure first: the results files, written last, say it is complete
        write_results(out, "serve", report, markdown(report))
    print(markdown(report))
    print(f"wrote {out}/serve.json, serve.md, serve.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    return invoke(command, argv, "python -m bench.serve")


if __name__ == "__main__":
    sys.exit(run_main(main))
