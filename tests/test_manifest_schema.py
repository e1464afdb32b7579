"""The JSON Schema a C++ or Python service validates manifest.json with, against real manifests: an ONNX-only
build gated in ONNX Runtime, and a TensorRT-RTX build with engines; and edits it must reject."""
import copy
import json

import jsonschema
import pytest

from onex_export.config import SkipRange
from onex_export.export import manifest as mf
from onex_export.export.build import BuildConfig, build
from onex_export.export.gate import GateConfig


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(mf.JSON_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    root = tmp_path_factory.mktemp("schema")
    build(BuildConfig(skip=SkipRange(3, 10), out=root / "onnx", trt="none"))
    build(BuildConfig(skip=SkipRange(4, 12), out=root / "rtx", model="tiny-sd35-medium", trt="tensorrt-rtx",
                      components=(), gate=GateConfig("none"), max_graph_bytes=600_000))
    return {"onnx": mf.read_manifest(root / "onnx"), "rtx": mf.read_manifest(root / "rtx")}


def test_real_manifests_validate(validator, manifests):
    for name, manifest in manifests.items():
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]
        assert errors == [], (name, errors[:5])
    rtx = manifests["rtx"]
    assert all(g["engine"]["flavour"] == "tensorrt-rtx" for g in rtx["graphs"].values())  # the engine branch ran
    assert len([n for n in rtx["graphs"] if n.startswith("tail")]) > 1  # and a cut role's plans


@pytest.mark.parametrize("edit, where", [
    (lambda m: m.pop("plans"), "plans"),
    (lambda m: m.update(schema_version=3), "schema_version"),
    (lambda m: m["schedule"]["steps"][1].update(plan="half"), "schedule/steps/1/plan"),
    (lambda m: m["graphs"]["head"]["onnx"].update(sha256="not-a-digest"), "graphs/head/onnx/sha256"),
    (lambda m: m["graphs"]["tail"]["inputs"][0].update(dtype="float64"), "graphs/tail/inputs/0/dtype"),
    (lambda m: m["graphs"]["tail"]["inputs"][0].update(shape=["batch", "height"]), "graphs/tail/inputs/0/shape/1"),
    (lambda m: m["shapes"]["ranges"].update(batch=[1, 4]), "shapes/ranges/batch"),
    (lambda m: m["plans"]["full"]["outputs"].pop("velocity"), "plans/full/outputs"),
    (lambda m: m["plans"].update(half=m["plans"]["full"]), "plans"),
    (lambda m: m["pipeline"].update(vae_scale_factor=0), "pipeline/vae_scale_factor"),
])
def test_edits_a_service_must_not_accept_are_rejected(validator, manifests, edit, where):
    manifest = copy.deepcopy(manifests["onnx"])
    edit(manifest)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]
    assert any(e.startswith(f"{where}: ") or e.startswith(f": '{where}'") for e in errors), errors
