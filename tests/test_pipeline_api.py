"""BuildPipeline as its Python users call it: a str is one prompt, integer-like seeds work, a diffusers-like call
(prompt, num_images_per_prompt, height/width, generator or seed, output_type), and errors that speak of
arguments, not of the CLI's flags. Real ONNX Runtime sessions over a tiny-sd3 build (128 px, batch 1-3)."""
import numpy as np
import pytest
import torch
from PIL import Image

from onex_export.errors import UsageError
from onex_export.runtime.pipeline import BuildPipeline, PipelineOutput, Request
from onex_export.build import BuildConfig, build
from onex_export.config import SkipRange
from onex_export.export.shapes import DimRange


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "tiny"
    build(BuildConfig(model="tiny-sd3", skip=SkipRange(3, 10), out=out, trt="none", batch=DimRange(1, 1, 3)))
    return BuildPipeline(out)


def test_a_string_is_one_prompt(pipe):
    """Before, generate("abc") made three images (one per character) and "a red fox" failed with "9 images"."""
    one = pipe.generate("abc", seed=2)
    assert one.images.shape == (1, 3, 128, 128)
    assert torch.equal(one.images, pipe.generate(["abc"], seed=2).images)
    assert pipe.generate("a red fox", seed=1).images.shape[0] == 1
    assert Request("a red fox").prompts == ("a red fox",)


def test_integer_like_seeds_are_taken_and_others_refused(pipe):
    base = pipe.generate(["a"], seed=7).images
    for seed in (np.int64(7), np.int32(7), np.uint8(7), torch.tensor(7)):
        assert torch.equal(pipe.generate(["a"], seed=seed).images, base), type(seed)
    for seed, shown in ((7.5, "7.5"), (True, "True"), ("7", "'7'")):
        with pytest.raises(UsageError, match=f"seed must be an integer, not {shown}"):
            pipe.generate(["a"], seed=seed)
    assert pipe.generate(["a"], images_per_prompt=np.int64(2)).images.shape[0] == 2


def test_the_call_is_diffusers_like(pipe):
    out = pipe("a red cube", num_images_per_prompt=2, generator=torch.Generator().manual_seed(7))
    assert isinstance(out, PipelineOutput) and len(out.images) == 2
    assert all(isinstance(im, Image.Image) and im.size == (128, 128) for im in out.images)
    expected = pipe.generate(["a red cube"], seed=out.seed, images_per_prompt=2)
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in out.images]), expected.pixels())
    assert set(out.seconds) == {"tokenize", "text", "transformer", "vae"}
    as_np = pipe(["a red cube", "x"], seed=out.seed, output_type="np", height=128, width=128)
    assert as_np.images.shape == (2, 128, 128, 3) and as_np.images.dtype == np.float32
    assert 0 <= as_np.images.min() and as_np.images.max() <= 1
    pt = pipe("a red cube", seed=3, output_type="pt")
    assert torch.equal(pt.images, pipe.generate("a red cube", seed=3).images)
    latents = pipe("a red cube", seed=3, output_type="latent", return_dict=False)
    assert isinstance(latents, tuple) and latents[0].shape == (1, 16, 16, 16)  # SD3: 16 latent channels, 128 px / 8


def test_a_generator_gives_the_same_images_from_the_same_state_and_advances(pipe):
    first = pipe("a", generator=torch.Generator().manual_seed(11), output_type="pt")
    again = pipe("a", generator=torch.Generator().manual_seed(11), output_type="pt")
    assert first.seed == again.seed and torch.equal(first.images, again.images)
    generator = torch.Generator().manual_seed(11)
    seeds = [pipe("a", generator=generator, output_type="latent").seed for _ in range(2)]
    assert seeds[0] == first.seed and seeds[1] != seeds[0]
    assert pipe("a", output_type="latent").seed != pipe("a", output_type="latent").seed  # none given: random


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=128, width=64), "this build makes square images: height 128 and width 64 differ"),
    (dict(height=64), "resolution 64 is not one this build runs: a multiple of 16 in 128-128"),
    (dict(output_type="latents"), "output_type 'latents' is not one of pil, np, pt, latent"),
    (dict(seed=1, generator=torch.Generator()), "both a generator and a seed were given"),
    (dict(generator=np.random.default_rng(0)), "generator must be a torch.Generator, not Generator"),
    (dict(num_images_per_prompt=4), "4 images per call is outside this build's batch range 1-3"),
    (dict(prompt=[]), "no prompt given"),
])
def test_call_errors_name_the_argument_not_a_flag(pipe, kwargs, message):
    kwargs = {"prompt": "a", **kwargs}
    with pytest.raises(UsageError, match=message.replace("(", r"\(")) as info:
        pipe(**kwargs)
    assert "--" not in info.value.message + (info.value.hint or "")
