"""Loss terms of Eq. (5) / (7) and their named breakdown."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch.nn.functional as F
from torch import Tensor


class LossBreakdown(NamedTuple):
    """The auxiliary loss of one training step, term by term.

    The reconstruction terms are *unweighted* L2 values; ``total`` is the weighted sum that
    ``aux_loss`` returns: ``λ1·recon_input + λ2·(recon_latent + recon_hidden)
    + perturbed_weight·nll_perturbed``.
    """

    recon_input: Tensor
    recon_latent: Tensor
    recon_hidden: Tensor
    nll_perturbed: Tensor
    total: Tensor

    def as_floats(self) -> dict[str, float]:
        """Plain floats for logging (one host sync)."""
        return {k: float(v.detach()) for k, v in self._asdict().items()}


def l2(a: Tensor, b: Tensor, reduction: Literal["sum", "mean"] = "sum") -> Tensor:
    """Squared error between ``a`` and ``b: (B, ...)``.

    ``"sum"``: summed over features, averaged over the batch (scales with the layer width).
    ``"mean"``: averaged over every element (``F.mse_loss``).
    """
    if reduction == "mean":
        return F.mse_loss(a, b)
    return (a - b).pow(2).sum() / a.shape[0]
