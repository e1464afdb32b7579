"""The build benchmark: time and peak memory of `onex-export build` on a real architecture, against a naive
monolithic export + engine build of the same checkpoint, in one run.

    python -m bench.build --arch sd3-medium                      # fp16, 1024 px, RTX engines, gate at the optimum
    python -m bench.build --arch sd35-large --precision bf16 --gate none
    python -m bench.build --arch sd35-large --weight-scale 0.5 --trt none --no-naive   # the weights of issue 25

1. Random weights of the real shapes go straight to disk in fp16/bf16, sharded the way published checkpoints
   are (never a float32 copy in memory; see ``bench/random_weights.py``).
2. ``onex-export build --model <that folder> --components none ...`` runs in a child process; its manifest
   gives each stage's time and peak memory (load, export, engines, gate) and each graph's export and engine
   time.
3. The naive way, in a child process too: ``SD3Transformer2DModel.from_pretrained`` in the build precision,
   one ``torch.onnx.export`` of the whole transformer traced at the real size, one engine.

Each child runs under a memory watchdog: past ``--rss-limit-gib`` (default 21, on a 24 GiB machine) it is
stopped and the run records where and when, instead of taking the machine down. JSON + Markdown go to a new
folder, ``bench/results/build-<arch>-<precision>-<trt>-cpu/`` by default (``--replace`` to replace an earlier run's).
"""
from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import click
import torch

from onex_export.contract import FILENAME, Manifest, read_manifest
from onex_export.export.precision import PRECISIONS
from onex_export.export.stages import StageClock, rss_bytes
from onex_export.outputs import report_folder
from onex_export.models.text import SD3_TEXT_LENGTH
from onex_export.params import FiniteFloat
from onex_export.trt import load_trt

from .arguments import POSITIVE_INT, RESOLUTION, SKIP, command_help, invoke, replace_option, run_main
from .random_weights import ARCHS, write_checkpoint
from .report import write_results

GIB = 2**30
FILES = ("build.json", "build.md", "build.log", "naive.log")  # the logs with --keep-logs


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Watchdog:
    """Samples a child's resident memory, its own children's included; kills it past ``limit`` bytes. ``peak`` is
    the largest sample."""

    def __init__(self, proc: subprocess.Popen, limit: int, interval: float = 0.2):
        self.proc, self.limit, self.interval = proc, limit, interval
        self.peak, self.killed_at = 0, None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _rss(self) -> int:
        """The child's resident memory with that of its own children (the build's gate reference process)."""
        total, pending = 0, [self.proc.pid]
        while pending:
            pid = pending.pop()
            total += rss_bytes(pid)
            try:
                pending += [int(c) for t in Path(f"/proc/{pid}/task").iterdir()
                            for c in (t / "children").read_text().split()]
            except OSError:
                continue  # gone meanwhile
        return total

    def _run(self) -> None:
        while self.proc.poll() is None:
            rss = self._rss()
            self.peak = max(self.peak, rss)
            if rss > self.limit and self.killed_at is None:
                self.killed_at = rss
                self.proc.kill()
            time.sleep(self.interval)

    def join(self) -> None:
        self._thread.join()


def run_child(argv: list[str], limit: int, log_path: Path) -> dict:
    """Run a child under the watchdog; its stdout/stderr go to ``log_path`` (and JSON lines are collected)."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        dog = Watchdog(proc, limit)
        events, last = [], ""
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if line.startswith("{"):
                    events.append(json.loads(line))
                elif line.strip():
                    last = line.strip()
                    progress(f"    {last[:150]}")
        except BaseException:  # an interrupt stops the child too (it cleans up on SIGTERM)
            proc.terminate()
            proc.wait()
            raise
        code = proc.wait()
        dog.join()
    return {"exit_code": code, "seconds": round(time.perf_counter() - start, 1), "peak_rss_bytes": dog.peak,
            "killed_over_limit": dog.killed_at is not None, "events": events, "last_line": last}


# -- the naive way, run as a child: python -m bench.build --naive-worker ... ----------------------------------

def naive_worker(folder: Path, precision: str, resolution: int, text_len: int, trt: str, out: Path) -> None:
    """Whole model through diffusers, one ONNX traced at the real size, one engine; a JSON line per stage."""
    from diffusers import SD3Transformer2DModel

    from onex_export.export.onnx_export import export_graph
    from onex_export.contract import GraphSpec, TensorSpec
    from onex_export.export.tensorrt import EngineBuildOptions, build_engine
    from onex_export.models.weights import module_nbytes

    dtype, clock = PRECISIONS[precision], StageClock()

    def emit(stage):
        print(json.dumps({"stage": stage, **clock.records[stage].to_json()}), flush=True)

    with clock.stage("load"):
        model = SD3Transformer2DModel.from_pretrained(str(folder), torch_dtype=dtype).eval()
    emit("load")
    cfg, name = model.config, "transformer"
    lat, work = resolution // 8, str(dtype).removeprefix("torch.")
    spec = GraphSpec(name, (TensorSpec("hidden_states", (1, cfg.in_channels, lat, lat), work),
                            TensorSpec("encoder_hidden_states", (1, text_len, cfg.joint_attention_dim), work),
                            TensorSpec("pooled_projections", (1, cfg.pooled_projection_dim), work),
                            TensorSpec("timestep", (1,), work)),
                     (TensorSpec("velocity", (1, cfg.out_channels, lat, lat), work),))

    class Whole(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x, t, p, ts):
            return self.m(hidden_states=x, encoder_hidden_states=t, pooled_projections=p, timestep=ts, return_dict=False)[0]

    inputs = tuple(torch.randn(*t.shape).to(dtype) for t in spec.inputs[:3]) + (torch.full((1,), 500.0, dtype=dtype),)
    with clock.stage("export"):
        weights = module_nbytes(model)
        export_graph(Whole(model), spec, inputs, out, weights)
    emit("export")
    del model
    if trt != "none":
        with clock.stage("engine"):
            build_engine(out / f"{name}.onnx", out / f"{name}.plan", {}, EngineBuildOptions(trt))
        emit("engine")


# -- the benchmark --------------------------------------------------------------------------------------------

def run(args) -> dict:
    limit = int(args.rss_limit_gib * GIB)
    work = Path(tempfile.mkdtemp(prefix="onex-bench-build-", dir=args.workdir))
    report = {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpus": torch.get_num_threads(), "memory_gib": _memory_gib()},
              "commit": _commit(),
              "config": {"arch": args.arch, "precision": args.precision, "resolution": args.resolution,
                         "text_len": args.text_len, "skip": args.skip, "trt": args.trt, "gate": args.gate,
                         "weight_scale": args.weight_scale, "max_graph_gib": args.max_graph_gib,
                         "rss_limit_gib": args.rss_limit_gib}}
    try:
        clock = StageClock()
        checkpoint = work / args.arch
        with clock.stage("write"):
            write_checkpoint(ARCHS[args.arch], checkpoint, PRECISIONS[args.precision], progress=progress,
                             scale=args.weight_scale)
        files = sorted(checkpoint.glob("*.safetensors"))
        report["checkpoint"] = {"files": len(files), "bytes": sum(f.stat().st_size for f in files),
                                **clock.records["write"].to_json()}
        progress(f"wrote {len(files)} shard(s), {report['checkpoint']['bytes'] / GIB:.2f} GiB, "
                 f"in {clock.records['write'].seconds:.0f} s")
        out = work / "build"
        argv = [sys.executable, "-m", "onex_export.cli", "build", "--model", str(checkpoint), "--skip", args.skip,
                "--precision", args.precision, "--components", "none", "--resolution", str(args.resolution),
                "--text-len", str(args.text_len), "--batch", "1", "--trt", args.trt, "--gate", args.gate,
                "--max-graph-gib", str(args.max_graph_gib), "--out", str(out)]
        progress("onex-export build ...")
        ours = run_child(argv, limit, work / "build.log")
        manifest = read_manifest(out) if (out / FILENAME).is_file() else None
        report["onex_export"] = summarize_build(ours, manifest)
        if args.naive:
            progress("naive: from_pretrained + one ONNX traced at full size + one engine ...")
            naive_out = work / "naive"
            naive_out.mkdir()
            argv = [sys.executable, "-m", "bench.build", "--naive-worker", str(checkpoint), "--precision", args.precision,
                    "--resolution", str(args.resolution), "--text-len", str(args.text_len), "--trt", args.trt,
                    "--workdir", str(naive_out)]
            naive = run_child(argv, limit, work / "naive.log")
            naive["stages"] = {e["stage"]: {k: e[k] for k in ("seconds", "peak_rss_bytes")} for e in naive.pop("events")}
            report["naive"] = naive
        if args.keep_logs:
            for log in ("build.log", "naive.log"):
                if (work / log).is_file():
                    shutil.copy(work / log, Path(args.out_dir) / log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def summarize_build(child: dict, manifest: Manifest | None) -> dict:
    out = {k: v for k, v in child.items() if k != "events"}
    if manifest is None:
        return out
    stages = {k: v for k, v in manifest.stages.items() if k != "per_stage_peak"}
    # the watchdog samples; the stages' own peaks (VmHWM) catch what falls between two samples
    out["peak_rss_bytes"] = max([out["peak_rss_bytes"], *(r["peak_rss_bytes"] for r in stages.values())])
    graphs = {n: {"blocks": (g.definition or {}).get("blocks"), "weight_bytes": g.weight_bytes,
                  "export_seconds": g.export_seconds,
                  "build_seconds": g.build_seconds if g.build_seconds is not None else 0.0,
                  "engine_bytes": g.engine.bytes if g.engine else None} for n, g in manifest.graphs.items()}
    v = manifest.verifications[-1]
    out.update(status=manifest.status, stages=stages, graphs=graphs,
               gate={"status": v["status"], "reason": v.get("reason"), "seconds": v.get("seconds"),
                     "rows": len(v["rows"]), "failed_rows": sum(not r["passed"] for r in v["rows"]),
                     "worst_max_rel": max((r["max_rel"] for r in v["rows"]), default=None),
                     "range_check": {k: (v["range_check"] or {}).get(k) for k in ("limit", "first_overflow")},
                     "time_by_graph": v.get("time_by_graph", []), "shared_runs": v.get("shared_runs", 0),
                     "reference_process": v.get("reference_process")})
    return out


def _commit() -> str | None:
    """The checkout the benchmark ran from (``+dirty`` with uncommitted changes), for the record."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty.strip() else "")


def _memory_gib() -> float:
    match = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    return round(int(match.group(1)) / 2**20, 1) if match else 0.0


def markdown(report: dict) -> str:
    c, ours = report["config"], report["onex_export"]
    lines = [f"# Build: {c['arch']} {c['precision']} at {c['resolution']} px, {c['trt']} engines, gate {c['gate']}", "",
             f"Machine: {report['machine']['processor']}, {report['machine']['cpus']} threads, "
             f"{report['machine']['memory_gib']} GiB; watchdog at {c['rss_limit_gib']} GiB; commit "
             f"{report.get('commit') or 'unknown'}. Checkpoint (random weights x{c['weight_scale']:g}): "
             f"{report['checkpoint']['files']} file(s), {report['checkpoint']['bytes'] / GIB:.2f} GiB, written in "
             f"{report['checkpoint']['seconds']:.0f} s.", "",
             "| | stage | seconds | peak RSS GiB |", "|---|---|---|---|"]
    for name, r in ours.get("stages", {}).items():
        lines.append(f"| onex-export | {name} | {r['seconds']:.1f} | {r['peak_rss_bytes'] / GIB:.2f} |")
    lines.append(f"| onex-export | **whole process** | {ours['seconds']:.1f} | {ours['peak_rss_bytes'] / GIB:.2f} |")
    naive = report.get("naive")
    if naive:
        for name, r in naive["stages"].items():
            lines.append(f"| naive | {name} | {r['seconds']:.1f} | {r['peak_rss_bytes'] / GIB:.2f} |")
        end = ("stopped by the watchdog over the limit" if naive["killed_over_limit"] else
               f"exit {naive['exit_code']}" + (f": {naive['last_line'][:120]}" if naive["exit_code"] else ""))
        lines.append(f"| naive | **whole process** ({end}) | {naive['seconds']:.1f} | {naive['peak_rss_bytes'] / GIB:.2f} |")
    if ours.get("graphs"):
        lines += ["", "| graph | blocks | weights GiB | export s | engine s | engine GiB |", "|---|---|---|---|---|---|"]
        for n, g in ours["graphs"].items():
            eng = f"{g['engine_bytes'] / GIB:.2f}" if g["engine_bytes"] else "-"
            lines.append(f"| {n} | {g['blocks'] or '-'} | {g['weight_bytes'] / GIB:.2f} | {g['export_seconds']:.1f} | "
                         f"{g['build_seconds']:.1f} | {eng} |")
    if ours.get("gate"):
        gt = ours["gate"]
        lines += ["", f"Gate: {gt['status']}" + (f" ({gt['reason']})" if gt["reason"] else "") +
                  (f", {gt['rows']} outputs compared, {gt['failed_rows']} failed, worst max rel {gt['worst_max_rel']:.3g}"
                   if gt["rows"] else "") + f"; fp16 range check: {gt['range_check']}."]
        if gt.get("time_by_graph"):
            lines += ["", f"Gate time by graph (loading included; {gt['shared_runs']} run(s) shared by a graph's check "
                      "and the chain):", "", "| side | graph | runs | seconds | share |", "|---|---|---|---|---|"]
            for r in sorted(gt["time_by_graph"], key=lambda r: -r["seconds"]):
                lines.append(f"| {r['side']} | {r['graph']} | {r['runs']} | {r['seconds']:.1f} | {100 * r['share']:.1f}% |")
        if gt.get("reference_process"):
            rp = gt["reference_process"]
            lines += ["", f"The reference rows were made by a second process during export and engines: "
                      f"{rp['seconds']:.1f} s, the gate waited {rp['waited_seconds']:.1f} s for it; its peak "
                      f"{rp['peak_rss_bytes'] / GIB:.2f} GiB (in the whole build's peak above, measured with its children)."]
    lines.append(f"\nBuild status: {ours.get('status', 'no manifest: exit ' + str(ours['exit_code']))}.")
    return "\n".join(lines) + "\n"


@click.command(name="bench.build", help=command_help(__doc__))
@click.option("--arch", type=click.Choice(list(ARCHS)), default="sd3-medium", show_default=True)
@click.option("--precision", type=click.Choice(["fp16", "bf16"]), default="fp16", show_default=True)
@click.option("--resolution", type=RESOLUTION, default=1024, show_default=True)
@click.option("--text-len", type=POSITIVE_INT, default=SD3_TEXT_LENGTH, show_default=True)
@click.option("--skip", type=SKIP, default="3-10", show_default=True)
@click.option("--trt", type=click.Choice(["tensorrt-rtx", "tensorrt", "none"]), default="tensorrt-rtx",
              show_default=True)
@click.option("--gate", type=click.Choice(["opt", "none"]), default="opt", show_default=True)
@click.option("--weight-scale", type=FiniteFloat(min=0, min_open=True), default=1.0, show_default=True,
              help="scale of the random linear weights (default initialisation x this; 0.5: issue 25's run)")
@click.option("--max-graph-gib", type=FiniteFloat(min=0, min_open=True), default=2.0, show_default=True,
              help="onex-export build's per-graph weight budget")
@click.option("--naive/--no-naive", default=True, help="run the naive baseline too (--no-naive: skip it)")
@click.option("--rss-limit-gib", type=FiniteFloat(min=0, min_open=True), default=21.0, show_default=True)
@click.option("--workdir", default=None, help="where the checkpoint and builds are written (removed after)")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="a new folder (default bench/results/build-<arch>-<precision>-<trt>-cpu)")
@replace_option
@click.option("--keep-logs", is_flag=True, help="copy the build's log beside the results")
@click.option("--naive-worker", type=click.Path(path_type=Path), default=None, hidden=True)
def command(**options) -> int:
    args = SimpleNamespace(**options)
    args.skip = str(args.skip)
    if args.naive_worker is not None:
        naive_worker(args.naive_worker, args.precision, args.resolution, args.text_len, args.trt, Path(args.workdir))
        return 0
    if args.trt != "none":
        load_trt(args.trt)  # installed, before minutes of writing the checkpoint
    args.out_dir = args.out or Path("bench/results") / f"build-{args.arch}-{args.precision}-{args.trt}-cpu"
    with report_folder(args.out_dir, FILES, replace=args.replace):
        report = run(args)
        table = markdown(report)
        write_results(args.out_dir, "build", report, table)
    print(table)
    print(f"wrote {args.out_dir}/build.json, build.md")
    return 0 if report["onex_export"].get("status") in ("passed", "unverified") else 1


def main(argv: list[str] | None = None) -> int:
    return invoke(command, argv, "python -m bench.build")


if __name__ == "__main__":
    sys.exit(run_main(main))
