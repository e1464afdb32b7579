"""A build folder that cannot lie (issue 24, cases 1 and 2): a manifest edited by hand is refused by `verify` and by
the runtime, whether its seal catches the edit or, in a build made before seals, its claims are re-derived from its
graphs; and no path a manifest names may lead out of its folder. Real builds, real ONNX Runtime sessions."""
import json
import shutil
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

from onex_export.build import BuildConfig, build
from onex_export.cli import main
from onex_export.config import SkipRange
from onex_export.contract import JSON_SCHEMA, SkipInfo
from onex_export.export import manifest as mf
from onex_export.runtime.pipeline import BuildPipeline


@pytest.fixture(scope="module")
def certified(tmp_path_factory) -> Path:
    """A real, gated build of the embedded tiny model (ONNX, text and VAE)."""
    out = tmp_path_factory.mktemp("integrity") / "tiny"
    build(BuildConfig(model="tiny-sd3", skip=SkipRange.parse("3-10"), out=out, trt="none"))
    return out


def _copy(src: Path, dst: Path, edit=None, unseal=False) -> Path:
    shutil.copytree(src, dst)
    data = json.loads((dst / mf.FILENAME).read_text())
    if edit:
        edit(data)
    if unseal:
        del data["seal"]  # as a build made before seals has it
    (dst / mf.FILENAME).write_text(json.dumps(data, indent=2))
    return dst


def _lie_skip(data):
    data["skip"] = SkipInfo(SkipRange(3, 8), None).to_json()  # the graphs still skip 3-10


def _lie_sigmas(data):
    data["schedule"]["sigmas"] = [1.0, 0.3]
    data["schedule"]["steps"][1]["sigma"] = data["schedule"]["steps"][0]["sigma_next"] = 0.3


def _lie_plan(data):
    data["plans"]["skipping"] = data["plans"]["full"]  # runs the segment: nothing is skipped


LIES = {"skip": _lie_skip, "schedule": _lie_sigmas, "plans": _lie_plan}


def verify_cli(folder: Path, *extra: str):
    return CliRunner().invoke(main, ["verify", str(folder), *extra])


def test_the_build_seals_what_it_certified_and_verify_keeps_the_seal(certified, tmp_path):
    manifest = mf.read_manifest(certified)
    assert manifest.status == "passed" and manifest.seal["algorithm"] == "sha256-per-section"
    assert {"skip", "schedule", "plans", "graphs", "pipeline", "model"} <= set(manifest.seal["sections"])
    assert not {"verifications", "status"} & set(manifest.seal["sections"])
    jsonschema.validate(manifest.to_json(), json.loads(JSON_SCHEMA.read_text()))
    copy = _copy(certified, tmp_path / "copy")
    result = verify_cli(copy)
    assert result.exit_code == 0 and "PASSED" in result.output, result.output
    again = mf.read_manifest(copy)
    assert len(again.verifications) == 2 and again.seal == manifest.seal and again.changed_since_sealed() == []


@pytest.mark.parametrize("section", list(LIES))
def test_an_edited_claim_is_refused_by_verify_and_by_the_runtime_and_nothing_is_certified(certified, tmp_path,
                                                                                          section):
    lying = _copy(certified, tmp_path / "lying", LIES[section])
    before = (lying / mf.FILENAME).read_bytes()
    result = verify_cli(lying)
    assert result.exit_code == 1, result.output
    assert f"manifest.json: {section} changed since the build certified it (its seal no longer matches)" in result.output
    assert "PASSED" not in result.output and (lying / mf.FILENAME).read_bytes() == before  # nothing recorded
    with pytest.raises(mf.ManifestError, match=f"{section} changed since the build certified it"):
        BuildPipeline(lying, check_files=False)  # the runtime checks the seal even when it skips the hashes
    made = CliRunner().invoke(main, ["generate", "--build", str(lying), "--prompt", "a cat", "--out",
                                     str(tmp_path / "cat.png")])
    assert made.exit_code == 1 and "changed since the build certified" in made.output
    assert not (tmp_path / "cat.png").exists()


@pytest.mark.parametrize("section, says", [
    ("skip", "skip: the manifest says 3-8, its segment graphs hold blocks 3-10"),
    ("schedule", "schedule: sigmas [1.0, 0.3] and steps are not the 1.x-NFE schedule this build runs (sigmas [1.0, 0.75])"),
    ("plans", "plans: 'skipping' is not the plan its graphs give (steps ['head', 'segment', 'tail'], expected "
              "['head', 'reuse', 'tail'])"),
])
def test_without_a_seal_verify_rederives_every_claim_from_the_graphs(certified, tmp_path, section, says):
    honest = _copy(certified, tmp_path / "honest", unseal=True)
    result = verify_cli(honest)
    assert result.exit_code == 0 and "no seal (built by an older onex-export)" in result.output, result.output
    lying = _copy(certified, tmp_path / "lying", LIES[section], unseal=True)
    before = (lying / mf.FILENAME).read_bytes()
    result = verify_cli(lying)
    assert result.exit_code == 1 and "claims what its graphs do not do" in result.output, result.output
    assert says in result.output
    assert (lying / mf.FILENAME).read_bytes() == before


def _outside_graph(data):
    data["graphs"]["head"]["onnx"]["file"] = "../outside/head.onnx"


def _outside_tokenizer(data):
    data["pipeline"]["tokenizers"]["clip_l"]["dir"] = "../../../../etc"


@pytest.mark.parametrize("edit, fragment", [
    (_outside_graph, "file '../outside/head.onnx' leaves the build folder"),
    (_outside_tokenizer, "tokenizer folder '../../../../etc' leaves the build folder"),
])
def test_a_path_that_leaves_the_folder_is_refused_before_anything_is_read(certified, tmp_path, edit, fragment):
    (tmp_path / "outside").mkdir()
    shutil.copy(certified / "head.onnx", tmp_path / "outside" / "head.onnx")  # the right sha256, outside
    leaving = _copy(certified, tmp_path / "build", edit, unseal=True)  # no seal to catch it first
    for args in (["verify", str(leaving)], ["generate", "--build", str(leaving), "--prompt", "a cat"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and fragment in result.output, result.output
    data = json.loads((leaving / mf.FILENAME).read_text())
    with pytest.raises(jsonschema.ValidationError, match="does not match"):  # services in other languages too
        jsonschema.validate(data, json.loads(JSON_SCHEMA.read_text()))


def test_a_symlink_that_leads_out_is_refused_by_verify_and_the_runtime(certified, tmp_path):
    linked = _copy(certified, tmp_path / "build")
    (tmp_path / "outside").mkdir()
    (linked / "head.onnx").rename(tmp_path / "outside" / "head.onnx")
    (linked / "head.onnx").symlink_to(tmp_path / "outside" / "head.onnx")  # same bytes, same sha256, seal intact
    result = verify_cli(linked)
    assert result.exit_code == 1, result.output
    assert "head.onnx: resolves to" in result.output and "outside the build folder (a symlink that leads out)" in \
        result.output
    with pytest.raises(mf.ManifestError, match="a symlink that leads out"):
        BuildPipeline(linked, check_files=False)
    inside = _copy(certified, tmp_path / "inside")  # a symlink within the folder is fine
    (inside / "head.onnx").rename(inside / "head-real.onnx")
    (inside / "head.onnx").symlink_to("head-real.onnx")
    assert mf.check_files(inside, mf.read_manifest(inside)) == []


def test_verify_against_a_model_that_changed_since_the_build_says_so(tmp_path):
    """It used to fail 13 of 15 parity rows without saying why; now it names the graphs whose weights changed."""
    import torch

    from onex_export.models import build_tiny

    model = build_tiny("tiny-sd3")
    model.save_pretrained(str(tmp_path / "model"))
    out = tmp_path / "build"
    build(BuildConfig(model=str(tmp_path / "model"), skip=SkipRange.parse("3-10"), out=out, trt="none",
                      components=()))
    manifest = mf.read_manifest(out)
    assert all(len(g.weights_sha256) == 64 for g in manifest.graphs.values())
    with torch.no_grad():
        model.transformer_blocks[20].ff.net[2].weight.mul_(1.01)  # block 21: in the tail
    model.save_pretrained(str(tmp_path / "model"))  # the same folder, other weights
    result = verify_cli(out)
    assert result.exit_code == 1, result.output
    assert "the weights of graph tail in" in result.output and "are not the ones this build was made from" in \
        result.output and "pass --model" in result.output
    assert len(mf.read_manifest(out).verifications) == 1  # nothing recorded


def test_a_read_only_build_is_verified_with_no_record_and_refused_with_that_hint_otherwise(certified, tmp_path,
                                                                                           monkeypatch):
    """Root (these tests' user) writes anywhere, so a read-only folder is simulated: os.access answers as it does on
    a read-only mount. The check itself is real."""
    copy = _copy(certified, tmp_path / "ro")
    before = (copy / mf.FILENAME).read_bytes()
    checked = verify_cli(copy, "--no-record")
    assert checked.exit_code == 0 and "PASSED verify" in checked.output and "this check not recorded" in checked.output
    assert (copy / mf.FILENAME).read_bytes() == before and not (tmp_path / ".ro.lock").exists()
    import onex_export.check.verify as verify_module

    monkeypatch.setattr(verify_module.os, "access", lambda path, mode: mode != verify_module.os.W_OK)
    refused = verify_cli(copy)
    assert refused.exit_code == 2 and "is read-only here" in refused.output, refused.output
    assert "onex-export verify --no-record" in refused.output and (copy / mf.FILENAME).read_bytes() == before
