"""The toy world's parts: the data, the text side, the judge's analytic detectors and the metrics (fast, CPU)."""
import numpy as np
import pytest
import torch

from bench.toy.judge import Judge, DigitNet, detect
from bench.toy.metrics import diversity, fid, fidelity
from train.toy.digits import COLOURS, PROMPTS, SIZES, VOCABULARY, glyphs, prompt_index, render, scenes
from train.toy.text import TEXT_LEN, toy_text


def test_glyph_splits_are_disjoint_and_cover_the_data():
    every = glyphs("generation").images.shape[0] + glyphs("judge").images.shape[0]
    assert every == 1797
    assert (len(glyphs("generation")), len(glyphs("judge-train")), len(glyphs("judge-test"))) == (1078, 539, 180)
    gen = {tuple(g.flatten().tolist()) for g in glyphs("generation").images}
    judge = {tuple(g.flatten().tolist()) for g in glyphs("judge").images}
    # sklearn's digits hold a few pixel-identical glyphs; no more than those may appear on both sides
    assert len(gen & judge) <= 3
    for split in ("generation", "judge-train", "judge-test"):  # every digit in every split
        assert set(glyphs(split).labels.tolist()) == set(range(10))


def test_prompts_name_digit_colour_and_side():
    assert len(PROMPTS) == 60 and len({p.text for p in PROMPTS}) == 60
    assert PROMPTS[prompt_index("a red 7 on the left")].digit == 7
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        prompt_index("a red fox")


def test_scenes_put_the_glyph_where_the_prompt_says():
    ids = torch.arange(60).repeat_interleave(4)
    images, layout = scenes(ids, "generation", seed=3)
    assert images.shape == (240, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    det = detect(images)
    left = torch.tensor([PROMPTS[int(i)].side == "left" for i in ids])
    assert bool(((det.cx < 32) == left).all())
    # the drawn centre, within a pixel and a half of the ink's centroid (glyphs are not centred in their 8x8 box)
    assert float((det.cx - layout.cx).abs().median()) < 1.5
    colours = torch.tensor([list(COLOURS).index(PROMPTS[int(i)].colour) for i in ids])
    assert bool((det.colour_index == colours).all())
    large = layout.size == max(SIZES)
    assert 0.35 < float(large.float().mean()) < 0.65  # both size modes, about equally often
    assert float(det.height[large].mean()) > float(det.height[~large].mean()) + 4


def test_render_is_subpixel_and_empty_outside_the_glyph():
    glyph = torch.zeros(1, 8, 8)
    glyph[0, 3:5, 3:5] = 1.0
    image = render(glyph, torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([16.0]), torch.tensor([20.0]),
                   torch.tensor([40.0]))[0]
    assert image[1:].abs().max() == 0  # red only
    det = detect(image[None])
    assert abs(float(det.cx[0]) - 20.0) < 0.5 and abs(float(det.cy[0]) - 40.0) < 0.5


def test_word_tokenizer_and_text_side_tell_prompts_apart():
    encoder, tokenizers = toy_text(64, 40)
    tok = tokenizers([p.text for p in PROMPTS] + ["a purple 7 on the left"])
    assert tok.ids_l.shape == (61, TEXT_LEN) and not tok.truncated
    unk = tokenizers.clip_l.convert_tokens_to_ids("<unk>")
    assert not (tok.ids_l[:60] == unk).any() and (tok.ids_l[60] == unk).sum() == 1
    assert set(VOCABULARY) <= set(tokenizers.t5.get_vocab())
    with torch.no_grad():
        text, pooled = encoder(tok.ids_l[:60], tok.ids_g[:60], tok.ids_t5[:60])
    assert text.shape == (60, 2 * TEXT_LEN, 64) and pooled.shape == (60, 40)
    flat = torch.cat([text.flatten(1), pooled], 1)
    dist = torch.cdist(flat, flat) + torch.eye(60) * 1e9
    assert float(dist.min()) > 0.2 * float(dist[dist < 1e8].median())  # no two prompts embed alike
    # the pooled embedding alone separates them too (CLIP pools at <eos>, not at the highest id)
    pd = torch.cdist(pooled, pooled) + torch.eye(60) * 1e9
    assert float(pd.min()) > 0.05


def _untrained_judge() -> Judge:
    return Judge(DigitNet(), 21.0, torch.zeros(39), torch.ones(39))


def test_judge_detectors_catch_wrong_colour_side_and_empty_images():
    judge = _untrained_judge()
    ids = torch.tensor([prompt_index("a red 3 on the left")] * 3)
    images, _ = scenes(ids, "judge", seed=0)
    prompts = [PROMPTS[int(i)] for i in ids]
    images[1] = images[1][[1, 0, 2]]  # red -> green
    images[2] = images[2].flip(-1)  # mirrored: now on the right
    v = judge(torch.cat([images, torch.zeros(1, 3, 64, 64)]), prompts + prompts[:1])
    assert v.colour_ok.tolist()[:3] == [True, False, True]
    assert v.side_ok.tolist()[:3] == [True, True, False]
    assert v.present.tolist() == [True, True, True, False]
    assert not bool(v.correct[3])  # an empty image is never correct
    with pytest.raises(ValueError, match="images for"):
        judge(images, prompts[:2])


def test_fid_known_values():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 5, generator=g)
    assert fid(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = a + torch.tensor([1.0, 0, 0, 0, 2.0])
    assert fid(a, shifted) == pytest.approx(5.0, rel=1e-6)  # equal covariances: |mu_a - mu_b|^2
    scaled = a * 2.0  # Gaussians N(0, I) vs N(0, 4I): tr(I + 4I - 2 * 2I) = d
    assert fid(a, scaled) == pytest.approx(5.0, rel=0.05)


def test_fidelity_and_diversity_from_verdicts():
    from bench.toy.judge import Verdicts

    n, seeds = 8, 4  # two prompts of four seeds
    ok = torch.tensor([1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    large = torch.tensor([0, 0, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    top = torch.tensor([0, 1, 0, 1, 1, 1, 1, 1], dtype=torch.bool)
    features = torch.zeros(n, 39)
    features[4:, 0] = torch.tensor([0.0, 3.0, 0.0, 3.0])
    v = Verdicts(torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.long), ok, torch.ones(n, dtype=torch.bool),
                 torch.ones(n, dtype=torch.bool), large, top, features)
    f = fidelity(v)
    assert f["correct"] == pytest.approx(7 / 8) and f["colour"] == 1.0
    d = diversity(v, seeds)
    assert d["mode_coverage"] == pytest.approx((4 / 4 + 1 / 4) / 2)  # prompt 1 covers all modes, prompt 2 one
    # prompt 1: all features equal (0); prompt 2: pairs at distance 3 in 4 of 6 pairs
    assert d["pairwise_distance"] == pytest.approx((0 + 3 * 4 / 6) / 2)
    with pytest.raises(ValueError, match="whole prompts"):
        diversity(v, 3)
    assert np.isfinite(list(d.values())).all()
