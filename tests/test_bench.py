"""The latency benchmark end to end on the tiny model (small repeat counts: this checks that it runs
and reports consistently, not how fast anything is)."""
import json

import pytest
from PIL import Image

from bench.latency import main
from bench.timing import measure_interleaved

SCHEDULES = ["teacher 28x2", "4-step", "2-step", "1.x skip 3-8", "1.x skip 3-10"]


def check_report(out, batches):
    report = json.loads((out / "latency.json").read_text())
    assert [r["batch"] for r in report["results"]] == batches
    for r in report["results"]:
        assert list(r["schedules"])[:5] == SCHEDULES
        s = r["schedules"]
        assert s["teacher 28x2"]["nfe"] == 56 and round(s["1.x skip 3-10"]["nfe"], 3) == 1.667
        assert round(s["1.x skip 3-10"]["nfe_speedup"], 1) == 33.6
        assert all(v["median_ms"] > 0 and v["p90_ms"] >= v["median_ms"] for v in s.values())
        # Speed itself is the benchmark's to report, not a test's to assert: only consistency here.
        assert s["1.x skip 3-10"]["speedup"] == pytest.approx(s["teacher 28x2"]["median_ms"] / s["1.x skip 3-10"]["median_ms"])
        assert r["derived"]["kept fraction 3-10"] == pytest.approx(16 / 24)
    assert {b["bar"] for b in report["bars"]} >= {"MLP < 1% of one block"}
    table = (out / "latency.md").read_text()
    assert "| 1.x skip 3-10 | 1.667 |" in table and "## Performance bars" in table
    with Image.open(out / "latency.png") as im:
        assert im.format == "PNG" and im.size[0] > 500
    return report


def test_benchmark_torch_backend(tmp_path):
    assert main(["--repeats", "2", "--warmup", "1", "--batch", "1", "2", "--out", str(tmp_path)]) == 0
    report = check_report(tmp_path, [1, 2])
    assert "end to end 1.x skip 3-10" in report["results"][0]["stages"]
    assert report["results"][0]["schedules"]["peer: skip_layers 3-10"]["nfe"] == pytest.approx(1 + 16 / 24)
    assert report["results"][0]["schedules"]["peer: cache-dit DBCache 3-10"]["nfe"] == pytest.approx(1 + 16 / 24)
    assert set(report["peers"].values()) == {"measured"}
    assert report["versions"]["cache-dit"] == "1.5.3"


def test_benchmark_onnxruntime_backend(tmp_path):
    assert main(["--backend", "onnxruntime", "--repeats", "1", "--warmup", "0", "--batch", "1", "--out", str(tmp_path)]) == 0
    report = check_report(tmp_path, [1])
    assert not any(name.startswith("peer") for name in report["results"][0]["schedules"])
    # Every stage runs on ONNX Runtime, the block as the 8-block segment graph / 8.
    assert report["stage_methods"]["one block"].endswith("/ 8")
    assert {"text encoding", "VAE decode", "end to end 1.x skip 3-10"} <= set(report["results"][0]["stages"])
    assert set(report["peers"].values()) == {"not measured: torch backend only"}


def test_interleaved_timing_runs_in_rounds_after_warmup():
    calls = []
    timings = measure_interleaved({"a": (lambda: calls.append("a"), 3), "b": (lambda: calls.append("b"), 2)},
                                  warmup=1)
    assert calls == ["a", "b", "a", "b", "a", "b", "a"]  # warm-up a, b; then rounds a b, a b, a
    assert (timings["a"].runs, timings["b"].runs) == (3, 2)
    assert all(t.p90_ms >= t.median_ms >= 0 for t in timings.values())
