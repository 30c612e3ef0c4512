"""The phase transposed convolution equals conv_transpose2d, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

from latent_aug.transpose import phase_conv_transpose2d

# (C_in, C_out, H, W, kernel, stride, padding, output_padding): strides below, equal to and
# above the kernel, asymmetric output padding, several output channels
GEOMETRIES = {
    "mnist_input_layer": (5, 1, 7, 6, (3, 3), (2, 2), (1, 1), (1, 0)),
    "stride_1_kernel_5": (4, 1, 6, 5, (5, 5), (1, 1), (2, 2), (0, 0)),
    "stride_3_no_padding": (3, 1, 4, 5, (3, 3), (3, 3), (0, 0), (2, 1)),
    "even_kernel": (3, 1, 5, 5, (4, 4), (2, 2), (1, 1), (0, 0)),
    "stride_above_kernel": (2, 1, 3, 4, (2, 2), (3, 3), (0, 0), (1, 2)),
    "rectangular": (3, 1, 4, 6, (3, 5), (2, 1), (1, 2), (1, 0)),
    "three_channels": (4, 3, 5, 4, (5, 5), (2, 2), (2, 2), (1, 1)),
}


def _inputs(c_in, c_out, h, w, kernel, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, c_in, h, w, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(c_in, c_out, *kernel, generator=g, dtype=dtype).requires_grad_()
    bias = torch.randn(c_out, generator=g, dtype=dtype).requires_grad_()
    return v, weight, bias


def _assert_matches_conv_transpose2d(c_in, c_out, h, w, kernel, stride, padding, out_pad):
    """Values and the gradients of input, weight and bias equal conv_transpose2d's."""
    v, weight, bias = _inputs(c_in, c_out, h, w, kernel)
    ref = F.conv_transpose2d(v, weight, bias, stride, padding, out_pad)
    out = phase_conv_transpose2d(v, weight, bias, stride, padding, out_pad)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (v, weight, bias), g),
                    torch.autograd.grad(ref, (v, weight, bias), g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_phase_transpose_equals_conv_transpose2d(name: str):
    c_in, c_out, h, w, kernel, stride, padding, out_pad = GEOMETRIES[name]
    _assert_matches_conv_transpose2d(c_in, c_out, h, w, kernel, stride, padding, out_pad)


def test_phase_transpose_without_bias_and_in_float32():
    v, weight, _ = _inputs(5, 1, 7, 6, (3, 3), dtype=torch.float32)
    ref = F.conv_transpose2d(v, weight, None, 2, 1, 1)
    out = phase_conv_transpose2d(v, weight, None, (2, 2), (1, 1), (1, 1))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(torch.autograd.grad(out.square().sum(), v)[0],
                               torch.autograd.grad(ref.square().sum(), v)[0])


def test_phase_transpose_is_twice_differentiable():
    v, weight, bias = _inputs(3, 1, 4, 5, (3, 3))
    fn = lambda *a: phase_conv_transpose2d(*a, (2, 2), (1, 1), (1, 1))  # noqa: E731
    assert gradcheck(fn, (v, weight, bias))
    assert gradgradcheck(fn, (v, weight, bias))


def test_phase_transpose_gradient_comes_back_channels_last():
    # the activation in front of the transpose saved a channels_last tensor; a gradient in
    # another layout would make its backward many times slower
    v, weight, bias = _inputs(5, 1, 7, 6, (3, 3), dtype=torch.float32)
    out = phase_conv_transpose2d(v, weight, bias, (2, 2), (1, 1), (1, 1))
    grad = torch.autograd.grad(out.sum(), v)[0]
    assert grad.is_contiguous(memory_format=torch.channels_last)
    assert not grad.is_contiguous()


def test_phase_transpose_rejects_other_ranks():
    with pytest.raises(ValueError, match="4-D"):
        phase_conv_transpose2d(torch.randn(2, 3, 4), torch.randn(2, 1, 3, 3), None,
                               (2, 2), (1, 1), (1, 1))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    c_in=st.integers(1, 4), c_out=st.integers(1, 3), h=st.integers(1, 6), w=st.integers(1, 6),
    kh=st.integers(1, 5), kw=st.integers(1, 5), sh=st.integers(1, 3), sw=st.integers(1, 3),
    data=st.data(),
)
def test_phase_transpose_matches_conv_transpose2d_on_random_geometry(
    c_in, c_out, h, w, kh, kw, sh, sw, data
):
    # any padding below the kernel and any output padding below the stride (what
    # conv_transpose2d accepts), including outputs the phases only partly cover
    ph, pw = data.draw(st.integers(0, kh - 1)), data.draw(st.integers(0, kw - 1))
    oph, opw = data.draw(st.integers(0, sh - 1)), data.draw(st.integers(0, sw - 1))
    ho, wo = (h - 1) * sh - 2 * ph + kh + oph, (w - 1) * sw - 2 * pw + kw + opw
    assume(ho > 0 and wo > 0)
    _assert_matches_conv_transpose2d(c_in, c_out, h, w, (kh, kw), (sh, sw), (ph, pw), (oph, opw))


def test_phase_transpose_output_can_be_changed_in_place():
    # the output is a tensor of its own, not a view made inside the autograd.Function
    # (autograd forbids in-place changes to those), also when the phases overhang the size
    for out_size, out_pad in (((14, 12), (1, 1)), ((13, 11), (0, 0))):
        v, weight, bias = _inputs(5, 1, 7, 6, (3, 3))
        out = phase_conv_transpose2d(v, weight, bias, (2, 2), (1, 1), out_pad)
        ref = F.conv_transpose2d(v, weight, bias, 2, 1, out_pad)
        assert tuple(out.shape[-2:]) == out_size
        out.relu_()
        torch.testing.assert_close(out, ref.relu())
        torch.testing.assert_close(torch.autograd.grad(out.sum(), v)[0],
                                   torch.autograd.grad(ref.relu().sum(), v)[0])
