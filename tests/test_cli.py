"""The command line, run in-process through click's runner."""
import pytest
from click.testing import CliRunner
from safetensors import safe_open

from onex_export.cli import main
from onex_export.models import CompensationMLP, save_compensation


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_sample_one_x_prints_schedule_and_saves_latents(tmp_path):
    out = tmp_path / "lat.safetensors"
    res = run("sample", "--model", "tiny-sd3", "--skip", "3-10", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert "transformer_blocks[2..9]" in res.output
    assert "sigmas 1 -> 0.75 -> 0; step 1 full, step 2 skips" in res.output
    assert "NFE       1.667 effective" in res.output and "33.6x fewer" in res.output
    assert res.output.strip().splitlines()[-1].startswith("PASSED")
    with safe_open(str(out), "pt") as h:
        assert tuple(h.get_tensor("latents").shape) == (1, 16, 16, 16)
        assert h.metadata()["plan"] == "1.x-nfe" and h.metadata()["skip"] == "3-10"


def test_sample_sd35_large_paper_range_and_batch(tmp_path):
    res = run("sample", "--model", "tiny-sd35-large", "--skip", "3-12", "--batch", "3",
              "--resolution", "64", "--out", str(tmp_path / "l.safetensors"))
    assert res.exit_code == 0, res.output
    assert "NFE       1.737" in res.output and "(3, 16, 8, 8)" in res.output


def test_sample_with_mlp_file_and_student_mode(tmp_path):
    mlp = save_compensation(CompensationMLP(32, 32), tmp_path / "mlp.safetensors")
    res = run("sample", "--model", "tiny-sd3", "--mlp", str(mlp), "--mode", "student", "--steps", "4",
              "--out", str(tmp_path / "s.safetensors"))
    assert res.exit_code == 0, res.output
    assert "4-step" in res.output and "NFE       4.000" in res.output


@pytest.mark.parametrize(
    "skip, message",
    [("3-24", "1-23"), ("10-3", "reversed"), ("x", "malformed"), ("0-3", "below 1"), ("3-99", "only 24 blocks")],
)
def test_bad_skip_exits_2_with_its_message(skip, message):
    res = run("sample", "--skip", skip)
    assert res.exit_code == 2
    assert message in res.output


def test_user_errors_exit_1_without_traceback(tmp_path):
    res = run("sample", "--model", str(tmp_path / "missing"))
    assert res.exit_code == 1 and "neither an embedded model" in res.output and "Traceback" not in res.output
    wide = save_compensation(CompensationMLP(64, 64), tmp_path / "wide.safetensors")
    res = run("sample", "--model", "tiny-sd3", "--mlp", str(wide))
    assert res.exit_code == 1 and "64 wide" in res.output and res.output.strip().endswith("FAILED")


def test_bad_resolution_is_usage_error():
    res = run("sample", "--resolution", "100")
    assert res.exit_code == 2 and "multiple of 16" in res.output


def test_models_lists_the_embedded_models():
    res = run("models")
    assert res.exit_code == 0 and "tiny-sd35-large" in res.output
