"""The gate's float32 reference made in a second process while the build exports (real child processes, real
builds of the embedded tiny model)."""
import multiprocessing

import pytest

from onex_export.build.run import BuildConfig, build
from onex_export.check.background import BackgroundReference, ReferenceJob
from onex_export.check.gate import GateConfig
from onex_export.config import SkipRange
from onex_export.errors import OnexError
from onex_export.export.graphs import build_plans, transformer_graphs
from onex_export.export.precision import PrecisionPolicy
from onex_export.export.shapes import DimRange, ShapeConfig
from onex_export.models.weights import split_on_meta, transformer_source

SKIP = SkipRange(3, 10)


def test_a_reference_made_in_a_second_process_gates_the_build_as_one_made_in_the_build(tmp_path):
    """Both ways give the same rows (the reference's float32 to its last bits or within a thread count's rounding),
    the same range check, and a reference row per graph in the time table."""
    lines, records = [], {}
    for background in (False, True):
        manifest = build(BuildConfig(model="tiny-sd3", skip=SKIP, out=tmp_path / f"bg-{background}", trt="none",
                                     components=(), reference_process=background),
                         log=lines.append if background else lambda _: None)
        records[background] = manifest.verifications[0]
    here, there = records[False], records[True]
    assert here["status"] == there["status"] == "passed"
    assert [(r["case"], r["output"]) for r in here["rows"]] == [(r["case"], r["output"]) for r in there["rows"]]
    for a, b in zip(here["rows"], there["rows"]):
        assert b["max_abs"] == pytest.approx(a["max_abs"], rel=1e-3, abs=1e-9), (a, b)
    assert here["range_check"]["max_abs"].keys() == there["range_check"]["max_abs"].keys()
    for key, value in here["range_check"]["max_abs"].items():
        assert there["range_check"]["max_abs"][key] == pytest.approx(value, rel=1e-5)
    assert {r["graph"] for r in there["time_by_graph"] if r["side"] == "reference"} == {
        "head", "segment", "reuse", "tail"}
    assert any("reference made in a second process" in line for line in lines)
    assert here["reference_process"] is None
    process = there["reference_process"]
    assert process["seconds"] > 0 and process["waited_seconds"] >= 0 and process["peak_rss_bytes"] > 100 * 2**20
    assert not any(p.name.startswith(".gate-reference") for p in (tmp_path / "bg-True").iterdir())
    assert not multiprocessing.active_children()


def _job(model: str, resolution: int = 32) -> ReferenceJob:
    config, _ = transformer_source("tiny-sd3")
    split = split_on_meta(config, None, SKIP)
    defs = transformer_graphs(split, PrecisionPolicy("fp32"))[0]
    shapes = ShapeConfig(DimRange(1, 1, 1), DimRange(resolution, resolution, resolution), DimRange(16, 16, 16), 8)
    return ReferenceJob(model, None, SKIP, tuple(defs), build_plans(defs), shapes, GateConfig(), 1.0, 1)


def test_a_failed_reference_is_the_builds_error_and_leaves_no_process(tmp_path):
    reference = BackgroundReference(_job(str(tmp_path / "no-such-model")), tmp_path)
    try:
        with pytest.raises(OnexError, match="the gate's float32 reference failed: .*no-such-model"):
            reference.result()
    finally:
        reference.close()
    assert not reference.process.is_alive() and list(tmp_path.iterdir()) == []


def test_closing_stops_a_reference_still_running(tmp_path):
    reference = BackgroundReference(_job("tiny-sd3", resolution=512), tmp_path)  # many seconds at 512 px
    reference.close()
    assert not reference.process.is_alive() and reference.process.exitcode != 0
    assert list(tmp_path.iterdir()) == []



def test_a_second_process_only_where_the_gate_runs_and_the_model_is_big_enough():
    from types import SimpleNamespace

    from onex_export.check.background import job_for_build

    config, _ = transformer_source("tiny-sd3")
    split = split_on_meta(config, None, SKIP)
    defs = transformer_graphs(split, PrecisionPolicy("fp32"))[0]
    shapes = ShapeConfig(DimRange(1, 1, 1), DimRange(32, 32, 32), DimRange(16, 16, 16), 8)

    def job(reference_process, mode="opt", precision="fp16"):
        cfg = SimpleNamespace(model="tiny-sd3", mlp=None, skip=SKIP, gate=GateConfig(mode=mode), eta=1.0,
                              precision=precision, reference_process=reference_process)
        return job_for_build(cfg, split, defs, build_plans(defs), shapes)

    assert job(None) is None  # tiny-sd3 is far below 256 MiB of weights: the build's own process makes it
    made = job(True)
    assert (made.model, made.skip, [d.name for d in made.defs]) == ("tiny-sd3", SKIP, [d.name for d in defs])
    assert job(True, mode="none") is None  # no gate, no reference
    assert job(True, precision="bf16") is None  # nothing here runs bf16 graphs: the gate records not-run
