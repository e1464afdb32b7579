"""Bad input across the entry points (issue 14): every case gets a clear message, the right exit code
(2 for a malformed or unfitting option, 1 for a file or model that cannot be used) and no traceback, and
nothing is written or deleted. Run in-process through click's runner and the benchmarks' ``main``; the
faults that need real processes and signals are in ``test_faults_processes.py``."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper
from safetensors.torch import save_file

from bench import latency as bench_latency
from bench.arguments import run_main
from onex_export.cli import main
from onex_export.config import SkipRange
from onex_export.export import manifest as mf
from onex_export.build import BuildConfig, build
from onex_export.check.gate import GateConfig


def tree(folder: Path) -> dict[str, int]:
    """Every path under ``folder`` with its size (folders -1): what a failed command must leave unchanged."""
    return {str(p.relative_to(folder)): (p.stat().st_size if p.is_file() else -1) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory) -> Path:
    """A real build of the embedded model, ONNX only and ungated (the bad inputs never get to run it)."""
    out = tmp_path_factory.mktemp("faults") / "tiny"
    build(BuildConfig(model="tiny-sd3", skip=SkipRange.parse("3-10"), out=out, trt="none", gate=GateConfig("none")))
    return out


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory) -> dict[str, Path]:
    """Transformer folders whose weights do not fit their config.json: a width changed in the config, one
    tensor cut in the weights."""
    import json

    from onex_export.models import build_tiny

    root, model = tmp_path_factory.mktemp("bad-models"), build_tiny("tiny-sd3")
    model.save_pretrained(root / "config")
    config = json.loads((root / "config" / "config.json").read_text())
    (root / "config" / "config.json").write_text(json.dumps({**config, "joint_attention_dim": 40}))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["transformer_blocks.3.attn.to_q.weight"] = state["transformer_blocks.3.attn.to_q.weight"][:, :16].clone()
    (root / "shape").mkdir()
    save_file(state, str(root / "shape" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    (root / "shape" / "config.json").write_text(json.dumps(config))
    return {"bad_config": root / "config", "bad_shape": root / "shape"}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty current folder with a user's own files in it, which every failing command must leave alone."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's own file\n")
    (tmp_path / "report.txt").write_text("not a build\n")
    (tmp_path / "not-weights.safetensors").write_bytes(b"\x00" * 100)
    save_file({"img.w": torch.zeros(3, 3)}, str(tmp_path / "wrong-mlp.safetensors"))
    os.mkfifo(tmp_path / "fifo")
    return tmp_path


# (arguments, exit code, a fragment of the message). {build} is the module's real build folder.
BAD = [
    # build: ranges, sizes and names, all refused before any export
    (["build", "--skip", "0-3"], 2, "1-based"),
    (["build", "--skip", "10-3"], 2, "10-3"),
    (["build", "--skip", "3-99"], 2, "24 blocks"),
    (["build", "--skip", "three"], 2, "three"),
    (["build", "--model", "tiny-sd4"], 1, "tiny-sd4"),
    (["build", "--model", "/nonexistent/model"], 1, "/nonexistent/model"),
    (["build", "--model", "{bad_config}"], 1, "'context_embedder.weight' has (32, 48), the model expects (32, 40)"),
    (["build", "--model", "{bad_shape}"], 1, "'transformer_blocks.3.attn.to_q.weight' has (32, 16)"),
    (["sample", "--model", "{bad_shape}"], 1, "the model expects (32, 32)"),
    (["build", "--batch", "0"], 2, "0 < MIN"),
    (["build", "--batch", "4:2:1"], 2, "MIN <= OPT <= MAX"),
    (["build", "--batch", "1:1:100000"], 2, "256"),
    (["build", "--batch", "1:x:4"], 2, "malformed range"),
    (["build", "--resolution", "100"], 2, "not a multiple of 16"),
    (["build", "--resolution", "99984"], 2, "exceeds this model's limit"),
    (["build", "--text-len", "16:16:99999"], 2, "16 tokens the text encoders"),  # case 5 of the issue
    (["build", "--text-len", "8"], 2, "does not include the text encoders' 16 tokens"),
    (["build", "--precision", "fp8"], 2, "fp8"),
    (["build", "--compute-capability", "86"], 2, "MAJOR.MINOR"),
    (["build", "--compute-capability", "8.6", "--trt", "none"], 2, "--trt none builds none"),  # was: ignored
    (["build", "--components", "unet"], 2, "unet"),
    (["build", "--max-graph-gib", "0"], 2, "0"),
    (["build", "--opset", "9"], 2, "9"),
    (["build", "--trt", "tensorrt", "--timing-cache", "t.bin"], 1, "TensorRT is not installed"),
    (["build", "--mlp", "missing.safetensors"], 1, "missing.safetensors"),
    (["build", "--mlp", "not-weights.safetensors"], 1, "not-weights.safetensors"),
    (["build", "--mlp", "wrong-mlp.safetensors"], 1, "wrong-mlp.safetensors"),
    (["build", "--out", "report.txt"], 2, "is not a folder"),  # case 2 of the issue
    (["build", "--out", "mine"], 2, "holds no onex-export build"),  # case 1 of the issue
    (["build", "--out", "fifo"], 2, "is not a folder"),
    (["build", "--tolerance", "delta_img"], 2, "'delta_img' is not OUTPUT=MAX_REL"),
    (["build", "--tolerance", "delta_img=0.1", "--tolerance", "delta_img=0.2"], 2, "names delta_img twice"),
    (["build", "--tolerance", "delta_img=-1"], 2, "a relative error bound must be a positive number"),
    # verify
    (["verify", "nowhere"], 1, "no manifest.json"),
    (["verify", "mine"], 1, "no manifest.json"),
    (["verify", "{build}", "--gate", "none"], 2, "none"),
    (["verify", "{build}", "--mlp", "missing.safetensors"], 1, "missing.safetensors"),
    (["verify", "{build}", "--tolerance", "delta_image=0.1"], 2, "delta_image, which this gate does not compare"),
    # generate: every output path is checked before the work
    (["generate", "--build", "{build}", "--prompt", "a cat", "--out", "/dev/null"], 2, "not a regular file"),  # case 6
    (["generate", "--build", "{build}", "--prompt", "a cat", "--out", "fifo"], 2, "not a regular file"),
    (["generate", "--build", "{build}", "--prompt", "a cat", "--out", "mine"], 2, "not a regular file"),
    (["generate", "--build", "{build}", "--prompt", "a cat", "--out", "report.txt/x.png"], 2, "is a file, not a folder"),
    (["generate", "--build", "{build}", "--prompt", "a cat", "--resolution", "100"], 2, "resolution"),
    (["generate", "--build", "{build}", "--prompt", "a cat", "--images-per-prompt", "0"], 2, "0"),
    (["generate", "--build", "{build}"], 2, "--prompt"),
    (["generate", "--build", "mine", "--prompt", "a cat"], 1, "no manifest.json"),
    # sample
    (["sample", "--batch", "0"], 2, "0"),
    (["sample", "--resolution", "100"], 2, "not a multiple of 16"),
    (["sample", "--text-len", "17"], 2, "16 tokens the text encoders"),
    (["sample", "--out", "/dev/null"], 2, "not a regular file"),
    (["sample", "--mlp", "wrong-mlp.safetensors"], 1, "wrong-mlp.safetensors"),
    (["sample", "--mode", "teacher", "--guidance", "0.5"], 2, "0.5"),
    (["sample", "--seed", str(2**64)], 2, "is not in the range 0<=x<=9223372036854775807"),  # was: a traceback
    (["sample", "--device", "banana"], 2, "'banana' is not a device: use cpu, cuda or cuda:N"),
    *([(["sample", "--device", "cuda"], 2, "cuda: no such CUDA device is visible here (0 GPUs)")]
      if not torch.cuda.is_available() else []),  # was: a traceback after the model loaded
    (["generate", "--build", "{build}", "--prompt", "a cat", "--seed", "-1"], 2, "is not in the range"),
    (["sample", "--mode", "teacher", "--guidance", "nan"], 2, "'nan' is not a finite number"),  # was: CFG off, PASSED
    (["sample", "--eta", "nan"], 2, "'nan' is not a finite number"),
    (["build", "--max-graph-gib", "inf"], 2, "'inf' is not a finite number"),
    (["probe", "--nfe", "nan"], 2, "'nan' is not a finite number"),
]


@pytest.mark.parametrize("args, code, fragment", BAD, ids=[" ".join(a) for a, _, _ in BAD])
def test_bad_input_is_refused_clearly_and_nothing_changes(workdir, tiny_build, bad_models, args, code, fragment):
    paths = {"build": tiny_build, **bad_models}
    args = [a.format(**paths) if a.startswith("{") else a for a in args]
    before, build_before = tree(workdir), tree(tiny_build)
    result = CliRunner().invoke(main, args)
    message = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == code, message
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), message
    assert "Traceback" not in message and fragment in message, message
    assert tree(workdir) == before  # nothing written, nothing deleted
    assert tree(tiny_build) == build_before
    assert (workdir / "mine" / "notes.txt").read_text() == "a user's own file\n"


def _with_inf_vae(src: Path, dst: Path) -> Path:
    """A copy of a build whose VAE graph carries an inf weight, recorded in its manifest as if built so:
    the stand-in for a build whose graphs overflow at run time."""
    import shutil

    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "vae.onnx"))
    init = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and "bias" in t.name)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * float("inf"), init.name))
    onnx.save(model, str(dst / "vae.onnx"))
    manifest = mf.read_manifest(dst)
    vae = dataclasses.replace(manifest.graphs["vae"], onnx=mf.file_entry(dst, dst / "vae.onnx"))
    mf.write_manifest(dst, dataclasses.replace(manifest, graphs={**manifest.graphs, "vae": vae}).sealed())
    return dst


def test_generate_with_non_finite_output_fails_and_writes_no_image(workdir, tiny_build):
    broken = _with_inf_vae(tiny_build, workdir / "broken")
    (workdir / "image.png").write_bytes(b"a good image from before")
    result = CliRunner().invoke(main, ["generate", "--build", str(broken), "--prompt", "a cat"])
    assert result.exit_code == 1, result.output
    assert "non-finite" in result.output and "PASSED" not in result.output
    assert (workdir / "image.png").read_bytes() == b"a good image from before"
    # the unbroken build, same command: PASSED and a PNG (the check above is not always failing)
    ok = CliRunner().invoke(main, ["generate", "--build", str(tiny_build), "--prompt", "a cat", "--out", "ok.png"])
    assert ok.exit_code == 0 and "PASSED" in ok.output and (workdir / "ok.png").read_bytes()[:4] == b"\x89PNG"


def test_verify_takes_the_model_and_mlp_from_where_they_are_now(workdir, tiny_build, tmp_path):
    from onex_export.models import CompensationMLP, build_tiny
    from onex_export.models.compensation import save_compensation

    mlp = CompensationMLP.for_transformer(build_tiny("tiny-sd3"))
    torch.nn.init.normal_(mlp.img.fc2.weight, std=0.05)
    save_compensation(mlp, workdir / "trained.safetensors")
    out = workdir / "with-mlp"
    build(BuildConfig(model="tiny-sd3", skip=SkipRange.parse("3-10"), out=out, mlp=workdir / "trained.safetensors", trt="none",
                      components=()))
    os.rename(workdir / "trained.safetensors", workdir / "moved.safetensors")
    lost = CliRunner().invoke(main, ["verify", str(out)])
    assert lost.exit_code == 1 and "--mlp" in lost.output
    found = CliRunner().invoke(main, ["verify", str(out), "--mlp", "moved.safetensors"])
    assert found.exit_code == 0 and "PASSED verify" in found.output, found.output


@pytest.mark.parametrize("argv, fragment", [
    (["--resolution", "100"], "multiple of 16"),  # case 9 of the issue: was measured as 96
    (["--batch", "0"], "at least 1"),
    (["--repeats", "-5"], "at least 1"),
    (["--device", "banana"], "banana"),
])
def test_bench_latency_refuses_nonsense_at_parse_time(workdir, capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_info:
        bench_latency.main(argv)
    assert exit_info.value.code == 2 and fragment in capsys.readouterr().err
    assert not (workdir / "bench").exists()


def test_bench_latency_checks_its_out_folder_before_the_run(workdir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: bench_latency.main(["--out", "report.txt/results", "--repeats", "1"]))
    assert exit_info.value.code == 2
    assert "is a file, not a folder" in capsys.readouterr().err
