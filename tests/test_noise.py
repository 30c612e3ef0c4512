"""Tests of ``latent_aug.noise``: the scale / perturb / de-scale of section 4.2."""

from __future__ import annotations

import pytest
import torch

from latent_aug.noise import minmax_noise, perturb_minmax, value_range


def spread_rows(n: int = 2000, d: int = 64, seed: int = 0) -> torch.Tensor:
    """``(n, d)`` rows whose ranges span four orders of magnitude and whose minima differ."""
    g = torch.Generator().manual_seed(seed)
    scale = 10 ** torch.empty(n, 1).uniform_(-2, 2, generator=g)
    shift = torch.randn(n, 1, generator=g) * 5
    return torch.rand(n, d, generator=g) * scale + shift


def test_noise_is_gaussian_with_std_times_the_row_range():
    v = spread_rows()
    std = 0.2
    noise = minmax_noise(v, std)
    span = v.amax(dim=1, keepdim=True) - v.amin(dim=1, keepdim=True)
    eps = noise / (std * span)  # should be N(0, 1), whatever the row's scale
    assert abs(float(eps.std()) - 1) < 0.02
    assert abs(float(eps.mean())) < 0.02
    # the same holds within small-range and large-range rows separately
    small, large = span[:, 0] < 0.1, span[:, 0] > 10
    assert small.sum() > 100 and large.sum() > 100
    for rows in (small, large):
        assert abs(float(eps[rows].std()) - 1) < 0.05
    # and the raw noise really is scaled: large rows get far larger noise than small ones
    assert noise[large].abs().mean() > 100 * noise[small].abs().mean()


@pytest.mark.parametrize("std", [0.0, 0.05, 0.2, 1.0])
def test_perturbed_equals_v_plus_eps_times_range(std: float):
    """De-scaling: ``lo + ((v - lo)/(hi - lo) + ε)(hi - lo) == v + ε(hi - lo)``."""
    v = spread_rows(n=50, d=7)
    perturbed = perturb_minmax(v, std, generator=torch.Generator().manual_seed(3))
    eps = torch.randn(v.shape, generator=torch.Generator().manual_seed(3)) * std
    lo = v.amin(dim=1, keepdim=True)
    hi = v.amax(dim=1, keepdim=True)
    torch.testing.assert_close(perturbed, v + eps * (hi - lo))
    paper = lo + ((v - lo) / (hi - lo) + eps) * (hi - lo)  # the paper's three steps, literally
    torch.testing.assert_close(perturbed, paper, rtol=1e-5, atol=1e-4)
    if std == 0:
        assert torch.equal(perturbed, v)


def test_constant_vector_gets_zero_noise_and_no_nan():
    v = torch.randn(6, 10)
    v[2] = 3.5  # a constant row (hi == lo)
    v[4] = 0.0
    noise = minmax_noise(v, 0.2)
    assert torch.isfinite(noise).all()
    assert torch.equal(noise[2], torch.zeros(10)) and torch.equal(noise[4], torch.zeros(10))
    assert (noise[[0, 1, 3, 5]] != 0).all()
    assert torch.equal(perturb_minmax(v, 0.2)[2], v[2])


def test_batch_range_uses_one_span_for_the_whole_batch():
    v = spread_rows(n=500, d=32)
    std = 0.3
    span = v.max() - v.min()
    r = value_range(v, "batch")
    assert r.shape == (500, 1)
    assert torch.equal(r, span.expand(500, 1))
    eps = minmax_noise(v, std, per="batch") / (std * span)
    assert abs(float(eps.std()) - 1) < 0.02
    assert abs(float(eps.mean())) < 0.02
    # a constant row is perturbed under the batch range (its own range is zero)
    v[0] = 1.0
    assert (minmax_noise(v, std, per="batch")[0] != 0).all()
    assert torch.equal(minmax_noise(v, std, per="sample")[0], torch.zeros(32))


def test_range_of_feature_maps_is_over_all_non_batch_dims():
    v = torch.randn(3, 4, 5, 6)
    v[1, 2, 3, 4] = 100.0
    r = value_range(v)
    assert r.shape == (3, 1, 1, 1)
    for b in range(3):
        assert float(r[b]) == pytest.approx(float(v[b].max() - v[b].min()))
    noise = minmax_noise(v, 0.1)
    assert noise.shape == v.shape


def test_noise_keeps_dtype_and_is_reproducible_with_a_generator():
    v = torch.randn(4, 9, dtype=torch.bfloat16)
    a = minmax_noise(v, 0.2, generator=torch.Generator().manual_seed(1))
    b = minmax_noise(v, 0.2, generator=torch.Generator().manual_seed(1))
    c = minmax_noise(v, 0.2, generator=torch.Generator().manual_seed(2))
    assert a.dtype == torch.bfloat16
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_noise_carries_the_gradient_of_the_range():
    """The noise is ``ε · std · (hi - lo)``: differentiable through hi and lo (class-conditional
    noise backpropagates through y's range unless ``detach_noise``)."""
    v = torch.tensor([[0.0, 1.0, 3.0]], requires_grad=True)
    g = torch.Generator().manual_seed(0)
    noise = minmax_noise(v, 0.5, generator=g)
    eps = torch.randn(1, 3, generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(noise.sum(), v)
    s = 0.5 * float(eps.sum())
    torch.testing.assert_close(grad, torch.tensor([[-s, 0.0, s]]))
