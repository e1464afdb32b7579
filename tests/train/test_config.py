"""Stage I config: YAML into a frozen, validated dataclass; unknown keys and bad values are errors."""
import dataclasses
from pathlib import Path

import pytest

from train.config import ConfigError, Stage1Config

CONFIGS = Path(__file__).resolve().parents[2] / "train" / "configs"


@pytest.mark.parametrize("name", ["tiny-cpu.yaml", "sd3-medium.yaml", "sd35-large.yaml"])
def test_shipped_configs_load(name):
    cfg = Stage1Config.load(CONFIGS / name)
    assert cfg.num_steps == 2 and cfg.guidance_scale == 7.0 and cfg.guidance_alpha == 0.94
    assert cfg.adam_betas == (0.0, 0.999) and cfg.weight_decay == pytest.approx(1e-4)


def test_sd3_medium_config_has_the_papers_table_6_values():
    cfg = Stage1Config.load(CONFIGS / "sd3-medium.yaml")
    assert (cfg.lr_generator, cfg.lr_fake, cfg.batch_size, cfg.max_steps) == (5e-6, 4e-5, 32, 1000)
    assert cfg.precision == "bf16" and cfg.resolution == 1024 and cfg.timestep_curve == "c"


def test_overrides_parse_as_yaml_and_exponents_without_a_dot_are_floats():
    cfg = Stage1Config.load(CONFIGS / "tiny-cpu.yaml", ["max_steps=9", "lr_fake=1e-4", "objective=trajectory",
                                                       "adam_betas=[0.5, 0.9]", "gradient_checkpointing=true"])
    assert cfg.max_steps == 9 and cfg.lr_fake == 1e-4 and isinstance(cfg.lr_fake, float)
    assert cfg.objective == "trajectory" and cfg.adam_betas == (0.5, 0.9) and cfg.gradient_checkpointing is True


def test_frozen_and_round_trips_through_yaml(tmp_path):
    cfg = Stage1Config.load(CONFIGS / "tiny-cpu.yaml", ["run_dir=" + str(tmp_path)])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_steps = 3
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    assert Stage1Config.load(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("override, message", [
    ("max_stepz=3", "unknown config key(s): max_stepz"),
    ("objective=dmd", "objective 'dmd' is not one of"),
    ("guidance_alpha=1.5", "guidance_alpha must lie in (0, 1]"),
    ("guidance_scale=0.5", "guidance_scale must be >= 1"),
    ("resolution=100", "resolution 100 is not a positive multiple of 16"),
    ("max_steps=0", "max_steps must be at least 1"),
    ("max_steps=2.5", "max_steps must be int"),
    ("eta=2", "eta must lie in [0, 1]"),
    ("adam_betas=[0.9]", "adam_betas must be two numbers"),
    ("timestep_curve=z", "timestep_curve 'z' is not one of"),
    ("lr_fake=fast", "lr_fake must be float"),
    ("noequals", "is not key=value"),
    # nan passes every bound (each comparison with it is false) and inf passes an upper-open one: refused first
    ("lr_generator=nan", "lr_generator is nan: a learning rate, scale or weight must be a finite number"),
    ("lr_fake=.inf", "lr_fake is inf"),
    ("guidance_scale=nan", "guidance_scale is nan"),
    ("adam_betas=[0.5, .nan]", "adam_betas must be tuple"),
])
def test_bad_values_are_user_errors(override, message):
    with pytest.raises(ConfigError) as exc:
        Stage1Config.load(CONFIGS / "tiny-cpu.yaml", [override])
    assert message in str(exc.value)


def test_run_dir_is_required_and_files_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="no run_dir"):
        Stage1Config.load(None, ["max_steps=3"])
    with pytest.raises(ConfigError, match="does not exist"):
        Stage1Config.load(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        Stage1Config.load(tmp_path / "list.yaml")


def test_differences_ignore_keys_that_do_not_change_the_computation():
    a = Stage1Config.load(CONFIGS / "tiny-cpu.yaml")
    b = dataclasses.replace(a, max_steps=100, checkpoint_every=7)
    assert a.differences(b) == []
    c = dataclasses.replace(a, lr_fake=1.0)
    assert a.differences(c) == ["lr_fake: 0.0004 -> 1.0"]
