"""`onex-export probe`: the per-block reuse error, the per-range caching error (against the runtime's own skipping
pass), the recommendation, its files, and `build --skip auto:NFE --probe`."""
import json

import jsonschema
import pytest
import torch
from click.testing import CliRunner

from onex_export import contract
from onex_export.cli import main
from onex_export.config import SkipRange
from onex_export.errors import UsageError
from onex_export.models import build_tiny
from onex_export.models.compensation import CompensationMLP, load_compensation, save_compensation
from onex_export.models.split import SplitSD3Transformer
from onex_export.probe import ProbeConfig, ProbeResult, candidate_ranges, probe, read_prompts, skipped_for, trace
from onex_export.probe.report import choose_skip, read_probe
from onex_export.schedule import SamplingPlan, student_step, timestep_from_sigma

LATENT = (16, 16, 16)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("tiny-sd3")


def conditioning(transformer, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, transformer.config.joint_attention_dim, generator=g),
            torch.randn(1, transformer.config.pooled_projection_dim, generator=g))


def runtime_steps(transformer, skip, text, pooled, seed=0):
    """The 1.x schedule through the split model's own passes: deltas at step one, the skipping and the full second
    step; returns (v_full, v_skip, deltas at step one, deltas at step two)."""
    split = SplitSD3Transformer(transformer, skip)
    s1, s2 = SamplingPlan.one_x().sigmas
    x1 = torch.randn((1, *LATENT), generator=torch.Generator().manual_seed(seed))
    ts = lambda s: torch.full((1,), timestep_from_sigma(s))  # noqa: E731
    with torch.no_grad():
        v1, *d1 = split.full(x1, text, pooled, ts(s1))
        x2 = student_step(x1, v1, s1, s2)
        v2, *d2 = split.full(x2, text, pooled, ts(s2))
        v_skip = split.skipping(x2, text, pooled, ts(s2), *d1)
    return v2, v_skip, d1, d2


def test_range_errors_equal_the_runtime_skipping_pass_with_plain_reuse(tiny):
    """The probe's shortcut (kept states, only the blocks after the range re-run) must give the error of the
    runtime's skipping pass with the untrained (identity) MLP, and the exact boundary error of the deltas."""
    text, pooled = conditioning(tiny)
    ranges = [SkipRange(3, 10), SkipRange(1, 1), SkipRange(12, 23)]
    result = probe(SplitSD3Transformer(tiny, None), [(text, pooled)], (0,), LATENT, ranges)
    for r, row in zip(ranges, result.ranges):
        v2, v_skip, d1, d2 = runtime_steps(tiny, r, text, pooled)
        want = float((v_skip - v2).norm() / v2.norm())
        assert row["velocity_error"] == pytest.approx(want, rel=1e-4), r
        boundary = sum(float((a - b).abs().sum()) for a, b in zip(d1, d2)) / sum(float(b.abs().sum()) for b in d2)
        assert row["boundary_error"] == pytest.approx(boundary, rel=1e-4), r
        _, s2 = SamplingPlan.one_x().sigmas
        assert row["latent_error"] > 0 and row["velocity_error"] > 0.001  # random weights do not reuse for free


def test_block_error_by_hand(tiny):
    text, pooled = conditioning(tiny)
    split = SplitSD3Transformer(tiny, None)
    s1, s2 = SamplingPlan.one_x().sigmas
    x1 = torch.randn((1, *LATENT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t1 = trace(split, x1, text, pooled, s1)
        t2 = trace(split, student_step(x1, t1.velocity, s1, s2), text, pooled, s2)
    result = probe(split, [(text, pooled)], (0,), LATENT, [])
    d = lambda t, n: (t.img[n] - t.img[n - 1], t.ctx[n] - t.ctx[n - 1])  # noqa: E731
    (i1, c1), (i2, c2) = d(t1, 5), d(t2, 5)
    e5 = float((i2 - i1).abs().sum() + (c2 - c1).abs().sum()) / float(i2.abs().sum() + c2.abs().sum())
    assert result.blocks[4]["block"] == 5 and result.blocks[4]["e"] == pytest.approx(e5, rel=1e-6)
    assert result.blocks[-1]["block"] == 24 and result.blocks[-1]["e_ctx"] is None  # the last block drops text
    with torch.no_grad():  # block by block gives the velocity of the split model's own full pass
        x2 = student_step(x1, t1.velocity, s1, s2)
        v2 = split.full(x2, text, pooled, torch.full((1,), timestep_from_sigma(s2)))[0]
    torch.testing.assert_close(t2.velocity, v2, rtol=1e-5, atol=1e-6)


def test_blocks_made_identity_are_found_and_recommended(tiny):
    """Zeroing the adaptive-norm modulation of blocks 5-8 zeroes their gates: each returns its input, so reusing
    them is exact. The probe must give them e = 0 and recommend 5-8 for 4 skipped blocks, with no error."""
    model = build_tiny("tiny-sd3")
    for block in model.transformer_blocks[4:8]:
        for linear in (block.norm1.linear, block.norm1_context.linear):
            torch.nn.init.zeros_(linear.weight)
            torch.nn.init.zeros_(linear.bias)
    result = probe(SplitSD3Transformer(model, None), [conditioning(model)], (0, 1), LATENT,
                   candidate_ranges(24, (4,)))
    assert [b["e"] for b in result.blocks[4:8]] == [0.0] * 4
    assert min(b["e"] for b in result.blocks if not 5 <= b["block"] <= 8) > 0.05
    [rec] = result.recommend((1 + 20 / 24,))
    assert rec["skip"] == "5-8" and rec["skipped"] == 4 and rec["velocity_error"] < 1e-6
    others = [r["velocity_error"] for r in result.ranges if r["skip"] != "5-8"]
    assert min(others) > 100 * rec["velocity_error"] + 1e-4


def test_ranges_and_nfe_targets():
    assert len(candidate_ranges(24)) == 23 * 24 // 2
    assert all(1 <= r.first <= r.last <= 23 for r in candidate_ranges(24))
    assert {r.count for r in candidate_ranges(24, (6, 8))} == {6, 8} and len(candidate_ranges(24, (6,))) == 18
    assert skipped_for(1.75, 24) == 6 and skipped_for(1.667, 24) == 8  # the paper's 3-8 and 3-10 on SD3-Medium
    assert skipped_for(1.75, 38) == 10  # the paper's 3-12 on SD3.5-Large: 10 of 38 blocks
    with pytest.raises(ValueError, match="between 1 and 2"):
        skipped_for(2.0, 24)


def test_recommend_takes_the_lowest_error_of_the_matching_length():
    rows = [{"skip": f"{a}-{a + 1}", "first": a, "last": a + 1, "velocity_error": e, "latent_error": e / 2,
             "boundary_error": e} for a, e in ((1, 0.3), (2, 0.1), (3, 0.2))]
    result = ProbeResult(4, 1, [], rows)
    [rec] = result.recommend((1.5,))
    assert rec == {"target_nfe": 1.5, "nfe": 1.5, "skipped": 2, "skip": "2-3", "velocity_error": 0.1,
                   "latent_error": 0.05}
    with pytest.raises(ValueError, match="no range of 1 blocks"):
        result.best_for(1.75)


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory):
    prompts = tmp_path_factory.mktemp("p") / "prompts.txt"
    prompts.write_text("# calibration\na red fox\n\na city at night\na third prompt\n")
    out = tmp_path_factory.mktemp("probe") / "tiny"
    res = CliRunner().invoke(main, ["probe", "--prompts", str(prompts), "--max-prompts", "2", "--lengths", "6,8",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "PASSED probe" in res.output and "NFE 1.750" in res.output
    assert "digits-sd3's own compensation MLP, trained for skip 3-10: measured too" in res.output  # the default's
    return out


def test_probe_writes_json_and_plots_that_read_back(probe_dir):
    result, doc = read_probe(probe_dir / "probe.json")
    assert doc["config"]["prompts"] == ["a red fox", "a city at night"] and result.samples == 2
    assert [r["skip"] for r in result.ranges if "mlp_velocity_error" in r] == ["3-10"]
    assert len(result.blocks) == 24 and len(result.ranges) == 18 + 16
    assert [r["target_nfe"] for r in result.recommendations] == [1.75, 1.667]
    for rec in result.recommendations:
        same_length = [r["velocity_error"] for r in result.ranges if r["last"] - r["first"] + 1 == rec["skipped"]]
        assert rec["velocity_error"] == min(same_length)
    for png in ("heatmap.png", "blocks.png"):
        assert (probe_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_build_skip_auto_uses_the_probe_and_records_it(probe_dir, tmp_path):
    out = tmp_path / "auto"
    res = CliRunner().invoke(main, ["build", "--skip", "auto:1.667", "--probe", str(probe_dir / "probe.json"),
                                    "--trt", "none", "--components", "none", "--out", str(out)])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    result, _ = read_probe(probe_dir / "probe.json")
    want = result.best_for(1.667)
    assert manifest["skip"]["one_based"] == want["skip"] and manifest["skip"]["count"] == 8
    source = manifest["skip"]["source"]
    assert source["target_nfe"] == 1.667 and source["probe"] == str(probe_dir / "probe.json")
    assert source["velocity_error"] == want["velocity_error"] and len(source["probe_sha256"]) == 64
    assert f"skip auto:1.667 -> {want['skip']}" in res.output
    validator = jsonschema.Draft202012Validator(json.loads(contract.JSON_SCHEMA.read_text()))
    assert list(validator.iter_errors(manifest)) == []  # skip.source is part of the published schema
    source["target_nfe"] = 2.5
    assert [e.message for e in validator.iter_errors(manifest)] == ["2.5 is greater than or equal to the maximum of 2"]


@pytest.mark.parametrize("argv, message", [
    (["build", "--skip", "auto:1.667", "--trt", "none"], "--skip auto:1.667 needs --probe"),
    (["build", "--skip", "auto:2.5", "--trt", "none"], "between 1 and 2"),
    (["build", "--skip", "auto:fast", "--trt", "none"], "'fast' is not a number"),
    (["build", "--skip", "3-10", "--probe", "PROBE", "--trt", "none"], "--probe goes with --skip auto:NFE"),
    (["build", "--skip", "auto:1.75", "--probe", "PROBE", "--model", "tiny-sd35-large", "--trt", "none"],
     "measured digits-sd3, not tiny-sd35-large"),
    (["build", "--skip", "auto:1.5", "--probe", "PROBE", "--trt", "none"], "no range of 12 blocks"),
    (["build", "--skip", "auto:1.75", "--probe", "PROBE", "--mlp", "PROBE", "--trt", "none"],
     "an MLP is trained for one range"),
    (["probe", "--seed", "-1"], "-1 is not in the range 0<=x<=9223372036854775807"),
    (["probe", "--nfe", "2.2"], "between 1 and 2"),
    (["probe", "--lengths", "6", "--nfe", "1.667"], "need ranges of [8] blocks"),
    (["probe", "--lengths", "30"], "does not fit a model of 24 blocks"),
    (["probe", "--prompts", "EMPTY"], "holds no prompt"),
    (["probe", "--resolution", "100"], "not a multiple of 16"),
])
def test_bad_probe_and_auto_skip_input_is_refused(argv, message, probe_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    argv = [str(probe_dir / "probe.json") if a == "PROBE" else str(tmp_path / "empty.txt") if a == "EMPTY" else a
            for a in argv]
    res = CliRunner().invoke(main, [*argv, "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_no_probe_is_refused(tmp_path):
    (tmp_path / "other.json").write_text(json.dumps({"schema": "onex-export/build-manifest"}))
    with pytest.raises(UsageError, match="is not a probe"):
        choose_skip(tmp_path / "other.json", 1.75, "tiny-sd3")
    (tmp_path / "partial.json").write_text(json.dumps({"schema": "onex-export/probe", "version": 1, "num_layers": 24,
                                                       "samples": 1, "blocks": [], "ranges": [{"skip": "3-10"}]}))
    with pytest.raises(UsageError, match=r"incomplete probe: no config.model, ranges\[0\].first"):
        read_probe(tmp_path / "partial.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(UsageError, match="cannot read the probe"):
        read_probe(tmp_path / "broken.json")


def test_prompts_file_and_config_checks(tmp_path):
    (tmp_path / "p.txt").write_text("a\n  b  \n# c\n\nd\n")
    assert read_prompts(tmp_path / "p.txt") == ("a", "b", "d")
    assert read_prompts(tmp_path / "p.txt", 2) == ("a", "b")
    with pytest.raises(UsageError, match="cannot read prompts"):
        read_prompts(tmp_path / "missing.txt")
    with pytest.raises(UsageError, match="no seed"):
        ProbeConfig(seeds=())


def test_a_transformer_only_folder_needs_random_text(tmp_path):
    folder = tmp_path / "transformer-only"
    build_tiny("tiny-sd3").save_pretrained(folder)
    argv = ["probe", "--model", str(folder), "--lengths", "6,8", "--out", str(tmp_path / "out")]
    res = CliRunner().invoke(main, argv)
    assert res.exit_code == 2 and "holds only a transformer" in res.output and "--random-text" in res.output
    assert not (tmp_path / "out").exists()
    res = CliRunner().invoke(main, [*argv, "--random-text", "--max-prompts", "1"])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert doc["config"]["random_text"] is True and len(doc["ranges"]) == 34 and doc["samples"] == 1
    assert doc["config"]["model"] == str(folder.resolve())  # `build --skip auto` may run from another folder


def test_a_trained_mlp_is_measured_on_its_range_as_the_runtime_runs_it(tiny, tmp_path):
    """An MLP with non-zero output layers (not the identity): the probe's mlp_ errors for its range must equal the
    runtime's skipping pass through that MLP, and differ from plain reuse."""
    mlp = CompensationMLP.for_transformer(tiny, seed=3)
    with torch.no_grad():
        for stream in (mlp.img, mlp.ctx):
            stream.fc2.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(4))
    save_compensation(mlp, tmp_path / "mlp.safetensors")
    text, pooled = conditioning(tiny)
    split = SplitSD3Transformer(tiny, None, load_compensation(tmp_path / "mlp.safetensors", tiny))
    [row] = probe(split, [(text, pooled)], (0,), LATENT, [SkipRange(3, 10)], mlp_skip=SkipRange(3, 10)).ranges
    v2, _, d1, _ = runtime_steps(tiny, SkipRange(3, 10), text, pooled)
    runtime = SplitSD3Transformer(tiny, SkipRange(3, 10), mlp)
    s1, s2 = SamplingPlan.one_x().sigmas
    x1 = torch.randn((1, *LATENT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x2 = student_step(x1, runtime.full(x1, text, pooled, torch.full((1,), timestep_from_sigma(s1)))[0], s1, s2)
        v_mlp = runtime.skipping(x2, text, pooled, torch.full((1,), timestep_from_sigma(s2)), *d1)
    assert row["mlp_velocity_error"] == pytest.approx(float((v_mlp - v2).norm() / v2.norm()), rel=1e-4)
    assert abs(row["mlp_velocity_error"] - row["velocity_error"]) > 1e-3


def test_probe_cli_reports_the_mlp_range(tmp_path):
    tiny = build_tiny("tiny-sd3")
    save_compensation(CompensationMLP.for_transformer(tiny), tmp_path / "mlp.safetensors")
    base = ["probe", "--model", "tiny-sd3", "--max-prompts", "1", "--lengths", "6,8", "--out", str(tmp_path / "out")]
    res = CliRunner().invoke(main, [*base, "--mlp", str(tmp_path / "mlp.safetensors"), "--mlp-skip", "3-10"])
    assert res.exit_code == 0, res.output
    row = next(r for r in read_probe(tmp_path / "out" / "probe.json")[0].ranges if r["skip"] == "3-10")
    # an untrained MLP is the identity: the same as plain reuse
    assert row["mlp_velocity_error"] == pytest.approx(row["velocity_error"], rel=1e-6)
    assert "MLP       --skip 3-10" in res.output
    res = CliRunner().invoke(main, [*base[:-2], "--out", str(tmp_path / "o2"), "--mlp", str(tmp_path / "mlp.safetensors")])
    assert res.exit_code == 2 and "--mlp and --mlp-skip go together" in res.output
    res = CliRunner().invoke(main, [*base[:-2], "--out", str(tmp_path / "o3"), "--mlp", str(tmp_path / "mlp.safetensors"),
                                    "--mlp-skip", "3-7"])
    assert res.exit_code == 2 and "a length --lengths leaves out" in res.output


def test_calibration_prompts_are_a_trained_models_own_unless_a_file_is_given(tmp_path, monkeypatch):
    from onex_export.models import zoo
    from onex_export.probe import DEFAULT_PROMPTS, calibration_prompts
    from onex_export.probe.run import TINY_PROMPTS

    folder = tmp_path / "toy"
    folder.mkdir()
    spec = zoo.TrainedSpec("a toy", folder, folder / "mlp.safetensors", "3-10")
    monkeypatch.setitem(zoo.TRAINED_MODELS, "toy-model", spec)
    assert calibration_prompts("toy-model", None) == DEFAULT_PROMPTS  # no prompts.txt shipped: the built-in ones
    (folder / "prompts.txt").write_text("a red 7 on the left\n# a comment\na blue 1 on the right\n")
    assert calibration_prompts("toy-model", None) == ("a red 7 on the left", "a blue 1 on the right")
    assert calibration_prompts("toy-model", None, 1) == ("a red 7 on the left",)
    mine = tmp_path / "mine.txt"
    mine.write_text("a green 3 on the left\n")
    assert calibration_prompts("toy-model", mine) == ("a green 3 on the left",)
    assert calibration_prompts("tiny-sd3", None, 2) == TINY_PROMPTS[:2] == ("a fox", "ramen")  # fit its tokenizers
    (tmp_path / "empty.txt").write_text("# only a comment\n")
    with pytest.raises(UsageError, match="holds no prompt"):
        calibration_prompts("tiny-sd3", tmp_path / "empty.txt")


def test_an_edited_recommendation_is_refused_not_followed(probe_dir, tmp_path):
    """The probe's recommendation is re-derived from its measured ranges; probe.json edited to recommend another
    range (here the whole model but its last block, as a careless edit did) is refused with the range the
    measurements give."""
    doc = json.loads((probe_dir / "probe.json").read_text())
    honest = choose_skip(probe_dir / "probe.json", 1.667, "digits-sd3")[0]
    for rec in doc["recommendations"]:
        if rec["target_nfe"] == 1.667:
            rec["skip"] = "1-8" if str(honest) != "1-8" else "2-9"
    (tmp_path / "probe.json").write_text(json.dumps(doc))
    with pytest.raises(UsageError, match=f"is not the range its own measurements give \\({honest}\\): the file was "
                                         "changed after the probe"):
        choose_skip(tmp_path / "probe.json", 1.667, "digits-sd3")
    assert choose_skip(probe_dir / "probe.json", 1.75, "digits-sd3")[0].count == 6  # the other NFE is untouched
