"""flush_subnormals: subnormal float32 results become exactly zero in this process."""

from __future__ import annotations

import pytest
import torch

from transformer_comparison.numerics import flush_subnormals


@pytest.fixture
def restore_subnormals():
    yield
    torch.set_flush_denormal(False)


def test_subnormal_results_are_flushed_to_zero(restore_subnormals):
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU has no flush-to-zero mode")
    tiny = torch.finfo(torch.float32).tiny
    x = torch.tensor([tiny, 1.0])
    assert (x / 16)[0].item() > 0  # subnormal, kept by default
    flush_subnormals()
    assert (x / 16)[0].item() == 0.0
    assert (x / 16)[1].item() == 1.0 / 16  # normal numbers untouched
    # a far ALiBi-like score: exp(-100) is subnormal in float32, so its softmax weight is now exactly 0
    probs = torch.softmax(torch.tensor([0.0, -100.0]), dim=0)
    assert probs[1].item() == 0.0 and probs[0].item() == 1.0
