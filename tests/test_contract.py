"""The contract between build and runtime: a service that runs a build imports the runtime and the contract,
never the exporter, the models or a TensorRT builder; and the reader refuses plans it cannot run, and manifests
it cannot read, with the fix."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from onex_export import contract
from onex_export.config import SkipRange
from onex_export.build import BuildConfig, build

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("diffusers", "onnx", "tensorrt", "tensorrt_rtx_bindings", "tensorrt_rtx_libs", "onex_export.export",
         "onex_export.models")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("contract") / "tiny"
    build(BuildConfig(model="tiny-sd3", skip=SkipRange(3, 10), out=out, trt="none"))
    return out


def test_running_a_build_imports_no_exporter_model_or_engine_builder(tiny):
    script = f"""
import json, sys
from onex_export.runtime.pipeline import BuildPipeline
images = BuildPipeline({str(tiny)!r}).generate(["a red cube"], seed=1).images
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r} or m.startswith({HEAVY[-2:]!r}))
print(json.dumps({{"heavy": loaded, "shape": list(images.shape), "runtime": "onnxruntime" in sys.modules}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"heavy": [], "shape": [1, 3, 128, 128], "runtime": True}


def test_the_same_check_sees_the_exporter_when_it_is_imported():
    """Negative: the import check above would notice the export stack (it is not vacuous)."""
    script = "import sys, onex_export.build; print(sorted(m for m in sys.modules if m.split('.')[0] == 'diffusers')[:1])"
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "['diffusers']", proc.stderr[-2000:]


def test_a_manifest_with_a_plan_the_runtime_does_not_know_is_refused(tiny, tmp_path):
    manifest = json.loads((tiny / contract.FILENAME).read_text())
    manifest["plans"]["half"] = manifest["plans"]["skipping"]
    (tmp_path / contract.FILENAME).write_text(json.dumps(manifest))
    with pytest.raises(contract.ManifestError, match=r"plan\(s\) \['half'\], which this tool cannot run"):
        contract.read_manifest(tmp_path)
    assert contract.read_manifest(tiny).plans.keys() == {"full", "skipping"}


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("stages"), "has no 'stages' entry where this version needs one"),
    (lambda m: m["graphs"]["head"].pop("onnx_key"), "has no 'onnx_key' entry where this version needs one"),
    (lambda m: m.update(graphs=[]), "is malformed"),
    (lambda m: m["skip"].update(zero_based=[3]), "is malformed: skip 3-10 disagrees with its blocks 3-10"),
])
def test_a_manifest_this_version_cannot_read_is_refused_with_the_fix(tiny, tmp_path, edit, message):
    """An older (or hand-edited) manifest of the same schema version: refused, naming what is missing, and how to
    fix it; never a KeyError from deep inside a reader."""
    manifest = json.loads((tiny / contract.FILENAME).read_text())
    edit(manifest)
    (tmp_path / contract.FILENAME).write_text(json.dumps(manifest))
    with pytest.raises(contract.ManifestError, match=message) as info:
        contract.read_manifest(tmp_path)
    assert info.value.hint.startswith("rebuild")


def test_a_manifest_is_checked_when_it_is_made_not_only_when_it_is_read(tiny):
    """A writer's bug (a value the schema refuses) fails where the manifest is constructed, as a ValueError. (The
    skip section cannot disagree with itself: SkipInfo holds only its range and writes the other forms from it.)"""
    manifest = contract.read_manifest(tiny)
    head = manifest.graphs["head"]
    bad_tensor = dataclasses.replace(head.inputs[0], dtype="float64")
    for make in (lambda: dataclasses.replace(manifest, status="ok"),
                 lambda: dataclasses.replace(manifest.shapes.ranges, batch=contract.Range(4, 1, 1)),
                 lambda: dataclasses.replace(head, inputs=(bad_tensor, *head.inputs[1:])),
                 lambda: dataclasses.replace(head.onnx, sha256="not-a-digest")):
        with pytest.raises(ValueError):
            make()
    assert dataclasses.replace(manifest, status="failed").with_verification(manifest.verifications[0]).status == "passed"


def test_a_graph_entry_naming_another_graphs_file_is_refused(tiny, tmp_path):
    """With the right sha256 it passed every file check, and the runtime ran the tail as the head (a KeyError)."""
    manifest = json.loads((tiny / contract.FILENAME).read_text())
    manifest["graphs"]["head"]["onnx"] = manifest["graphs"]["tail"]["onnx"]
    (tmp_path / contract.FILENAME).write_text(json.dumps(manifest))
    with pytest.raises(contract.ManifestError, match="is malformed: tail.onnx listed for two entries"):
        contract.read_manifest(tmp_path)
