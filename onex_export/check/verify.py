"""`onex-export verify DIR`: check an existing build's files against its manifest, re-run the parity gate
on its ONNX graphs (ONNX Runtime) or its engines (TensorRT, GPU), and record the result in the manifest."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..errors import OnexError, UsageError
from ..runtime.graphs import OrtGraph, aoti_graph, check_aoti
from ..runtime.tensorrt_runner import require_gpu
from ..export import manifest as mf
from .from_manifest import (
    changed_weights, checked_defs, manifest_components, manifest_policy, manifest_shapes, reference_split,
    unfounded_claims,
)
from .gate import GateConfig, run_gate
from ..locks import build_lock
from ..export.install import recover


def verify(folder: Path, log: Callable[[str], None] = lambda _: None, backend: str = "onnxruntime",
           gate: GateConfig = GateConfig(), record: bool = True, model: str | None = None,
           mlp: Path | None = None) -> tuple[mf.Manifest, dict]:
    """Return ``(manifest, verification)``; raises :class:`~manifest.ManifestError` on a file mismatch.

    ``backend`` runs the build's ONNX graphs ("onnxruntime", CPU), its AOTInductor packages ("aoti") or its engines
    ("tensorrt", GPU only).
    With ``record`` the verification is appended to the manifest (atomically) and its status re-derived.
    ``model`` and ``mlp`` say where the reference the build was made from is now, when it has moved
    since (the manifest records the paths the build was given).
    """
    if backend not in ("onnxruntime", "aoti", "tensorrt"):
        raise UsageError(f"verify cannot run backend {backend!r}", "choose onnxruntime, aoti or tensorrt")
    if backend == "tensorrt":
        require_gpu("verify with --backend onnxruntime here, and with --backend tensorrt on a GPU")
    if gate.mode == "none":
        raise UsageError("verify --gate none would check nothing", "use --gate opt or --gate full")
    folder = Path(folder)
    if not folder.parent.is_dir():
        raise mf.ManifestError(f"no {mf.FILENAME} in {folder}", "point at a folder written by `onex-export build`")
    if not record:  # a check that writes nothing (a read-only build folder, say): no lock to take either
        return _verify(folder, log, backend, gate, False, model, mlp)
    if (folder / mf.FILENAME).is_file() and not (os.access(folder.parent, os.W_OK)
                                                 and os.access(folder / mf.FILENAME, os.W_OK)):
        raise UsageError(f"{folder} is read-only here, and verify records its result in the build's manifest "
                         "(beside it, its lock)", "check it without recording: onex-export verify --no-record")
    with build_lock(folder):  # a build or verify in progress may be about to replace or record in it
        return _verify(folder, log, backend, gate, record, model, mlp)


def _verify(folder: Path, log, backend: str, gate: GateConfig, record: bool, model: str | None,
            mlp: Path | None) -> tuple[mf.Manifest, dict]:
    for line in recover(folder):
        log(line)
    manifest = mf.read_manifest(folder)
    log(f"checking {len(manifest.files())} files against their sha256")
    problems = mf.check_files(folder, manifest)
    if problems:
        raise mf.ManifestError(f"{folder} does not match its manifest:\n    " + "\n    ".join(problems),
                               "rebuild with `onex-export build`; never edit a build by hand")
    engines = backend == "tensorrt"
    if backend == "aoti":
        check_aoti(folder, manifest)
    if engines and manifest.trt == "none":
        raise OnexError(f"{folder} has no engines (built with --trt none)",
                        "rebuild with --trt tensorrt or tensorrt-rtx, or verify with --backend onnxruntime")
    reference = replace(manifest, model=replace(manifest.model, **({"source": str(model)} if model else {}),
                                                **({"mlp": str(mlp)} if mlp else {})))
    log(f"loading the reference {reference.model.source} (float32, one module at a time on {gate.device})")
    split, source = reference_split(reference)
    defs = checked_defs(manifest, split)
    if problems := unfounded_claims(manifest, defs):
        raise mf.ManifestError(f"{folder}'s manifest claims what its graphs do not do:\n    " + "\n    ".join(problems),
                               "rebuild with `onex-export build`; never edit a build by hand")
    log("      hashing the reference's weights of each graph against those the build exported")
    if changed := changed_weights(manifest, defs, split, source):
        raise mf.ManifestError(f"the weights of graph{'s' if len(changed) > 1 else ''} {', '.join(changed)} in "
                               f"{reference.model.source}" + (f" and {reference.model.mlp}" if reference.model.mlp
                                                             else "") + " are not the ones this build was made from: "
                               "the model changed since the build, so every check against it would fail",
                               "pass --model (and --mlp) with the model the build was made from, or rebuild from this one")
    if manifest.seal is None:
        log("      no seal (built by an older onex-export): its claims were re-derived from its graphs instead")
    graphs = manifest.graphs
    if engines:
        from ..runtime.tensorrt_runner import TrtGraph

        def load(name):
            return TrtGraph(folder / graphs[name].engine.file, manifest.trt)
    elif backend == "aoti":
        def load(name):
            return aoti_graph(folder, name, graphs[name])
    else:
        def load(name):
            return OrtGraph(folder / graphs[name].onnx.file, low_memory=True)
    verification = run_gate(
        split, source, defs, manifest.plans, load,
        artifact="engine" if engines else "compiled" if backend == "aoti" else "onnx",
        backend=manifest.trt if engines else backend, candidate_device="cuda" if engines else "cpu",
        policy=manifest_policy(manifest), shapes=manifest_shapes(manifest), gate=gate,
        eta=manifest.schedule["eta"], components=manifest_components(reference, split.transformer.config), log=log)
    if record:
        manifest = mf.add_verification(folder, verification)
    return manifest, verification
