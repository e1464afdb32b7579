"""`python -m bench.quality`: the metrics against hand-computed values, the schedules, the whole run on tiny-sd3.

The metric networks are seeded random stand-ins built in code (no weights can be downloaded here); they go
through the same loading code as real weights files and folders.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from bench.arguments import run_main
from bench.quality.__main__ import main
from bench.quality.generation import Renderer, QualityConfig, schedules
from bench.quality.metrics import FID, AestheticScorer, CLIPScorer, HPSv2, LPIPSDiversity, MetricWeights
from bench.quality.stand_ins import (TINY_OPEN_CLIP, random_aesthetic_head, random_alexnet, random_hpsv2,
                                     write_tiny_clip)
from onex_export.config import SkipRange
from onex_export.errors import UsageError
from onex_export.models import build_tiny
from onex_export.models.compensation import CompensationMLP, save_compensation
from onex_export.models import SplitSD3Transformer
from onex_export.models.text import build_tiny_text
from onex_export.models.vae import LatentDecoder, build_tiny_vae
from onex_export.runtime import Conditioning, TorchDenoiser, sample
from onex_export.schedule import SamplingPlan

ROOT = Path(__file__).resolve().parents[1]


def _images(n: int, seed: int, low: int = 40, high: int = 200, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n, size, size, 3), generator=g, dtype=torch.uint8)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


# -- metrics ----------------------------------------------------------------------------------------------------

def test_lpips_of_identical_images_is_zero_and_of_different_ones_is_not():
    metric = LPIPSDiversity(random_alexnet())
    a, b = _images(3, 0), _images(3, 1)
    assert metric.distance(a, a).abs().max().item() < 1e-7
    assert metric.distance(a, b).min().item() > 1e-3
    metric.update(torch.cat([a[:1]] * 4), "four seeds, one image")  # 6 pairs, all identical
    metric.update(a, "three different images")
    pairs = [metric.distance(a[i:i + 1], a[j:j + 1]).item() for i, j in ((0, 1), (0, 2), (1, 2))]
    assert metric.per_prompt[0] < 1e-7
    assert metric.per_prompt[1] == pytest.approx(sum(pairs) / 3, rel=1e-5)
    assert metric.compute() == pytest.approx(sum(pairs) / 6, rel=1e-5)  # the mean over the two prompts


def test_lpips_refuses_a_backbone_that_is_not_alexnet():
    with pytest.raises(UsageError, match="lacks features.0.weight"):
        LPIPSDiversity({"conv.weight": torch.zeros(1)})


class ChannelMeans(nn.Module):
    """A feature extractor whose features are known: each image's per-channel mean in [0, 1]."""

    def forward(self, images):
        return images.float().mean(dim=(2, 3)) / 255


def test_fid_of_two_sets_with_equal_covariance_is_their_squared_mean_distance():
    """Shifting every pixel by 20 levels shifts each feature by 20/255 and keeps the covariance, so
    FID = ||mu_a - mu_b||^2 + Tr(S + S - 2 (S S)^1/2) = 3 (20/255)^2."""
    fid = FID(ChannelMeans())
    reference = _images(16, 0)
    fid.add_reference(reference[:8])
    fid.add_reference(reference[8:])  # features accumulate over calls
    fid.update(reference[:8] + 20, "a")
    fid.update(reference[8:] + 20, "b")
    assert fid.compute() == pytest.approx(3 * (20 / 255) ** 2, abs=1e-6)
    fid.reset()  # the reference stays; the same images again give 0
    fid.update(reference, "same")
    assert fid.compute() == pytest.approx(0.0, abs=1e-6)


def test_fid_needs_two_images_a_side_and_the_inception_needs_its_weights():
    fid = FID(ChannelMeans())
    fid.add_reference(_images(4, 0))
    fid.update(_images(1, 1), "one")
    with pytest.raises(UsageError, match="2 images or more"):
        fid.compute()
    with pytest.raises(UsageError, match="--fid-weights"):
        FID(2048, None)


def test_clip_score_is_the_cosine_of_the_projected_embeddings(tiny_clip):
    """Computed here through the vision and text towers and their projections by hand, not get_*_features."""
    from transformers import CLIPImageProcessor, CLIPModel

    images, prompt = _images(3, 2), "a photo of a red fox"
    scorer, picks = CLIPScorer(tiny_clip), CLIPScorer(tiny_clip, name="pickscore", scaled=True)
    scorer.update(images, prompt)
    picks.update(images, prompt)

    model = CLIPModel.from_pretrained(str(tiny_clip)).eval()
    pixels = CLIPImageProcessor.from_pretrained(str(tiny_clip))(images=list(images.numpy()), return_tensors="pt")
    assert pixels["pixel_values"].shape == (3, 3, 32, 32)
    ids = scorer.tokenizer([prompt], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=pixels["pixel_values"]).pooler_output)
        text = model.text_projection(model.text_model(**ids).pooler_output)
    cosine = nn.functional.cosine_similarity(image, text.expand_as(image), dim=-1)
    assert scorer.compute() == pytest.approx(cosine.mean().item(), abs=1e-5)
    assert picks.compute() == pytest.approx(model.logit_scale.exp().item() * cosine.mean().item(), abs=1e-4)
    assert -1 <= scorer.compute() <= 1 and abs(scorer.compute()) > 1e-4


def test_clip_score_refuses_a_folder_without_a_model(tmp_path):
    with pytest.raises(UsageError, match="cannot load a CLIP model"):
        CLIPScorer(tmp_path)


def test_aesthetic_score_is_the_linear_stack_on_the_unit_image_embedding(tiny_clip):
    head = random_aesthetic_head(32)
    scorer = AestheticScorer(tiny_clip, head)
    images = _images(2, 3)
    scorer.update(images, "ignored")
    e = scorer.clip.image_embeddings(images)
    assert e.norm(dim=-1).sub(1).abs().max() < 1e-5
    x = e
    for i in (0, 2, 4, 6, 7):  # no activation between the layers, as released
        x = x @ head[f"layers.{i}.weight"].T + head[f"layers.{i}.bias"]
    assert scorer.compute() == pytest.approx(x.mean().item(), abs=1e-5)
    with pytest.raises(UsageError, match="takes 64-d embeddings"):
        AestheticScorer(tiny_clip, random_aesthetic_head(64))


def test_hpsv2_is_100_times_the_cosine_of_open_clip_embeddings(tmp_path):
    """The checkpoint is loaded into a fresh open_clip model; the expected value comes from open_clip's forward,
    which returns both unit embeddings."""
    import open_clip

    checkpoint = random_hpsv2(tmp_path)
    metric = HPSv2(checkpoint, TINY_OPEN_CLIP)
    images, prompt = _images(2, 4), "a bouquet of sunflowers"
    metric.update(images, prompt)
    model = open_clip.create_model(TINY_OPEN_CLIP, pretrained=None).eval()
    model.load_state_dict(checkpoint["state_dict"])
    pixels = torch.stack([metric.preprocess(Image.fromarray(i)) for i in images.numpy()])
    assert pixels.shape == (2, 3, 32, 32)
    with torch.no_grad():
        image, text, _ = model(pixels, open_clip.get_tokenizer(TINY_OPEN_CLIP)([prompt]))
    assert metric.compute() == pytest.approx(100 * (image @ text.T).mean().item(), abs=1e-4)
    with pytest.raises(UsageError, match="is not an HPSv2 checkpoint"):
        HPSv2({"state_dict": {"visual.proj": torch.zeros(1)}}, TINY_OPEN_CLIP)


def test_metric_weights_are_checked_before_any_work(tmp_path):
    with pytest.raises(UsageError, match="--fid-weights .* does not exist"):
        MetricWeights(fid_weights=tmp_path / "missing.pth")
    with pytest.raises(UsageError, match="go together"):
        MetricWeights(aesthetic_clip=tmp_path)


# -- schedules ---------------------------------------------------------------------------------------------------

def test_schedules_are_the_papers_and_named_as_the_latency_benchmark_names_them():
    rows = schedules(4, SkipRange.parse("3-10"), with_mlp=True)
    assert [r.name for r in rows] == ["teacher 28x2", "4-step", "2-step", "1.x skip 3-10", "1.x skip 3-10 + MLP"]
    assert [r.plan.nfe(24, SkipRange.parse("3-10")) for r in rows] == pytest.approx([56, 4, 2, 5 / 3, 5 / 3])
    assert rows[0].teacher and rows[0].plan.uses_cfg and not any(r.plan.uses_cfg for r in rows[1:])
    assert rows[-1].mlp and rows[-1].latency_name == "1.x skip 3-10"
    assert [r.name for r in schedules(2, SkipRange.parse("3-8"), with_mlp=False)] == [
        "teacher 28x2", "2-step", "1.x skip 3-8"]


def test_rendered_images_are_the_runtime_sampler_on_the_embedded_components():
    """The 1.x row and the teacher row (CFG against the empty prompt), rebuilt here from the embedded model's
    own parts: tiny-sd3's transformer, text encoders and VAE, the runtime's sampler."""
    config = QualityConfig(model="tiny-sd3", prompts=("a red fox",), seeds=2, teacher_steps=2)
    renderer = Renderer(config)
    renderer.prepare()
    rows = schedules(4, config.skip, with_mlp=False, teacher_steps=2)
    teacher, one_x = rows[0], rows[-1]

    transformer = build_tiny("tiny-sd3")
    split = SplitSD3Transformer(transformer, config.skip)
    encoder, tokenizers = build_tiny_text(transformer.config.joint_attention_dim,
                                          transformer.config.pooled_projection_dim)
    vae = LatentDecoder(build_tiny_vae(transformer.config.in_channels)).eval()
    with torch.no_grad():
        (text, pooled), (empty, empty_pooled) = (encoder(*_ids(tokenizers, p)) for p in ("a red fox", ""))
        for schedule, plan, uncond in ((one_x, SamplingPlan.one_x(), None),
                                       (teacher, SamplingPlan.teacher(2, 7.0), (empty, empty_pooled))):
            cond = Conditioning(text.expand(2, -1, -1), pooled.expand(2, -1),
                                *((u.expand(2, *u.shape[1:]) for u in uncond) if uncond else ()))
            latents = sample(TorchDenoiser(split), plan, cond, (16, 16, 16), [(0, 1), (1, 1)])
            expected = (vae(latents) * 255).round().to(torch.uint8).movedim(1, -1)
            prompt, images = next(renderer.render(schedule))
            assert images.shape == (2, 128, 128, 3) and images.dtype == torch.uint8
            assert torch.equal(images, expected), schedule.name
            assert not torch.equal(images[0], images[1])  # the two seeds differ


def _ids(tokenizers, prompt: str):
    tok = tokenizers([prompt])
    return tok.ids_l, tok.ids_g, tok.ids_t5


# -- the command -------------------------------------------------------------------------------------------------

def _latency_json(path: Path) -> Path:
    """A bench.latency result reduced to what the quality plot reads (batch 1, median ms per schedule)."""
    names = {"teacher 28x2": 900.0, "4-step": 70.0, "2-step": 36.0, "1.x skip 3-10": 31.0}
    path.write_text(json.dumps({"results": [{"batch": 1, "schedules": {
        n: {"median_ms": ms, "nfe": 1.0} for n, ms in names.items()}}]}))
    return path


def test_the_quality_benchmark_on_tiny_sd3_with_a_trained_mlp(tmp_path):
    """The whole command in its own process: five schedules, five metrics on stand-ins, the grid and the plot."""
    transformer = build_tiny("tiny-sd3")
    mlp = CompensationMLP.for_transformer(transformer)
    with torch.no_grad():
        for p in mlp.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a "trained" MLP: not the identity of plain reuse
    mlp_file = save_compensation(mlp, tmp_path / "mlp.safetensors")
    out = tmp_path / "quality"
    result = subprocess.run([sys.executable, "-m", "bench.quality", "--model", "tiny-sd3", "--random-metrics",
                             "--seeds", "2", "--max-prompts", "3", "--mlp", str(mlp_file), "--latency",
                             str(_latency_json(tmp_path / "latency.json")), "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "PASSED quality" in result.stdout
    report = json.loads((out / "quality.json").read_text())
    rows = report["schedules"]
    assert list(rows) == ["teacher 28x2", "4-step", "2-step", "1.x skip 3-10", "1.x skip 3-10 + MLP"]
    metrics = ["fid", "clip", "lpips_diversity", "pickscore", "aesthetic", "hpsv2"]
    assert list(report["metrics"]) == metrics and report["stand_ins"] is True
    assert set(report["skipped"]) == {"image_reward"}
    assert rows["teacher 28x2"]["fid"] is None
    for name, row in rows.items():
        assert all(math.isfinite(row[m]) for m in metrics if row[m] is not None), name
    assert rows["1.x skip 3-10"]["nfe"] == pytest.approx(5 / 3)
    assert rows["1.x skip 3-10 + MLP"]["latency_ms"] == 31.0 and rows["teacher 28x2"]["latency_ms"] == 900.0
    assert rows["1.x skip 3-10 + MLP"]["clip"] != rows["1.x skip 3-10"]["clip"]  # the MLP changed the images
    assert rows["2-step"]["clip"] != rows["1.x skip 3-10"]["clip"]  # skipping changed them
    with Image.open(out / "grid.png") as grid, Image.open(out / "quality-vs-latency.png") as plot:
        assert grid.size[0] > 300 and grid.size[1] > 500 and plot.size[0] > 1000
    table = (out / "quality.md").read_text()
    assert "| 1.x skip 3-10 + MLP | 1.667 |" in table and "random stand-ins" in table


@pytest.mark.parametrize("args, message", [
    (["--seeds", "1", "--random-metrics"], "--seeds 1 gives none to compare"),
    (["--fid-weights", "/nonexistent/inception.pth"], "does not exist"),
    (["--aesthetic-head", "{tmp}"], "go together"),
    (["--latency", "{tmp}/not-latency.json"], "is not a bench.latency result"),
    (["--latency", "{tmp}/other-latency.json"], "names none of the schedules"),
    (["--fid-weights", "{tmp}/not-latency.json"], "cannot load FID's Inception-v3"),
    (["--lpips-backbone", "{tmp}/not-latency.json"], "cannot read --lpips-backbone"),
    (["--model", "{tmp}/transformer-only"], "holds only a transformer"),
])
def test_bad_input_exits_2_before_writing_anything(tmp_path, capsys, args, message):
    (tmp_path / "not-latency.json").write_text('{"results": []}')
    (tmp_path / "other-latency.json").write_text('{"results": [{"batch": 1, "schedules": {"8-step": {"median_ms": 1}}}]}')
    build_tiny("tiny-sd3").save_pretrained(tmp_path / "transformer-only")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda: main([a.format(tmp=tmp_path) for a in args] + ["--out", str(out)]))
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--skip", "0-3"], "--skip"), (["--resolution", "100"], "not a multiple of 16"), (["--seeds", "0"], "at least 1"),
    (["--guidance", "1.0"], "turns the teacher's CFG off")])
def test_malformed_options_exit_2_before_any_work(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda: main(args + ["--out", str(tmp_path / "out")]))
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_non_finite_metric_exits_1_and_writes_nothing(tmp_path, capsys, monkeypatch):
    """A metric that comes out NaN (patched in: no real network here gives one on demand) stops the run."""
    monkeypatch.setattr(CLIPScorer, "compute", lambda self: float("nan"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda: main(["--random-metrics", "--seeds", "2", "--max-prompts", "1", "--teacher-steps", "2",
                               "--out", str(out)]))
    captured = capsys.readouterr()
    assert exit_.value.code == 1
    assert "clip of teacher 2x2 is nan: nothing was written" in captured.err and "PASSED" not in captured.out
    assert not out.exists()


def test_fid_runs_torch_fidelitys_inception_from_a_weights_file(tmp_path):
    """The real FID path (torchmetrics over torch-fidelity's Inception-v3, 2048 features) from a local file. The
    file holds random weights: the published ones cannot be downloaded here, so the module is built once with
    its own loading patched out (a mock only to make the file), then loaded for real through FID()."""
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.manual_seed(0)
    with mock.patch("torch_fidelity.feature_extractor_inceptionv3.torch.load"), \
            mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"):
        inception = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="-")
    torch.save(inception.state_dict(), tmp_path / "inception.pth")

    fid = FID(2048, tmp_path / "inception.pth")
    reference, other = _images(6, 0), _images(6, 1, low=0, high=80)
    fid.add_reference(reference)
    fid.update(reference, "same images")
    same = fid.compute()
    fid.reset()
    fid.update(other, "darker images")
    different = fid.compute()
    assert abs(same) < 1e-3 * different and different > 0
