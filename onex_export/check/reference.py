"""The float32 PyTorch reference of a build, rebuilt from the model its manifest names: the graphs the parity gate
compares against, also offered to :class:`~onex_export.runtime.pipeline.BuildPipeline` as its ``torch`` backend.

It lives with the checks, not in the runtime: it needs the model code (diffusers), the exporter's subgraph
definitions and the precision policy, none of which a service that runs a build should import.
"""
from __future__ import annotations

from pathlib import Path

from ..contract import Manifest
from ..export.components import component_graphs
from ..export.graphs import SubgraphModule, graph_spec
from ..export.precision import PrecisionPolicy
from ..models import SplitSD3Transformer, load_compensation, load_transformer
from ..runtime.graphs import TorchGraph
from ..runtime.pipeline import BuildPipeline
from .from_manifest import checked_defs, manifest_components


def reference_graphs(folder: Path, manifest: Manifest, device: str) -> dict[str, TorchGraph]:
    """Every graph of the build (transformer subgraphs, ``text``, ``vae``) as float32 PyTorch modules on ``device``,
    whole in memory (SD3.5-Large: 32 GB): a reference backend, not a fast one. ``folder`` is unused: the reference
    is made from the model the manifest names, not from the build's files."""
    model, fp32 = manifest.model, PrecisionPolicy("fp32")
    transformer = load_transformer(model.source, device=device)
    mlp = load_compensation(model.mlp, transformer) if model.mlp else None
    split = SplitSD3Transformer(transformer, manifest.skip.range, mlp).to(device)
    graphs = {}
    for d in checked_defs(manifest, split):
        spec = graph_spec(split, d, fp32)
        graphs[d.name] = TorchGraph(SubgraphModule(split, d, spec), spec)
    for name, (module, spec) in component_graphs(manifest_components(manifest, transformer.config)).items():
        graphs[name] = TorchGraph(module.to(device), spec)
    return graphs


def open_pipeline(folder: str | Path, backend: str = "onnxruntime", device: str = "cpu", **options) -> BuildPipeline:
    """A :class:`BuildPipeline` for any backend, ``torch`` included (the reference above); ``options`` as
    BuildPipeline takes them (``check_files``, ``cuda_graph``, ``spin``)."""
    return BuildPipeline(folder, backend, device, reference=reference_graphs if backend == "torch" else None,
                         **options)
