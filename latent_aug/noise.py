"""The perturbation of section 4.2: min-max scale, add Gaussian noise, de-scale.

The paper scales the base vector to [0, 1] with its own min and max, adds zero-mean Gaussian
noise of std σ (0.2), and de-scales with the same min and max. Written out,

    v' = lo + ((v - lo) / (hi - lo) + ε) · (hi - lo) = v + ε · (hi - lo),   ε ~ N(0, σ²),

so the noise is Gaussian with a per-sample std of σ·(hi - lo). We compute the right-hand side
directly: it is the same number without the division, so a constant vector (hi == lo) gets
no noise instead of NaN.
"""

from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange
from torch import Tensor


def value_range(v: Tensor, per: Literal["sample", "batch"] = "sample") -> Tensor:
    """hi - lo of ``v: (B, ...)``, per sample or for the whole batch, shaped ``(B, 1, ...)``."""
    flat = rearrange(v, "b ... -> b (...)")
    if per == "sample":
        span = flat.amax(dim=1) - flat.amin(dim=1)
    else:
        span = (flat.amax() - flat.amin()).expand(v.shape[0])
    return span.reshape((v.shape[0],) + (1,) * (v.dim() - 1))


def minmax_noise(
    v: Tensor,
    std: float,
    *,
    per: Literal["sample", "batch"] = "sample",
    generator: torch.Generator | None = None,
) -> Tensor:
    """The additive noise the paper's scale / perturb / de-scale puts on ``v: (B, ...)``.

    Returns a tensor shaped like ``v``: ``ε · (hi - lo)`` with ``ε ~ N(0, std²)``.
    """
    if generator is None:  # randn_like keeps symbolic shapes working under torch.compile
        eps = torch.randn_like(v)
    else:
        eps = torch.randn(v.shape, dtype=v.dtype, device=v.device, generator=generator)
    return eps * std * value_range(v, per)


def perturb_minmax(
    v: Tensor,
    std: float,
    *,
    per: Literal["sample", "batch"] = "sample",
    generator: torch.Generator | None = None,
) -> Tensor:
    """``v`` perturbed as in section 4.2 (scaled to [0, 1], noised, de-scaled)."""
    return v + minmax_noise(v, std, per=per, generator=generator)
