"""The JSON Schema a C++ or Python service validates manifest.json with, against real manifests: an ONNX-only
build gated in ONNX Runtime, and a TensorRT-RTX build with engines; and edits it must reject. The typed
:class:`~onex_export.contract.Manifest` reads both back to the same bytes and refuses what the schema refuses."""
import copy
import json

import jsonschema
import pytest

from onex_export.config import SkipRange
from onex_export.contract import Manifest
from onex_export.export import manifest as mf
from onex_export.build import BuildConfig, build
from onex_export.check.gate import GateConfig


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(mf.JSON_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    root = tmp_path_factory.mktemp("schema")
    build(BuildConfig(model="tiny-sd3", skip=SkipRange(3, 10), out=root / "onnx", trt="none"))
    build(BuildConfig(skip=SkipRange(4, 12), out=root / "rtx", model="tiny-sd35-medium", trt="tensorrt-rtx",
                      components=(), gate=GateConfig("none"), max_graph_bytes=600_000))
    return {name: json.loads((root / name / mf.FILENAME).read_text()) for name in ("onnx", "rtx")}


def test_real_manifests_validate(validator, manifests):
    for name, manifest in manifests.items():
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]
        assert errors == [], (name, errors[:5])
    rtx = manifests["rtx"]
    assert all(g["engine"]["flavour"] == "tensorrt-rtx" for g in rtx["graphs"].values())  # the engine branch ran
    assert len([n for n in rtx["graphs"] if n.startswith("tail")]) > 1  # and a cut role's plans


# (edit, where the schema reports it, whether Manifest.from_json refuses it too: the schedule is checked when a
# runtime reads it as a SamplingPlan, and a plan's steps when it runs)
EDITS = [
    (lambda m: m.pop("plans"), "plans", True),
    (lambda m: m.update(schema_version=3), "schema_version", True),
    (lambda m: m["schedule"]["steps"][1].update(plan="half"), "schedule/steps/1/plan", False),
    (lambda m: m["graphs"]["head"]["onnx"].update(sha256="not-a-digest"), "graphs/head/onnx/sha256", True),
    (lambda m: m["graphs"]["tail"]["inputs"][0].update(dtype="float64"), "graphs/tail/inputs/0/dtype", True),
    (lambda m: m["graphs"]["tail"]["inputs"][0].update(shape=["batch", "height"]), "graphs/tail/inputs/0/shape/1", True),
    (lambda m: m["shapes"]["ranges"].update(batch=[1, 4]), "shapes/ranges/batch", True),
    (lambda m: m["plans"]["full"]["outputs"].pop("velocity"), "plans/full/outputs", False),
    (lambda m: m["plans"].update(half=m["plans"]["full"]), "plans", True),
    (lambda m: m["pipeline"].update(vae_scale_factor=0), "pipeline/vae_scale_factor", True),
]


@pytest.mark.parametrize("edit, where, typed", EDITS)
def test_edits_a_service_must_not_accept_are_rejected(validator, manifests, edit, where, typed):
    manifest = copy.deepcopy(manifests["onnx"])
    edit(manifest)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]
    assert any(e.startswith(f"{where}: ") or e.startswith(f": '{where}'") for e in errors), errors
    if typed:
        with pytest.raises(mf.ManifestError, match="rebuild|not an onex-export build manifest"):
            Manifest.from_json(manifest)


def test_the_typed_manifest_reads_and_writes_the_same_bytes(validator, manifests, tmp_path):
    """``Manifest.from_json(d).to_json() == d`` for real builds (text encoders and tokenizers; cut roles and
    engines), key order included: what a build writes is unchanged by going through the type."""
    for name, data in manifests.items():
        manifest = Manifest.from_json(data)
        assert manifest.to_json() == data and list(manifest.to_json()) == list(data), name
        assert json.dumps(manifest.to_json(), indent=2) == json.dumps(data, indent=2), name
        assert list(validator.iter_errors(manifest.to_json())) == [], name
    onnx, rtx = Manifest.from_json(manifests["onnx"]), Manifest.from_json(manifests["rtx"])
    assert (onnx.skip.first, onnx.skip.last, onnx.shapes.ranges.batch.max, onnx.pipeline.components) == \
        (3, 10, 4, ("text", "vae"))
    assert {g.engine.extra["flavour"] for g in rtx.graphs.values()} == {"tensorrt-rtx"} and onnx.graphs["head"].engine is None
