"""What a build's manifest says it was made from, rebuilt for checking it again: the float32 reference on
``meta``, its graph definitions, components, precision policy and shape ranges (``verify`` and the torch
backend of the runtime)."""
from __future__ import annotations

from pathlib import Path

from ..contract import Manifest, ManifestError
from ..models.weights import WeightSource, tensors_digest, transformer_source
from ..models.split import SplitSD3Transformer
from ..models.weights import split_on_meta
from ..export.components import load_components
from ..export.graphs import GraphDef, build_plans, graph_spec, weights_digest
from ..export.precision import Fp32Blocks, PrecisionPolicy
from ..export.shapes import DimRange, ShapeConfig
from ..schedule import SamplingPlan


def reference_split(manifest: Manifest) -> tuple[SplitSD3Transformer, WeightSource]:
    """The float32 reference a build was made from, on ``meta`` (for the streamed gate), and its checkpoint."""
    model = manifest.model
    config, source = transformer_source(model.source)
    return split_on_meta(config, Path(model.mlp) if model.mlp else None, manifest.skip.range), source


def manifest_defs(manifest: Manifest) -> list[GraphDef]:
    """The transformer graph definitions a manifest records, in plan order."""
    return [GraphDef.from_json(n, g.definition) for n, g in manifest.graphs.items() if g.definition]


def checked_defs(manifest: Manifest, split: SplitSD3Transformer) -> list[GraphDef]:
    """:func:`manifest_defs`, whose inputs and outputs, as this version derives them for ``split`` (the build's
    model), must be those the build recorded: a build made by a version whose graphs differed (a cut segment's
    last graph used to take ``I_n`` as ``img_in`` / ``ctx_in``) cannot be re-checked or run as PyTorch graphs,
    and is refused with the fix."""
    defs = manifest_defs(manifest)
    for d in defs:
        spec, recorded = graph_spec(split, d, PrecisionPolicy("fp32")), manifest.graphs[d.name]
        derived = [t.name for t in (*spec.inputs, *spec.outputs)]
        built = [t.name for t in (*recorded.inputs, *recorded.outputs)]
        if derived != built:
            raise ManifestError(f"graph {d.name!r} of this build has inputs and outputs {built}, where this version of "
                                f"onex-export makes {derived}: the build was made by another version",
                                "rebuild it with `onex-export build` (the same options)")
    return defs


def unfounded_claims(manifest: Manifest, defs: list[GraphDef]) -> list[str]:
    """What the manifest claims that its graphs do not do, re-derived as the build derives it: the skipped range
    (the segment graphs' blocks), the plans (from the graphs' definitions) and the schedule (the 1.x-NFE plan
    for the recorded eta). Empty when every claim holds; the seal catches an edit, this catches a claim that
    was never true, in a build made before seals too."""
    problems = []
    segment = [d for d in defs if d.role == "segment"]
    if segment:
        first, last = min(d.start for d in segment) + 1, max(d.stop for d in segment)
        if (first, last) != (manifest.skip.first, manifest.skip.last):
            problems.append(f"skip: the manifest says {manifest.skip.one_based}, its segment graphs hold blocks "
                            f"{first}-{last}")
    derived = build_plans(defs)
    for name in sorted(set(derived) | set(manifest.plans)):
        if derived.get(name) != manifest.plans.get(name):
            problems.append(f"plans: {name!r} is not the plan its graphs give (steps "
                            f"{[st['graph'] for st in manifest.plans.get(name, {}).get('steps', [])]}, expected "
                            f"{[st['graph'] for st in derived.get(name, {}).get('steps', [])]})")
    try:
        schedule = SamplingPlan.one_x(float(manifest.schedule["eta"])).to_manifest(manifest.model.num_layers,
                                                                                 manifest.skip.range)
    except (KeyError, TypeError, ValueError) as exc:
        return problems + [f"schedule: unreadable ({exc})"]
    if schedule != manifest.schedule:
        problems.append(f"schedule: sigmas {manifest.schedule.get('sigmas')} and steps are not the 1.x-NFE schedule "
                        f"this build runs (sigmas {schedule['sigmas']})")
    return problems


def changed_weights(manifest: Manifest, defs: list[GraphDef], split: SplitSD3Transformer,
                    source: WeightSource) -> list[str]:
    """The transformer graphs whose weights in the reference (``split``'s MLP, ``source``'s checkpoint) are not the
    ones the build recorded exporting (``weights_sha256``), hashed as the build hashes them; empty when all match
    or the build kept no digests."""
    mlp_digest = tensors_digest(split.mlp.state_dict().items())  # as the build took it: float32, before any cast
    recorded = {d.name: manifest.graphs[d.name].weights_sha256 for d in defs}
    return [d.name for d in defs if recorded[d.name] is not None  # an older build kept no digest: nothing to hash
            and recorded[d.name] != weights_digest(d, mlp_digest, source)]


def manifest_components(manifest: Manifest, transformer_config):
    """The text encoders and VAE the build carries, loaded from the model it was made from."""
    return load_components(manifest.model.source, transformer_config, manifest.pipeline.components)


def manifest_policy(manifest: Manifest) -> PrecisionPolicy:
    """The precision policy the build was exported with."""
    blocks = manifest.precision_policy["fp32_blocks"]
    return PrecisionPolicy(manifest.precision, Fp32Blocks.parse(blocks) if blocks else None)


def manifest_shapes(manifest: Manifest) -> ShapeConfig:
    """The shape ranges the build runs."""
    r = manifest.shapes.ranges
    return ShapeConfig(DimRange(*r.batch), DimRange(*r.resolution), DimRange(*r.text_len),
                       manifest.pipeline.vae_scale_factor)

