"""Backward simulation gives the student exactly the states that inference (the core sampler) reaches."""
import pytest
import torch

from onex_export.models import SplitSD3Transformer
from onex_export.runtime import Conditioning, TorchDenoiser, sample
from onex_export.schedule import SamplingPlan, student_sigmas
from train.models import velocity_fn
from train.simulation import backward_simulate, draw_rollout_noise, gather, generate

LATENT = (16, 8, 8)


class Recording(TorchDenoiser):
    """The sampler's denoiser, recording the state it is handed at each step."""

    def __init__(self, model):
        super().__init__(model)
        self.states = []

    def full(self, x, text, pooled, timestep):
        self.states.append(x.clone())
        return super().full(x, text, pooled, timestep)


@pytest.fixture(scope="module")
def cond():
    g = torch.Generator().manual_seed(11)
    return Conditioning(torch.randn(3, 16, 48, generator=g), torch.randn(3, 40, generator=g))


def _student(model, cond):
    v = velocity_fn(model, "fp32")
    return lambda x, s: v(x, torch.full((x.shape[0],), s, dtype=torch.float64), cond.text, cond.pooled)


@pytest.mark.parametrize("num_steps, eta", [(2, 1.0), (4, 1.0), (4, 0.5)])
def test_states_are_the_samplers_bit_for_bit(tiny_teacher, cond, num_steps, eta):
    recorder = Recording(SplitSD3Transformer(tiny_teacher, None))
    final = sample(recorder, SamplingPlan.student(num_steps, eta), cond, LATENT, seed=21)
    noise = draw_rollout_noise((3, *LATENT), num_steps, eta, torch.Generator().manual_seed(21))
    states = backward_simulate(_student(tiny_teacher, cond), noise, student_sigmas(num_steps), eta, num_steps - 1)
    assert len(states) == len(recorder.states) == num_steps
    for k, (ours, theirs) in enumerate(zip(states, recorder.states)):
        assert torch.equal(ours, theirs), f"state {k} differs by {(ours - theirs).abs().max()}"
    out = generate(_student(tiny_teacher, cond), noise, student_sigmas(num_steps), eta)
    assert torch.equal(out, final)


def test_another_seed_gives_other_states(tiny_teacher, cond):
    sig = student_sigmas(2)
    a = backward_simulate(_student(tiny_teacher, cond), draw_rollout_noise((3, *LATENT), 2, 1.0,
                          torch.Generator().manual_seed(1)), sig, 1.0, 1)
    b = backward_simulate(_student(tiny_teacher, cond), draw_rollout_noise((3, *LATENT), 2, 1.0,
                          torch.Generator().manual_seed(2)), sig, 1.0, 1)
    assert (a[1] - b[1]).abs().max() > 0.1


def test_rollout_stops_where_asked_and_gather_picks_each_samples_step(tiny_teacher, cond):
    calls = []
    student = _student(tiny_teacher, cond)

    def counting(x, s):
        calls.append(s)
        return student(x, s)

    noise = draw_rollout_noise((3, *LATENT), 4, 1.0, torch.Generator().manual_seed(3))
    states = backward_simulate(counting, noise, student_sigmas(4), 1.0, until=2)
    assert calls == [1.0, 0.9] and len(states) == 3
    picked = gather(states, torch.tensor([2, 0, 1]))
    assert torch.equal(picked[0], states[2][0]) and torch.equal(picked[1], states[0][1])
    assert torch.equal(picked[2], states[1][2]) and not picked.requires_grad
    with pytest.raises(ValueError, match="until"):
        backward_simulate(counting, noise, student_sigmas(4), 1.0, until=4)
