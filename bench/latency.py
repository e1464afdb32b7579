"""Latency of 1.x-NFE sampling against the other schedules, on one model, backend and machine, in one run.

    python -m bench.latency                                   # tiny-sd3, PyTorch, CPU
    python -m bench.latency --backend onnxruntime             # through exported ONNX graphs
    python -m bench.latency --arch sd3-medium --resolution 1024 --device cuda --dtype bf16   # on a GPU
    python -m bench.latency --arch sd3-medium --resolution 1024 --device cuda --dtype bf16 --cuda-graph
    python -m bench.latency --arch sd3-medium --resolution 1024 --device cuda --dtype fp16 --backend tensorrt

Times (median and p90 after warm-up, batch 1 and 4): teacher 28 x 2 (CFG), 4-step, 2-step and 1.x-NFE
with skip ranges 3-8 and 3-10; and per stage: text encoding, the full and the skipping transformer
step, the MLP/reuse, one transformer block, VAE decode, end to end. Writes JSON, a Markdown table and
a PNG plot into a new folder (default bench/results/<arch>-<backend>-<dtype>-<device>; --replace to
replace an earlier run's). Speed-ups are reported next to the NFE-predicted ones so that overhead is
visible; one above what its NFE allows is flagged as timing noise.
"""
from __future__ import annotations

import dataclasses
import functools
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import click
import torch
from diffusers import SD3Transformer2DModel

from onex_export.config import SkipRange
from onex_export.contract import Manifest
from onex_export.errors import OnexError
from onex_export.fileio import pyplot
from onex_export.outputs import report_folder
from onex_export.build import BuildConfig, build
from onex_export.models.text import SD3_TEXT_LENGTH
from onex_export.export.components import component_graphs, load_components
from onex_export.export.precision import PRECISIONS
from onex_export.export.shapes import DimRange
from onex_export.models.vae import SD3_VAE_SCALE, LatentDecoder, vae_scale
from onex_export.trt import flavour_version, load_trt
from onex_export.models import SplitSD3Transformer, build_tiny
from onex_export.models.zoo import TINY_TEXT_LEN
from onex_export.runtime.cuda_graph import CudaGraphDenoiser
from onex_export.runtime.graphs import PlanDenoiser, TorchGraph, load_build_graphs
from onex_export.runtime.sampler import Conditioning, TorchDenoiser, sample
from onex_export.runtime.tensorrt_runner import require_gpu
from onex_export.schedule import SamplingPlan
from onex_export.params import DEVICE

from .arguments import NON_NEGATIVE_INT, POSITIVE_INT, RESOLUTION, command_help, invoke, replace_option, run_main
from .random_weights import ARCHS, random_text_encoder, random_transformer, random_vae, text_ids
from .peers import CacheDitPeer, SkipLayersPeer, cache_dit_installed
from .report import markdown, plot, write_results
from .timing import measure_interleaved

SKIPS = ("3-8", "3-10")
DTYPES = PRECISIONS
FILES = ("latency.json", "latency.md", "latency.png")
# A speed-up over the teacher cannot exceed the ratio of the NFEs (the teacher's 56 over the row's) by more than the
# timing's noise: above the ratio by more than this share, the figure is reported as noise, not as a speed-up.
SPEEDUP_TOLERANCE = 0.05
MLP_SHARE = 0.05  # the bar: the MLP costs at most this share of the skipped segment 3-10 it stands in for


def make_transformer(arch: str, dtype: torch.dtype, device: str) -> SD3Transformer2DModel:
    """The benchmarked model in ``dtype`` on ``device``: a real architecture with random weights drawn directly in
    ``dtype`` (no float32 copy), or an embedded model."""
    if arch in ARCHS:
        return random_transformer(arch, dtype, device)
    return build_tiny(arch).to(device=device, dtype=dtype)


def denoisers(args, transformer, resolution: int, tmp: Path) -> dict:
    """skip range -> (denoiser, split model). The ONNX Runtime and TensorRT backends build into ``tmp`` first,
    with static shapes at the benchmarked resolution, the precision benchmarked and batches up to the largest."""
    model = args.arch
    if args.backend != "torch" and args.arch in ARCHS:
        # A build loads its model by name or from a diffusers folder: the random weights go to a folder first.
        model = str(tmp / args.arch)
        transformer.save_pretrained(model)
    out = {}
    for skip_text in SKIPS:
        skip = SkipRange.parse(skip_text)
        split = SplitSD3Transformer(transformer, skip).to(device=args.device, dtype=DTYPES[args.dtype])
        if args.backend == "torch":
            out[skip_text] = (TorchDenoiser(split), split)
            continue
        folder = tmp / f"skip{skip_text}"
        # The 3-10 build of an embedded model also carries its text encoders and VAE, so that their stages
        # run on the benchmarked backend too (the random-weight real architectures have none).
        components = None if skip_text == "3-10" and args.arch not in ARCHS else ()
        config = BuildConfig(skip=skip, out=folder, model=model, precision=args.dtype,
                             trt=args.trt if args.backend == "tensorrt" else "none", components=components,
                             batch=DimRange(1, 1, max(args.batch)), resolution=DimRange.parse(resolution))
        progress(f"building the {skip_text} graphs for {args.backend}")
        manifest = checked_build(config)
        graphs = load_build_graphs(folder, manifest, args.backend)
        out[skip_text] = (PlanDenoiser(graphs, manifest.plans), split)
    return out


def checked_build(config: BuildConfig) -> Manifest:
    """Build for timing. A gate that could not run here is accepted (bf16 graphs are gated only on a GPU,
    with ``onex-export verify --backend tensorrt``); a gate that ran and failed stops the benchmark, since
    the timings would not be of the model."""
    manifest = build(dataclasses.replace(config, allow_parity_failure=True), log=lambda line: None)
    if manifest.status == "failed":
        raise OnexError(f"the {config.skip} build does not match PyTorch (its parity gate failed), so timing it "
                        "would not measure the model", "run `onex-export build` with the same options for the table")
    return manifest


def peers(args, transformer, dens: dict) -> dict:
    """Training-free peers on the same model with skip range 3-10 (PyTorch backend only)."""
    if args.backend != "torch":
        return {}
    out = {"peer: skip_layers 3-10": SkipLayersPeer(dens["3-10"][1])}
    if cache_dit_installed():
        out["peer: cache-dit DBCache 3-10"] = CacheDitPeer(transformer, SkipRange(3, 10))
    return out


# How the per-stage rows are measured on each backend: every stage runs on the benchmarked backend.
_GRAPH_STAGES = {"MLP (both streams)": "the reuse graph (the MLP and the two adds)",
                 "one block": "the segment graph(s) (blocks 3-10, with the deltas) / 8"}
REAL_PARTS = {"text encoding": "CLIP-L + CLIP-G + T5-XXL encoder at published sizes, random weights, PyTorch, "
                              "77 + 77 + 256 tokens",
              "VAE decode": "SD3's VAE decoder (84 M parameters with its encoder), random weights, PyTorch"}
T5_XXL_GB = {"fp32": 19.0, "fp16": 9.5, "bf16": 9.5}
STAGE_METHODS = {"torch": {"MLP (both streams)": "the MLP module", "one block": "block 6 alone"},
                 "onnxruntime": _GRAPH_STAGES, "tensorrt": _GRAPH_STAGES}


def stage_calls(backend: str, den, split, comps, cfg, batch: int, latent: tuple, step_inputs: tuple,
                deltas: tuple, parts: tuple | None = None) -> dict:
    """Stage name -> (call, divisor): the MLP, one block, text encoding and VAE decode on ``backend``; ``parts``
    (text encoder, latent decoder): a real architecture's components, in PyTorch whatever the backend."""
    x, text, pooled, ts = step_inputs
    calls = {}
    if backend == "torch":
        img, ctx, temb = split.embed(x, text, pooled, ts)
        calls["MLP (both streams)"] = (lambda: split.mlp(*deltas), 1)
        calls["one block"] = (lambda: split.run_blocks(img, ctx, temb, 5, 6), 1)
        graphs = {n: TorchGraph(module, spec) for n, (module, spec) in component_graphs(comps).items()} if comps else {}
    else:
        graphs = den.graphs
        seen = _first_calls(den, x, text, pooled, ts, deltas)
        segment = [n for n in seen if n.startswith("segment")]
        calls["MLP (both streams)"] = (lambda: graphs["reuse"](**seen["reuse"]), 1)
        calls["one block"] = (lambda: [graphs[n](**seen[n]) for n in segment], SkipRange(3, 10).count)
    if comps is not None:
        inputs = {name: comps.inputs(name, batch, latent[1]) for name in comps.names}
        calls["text encoding"] = (lambda: graphs["text"](**inputs["text"]), 1)
        calls["VAE decode"] = (lambda: graphs["vae"](**inputs["vae"]), 1)
    if parts is not None:
        encoder, decoder = parts
        ids = {k: v.to(x.device) for k, v in text_ids(batch).items()}
        z = torch.randn(batch, *latent, generator=torch.Generator().manual_seed(1)).to(x.device, x.dtype)
        calls["text encoding"] = (lambda: encoder(**ids), 1)
        calls["VAE decode"] = (lambda: decoder(z), 1)
    return calls


def _first_calls(den: PlanDenoiser, x, text, pooled, ts, deltas) -> dict[str, dict]:
    """The inputs each graph receives in one full and one skipping step, to time graphs on their own."""
    seen: dict[str, dict] = {}

    class Tap(dict):
        def __getitem__(self, name):
            def call(**inputs):
                seen.setdefault(name, inputs)
                return den.graphs[name](**inputs)
            return call

    tapped = PlanDenoiser(Tap(), den.plans)
    tapped.full(x, text, pooled, ts)
    tapped.skipping(x, text, pooled, ts, *deltas)
    return seen


def progress(line: str) -> None:
    """Progress goes to stderr, so that stdout carries only the final table."""
    print(line, file=sys.stderr, flush=True)


def measure_batch(args, batch: int, cfg, dens: dict, peer_dens: dict, comps, latent: tuple, text_len: int, dtype,
                  cuda: bool, parts: tuple | None = None) -> dict:
    """Every schedule and stage at one batch size, each group timed in interleaved rounds."""
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g),
                        torch.randn(batch, cfg.pooled_projection_dim, generator=g),
                        torch.zeros(batch, text_len, cfg.joint_attention_dim), torch.zeros(batch, cfg.pooled_projection_dim))

    def runner(d):
        """A CUDA-graph wrapper per use, so that no two shapes share (and recapture) one graph; cache-dit
        decides per call in Python, so it cannot be captured and stays eager."""
        return CudaGraphDenoiser(d) if args.cuda_graph and not isinstance(d, CacheDitPeer) else d

    den, split = dens["3-10"]
    plans = {"teacher 28x2": (SamplingPlan.teacher(28), den, None), "4-step": (SamplingPlan.student(4), den, None),
             "2-step": (SamplingPlan.student(2), den, None)}
    for skip_text in SKIPS:
        plans[f"1.x skip {skip_text}"] = (SamplingPlan.one_x(), dens[skip_text][0], SkipRange.parse(skip_text))
    for name, peer in peer_dens.items():
        plans[name] = (SamplingPlan.one_x(), peer, SkipRange(3, 10))
    calls = {}
    for name, (plan, d, _) in plans.items():
        reps = max(1, args.repeats // 4) if plan.uses_cfg else args.repeats  # the teacher runs 28 steps per call
        calls[name] = (functools.partial(sample, runner(d), plan, cond, latent, 0, dtype, args.device), reps)
    timings = measure_interleaved(calls, args.warmup, cuda,
                                  on_round=lambda i, n: progress(f"batch {batch}: schedules, round {i}/{n}"))
    schedules = {name: dict(timings[name].as_json(), nfe=plan.nfe(cfg.num_layers, skip))
                 for name, (plan, _, skip) in plans.items()}
    teacher = schedules["teacher 28x2"]
    for s in schedules.values():
        s["speedup"] = teacher["median_ms"] / s["median_ms"]
        s["nfe_speedup"] = teacher["nfe"] / s["nfe"]

    x = torch.randn(batch, *latent, generator=g).to(args.device, dtype)
    text, pooled = cond.text.to(args.device, dtype), cond.pooled.to(args.device, dtype)
    ts = torch.full((batch,), 1000.0, device=args.device, dtype=dtype)
    stage_fns = {"full step": (functools.partial(runner(den).full, x, text, pooled, ts), 1)}
    for skip_text in SKIPS:
        d = dens[skip_text][0]
        _, d_img, d_ctx = d.full(x, text, pooled, ts)
        stage_fns[f"skipping step {skip_text}"] = (functools.partial(runner(d).skipping, x, text, pooled, ts,
                                                                     d_img, d_ctx), 1)
    # The steps are interleaved (their ratio is a bar); the small stages are timed each on its own, since
    # right after a large call the runtimes' spinning worker threads would still compete with them.
    # Single steps are short next to whole schedules, so they get 3x the repeats for steadier medians.
    timings = measure_interleaved({n: (fn, 3 * args.repeats) for n, (fn, _) in stage_fns.items()}, args.warmup, cuda,
                                  on_round=lambda i, n: progress(f"batch {batch}: steps, round {i}/{n}")
                                  if i % 8 == 0 or i == n else None)
    d_img, d_ctx = d_img.to(dtype), d_ctx.to(dtype)  # the 3-10 deltas, for the MLP alone
    small = stage_calls(args.backend, den, split, comps, cfg, batch, latent, (x, text, pooled, ts), (d_img, d_ctx),
                        parts)
    for name, (fn, _) in small.items():
        timings[name] = measure_interleaved({name: (fn, 3 * args.repeats)}, args.warmup, cuda)[name]
    stages = {n: {"median_ms": timings[n].median_ms / per, "p90_ms": timings[n].p90_ms / per, "runs": timings[n].runs}
              for n, (_, per) in (stage_fns | small).items()}
    if "text encoding" in stages:
        stages["end to end 1.x skip 3-10"] = {
            k: stages["text encoding"][k] + schedules["1.x skip 3-10"][k] + stages["VAE decode"][k]
            for k in ("median_ms", "p90_ms")} | {"runs": args.repeats}  # sums of medians, not a measured run
    progress(f"batch {batch}: stages " + ", ".join(f"{n} {t['median_ms']:.2f} ms" for n, t in stages.items()))
    derived = {}
    for skip_text in SKIPS:
        k = SkipRange.parse(skip_text).count
        derived[f"skip/full {skip_text}"] = stages[f"skipping step {skip_text}"]["median_ms"] / stages["full step"]["median_ms"]
        derived[f"kept fraction {skip_text}"] = (cfg.num_layers - k) / cfg.num_layers
    derived["MLP / one block"] = stages["MLP (both streams)"]["median_ms"] / stages["one block"]["median_ms"]
    # The MLP replaces the whole skipped segment, so this is the ratio that decides the trade.
    derived["MLP / skipped segment 3-10"] = derived["MLP / one block"] / SkipRange.parse("3-10").count
    return {"batch": batch, "schedules": schedules, "stages": stages, "derived": derived}


@torch.no_grad()
def run(args) -> dict:
    cuda = args.device.startswith("cuda")
    dtype = DTYPES[args.dtype]
    transformer = make_transformer(args.arch, dtype, args.device)
    cfg = transformer.config
    scale = SD3_VAE_SCALE if args.arch in ARCHS else vae_scale(args.arch)  # the real architectures' VAE is SD3's
    resolution = args.resolution or cfg.sample_size * scale
    latent = (cfg.in_channels, resolution // scale, resolution // scale)
    text_len = SD3_TEXT_LENGTH if args.arch in ARCHS else TINY_TEXT_LEN
    comps = load_components(args.arch, cfg, ("text", "vae")) if args.arch not in ARCHS and components_on(args) else None
    parts = real_parts(args, dtype) if args.arch in ARCHS and components_on(args) else None
    with tempfile.TemporaryDirectory(prefix="onex-bench-") as tmp:  # ONNX graphs live only for the run
        dens = denoisers(args, transformer, resolution, Path(tmp))
        peer_dens = peers(args, transformer, dens)
        results = [measure_batch(args, b, cfg, dens, peer_dens, comps, latent, text_len, dtype, cuda, parts)
                   for b in args.batch]
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name() if cuda else None},
        "backend": args.trt if args.backend == "tensorrt" else args.backend,  # the TensorRT flavour by name
        "device": args.device, "dtype": args.dtype,
        "versions": {"python": platform.python_version(),
                     **_versions("torch", "diffusers", "onnxruntime", "cache-dit"),
                     **({args.trt: flavour_version(args.trt)} if args.backend == "tensorrt" else {})},
        "config": {"arch": args.arch, "resolution": resolution, "text_len": text_len, "batches": args.batch,
                   "cuda_graph": args.cuda_graph,
                   "warmup": args.warmup, "repeats": args.repeats, "num_layers": cfg.num_layers},
        "stage_methods": STAGE_METHODS[args.backend] | (REAL_PARTS if parts else {}),
        "components": ("measured" if comps is not None or parts else
                       "not measured (--components: SD3's encoders and VAE at real size; T5-XXL's encoder is "
                       f"{T5_XXL_GB[args.dtype]} GB in {args.dtype})" if args.arch in ARCHS else "not measured"),
        "peers": {name: "measured" if name in peer_dens else "not measured: " + (
                      "torch backend only" if args.backend != "torch" else "cache-dit is not installed")
                  for name in ("peer: skip_layers 3-10", "peer: cache-dit DBCache 3-10")},
        "results": results,
        "speedup_noise": speedup_noise(results),
        "bars": bars(results),
    }


def components_on(args) -> bool:
    """--components / --no-components; unset: on, but for a real architecture on the CPU (T5-XXL's encoder alone
    is 19 GB in float32)."""
    if args.components is not None:
        return args.components
    return args.arch not in ARCHS or args.device.startswith("cuda")


def real_parts(args, dtype) -> tuple:
    """SD3's text encoders and VAE decoder at their published sizes, random weights, in ``dtype`` on the device."""
    progress("making SD3's text encoders (CLIP-L, CLIP-G, T5-XXL) and VAE at real size, random weights")
    encoder = random_text_encoder(dtype, args.device)
    return encoder, LatentDecoder(random_vae()).to(args.device, dtype).eval()


def _versions(*packages: str) -> dict:
    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def speedup_noise(results: list[dict]) -> list[dict]:
    """The speed-ups over the teacher that exceed what the schedules allow, the NFE ratio (teacher's NFE / the
    row's), by more than :data:`SPEEDUP_TOLERANCE`: timing noise (a slow round of the teacher, clocks), not speed."""
    return [{"batch": r["batch"], "schedule": name, "speedup": s["speedup"], "nfe_bound": s["nfe_speedup"]}
            for r in results for name, s in r["schedules"].items()
            if s["speedup"] > s["nfe_speedup"] * (1 + SPEEDUP_TOLERANCE)]


def noise_warnings(report: dict) -> list[str]:
    """One line per speed-up flagged by :func:`speedup_noise`, for the command to print."""
    return [f"warning: batch {n['batch']}, {n['schedule']}: {n['speedup']:.1f}x over teacher 28x2 exceeds the "
            f"{n['nfe_bound']:.1f}x its NFE allows: timing noise, not a speed-up (see the p90s in the JSON)"
            for n in report.get("speedup_noise", [])]


def bars(results: list[dict]) -> list[dict]:
    """The issue's performance bars, checked against every batch measured. A speed-up flagged as noise meets no
    bar."""
    noisy = {(n["batch"], n["schedule"]) for n in speedup_noise(results)}
    out = []
    for r in results:
        d, s = r["derived"], r["schedules"]
        out.append({"batch": r["batch"], "bar": "skipping step <= kept fraction + 0.03 (3-10)",
                    "value": d["skip/full 3-10"], "limit": d["kept fraction 3-10"] + 0.03,
                    "met": d["skip/full 3-10"] <= d["kept fraction 3-10"] + 0.03})
        out.append({"batch": r["batch"], "bar": "MLP <= 5% of the segment it replaces (3-10)",
                    "value": d["MLP / skipped segment 3-10"], "limit": MLP_SHARE,
                    "met": d["MLP / skipped segment 3-10"] <= MLP_SHARE})
        speedup = s["1.x skip 3-10"]["speedup"]
        out.append({"batch": r["batch"], "bar": "1.x (3-10) >= 30x faster than teacher 28x2", "value": speedup,
                    "limit": 30.0, "met": speedup >= 30 and (r["batch"], "1.x skip 3-10") not in noisy})
    return out


def default_trt() -> str:
    """Full TensorRT where installed (data-centre GPUs), else TensorRT-RTX."""
    return "tensorrt" if flavour_version("tensorrt") else "tensorrt-rtx"


@click.command(name="bench.latency", help=command_help(__doc__))
@click.option("--arch", default="tiny-sd3", show_default=True,
              help=f"tiny-sd3 | tiny-sd35-large | {' | '.join(ARCHS)} (random weights)")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default="torch", show_default=True,
              help="tensorrt builds engines first and needs a GPU (--device cuda)")
@click.option("--trt", type=click.Choice(["tensorrt", "tensorrt-rtx"]), default=None,
              help="TensorRT flavour for --backend tensorrt (default: tensorrt if installed, else tensorrt-rtx)")
@click.option("--device", type=DEVICE, default="cpu", show_default=True, help="cpu, cuda or cuda:N")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True)
@click.option("--resolution", type=RESOLUTION, default=None,
              help="pixels, a multiple of 16 (default: the model's native size)")
@click.option("--batch", type=POSITIVE_INT, multiple=True, help="batch size (repeatable; default: 1 and 4)")
@click.option("--warmup", type=NON_NEGATIVE_INT, default=2, show_default=True)
@click.option("--repeats", type=POSITIVE_INT, default=8, show_default=True)
@click.option("--cuda-graph", is_flag=True,
              help="replay each transformer step as a captured CUDA graph (GPU; cache-dit stays eager)")
@click.option("--components/--no-components", default=None,
              help="time the text encoders and VAE decoder too; real architectures get SD3's at their published sizes "
                   "with random weights (default: on with CUDA, off on the CPU)")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="a new folder for JSON/Markdown/PNG (default bench/results/<arch>-<backend>-<dtype>-<device>)")
@replace_option
def command(**options) -> int:
    args = SimpleNamespace(**options)
    args.batch = list(args.batch) or [1, 4]
    cuda = args.device.startswith("cuda")
    if args.backend == "onnxruntime" and (cuda or args.dtype != "fp32"):
        raise click.UsageError("--backend onnxruntime runs fp32 on the CPU here")
    if args.backend == "tensorrt" and not cuda:
        raise click.UsageError("--backend tensorrt runs engines on a GPU: add --device cuda")
    if args.cuda_graph and (args.backend == "onnxruntime" or not cuda):
        raise click.UsageError("--cuda-graph needs --device cuda and --backend torch or tensorrt")
    if args.trt is not None and args.backend != "tensorrt":
        raise click.UsageError("--trt applies to --backend tensorrt only")
    if args.backend == "tensorrt":
        args.trt = args.trt or default_trt()
    if cuda:  # --backend tensorrt has --device cuda by now
        require_gpu("run the benchmark on a GPU machine, or with --device cpu and --backend torch or onnxruntime")
    if args.backend == "tensorrt":
        load_trt(args.trt)  # installed, before the model is made and the graphs are exported
    pyplot("bench.latency")  # before the run, not after it, as the output folder is
    device = (torch.cuda.get_device_name() if cuda else "cpu").replace(" ", "-").lower()
    graph = "-cudagraph" if args.cuda_graph else ""
    backend = args.trt if args.backend == "tensorrt" else args.backend
    out = args.out or Path("bench/results") / f"{args.arch}-{backend}{graph}-{args.dtype}-{device}"
    with report_folder(out, FILES, replace=args.replace):
        report = run(args)
        table = markdown(report)
        plot(report, out / "latency.png")  # the figure first: the results files, written last, say it is complete
        write_results(out, "latency", report, table)
    for line in noise_warnings(report):
        print(line, file=sys.stderr)
    print(table)
    print(f"wrote {out}/latency.json, latency.md, latency.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    return invoke(command, argv, "python -m bench.latency")


if __name__ == "__main__":
    sys.exit(run_main(main))
