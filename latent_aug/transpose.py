"""A CPU transposed convolution for layers that write one channel (a grayscale input layer).

The tied decoder's last step maps the first hidden layer back to the image: a transposed
convolution whose output has one channel. oneDNN's deconvolution runs it 2-4x slower than
PyTorch's native kernel, and both want their input in another memory layout than the
channels_last one the decoder's earlier transposes produce (each conversion is a copy of the
hidden layer forward and of its gradient backward). This one reads channels_last input as it
is and splits the transpose into its stride phases:

* forward: one matrix product ``cols = v_rows @ W`` with ``v_rows: (B·H·W, C_in)`` (the
  channels_last memory of ``v`` read as a matrix, no copy) and ``W: (C_in, C_out·kh·kw)``,
  then each kernel tap's column is added into the output pixels of its stride phase: output
  row ``o = s·i - p + k`` is phase ``(k - p) mod s``, plane row ``i + ⌊(k - p) / s⌋``;
* backward: the gradient of a transposed convolution with respect to its input is the
  forward convolution of the output gradient (oneDNN, the encoder layer's own kernel), and
  with respect to the weight it is that convolution's weight gradient with the roles of
  input and output exchanged. Both come back channels_last, the layout the activations in
  front saved.

Measured on the paper's MNIST net (benchmarks/results/overhead.md), 2-D, dilation 1,
groups 1 only; :class:`latent_aug.decoders.TiedConv` decides where it runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _taps(kernel: int, stride: int, padding: int) -> list[tuple[int, int]]:
    """``(shift, phase)`` of each kernel tap along one axis: tap ``k`` sends input ``i`` to
    output ``o = s·i - p + k = s·(i + shift) + phase``."""
    return [((k - padding) // stride, (k - padding) % stride) for k in range(kernel)]


def _tap_windows(taps_h, taps_w, h: int, w: int, planes_h: int, planes_w: int):
    """For each tap ``(a, b)``: its phase ``(rh, rw)``, the plane window it writes and the
    input window it reads; a tap that reaches no output pixel is left out."""
    for a, (dh, rh) in enumerate(taps_h):
        m0, m1 = max(0, dh), min(planes_h, h + dh)  # plane row m reads input row m - dh
        if m1 <= m0:
            continue
        for b, (dw, rw) in enumerate(taps_w):
            n0, n1 = max(0, dw), min(planes_w, w + dw)
            if n1 <= n0:
                continue
            yield a, b, rh, rw, (slice(m0, m1), slice(n0, n1)), (
                slice(m0 - dh, m1 - dh), slice(n0 - dw, n1 - dw))


class _PhaseTranspose2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, weight: Tensor, bias: Tensor | None,
                stride: tuple[int, int], padding: tuple[int, int],
                out_size: tuple[int, int]) -> Tensor:
        b, c_in, h, w = v.shape
        c_out, kh, kw = weight.shape[1:]
        (sh, sw), (ho, wo) = stride, out_size
        planes_h, planes_w = -(-ho // sh), -(-wo // sw)
        rows = v.permute(0, 2, 3, 1).reshape(b * h * w, c_in)  # a view: v is channels_last
        cols = (rows @ weight.reshape(c_in, c_out * kh * kw)).view(b, h, w, c_out, kh, kw)
        # (B, C_out, Ho', Wo') channels_last, covering whole phases; written through a
        # (B, plane row, phase row, plane column, phase column, C_out) view of its memory
        full = torch.empty((b, c_out, planes_h * sh, planes_w * sw), dtype=cols.dtype,
                           device=v.device, memory_format=torch.channels_last).zero_()
        phases = full.permute(0, 2, 3, 1).view(b, planes_h, sh, planes_w, sw, c_out)
        windows = _tap_windows(_taps(kh, sh, padding[0]), _taps(kw, sw, padding[1]),
                               h, w, planes_h, planes_w)
        for i, j, rh, rw, (mo, no), (mi, ni) in windows:
            phases[:, mo, rh, no, rw] += cols[:, mi, ni, :, i, j]
        out = full
        if full.shape[-2:] != (ho, wo):  # a copy, so that the output is never a view
            out = full[:, :, :ho, :wo].contiguous(memory_format=torch.channels_last)
        if bias is not None:
            out += bias.view(-1, 1, 1)
        ctx.save_for_backward(v, weight)
        ctx.conv = (stride, padding, bias is not None)
        return out  # (B, C_out, Ho, Wo), channels_last

    @staticmethod
    def backward(ctx, grad: Tensor):
        v, weight = ctx.saved_tensors
        stride, padding, has_bias = ctx.conv
        if grad.shape[1] == 1:  # one channel: the same memory, with channels_last strides
            grad = grad.contiguous()
            grad = grad.as_strided(grad.shape, (grad[0].numel(), 1, grad.shape[3], 1))
        else:
            grad = grad.contiguous(memory_format=torch.channels_last)
        grad_v = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_v = F.conv2d(grad, weight, None, stride, padding)
        if ctx.needs_input_grad[1]:
            grad_w = torch.ops.aten.convolution_backward(
                v, grad, weight, None, stride, padding, (1, 1), False, (0, 0), 1,
                (False, True, False),
            )[1]
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(dim=(0, 2, 3))
        return grad_v, grad_w, grad_b, None, None, None


def phase_conv_transpose2d(v: Tensor, weight: Tensor, bias: Tensor | None,
                           stride: tuple[int, int], padding: tuple[int, int],
                           output_padding: tuple[int, int]) -> Tensor:
    """``conv_transpose2d(v, weight, bias, stride, padding, output_padding)`` for
    ``v: (B, C_in, H, W)`` (made channels_last) and ``weight: (C_in, C_out, kh, kw)``,
    dilation 1, groups 1. The output is channels_last; twice differentiable (the backward is
    made of differentiable convolutions)."""
    if v.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"phase_conv_transpose2d needs 4-D v and weight, got {v.dim()}-D "
                         f"and {weight.dim()}-D.")
    out_size = tuple((n - 1) * s - 2 * p + k + op for n, s, p, k, op in zip(
        v.shape[-2:], stride, padding, weight.shape[-2:], output_padding))
    v = v.contiguous(memory_format=torch.channels_last)
    return _PhaseTranspose2d.apply(v, weight, bias, tuple(stride), tuple(padding), out_size)
