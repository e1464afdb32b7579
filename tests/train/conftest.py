"""Stage I tests: tiny models on one CPU thread (tiny tensors gain nothing from more threads, and
contend badly with other processes on a small machine), plus a shared tiny 24-block teacher."""
from __future__ import annotations

import pytest
import torch

from onex_export.models import build_tiny


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_teacher():
    """The embedded tiny-sd3 (24 joint blocks); tests must not mutate it."""
    return build_tiny("tiny-sd3").requires_grad_(False)
