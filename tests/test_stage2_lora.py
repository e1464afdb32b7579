"""Stage II's LoRA (peft, through diffusers) and its output: a merged student and an MLP that build and pass the
parity gate."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from onex_export.config import SkipRange
from onex_export.errors import OnexError, UsageError
from onex_export.models import build_tiny
from onex_export.models.compensation import CompensationMLP, load_compensation
from onex_export.models.weights import load_transformer
from train.lora import LORA_TARGETS, add_lora, merge_lora, save_outputs


def _velocity(model, seed: int = 0) -> torch.Tensor:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return model(hidden_states=torch.randn(2, 16, 16, 16, generator=g),
                     encoder_hidden_states=torch.randn(2, 16, cfg.joint_attention_dim, generator=g),
                     pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=g),
                     timestep=torch.tensor([750.0, 250.0]), return_dict=False)[0]


def _trained_lora(rank: int = 4):
    """tiny-sd3 with adapters whose B matrices are no longer zero, as after some training."""
    model = build_tiny("tiny-sd3")
    params = add_lora(model, rank=rank, alpha=rank)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model, params


def test_adapters_sit_on_exactly_the_release_targets_and_are_all_that_trains():
    base = build_tiny("tiny-sd3")
    expected = {n for n, m in base.named_modules() if isinstance(m, nn.Linear) and n.endswith(LORA_TARGETS)}
    model = build_tiny("tiny-sd3")
    params = add_lora(model, rank=4, alpha=4)
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert wrapped == expected and len(expected) > 10 * len(base.transformer_blocks)
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    assert torch.equal(_velocity(model), _velocity(base))  # B = 0: unchanged until trained


def test_merging_gives_a_plain_diffusers_model_with_the_adapted_outputs():
    model, _ = _trained_lora()
    adapted = _velocity(model)
    assert (adapted - _velocity(build_tiny("tiny-sd3"))).abs().max() > 1e-3  # the adapters do something
    merge_lora(model)
    assert not any("lora" in k or "base_layer" in k for k in model.state_dict())
    assert set(model.state_dict()) == set(build_tiny("tiny-sd3").state_dict())
    assert torch.allclose(_velocity(model), adapted, atol=1e-5)


def test_lora_refuses_a_rank_below_one():
    with pytest.raises(UsageError, match="rank >= 1"):
        add_lora(build_tiny("tiny-sd3"), rank=0)


def test_the_outputs_build_and_pass_the_parity_gate(tmp_path):
    model, _ = _trained_lora()
    adapted = _velocity(model)
    mlp = CompensationMLP.for_transformer(model)
    with torch.no_grad():
        for p in mlp.parameters():
            p.add_(0.02 * torch.randn_like(p))
    student, mlp_path, command = save_outputs(model, mlp, tmp_path / "out", SkipRange.parse("3-10"))
    assert command == f"onex-export build --model {student} --mlp {mlp_path} --skip 3-10"
    assert torch.allclose(_velocity(load_transformer(str(student))), adapted, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(load_compensation(mlp_path).state_dict().values(),
                                                  mlp.state_dict().values()))
    result = subprocess.run([sys.executable, "-m", "onex_export.cli", *command.split()[1:], "--trt", "none",
                             "--components", "none", "--out", str(tmp_path / "engines")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "PASSED build" in result.stdout

    # a second save never overwrites the first
    before = (student / "diffusion_pytorch_model.safetensors").read_bytes()
    with pytest.raises(UsageError, match="already exists"):
        save_outputs(build_tiny("tiny-sd3"), mlp, tmp_path / "out", SkipRange.parse("3-10"))
    assert (student / "diffusion_pytorch_model.safetensors").read_bytes() == before


def test_non_finite_weights_are_not_written(tmp_path):
    model = build_tiny("tiny-sd3")
    with torch.no_grad():
        model.proj_out.weight[0, 0] = float("nan")
    with pytest.raises(OnexError, match="not finite"):
        save_outputs(model, CompensationMLP.for_transformer(model), tmp_path / "out", SkipRange.parse("3-10"))
    assert not (tmp_path / "out" / "student").exists() and not (tmp_path / "out" / "mlp.safetensors").exists()
