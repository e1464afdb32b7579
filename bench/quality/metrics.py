"""The paper's image-quality metrics behind one interface, each from local weights only (nothing is downloaded).

Every metric takes the images of one prompt at a time, as 8-bit RGB ``(S, H, W, 3)`` uint8 (S = seeds), and
gives one number per schedule:

- ``fid``: Frechet Inception Distance between a schedule's images and the teacher's (torchmetrics over
  torch-fidelity's Inception-v3, its ``weights-inception-2015-12-05-6726825d.pth`` file, resized to 299 px the
  way the original TensorFlow implementation does); lower is better.
- ``clip``: CLIP score, the cosine between the image and prompt embeddings of CLIP ViT-B/32 (a transformers
  folder), as the paper's Table 1 reports it (0.3176 for SD3-Medium).
- ``lpips_diversity``: mean pairwise LPIPS (AlexNet) between the seeds of one prompt, averaged over prompts
  (the paper's Table 3); the linear heads ship with the ``lpips`` package, the AlexNet backbone is a torchvision
  weights file.
- ``pickscore``: PickScore, ``logit_scale * cosine`` of the PickScore_v1 CLIP-H model (a transformers folder).
- ``aesthetic``: the LAION aesthetic predictor: its linear head on the normalised CLIP ViT-L/14 image embedding.
- ``hpsv2``: HPSv2, 100 x cosine of open_clip's ViT-H-14 with the HPS_v2 checkpoint (open-clip-torch), as the
  paper's Table 1 reports it (30.72 for SD3-Medium; the HPSv2 package's ``score()`` gives the plain cosine).

The metric networks run on ``device`` (the benchmark's ``--device``).
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from onex_export.errors import UsageError


@contextlib.contextmanager
def quiet_open_clip():
    """open_clip warns that a model made without ``pretrained`` is random: ours get their weights next."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


class Metric(Protocol):
    name: str
    higher_is_better: bool

    def reset(self) -> None:
        """Forget the schedule measured so far (a reference the metric keeps stays)."""

    def update(self, images: torch.Tensor, prompt: str) -> None:
        """Add one prompt's images, (S, H, W, 3) uint8."""

    def compute(self) -> float:
        """The schedule's value over every image added since the last reset."""


def _chw(images: torch.Tensor) -> torch.Tensor:
    """(S, H, W, 3) uint8 -> (S, 3, H, W) float in [0, 1]."""
    return images.movedim(-1, -3).float() / 255


class _MeanScore:
    """A metric that is the mean of a score per image: subclasses append (S,) tensors to ``scores``."""

    scores: list[torch.Tensor]

    def reset(self) -> None:
        self.scores = []

    def compute(self) -> float:
        return float(torch.cat(self.scores).mean())


class FID:
    """FID against reference images (the teacher's), added first with :meth:`add_reference`.

    ``feature``: 2048 for torch-fidelity's Inception-v3 from ``weights`` (weights-inception-2015-12-05-6726825d.pth),
    or a module mapping (N, 3, H, W) uint8 images to (N, D) features (the random stand-in)."""

    name, higher_is_better = "fid", False

    def __init__(self, feature: int | nn.Module = 2048, weights: Path | None = None, device: str = "cpu"):
        from torchmetrics.image.fid import FrechetInceptionDistance

        if isinstance(feature, int) and weights is None:
            raise UsageError("FID's Inception-v3 needs its weights file", "pass --fid-weights FILE "
                             "(torch-fidelity's weights-inception-2015-12-05-6726825d.pth)")
        try:  # antialias=False: the TensorFlow-style resize to 299 px of the original FID, as torch-fidelity has it
            self.fid = FrechetInceptionDistance(feature=feature, reset_real_features=False, antialias=False,
                                                feature_extractor_weights_path=str(weights) if weights else None)
        except Exception as exc:  # torch-fidelity's own loading: a wrong or damaged file fails in many ways
            raise UsageError(f"cannot load FID's Inception-v3 from {weights}: {type(exc).__name__}: {exc}",
                             "pass torch-fidelity's weights-inception-2015-12-05-6726825d.pth") from exc
        self.fid = self.fid.to(device).eval()
        self.device = device
        self.references = self.images = 0

    def add_reference(self, images: torch.Tensor) -> None:
        self.fid.update(images.movedim(-1, -3).contiguous().to(self.device), real=True)
        self.references += images.shape[0]

    def reset(self) -> None:
        self.fid.reset()  # the reference features stay (reset_real_features=False)
        self.images = 0

    def update(self, images: torch.Tensor, prompt: str) -> None:
        self.fid.update(images.movedim(-1, -3).contiguous().to(self.device), real=False)
        self.images += images.shape[0]

    def compute(self) -> float:
        if self.references < 2 or self.images < 2:
            raise UsageError(f"FID needs 2 images or more on each side ({self.references} reference, "
                             f"{self.images} generated)", "use more prompts or seeds")
        return float(self.fid.compute())


class CLIPScorer(_MeanScore):
    """Mean image-prompt cosine of a CLIP model (a transformers folder with its tokenizer and image processor);
    ``scaled``: times the model's logit scale (PickScore's definition)."""

    higher_is_better = True

    def __init__(self, folder: Path, name: str = "clip", scaled: bool = False, device: str = "cpu",
                 text: bool = True):
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        self.name, self.scaled, self.device = name, scaled, device
        try:
            self.model = CLIPModel.from_pretrained(str(folder)).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder)) if text else None
            self.processor = CLIPImageProcessor.from_pretrained(str(folder))
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot load a CLIP model for {name} from {folder}: {exc}",
                             "pass a transformers CLIP folder (config.json, weights, tokenizer and "
                             "preprocessor_config.json)") from exc
        self.reset()

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(S, H, W, 3) uint8 -> (S, D) unit vectors."""
        pixels = self.processor(images=list(images.numpy()), return_tensors="pt")["pixel_values"].to(self.device)
        features = self.model.get_image_features(pixel_values=pixels).pooler_output
        return nn.functional.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def text_embedding(self, prompt: str) -> torch.Tensor:
        """A prompt -> (1, D) unit vector (truncated to the model's text length, as CLIP scores are)."""
        ids = self.tokenizer([prompt], padding="max_length", truncation=True, return_tensors="pt",
                             max_length=self.model.config.text_config.max_position_embeddings)
        features = self.model.get_text_features(input_ids=ids["input_ids"].to(self.device),
                                                attention_mask=ids["attention_mask"].to(self.device)).pooler_output
        return nn.functional.normalize(features.float(), dim=-1)

    def update(self, images: torch.Tensor, prompt: str) -> None:
        cosine = self.image_embeddings(images) @ self.text_embedding(prompt).T
        scale = self.model.logit_scale.exp().item() if self.scaled else 1.0
        self.scores.append(scale * cosine.squeeze(-1).cpu())


class LPIPSDiversity:
    """Mean pairwise LPIPS between the images of one prompt (its seeds), averaged over prompts; the AlexNet
    backbone comes from ``backbone`` (torchvision's ``alexnet`` state dict, ``features.*`` keys)."""

    name, higher_is_better = "lpips_diversity", True

    def __init__(self, backbone: Path | dict, device: str = "cpu"):
        import lpips

        with warnings.catch_warnings():  # lpips still passes torchvision the deprecated `pretrained=False`
            warnings.simplefilter("ignore", UserWarning)
            # pnet_rand: no torchvision download; the backbone is loaded below, the linear heads ship with lpips
            self.lpips = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).eval()
        state = backbone if isinstance(backbone, dict) else _torch_load(backbone, "--lpips-backbone")
        sliced = {}
        for slice_name, module in self.lpips.net.named_children():
            for key in module.state_dict():
                source = f"features.{key}"
                if source not in state:
                    raise UsageError(f"the LPIPS backbone {_name(backbone)} lacks {source}",
                                     "pass torchvision's AlexNet weights (alexnet-owt-7be5be79.pth)")
                sliced[f"{slice_name}.{key}"] = state[source]
        self.lpips.net.load_state_dict(sliced)
        self.lpips = self.lpips.to(device)
        self.device = device
        self.per_prompt: list[float] = []

    @torch.no_grad()
    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """LPIPS between images (N, H, W, 3) uint8, pairwise by row: (N,)."""
        return self.lpips(_chw(a).to(self.device) * 2 - 1, _chw(b).to(self.device) * 2 - 1).flatten().cpu()

    def reset(self) -> None:
        self.per_prompt = []

    def update(self, images: torch.Tensor, prompt: str) -> None:
        if images.shape[0] < 2:
            raise UsageError("LPIPS diversity needs 2 seeds per prompt or more", "pass --seeds 4 (the paper's)")
        pairs = list(itertools.combinations(range(images.shape[0]), 2))
        first, second = (torch.tensor(side) for side in zip(*pairs))
        self.per_prompt.append(float(self.distance(images[first], images[second]).mean()))

    def compute(self) -> float:
        return sum(self.per_prompt) / len(self.per_prompt)


class AestheticScorer(_MeanScore):
    """The LAION aesthetic predictor: a stack of linear layers (``layers.<i>.weight``/``bias``; no activations
    between them, as released) on the unit CLIP ViT-L/14 image embedding of ``clip`` (a transformers folder)."""

    name, higher_is_better = "aesthetic", True

    def __init__(self, clip: Path, head: Path | dict, device: str = "cpu"):
        self.clip = CLIPScorer(clip, name="aesthetic", device=device, text=False)
        state = head if isinstance(head, dict) else _torch_load(head, "--aesthetic-head")
        indices = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.endswith(".weight")})
        if not indices:
            raise UsageError(f"{_name(head)} holds no layers.<i>.weight", "pass the aesthetic predictor's .pth file")
        layers = []
        for i in indices:
            linear = nn.Linear(state[f"layers.{i}.weight"].shape[1], state[f"layers.{i}.weight"].shape[0])
            linear.load_state_dict({"weight": state[f"layers.{i}.weight"], "bias": state[f"layers.{i}.bias"]})
            layers.append(linear)
        self.head = nn.Sequential(*layers).to(device).eval()
        width = self.clip.model.config.projection_dim
        if layers[0].in_features != width:
            raise UsageError(f"the aesthetic head takes {layers[0].in_features}-d embeddings, {clip} gives {width}",
                             "pair the head with the CLIP it was trained on (ViT-L/14: 768)")
        self.reset()

    @torch.no_grad()
    def update(self, images: torch.Tensor, prompt: str) -> None:
        self.scores.append(self.head(self.clip.image_embeddings(images)).squeeze(-1).cpu())


class HPSv2(_MeanScore):
    """HPSv2: 100 x the cosine between the image and prompt embeddings of open_clip's ViT-H-14 carrying the
    HPS_v2 checkpoint (``HPS_v2_compressed.pt`` or ``HPS_v2.1_compressed.pt``: a ``state_dict`` entry), images
    preprocessed as open_clip does for validation (resize, centre crop, OpenAI CLIP mean/std)."""

    name, higher_is_better = "hpsv2", True

    def __init__(self, checkpoint: Path | dict, arch: str = "ViT-H-14", device: str = "cpu"):
        import open_clip

        with quiet_open_clip():
            self.model = open_clip.create_model(arch, pretrained=None).eval()
        state = checkpoint if isinstance(checkpoint, dict) else _torch_load(checkpoint, "--hpsv2")
        try:
            self.model.load_state_dict(state.get("state_dict", state))
        except RuntimeError as exc:
            raise UsageError(f"{_name(checkpoint)} is not an HPSv2 checkpoint for open_clip's {arch}: "
                             f"{str(exc).splitlines()[0]}", "pass HPS_v2_compressed.pt or HPS_v2.1_compressed.pt")
        self.model = self.model.to(device)
        self.device = device
        self.preprocess = open_clip.image_transform(self.model.visual.image_size, is_train=False)
        self.tokenizer = open_clip.get_tokenizer(arch)  # its BPE vocabulary ships with open_clip
        self.reset()

    @torch.no_grad()
    def update(self, images: torch.Tensor, prompt: str) -> None:
        from PIL import Image

        pixels = torch.stack([self.preprocess(Image.fromarray(image)) for image in images.numpy()])
        image = self.model.encode_image(pixels.to(self.device), normalize=True)
        text = self.model.encode_text(self.tokenizer([prompt]).to(self.device), normalize=True)
        self.scores.append(100 * (image @ text.T).squeeze(-1).cpu())


def _torch_load(path: Path, option: str) -> dict:
    try:  # weights_only: tensors and containers, no code; anything else (text, a pickle of objects) is refused
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # KeyError for a text file, UnpicklingError, OSError, ...: all a wrong file
        raise UsageError(f"cannot read {option} {path}: {type(exc).__name__}: {exc}",
                         "pass the metric's weights file") from exc
    return state.get("state_dict", state) if isinstance(state, dict) else {}


def _name(source: Path | dict) -> str:
    """How an error names weights given as a file or (tests, stand-ins) as a state dict."""
    return "the given state dict" if isinstance(source, dict) else str(source)


@dataclass(frozen=True)
class MetricWeights:
    """Where each metric's weights are; a metric whose weights are None is skipped (and listed as such)."""

    fid_weights: Path | None = None
    clip: Path | None = None
    lpips_backbone: Path | None = None
    pickscore: Path | None = None
    aesthetic_clip: Path | None = None
    aesthetic_head: Path | None = None
    hpsv2: Path | None = None

    def __post_init__(self) -> None:
        for name, path in vars(self).items():
            if path is not None and not Path(path).exists():
                raise UsageError(f"--{name.replace('_', '-')} {path} does not exist",
                                 "pass a local weights file or folder (nothing is downloaded)")
        if (self.aesthetic_clip is None) != (self.aesthetic_head is None):
            raise UsageError("--aesthetic-clip and --aesthetic-head go together",
                             "pass the CLIP ViT-L/14 folder and the predictor's .pth file")


# Metrics of the paper that this benchmark does not compute, and why (listed in every report).
NOT_IMPLEMENTED = {
    "image_reward": "not supported: its package (image-reward 1.5) pins timm==0.6.13, which cannot be installed "
                    "beside open-clip-torch 3.3 (timm>=1.0.17; HPSv2 and Stage II's discriminator)",
}


def load_metrics(weights: MetricWeights, fid_features: nn.Module | None = None, hpsv2_arch: str = "ViT-H-14",
                 device: str = "cpu") -> tuple[list[Metric], dict[str, str]]:
    """The metrics whose weights are given, and {name: why skipped} for the others; ``fid_features`` replaces
    FID's Inception and ``hpsv2_arch`` HPSv2's ViT-H-14 (the random stand-ins)."""
    metrics, skipped = [], dict(NOT_IMPLEMENTED)
    if fid_features is not None:
        metrics.append(FID(fid_features, device=device))
    elif weights.fid_weights is not None:
        metrics.append(FID(2048, weights.fid_weights, device))
    else:
        skipped["fid"] = "no --fid-weights"
    if weights.clip is not None:
        metrics.append(CLIPScorer(weights.clip, device=device))
    else:
        skipped["clip"] = "no --clip"
    if weights.lpips_backbone is not None:
        metrics.append(LPIPSDiversity(weights.lpips_backbone, device))
    else:
        skipped["lpips_diversity"] = "no --lpips-backbone"
    if weights.pickscore is not None:
        metrics.append(CLIPScorer(weights.pickscore, name="pickscore", scaled=True, device=device))
    else:
        skipped["pickscore"] = "no --pickscore"
    if weights.aesthetic_clip is not None:
        metrics.append(AestheticScorer(weights.aesthetic_clip, weights.aesthetic_head, device))
    else:
        skipped["aesthetic"] = "no --aesthetic-clip / --aesthetic-head"
    if weights.hpsv2 is not None:
        metrics.append(HPSv2(weights.hpsv2, hpsv2_arch, device))
    else:
        skipped["hpsv2"] = "no --hpsv2"
    return metrics, skipped
