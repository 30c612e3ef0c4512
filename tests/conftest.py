"""Shared test setup: one intra-op thread, a fixed torch seed per test, and a guard that no
decoder or noise runs."""

from __future__ import annotations

import pytest
import torch

import latent_aug.wrapper as wrapper_module
from latent_aug.decoders import LearnedInputDecoder, TiedDecoder

# The tests use tiny tensors: extra intra-op threads only add synchronisation, and on a busy
# machine they make a 10 ms training step take a second.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same global RNG state (model init, noise draws)."""
    torch.manual_seed(0)


@pytest.fixture
def forbid_extra_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every decoder and the latent noise raise if called (for eval-mode tests)."""

    def boom(*args, **kwargs):
        raise AssertionError("a decoder or the latent noise ran where only the model may run")

    monkeypatch.setattr(TiedDecoder, "forward", boom)
    monkeypatch.setattr(LearnedInputDecoder, "forward", boom)
    monkeypatch.setattr(wrapper_module, "minmax_noise", boom)
