"""`onex-export verify DIR`: check an existing build's files against its manifest, then re-run the
parity gate on its graphs against the PyTorch model it was built from."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import UsageError
from ..runtime.graphs import load_build_graphs
from ..runtime.tensorrt_runner import require_gpu
from . import manifest as mf
from .build import manifest_reference
from .gate import run_gate
from .shapes import DimRange, ShapeConfig


def verify(folder: Path, log: Callable[[str], None] = lambda _: None,
           backend: str = "onnxruntime") -> tuple[dict, dict]:
    """Return ``(manifest, parity)``; raises :class:`~manifest.ManifestError` on a file mismatch.

    ``backend`` runs the build's ONNX graphs ("onnxruntime", CPU) or its engines ("tensorrt", GPU only).
    """
    if backend not in ("onnxruntime", "tensorrt"):
        raise UsageError(f"verify cannot run backend {backend!r}", "choose onnxruntime or tensorrt")
    if backend == "tensorrt":
        require_gpu("verify with --backend onnxruntime here, and with --backend tensorrt on a GPU")
    folder = Path(folder)
    manifest = mf.read_manifest(folder)
    log(f"checking {len(mf.artifact_entries(manifest))} files against their sha256")
    problems = mf.check_files(folder, manifest)
    if problems:
        raise mf.ManifestError(f"{folder} does not match its manifest:\n    " + "\n    ".join(problems),
                               "rebuild with `onex-export build`; never edit a build by hand")
    log(f"loading the reference {manifest['model']['source']}")
    split, comps = manifest_reference(manifest)
    ranges = manifest["shapes"]["ranges"]
    shapes = ShapeConfig(*(DimRange(*ranges[k]) for k in ("batch", "resolution", "text_len")))
    engines = backend == "tensorrt"
    parity = run_gate(split, lambda: load_build_graphs(folder, manifest, backend), manifest["trt"] if engines else backend,
                      manifest["precision"], shapes, manifest["schedule"]["eta"], comps, log=log,
                      device="cuda" if engines else "cpu")
    return manifest, parity
