"""Long runs, and what they write (issue 23): optional dependencies refused before the work (exit 2), progress on
stderr, benchmark results never replaced without --replace, speed-ups above the NFE bound flagged as noise, and the
MLP's bar against the segment it replaces. The benchmarks' work functions are replaced by recorders here: what is
tested is what happens before and after the work, not the work."""
import copy
import importlib
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench import latency
from bench.arguments import run_main
from bench.report import markdown
from onex_export.cli import main as cli
from onex_export.outputs import LOCK, RECORD
from onex_export.progress import LineProgress, progress_bar

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
TINY_LATENCY = RESULTS / "tiny-sd3-torch-fp32-cpu"


class Recorder:
    """Stands in for a benchmark's ``run(args)``: counts the calls, returns a report."""

    def __init__(self, report=None):
        self.calls, self.report = 0, report

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return copy.deepcopy(self.report)


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_probe_without_matplotlib_is_refused_before_any_work(tmp_path, monkeypatch):
    import onex_export.probe

    work = Recorder()
    monkeypatch.setattr(onex_export.probe, "run", work)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    res = CliRunner().invoke(cli, ["probe", "--model", "tiny-sd3", "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert "the probe needs matplotlib for its plots, which is not installed" in res.output
    assert "pip install -c constraints.txt -e '.[bench]'" in res.output
    assert work.calls == 0 and not (tmp_path / "out").exists()


def test_latency_without_matplotlib_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    work = Recorder()
    monkeypatch.setattr(latency, "run", work)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as info:
        run_main(lambda: latency.main(["--out", str(tmp_path / "out")]))
    assert info.value.code == 2 and "bench.latency needs matplotlib" in capsys.readouterr().err
    assert work.calls == 0 and not (tmp_path / "out").exists()


def test_progress_off_a_terminal_is_plain_lines_with_real_counts():
    log = io.StringIO()  # not a terminal: a log file, CI
    bar = progress_bar(40, "probe", "step", file=log, interval=0)
    assert isinstance(bar, LineProgress)
    bar.update(10)
    bar.set_postfix_str("teacher 28x2")
    bar.update(30)
    bar.close()  # the last count was written already: nothing more
    assert log.getvalue().splitlines() == ["probe: 10/40 step (25%), 0:00 elapsed",
                                           "probe: 40/40 step (100%), 0:00 elapsed, teacher 28x2"]
    quiet = io.StringIO()
    with progress_bar(5, "probe", file=quiet, interval=3600) as short:  # ends within its first interval
        short.update(5)
    assert quiet.getvalue() == ""


# (module, its result files, a committed folder of them, extra arguments)
BENCHES = [
    ("bench.latency", ["latency.json", "latency.md", "latency.png"], TINY_LATENCY, []),
    ("bench.serve", ["serve.json", "serve.md", "serve.png"], RESULTS / "serve-tiny-sd3-onnxruntime-cpu", []),
    ("bench.build", ["build.json", "build.md"], RESULTS / "build-sd35-large-fp16-half-scale-tensorrt-rtx-cpu", []),
    ("bench.step_profile", ["profile.json", "profile.md"], RESULTS / "profile-sd3-medium-bf16-nvidia-h100-80gb-hbm3",
     []),
]


@pytest.mark.parametrize("module, files, committed, argv", BENCHES, ids=[b[0] for b in BENCHES])
def test_a_benchmark_replaces_earlier_results_only_with_replace(module, files, committed, argv, tmp_path, monkeypatch,
                                                                capsys):
    if module == "bench.serve":
        pytest.importorskip("tritonclient.grpc")
    bench = importlib.import_module(module)
    out = tmp_path / "results"
    shutil.copytree(committed, out)  # committed results, with the record that says onex-export wrote them
    before = snapshot(out)
    report = json.loads((committed / files[0]).read_text()) | {"marker": "this run"}
    work = Recorder(report)
    monkeypatch.setattr(bench, "run", work)
    with pytest.raises(SystemExit) as info:
        run_main(lambda: bench.main([*argv, "--out", str(out)]))
    err = capsys.readouterr().err
    assert info.value.code == 2 and "holds the results of an earlier run" in err
    assert "--out NEW_FOLDER, or pass --replace" in err
    assert work.calls == 0 and snapshot(out) == before  # byte-identical, no lock left behind

    assert bench.main([*argv, "--out", str(out), "--replace"]) in (0, 1)  # build: 1 when its report's build failed
    assert work.calls == 1
    assert json.loads((out / files[0]).read_text())["marker"] == "this run"
    record = json.loads((out / RECORD).read_text())
    assert set(files) <= set(record) and not (out / LOCK).exists()

    (out / files[1]).write_text("my notes\n")  # a user's file: refused even with --replace
    with pytest.raises(SystemExit) as info:
        run_main(lambda: bench.main([*argv, "--out", str(out), "--replace"]))
    assert info.value.code == 2 and "which onex-export did not write there" in capsys.readouterr().err
    assert (out / files[1]).read_text() == "my notes\n" and work.calls == 1


@pytest.mark.parametrize("module, committed, argv", [
    ("bench.latency", TINY_LATENCY, []),  # `python -m bench.latency`, as the README shows it
    ("bench.serve", RESULTS / "serve-tiny-sd3-onnxruntime-cpu", []),  # `python -m bench.serve`
])
def test_the_readme_commands_refuse_to_replace_the_committed_results(module, committed, argv, monkeypatch, capsys):
    if module == "bench.serve":
        pytest.importorskip("tritonclient.grpc")
    bench = importlib.import_module(module)
    monkeypatch.chdir(RESULTS.parent.parent)  # the checkout, where the README's commands run
    before = snapshot(committed)
    work = Recorder()
    monkeypatch.setattr(bench, "run", work)
    with pytest.raises(SystemExit) as info:
        run_main(lambda: bench.main(argv))
    assert info.value.code == 2 and committed.name in capsys.readouterr().err
    assert work.calls == 0 and snapshot(committed) == before


def constructed(speedup_4: float) -> list[dict]:
    """Two batches of a latency result: the teacher at 56 NFE, 1.x skip 3-10 at 1 + 16/24."""
    def batch(b, teacher_ms, onex_ms):
        nfe = 1 + 16 / 24
        return {"batch": b,
                "schedules": {"teacher 28x2": {"nfe": 56, "median_ms": teacher_ms, "p90_ms": teacher_ms, "runs": 2,
                                               "speedup": 1.0, "nfe_speedup": 1.0},
                              "1.x skip 3-10": {"nfe": nfe, "median_ms": onex_ms, "p90_ms": onex_ms, "runs": 8,
                                                "speedup": teacher_ms / onex_ms, "nfe_speedup": 56 / nfe}},
                "stages": {"full step": {"median_ms": 10.0, "p90_ms": 11.0, "runs": 8}},
                "derived": {"skip/full 3-10": 0.68, "kept fraction 3-10": 16 / 24, "MLP / one block": 0.16,
                            "MLP / skipped segment 3-10": 0.02}}
    return [batch(1, 3100.0, 100.0), batch(4, speedup_4 * 400.0, 400.0)]


def test_a_speedup_above_the_nfe_bound_is_flagged_as_noise(capsys):
    results = constructed(82.2)  # batch 1: 31.0x, under the 33.6x bound; batch 4: 82.2x, far above it
    noise = latency.speedup_noise(results)
    assert noise == [{"batch": 4, "schedule": "1.x skip 3-10", "speedup": pytest.approx(82.2), "nfe_bound": 33.6}]
    bars = {(b["batch"], b["bar"]): b for b in latency.bars(results)}
    speed = "1.x (3-10) >= 30x faster than teacher 28x2"
    assert bars[(1, speed)]["met"] is True and bars[(4, speed)]["met"] is False  # 82.2 >= 30, but noise
    report = {"config": {"arch": "tiny-sd3", "resolution": 128}, "backend": "torch", "dtype": "fp32",
              "machine": {"gpu": None, "processor": "x86_64"}, "results": results, "speedup_noise": noise,
              "bars": latency.bars(results)}
    table = markdown(report)
    assert "| 1.x skip 3-10 | 1.667 | 400.00 | 400.00 | 82.2x (noise) | 33.6x |" in table
    assert "| 1.x skip 3-10 | 1.667 | 100.00 | 100.00 | 31.0x | 33.6x |" in table  # within the bound: as measured
    assert "Noise: batch 4, 1.x skip 3-10: 82.2x over teacher 28x2, above what the schedule's NFE allows" in table
    assert latency.noise_warnings(report) == [
        "warning: batch 4, 1.x skip 3-10: 82.2x over teacher 28x2 exceeds the 33.6x its NFE allows: timing noise, "
        "not a speed-up (see the p90s in the JSON)"]
    # negative: within the 5% tolerance above the bound, a figure is the schedule's, not noise
    assert latency.speedup_noise(constructed(33.6 * 1.04)) == []
    assert latency.speedup_noise(constructed(33.6 * 1.06))[0]["batch"] == 4


def test_the_mlp_bar_is_against_the_segment_it_replaces():
    results = constructed(30.0)
    mlp = [b for b in latency.bars(results) if b["bar"].startswith("MLP")]
    assert [(b["bar"], b["value"], b["limit"], b["met"]) for b in mlp] == [
        ("MLP <= 5% of the segment it replaces (3-10)", 0.02, 0.05, True)] * 2
    results[1]["derived"]["MLP / skipped segment 3-10"] = 0.051
    assert [b["met"] for b in latency.bars(results) if b["bar"].startswith("MLP")] == [True, False]
    assert not any("one block" in b["bar"] for b in latency.bars(results))  # the old bar is retired


def test_the_committed_latency_reports_carry_the_current_bars_and_noise():
    """The committed reports were re-derived from their measured numbers with today's bars: JSON and table agree."""
    for path in sorted(RESULTS.glob("*/latency.json")):
        report = json.loads(path.read_text())
        assert report["bars"] == latency.bars(report["results"]), path
        assert report["speedup_noise"] == latency.speedup_noise(report["results"]), path
        assert (path.parent / "latency.md").read_text() == markdown(report), path
