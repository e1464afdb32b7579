"""Where one transformer step's time goes, against its FLOP floor.

    python -m bench.step_profile --arch sd3-medium --resolution 1024 --device cuda --dtype bf16
    python -m bench.step_profile --arch tiny-sd3                        # the plumbing, on a CPU

Counts the step's floating-point operations (``torch.utils.flop_counter``), times it (eager, and compiled
with ``--compile``), divides the FLOPs by a measured matrix-product rate (a large bf16/fp32 GEMM on the same
device) for the floor, and groups the profiler's kernel times into attention, matrix products, norms and
the rest. Writes ``profile.json`` and ``profile.md`` to a new folder, ``bench/results/profile-<arch>-<dtype>-<device>/``
by default (``--replace`` to replace an earlier run's).
"""
from __future__ import annotations

import collections
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import click
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from onex_export.export.precision import PRECISIONS
from onex_export.models import build_tiny
from onex_export.models.text import SD3_TEXT_LENGTH
from onex_export.models.zoo import TINY_TEXT_LEN
from onex_export.outputs import report_folder
from onex_export.params import DEVICE

from .arguments import POSITIVE_INT, RESOLUTION, command_help, invoke, replace_option, run_main
from .random_weights import ARCHS, random_transformer
from .report import write_results

GROUPS = (("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
          ("matrix products", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "addmm", "mm", "matmul", "linear")),
          ("norms", ("norm",)))


def _group(kernel: str) -> str:
    name = kernel.lower()
    return next((g for g, keys in GROUPS if any(k in name for k in keys)), "elementwise and copies")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_ms(fn, device: str, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def matmul_rate(device: str, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of an n x n x n matrix product on random data (the ceiling the floor is taken against)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / (median_ms(lambda: a @ b, device, 10) / 1e3)


def run(args) -> dict:
    dtype = PRECISIONS[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = False
    model = (random_transformer(args.arch, dtype, args.device) if args.arch in ARCHS
             else build_tiny(args.arch).to(args.device, dtype))
    cfg = model.config
    res = args.resolution or cfg.sample_size * 8
    text_len = SD3_TEXT_LENGTH if args.arch in ARCHS else TINY_TEXT_LEN
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, cfg.in_channels, res // 8, res // 8, generator=g).to(args.device, dtype)
    text = torch.randn(args.batch, text_len, cfg.joint_attention_dim, generator=g).to(args.device, dtype)
    pooled = torch.randn(args.batch, cfg.pooled_projection_dim, generator=g).to(args.device, dtype)
    ts = torch.full((args.batch,), 1000.0, device=args.device, dtype=dtype)

    def step(m=model):
        with torch.no_grad():
            return m(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=ts, return_dict=False)

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    rate = matmul_rate(args.device, dtype, args.matmul_size)
    eager = median_ms(step, args.device, args.repeats)
    activities = [ProfilerActivity.CUDA] if args.device.startswith("cuda") else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        _sync(args.device)
    groups, kernels = collections.Counter(), collections.Counter()
    for ev in prof.key_averages():
        # exclusive times: each kernel (GPU) or operator (CPU) counted once, not again in its callers
        own = (ev.self_device_time_total if args.device.startswith("cuda") else ev.self_cpu_time_total) / 3 / 1e3
        if own > 0:
            groups[_group(ev.key)] += own
            kernels[ev.key[:100]] += own
    out = {"arch": args.arch, "dtype": args.dtype, "device": args.device, "batch": args.batch, "resolution": res,
           "text_len": text_len, "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
           "torch": torch.__version__, "tflop": flops / 1e12, "matmul_tflops": rate / 1e12,
           "floor_ms": flops / rate * 1e3, "eager_ms": eager, "eager_over_floor": eager / (flops / rate * 1e3),
           "groups_ms": dict(groups.most_common()), "top_kernels_ms": dict(kernels.most_common(12))}
    if args.compile:
        start = time.perf_counter()
        compiled = torch.compile(model)
        step(compiled)
        out["compile_seconds"] = time.perf_counter() - start
        out["compiled_ms"] = median_ms(lambda: step(compiled), args.device, args.repeats)
        out["compiled_over_floor"] = out["compiled_ms"] / out["floor_ms"]
    return out


def markdown(r: dict) -> str:
    lines = [f"# One transformer step: {r['arch']} at {r['resolution']} px, batch {r['batch']}, {r['dtype']} on "
             f"{r['gpu'] or r['device']}", "",
             f"{r['tflop']:.3f} TFLOP per step; a {r['dtype']} matrix product ran at {r['matmul_tflops']:.0f} TFLOP/s, "
             f"so the floor is {r['floor_ms']:.2f} ms.", "", "| run | ms | x floor |", "|---|---|---|",
             f"| eager | {r['eager_ms']:.2f} | {r['eager_over_floor']:.2f} |"]
    if "compiled_ms" in r:
        lines.append(f"| torch.compile ({r['compile_seconds']:.0f} s to compile) | {r['compiled_ms']:.2f} | "
                     f"{r['compiled_over_floor']:.2f} |")
    lines += ["", "| kernels (profiler, eager) | ms per step |", "|---|---|"]
    lines += [f"| {g} | {ms:.2f} |" for g, ms in r["groups_ms"].items()]
    return "\n".join(lines) + "\n"


@click.command(name="bench.step_profile", help=command_help(__doc__))
@click.option("--arch", default="tiny-sd3", show_default=True, help=f"tiny-sd3 | {' | '.join(ARCHS)} (random weights)")
@click.option("--resolution", type=RESOLUTION, default=None, help="pixels (default: the model's native size)")
@click.option("--batch", type=POSITIVE_INT, default=1, show_default=True)
@click.option("--device", type=DEVICE, default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(list(PRECISIONS)), default="fp32", show_default=True)
@click.option("--repeats", type=POSITIVE_INT, default=20, show_default=True)
@click.option("--matmul-size", type=POSITIVE_INT, default=None, help="default 8192 on a GPU, 1024 on a CPU")
@click.option("--compile", is_flag=True, help="also time torch.compile's version")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="a new folder (default bench/results/profile-<arch>-<dtype>-<device>)")
@replace_option
def command(**options) -> int:
    args = SimpleNamespace(**options)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise click.UsageError("--device cuda needs an NVIDIA GPU, and none is visible here")
    args.matmul_size = args.matmul_size or (8192 if args.device.startswith("cuda") else 1024)
    cuda = args.device.startswith("cuda")
    device = (torch.cuda.get_device_name() if cuda else "cpu").replace(" ", "-").lower()
    out = args.out or Path("bench/results") / f"profile-{args.arch}-{args.dtype}-{device}"
    with report_folder(out, ("profile.json", "profile.md"), replace=args.replace):
        report = run(args)
        table = markdown(report)
        write_results(out, "profile", report, table)
    print(table)
    print(f"wrote {out}/profile.json, profile.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    return invoke(command, argv, "python -m bench.step_profile")


if __name__ == "__main__":
    sys.exit(run_main(main))
