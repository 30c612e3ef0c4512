"""Shared fixtures: a fixed torch seed per test, one intra-op thread for the whole session,
and a guard that no decoder or noise runs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import latent_aug.wrapper as wrapper_module
from latent_aug.decoders import LearnedInputDecoder, TiedDecoder


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same global RNG state (model init, noise draws)."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def one_thread() -> Iterator[None]:
    """One intra-op thread for every test (restored after). Tiny tensors gain nothing from
    more, and on a busy 2-core machine two threads made a 10 ms training step take a second."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def forbid_extra_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every decoder and the latent noise raise if called (for eval-mode tests)."""

    def boom(*args, **kwargs):
        raise AssertionError("a decoder or the latent noise ran where only the model may run")

    monkeypatch.setattr(TiedDecoder, "forward", boom)
    monkeypatch.setattr(LearnedInputDecoder, "forward", boom)
    monkeypatch.setattr(wrapper_module, "minmax_noise", boom)
