"""Text -> image from a build folder alone, with interchangeable backends.

``torch`` (the float32 PyTorch reference, rebuilt from the model the manifest names by the checks, which hand
it in: :func:`onex_export.check.reference.open_pipeline`), ``onnxruntime``
(the build's ONNX graphs) and ``tensorrt`` (its engines; GPU only) run the same plans through the same
sampler: tokenize -> ``text`` graph -> 1.x-NFE schedule (full plan, then skipping plan fed the deltas)
-> ``vae`` graph.
"""
from __future__ import annotations

import operator
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import OnexError, UsageError
from ..fileio import to_uint8
from .. import contract
from ..schedule import SamplingPlan
from .cuda_graph import CudaGraphDenoiser, require_cuda
from .graphs import PlanDenoiser, load_build_graphs
from .sampler import Conditioning, sample
from ..contract.tokenizers import load_build_tokenizers

BACKENDS = ("torch", "onnxruntime", "aoti", "tensorrt")
# The torch backend's graphs, made by the checks (onex_export.check.reference): (folder, manifest, device) -> graphs
ReferenceGraphs = Callable[[Path, contract.Manifest, str], dict]


def _integer(value, name: str) -> int:
    """``value`` as an int when it is integer-like (int, numpy integers, 0-d integer tensors), else UsageError."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise UsageError(f"{name} must be an integer, not {value!r}")
    return operator.index(value)


@dataclass(frozen=True)
class Request:
    """One caller's request: ``prompts`` (a str is one prompt), each made ``images_per_prompt`` times from
    ``seed``, at ``resolution`` pixels (None: the build's optimum). Integer-like values (numpy's) are taken."""

    prompts: tuple[str, ...]
    seed: int = 0
    images_per_prompt: int = 1
    resolution: int | None = None

    def __post_init__(self) -> None:
        prompts = (self.prompts,) if isinstance(self.prompts, str) else tuple(self.prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise UsageError(f"prompts must be text, got {[type(p).__name__ for p in prompts]}")
        object.__setattr__(self, "prompts", prompts)
        object.__setattr__(self, "seed", _integer(self.seed, "seed"))
        object.__setattr__(self, "images_per_prompt", _integer(self.images_per_prompt, "images_per_prompt"))
        if self.resolution is not None:
            object.__setattr__(self, "resolution", _integer(self.resolution, "resolution"))

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.images_per_prompt

    def expanded(self) -> list[str]:
        return [p for p in self.prompts for _ in range(self.images_per_prompt)]


@dataclass
class Generation:
    images: torch.Tensor  # (N, 3, H, W) float in [0, 1]
    latents: torch.Tensor  # (N, C, H/8, W/8)
    truncated: tuple[str, ...]
    seconds: dict[str, float] = field(default_factory=dict)  # per stage

    def pixels(self) -> np.ndarray:
        """The images as 8-bit RGB, (N, H, W, 3) uint8, as the PNGs hold them."""
        return to_uint8(self.images).numpy()


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class PipelineOutput:
    """What a call of :class:`BuildPipeline` returns, as diffusers' pipelines do: ``images`` in the ``output_type``
    asked for (``pil``: a list of N PIL images; ``np``: (N, H, W, 3) float32 in [0, 1]; ``pt``: (N, 3, H, W) float in
    [0, 1]; ``latent``: (N, C, H/8, W/8)), with the ``seed`` used, what the encoders cut (``truncated``) and the
    ``seconds`` per stage."""

    images: object
    seed: int
    truncated: tuple[str, ...]
    seconds: dict[str, float]


def _plan(folder: Path, manifest: contract.Manifest) -> SamplingPlan:
    """The schedule the manifest records (sigmas, each step's plan, eta), checked against the build's plans."""
    try:
        plan = SamplingPlan.from_manifest(manifest.schedule)
    except (KeyError, TypeError, ValueError) as exc:
        raise contract.ManifestError(f"the schedule in {folder / contract.FILENAME} cannot be run: {exc!s}",
                               "rebuild with `onex-export build`") from exc
    missing = {"skipping" if s else "full" for s in plan.skips} - set(manifest.plans)
    if missing:
        raise contract.ManifestError(f"the schedule in {folder / contract.FILENAME} uses plan(s) {sorted(missing)}, which the "
                               f"build does not have ({', '.join(manifest.plans)})", "rebuild with `onex-export build`")
    return plan


def _check_cuda_graph(backend: str, device: str) -> None:
    if backend in ("onnxruntime", "aoti"):
        raise UsageError(f"CUDA-graph capture is not available with the {backend} backend (it runs on the CPU)",
                         "use the tensorrt backend, or the torch backend on a cuda device")
    if backend == "torch" and not device.startswith("cuda"):
        raise UsageError(f"CUDA-graph capture with the torch backend needs a cuda device, not {device!r}",
                         "run on device cuda, or turn CUDA-graph capture off")
    require_cuda()


class BuildPipeline:
    """Loads ``folder``'s manifest (checking every file's sha256) and generates images.

    One object serves a whole process: :meth:`generate` may be called from several threads (the calls run
    one at a time: a captured CUDA graph and the engines' buffers are shared), and :meth:`warm_up` runs a
    first request before a service reports ready. ``spin=True`` lets ONNX Runtime's worker threads spin between
    runs; off by default, as measured on 2 cores (digits-sd3 and tiny-sd3, 40 images): spinning gave 6.7-10.8
    images/s against 40-52 without, alone or from 4 threads, since each graph's session spins its own threads
    and the idle ones take the CPU from the one that runs. ``reference`` makes the ``torch``
    backend's graphs; the checks hand it in (:func:`onex_export.check.reference.open_pipeline`).
    """

    def __init__(self, folder: str | Path, backend: str = "onnxruntime", device: str = "cpu", check_files: bool = True,
                 cuda_graph: bool = False, spin: bool = False, reference: ReferenceGraphs | None = None):
        if backend not in BACKENDS:
            raise UsageError(f"unknown backend {backend!r}", f"choose one of {', '.join(BACKENDS)}")
        if cuda_graph:
            _check_cuda_graph(backend, device)
        self.folder = Path(folder)
        self.manifest = m = contract.read_manifest(self.folder)
        if problems := (contract.check_files if check_files else contract.check_claims)(self.folder, m):
            raise contract.ManifestError(f"{self.folder} does not match its manifest:\n    " + "\n    ".join(problems),
                                   "rebuild with `onex-export build`")
        if m.status == "failed":
            raise contract.ManifestError(f"{self.folder} failed its parity gate: its outputs do not match PyTorch",
                                   "rebuild it, or inspect it with `onex-export verify`")
        # "unverified" (no backend could check it where it was built, e.g. bf16 on a CPU) is usable: callers
        # see it in self.verified and `onex-export verify --backend tensorrt` on a GPU settles it.
        self.verified = m.status == "passed"
        if backend == "onnxruntime" and m.precision == "bf16":  # not "rebuild": the build is fine where it is meant to run
            raise OnexError(f"{self.folder} is a bf16 build, and ONNX Runtime cannot run bf16 graphs on a CPU (which is "
                            "also why it is unverified)", "run it with --backend tensorrt on an NVIDIA GPU (first "
                            "`onex-export verify --backend tensorrt` there), or build --precision fp32 or fp16 for the CPU")
        missing = {"text", "vae"} - set(m.pipeline.components)
        if missing:
            raise OnexError(f"{self.folder} has no {' and no '.join(sorted(missing))} graph, so it cannot go from text "
                            "to image", "rebuild with the text encoders and VAE (--components text,vae)")
        self.backend, self.device, self.spin, self.reference = backend, device, spin, reference
        self.tokenizers = load_build_tokenizers(self.folder, m)
        self.graphs = self._graphs()
        self.denoiser = PlanDenoiser(self.graphs, m.plans)
        if cuda_graph:  # captured per batch size and resolution on first use
            self.denoiser = CudaGraphDenoiser(self.denoiser)
        self.plan = _plan(self.folder, m)
        self._lock = threading.Lock()

    def warm_up(self, batch: int | None = None, resolution: int | None = None) -> float:
        """Run one request at ``batch`` x ``resolution`` (default: the build's optimum shape) so that sessions,
        engines' first-run tuning and CUDA-graph capture happen now, not in a user's request; returns seconds."""
        start = time.perf_counter()
        self.generate(["warm-up"] * (batch or self.manifest.shapes.ranges.batch.opt), seed=0, resolution=resolution)
        return time.perf_counter() - start

    def _graphs(self) -> dict:
        if self.backend != "torch":
            return load_build_graphs(self.folder, self.manifest, self.backend, self.spin)
        if self.reference is None:
            raise UsageError("the torch backend is the checks' float32 reference, which this runtime does not carry",
                             "open it with onex_export.check.reference.open_pipeline(folder, 'torch'), or pick "
                             "onnxruntime or tensorrt")
        return self.reference(self.folder, self.manifest, self.device)

    def check_request(self, request: Request) -> int:
        """Raise :class:`UsageError` naming what this build cannot run in ``request``; returns its resolution."""
        r = self.manifest.shapes.ranges
        if not request.prompts:
            raise UsageError("no prompt given", "pass at least one prompt")
        if request.images_per_prompt < 1:
            raise UsageError(f"images_per_prompt must be at least 1, not {request.images_per_prompt}")
        if not r.batch.min <= request.rows <= r.batch.max:
            raise UsageError(f"{request.rows} images per call is outside this build's batch range "
                             f"{r.batch.min}-{r.batch.max}",
                             "split the prompts into smaller calls, or rebuild with a larger batch range")
        resolution = r.resolution.opt if request.resolution is None else request.resolution
        step = self.manifest.pipeline.vae_scale_factor * self.manifest.model.config["patch_size"]
        if not r.resolution.min <= resolution <= r.resolution.max or resolution % step:
            raise UsageError(f"resolution {resolution} is not one this build runs: a multiple of {step} in "
                             f"{r.resolution.min}-{r.resolution.max}",
                             "ask for one of those, or rebuild with a resolution range that holds it")
        return resolution

    def generate(self, prompts: str | Sequence[str], seed: int = 0, images_per_prompt: int = 1,
                 resolution: int | None = None) -> Generation:
        """Images for ``prompts`` (a str is one prompt; each repeated ``images_per_prompt`` times), one batch, one
        seed (any integer-like value).

        Returns images (N, 3, H, W) in [0, 1] and latents (N, C, H/8, W/8) on the CPU, N = prompts x images
        per prompt. Safe to call from several threads."""
        return self.generate_batch([Request(prompts, seed, images_per_prompt, resolution)])[0]

    def __call__(self, prompt: str | Sequence[str], num_images_per_prompt: int = 1, height: int | None = None,
                 width: int | None = None, generator: torch.Generator | None = None, seed: int | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        """Text to images as a diffusers pipeline is called: ``prompt`` (a str or a list), ``num_images_per_prompt``,
        ``height`` / ``width`` (square: one resolution the build runs; None: its optimum), and a ``generator`` (drawn
        from once for the call's seed, so that it advances as in diffusers) or a ``seed`` (neither: a random one,
        returned). Returns a :class:`PipelineOutput`, or ``(images,)`` with ``return_dict=False``. The schedule is
        the build's (1.x NFE): there is no steps or guidance argument. Safe to call from several threads."""
        if output_type not in OUTPUT_TYPES:
            raise UsageError(f"output_type {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
        if height is not None and width is not None and _integer(height, "height") != _integer(width, "width"):
            raise UsageError(f"this build makes square images: height {height} and width {width} differ",
                             "ask for one size (height, width or both equal), or leave both out for the build's own")
        if generator is not None and seed is not None:
            raise UsageError("both a generator and a seed were given", "pass one of them")
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise UsageError(f"generator must be a torch.Generator, not {type(generator).__name__}",
                                 "pass torch.Generator().manual_seed(N), or seed=N")
            seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
        elif seed is None:
            seed = int(torch.randint(0, 2**63 - 1, (1,)))
        result = self.generate(prompt, seed, num_images_per_prompt, height if height is not None else width)
        if output_type == "pil":
            from PIL import Image

            images = [Image.fromarray(array) for array in result.pixels()]
        else:
            images = {"np": lambda: result.images.permute(0, 2, 3, 1).numpy(), "pt": lambda: result.images,
                      "latent": lambda: result.latents}[output_type]()
        if not return_dict:
            return (images,)
        return PipelineOutput(images, _integer(seed, "seed"), result.truncated, result.seconds)

    def generate_batch(self, requests: list[Request]) -> list[Generation]:
        """Several requests, one result each in order. Requests of the same resolution run together in batches
        of up to the build's largest batch, each with its own seed: a request's images are the ones it gets
        alone. Each result's ``seconds`` are those of the batch it ran in. Safe to call from several threads."""
        max_batch = self.manifest.shapes.ranges.batch.max
        sized = [(self.check_request(r), r) for r in requests]
        results: list[Generation | None] = [None] * len(requests)
        with self._lock, torch.no_grad():
            for resolution in dict.fromkeys(res for res, _ in sized):
                pack: list[int] = []
                rows = 0
                for i, (res, r) in enumerate(sized):
                    if res != resolution:
                        continue
                    if pack and rows + r.rows > max_batch:
                        self._run_pack(requests, pack, resolution, results)
                        pack, rows = [], 0
                    pack.append(i)
                    rows += r.rows
                self._run_pack(requests, pack, resolution, results)
        return results

    def _run_pack(self, requests: list[Request], pack: list[int], resolution: int, results: list) -> None:
        prompts = [p for i in pack for p in requests[i].expanded()]
        out = self._run(prompts, [(requests[i].seed, requests[i].rows) for i in pack], resolution)
        start = 0
        for i in pack:
            r, stop = requests[i], start + requests[i].rows
            truncated = tuple(line for line in out.truncated if any(repr(p) in line for p in r.prompts))
            results[i] = Generation(out.images[start:stop], out.latents[start:stop], truncated, dict(out.seconds))
            start = stop

    def _run(self, prompts: list[str], seeds: list[tuple[int, int]], resolution: int) -> Generation:
        seconds, cuda = {}, self.device.startswith("cuda") or self.backend == "tensorrt"

        def stage(name, fn):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = fn()
            if cuda:
                torch.cuda.synchronize()
            seconds[name] = time.perf_counter() - start
            return result

        tok = stage("tokenize", lambda: self.tokenizers(prompts))
        text = stage("text", lambda: self.graphs["text"](ids_l=tok.ids_l, ids_g=tok.ids_g, ids_t5=tok.ids_t5))
        cond = Conditioning(text["encoder_hidden_states"].float(), text["pooled_projections"].float())
        channels = self.manifest.model.config["in_channels"]
        latent = resolution // self.manifest.pipeline.vae_scale_factor
        device = "cuda" if self.backend == "tensorrt" else self.device
        latents = stage("transformer", lambda: sample(self.denoiser, self.plan, cond, (channels, latent, latent), seeds,
                                                      device=device))
        images = stage("vae", lambda: self.graphs["vae"](latents=latents)["image"].float())
        return Generation(images.cpu(), latents.cpu(), tok.truncated, seconds)
