"""Ladder network (Rasmus et al., 2015) for fully supervised training.

This is the Γ/full ladder with the "vanilla" combinator, the baseline of Table 4 of the
semantic-noise paper (784-1000-500-250-250-250-10 on MNIST, written there with the
rinuboney/ladder TensorFlow code). It is written here from the paper's Algorithm 1:

* corrupted encoder: ``z̃(0) = x + n``; for ``l = 1..L``:
  ``z̃(l) = BN(W(l) h̃(l-1)) + n``, ``h̃(l) = ReLU(z̃(l) + β(l))`` and on the top layer
  ``h̃(L) = softmax(γ ⊙ (z̃(L) + β(L)))``, with ``n ~ N(0, noise_std²)``;
* clean encoder: the same without noise, keeping the batch mean ``μ(l)`` and std ``σ(l)``
  of every pre-activation;
* decoder, ``l = L..0``: ``u(L) = BN(h̃(L))``, ``u(l) = BN(V(l+1) ẑ(l+1))``,
  ``ẑ(l) = g_l(z̃(l), u(l))`` and ``ẑ_BN(l) = (ẑ(l) - μ(l)) / σ(l)`` (``μ(0) = 0``, ``σ(0) = 1``);
* denoising cost ``Σ_l λ_l / N_l · mean_b ‖z(l) - ẑ_BN(l)‖²``.

Usage::

    model = LadderNetwork()
    loss = F.cross_entropy(model(x), t) + model.aux_loss(t)   # training
    logits = model.eval()(x)                                  # clean encoder only
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from latent_aug.errors import ConfigError, NoTrainingForwardError

__all__ = ["LadderNetwork", "VanillaCombinator"]

DEFAULT_LAYER_SIZES = (784, 1000, 500, 250, 250, 250, 10)
DEFAULT_DENOISING_COSTS = (1000.0, 10.0, 0.1, 0.1, 0.1, 0.1, 0.1)


class _EncoderPass(NamedTuple):
    """What one encoder pass keeps for the decoder (index ``l`` is layer ``l``, 0 = input).

    ``z[l]: (B, N_l)`` normalized pre-activations (plus noise on the corrupted path),
    ``mean[l], std[l]: (N_l,)`` the batch moments used to normalize them (``None`` at ``l = 0``),
    ``top: (B, N_L)`` the softmax output ``h(L)``, ``logits: (B, N_L)`` its pre-softmax input.
    """

    z: list[Tensor]
    mean: list[Tensor | None]
    std: list[Tensor | None]
    top: Tensor
    logits: Tensor


class _Standardize(nn.Module):
    """Batch normalization without affine parameters that also returns the moments it used.

    Training normalizes with the batch mean and (biased) variance; evaluation with running
    averages, which only the clean encoder updates (as in the paper's code).
    """

    running_mean: Tensor
    running_var: Tensor

    def __init__(self, width: int, momentum: float, eps: float) -> None:
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(width))
        self.register_buffer("running_var", torch.ones(width))

    def forward(
        self, z_pre: Tensor, *, batch_stats: bool, update_running: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Normalize ``z_pre: (B, N)``; return ``(z: (B, N), mean: (N,), std: (N,))``."""
        if batch_stats:
            var, mean = torch.var_mean(z_pre, dim=0, correction=0)
            if update_running:
                with torch.no_grad():
                    self.running_mean.lerp_(mean.detach(), self.momentum)
                    self.running_var.lerp_(var.detach(), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        std = torch.sqrt(var + self.eps)
        return (z_pre - mean) / std, mean, std


class VanillaCombinator(nn.Module):
    """The "vanilla" denoising function ``ẑ = g(z̃, u)`` of the ladder network, per unit.

    ``ẑ = (z̃ - μ(u)) ⊙ v(u) + μ(u)`` with
    ``μ(u) = a1 ⊙ sigmoid(a2 ⊙ u + a3) + a4 ⊙ u + a5`` and
    ``v(u) = a6 ⊙ sigmoid(a7 ⊙ u + a8) + a9 ⊙ u + a10``.

    ``a: (10, N)`` holds the ten parameters of each of the ``N`` units; all start at 0
    except ``a2`` and ``a7``, which start at 1 (as in the reference code).
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        init = torch.zeros(10, width)
        init[1] = 1.0  # a2
        init[6] = 1.0  # a7
        self.a = nn.Parameter(init)

    def forward(self, z_noisy: Tensor, u: Tensor) -> Tensor:
        """Denoise ``z_noisy: (B, N)`` given the top-down signal ``u: (B, N)``; returns (B, N)."""
        a1, a2, a3, a4, a5, a6, a7, a8, a9, a10 = self.a
        mu = a1 * torch.sigmoid(a2 * u + a3) + a4 * u + a5
        v = a6 * torch.sigmoid(a7 * u + a8) + a9 * u + a10
        return (z_noisy - mu) * v + mu


class LadderNetwork(nn.Module):
    """Fully connected ladder network classifier (Γ/full model, vanilla combinator).

    Args:
        layer_sizes: widths ``N_0, ..., N_L``; ``N_0`` is the flattened input size and ``N_L``
            the number of classes.
        noise_std: std of the Gaussian noise added to every ``z̃(l)`` of the corrupted encoder,
            input included.
        denoising_costs: ``λ_0, ..., λ_L``, one weight per layer (input first).
        bn_momentum: weight of the new batch in the running averages used in eval mode
            (0.01 is the reference code's decay of 0.99).
        bn_eps: added to the variance before the square root.

    ``forward(x: (B, ...)) -> (B, N_L)`` logits. In eval mode only the clean encoder runs (with
    running averages, no noise). In training mode the corrupted and clean encoders and the
    decoder run, the denoising cost is stored for :meth:`aux_loss`, and the *corrupted* logits
    are returned, since the paper's supervised cost is taken on the corrupted output::

        loss = F.cross_entropy(model(x), t) + model.aux_loss(t)
    """

    def __init__(
        self,
        layer_sizes: Sequence[int] = DEFAULT_LAYER_SIZES,
        noise_std: float = 0.3,
        denoising_costs: Sequence[float] = DEFAULT_DENOISING_COSTS,
        *,
        bn_momentum: float = 0.01,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        sizes = tuple(int(n) for n in layer_sizes)
        costs = tuple(float(c) for c in denoising_costs)
        if len(sizes) < 2 or any(n < 1 for n in sizes):
            raise ConfigError(
                f"layer_sizes={tuple(layer_sizes)!r}: need at least an input and an output "
                "size, all positive, e.g. (784, 1000, 500, 250, 250, 250, 10)."
            )
        if len(costs) != len(sizes):
            raise ConfigError(
                f"denoising_costs has {len(costs)} entries but layer_sizes has {len(sizes)}; "
                "give one weight per layer, the input layer first."
            )
        if any(c < 0 or not math.isfinite(c) for c in costs):
            raise ConfigError(f"denoising_costs={costs!r} must be finite and >= 0.")
        if noise_std < 0 or not math.isfinite(noise_std):
            raise ConfigError(f"noise_std={noise_std!r} must be finite and >= 0.")
        if not 0.0 < bn_momentum <= 1.0:
            raise ConfigError(f"bn_momentum={bn_momentum!r} must be in (0, 1].")
        if bn_eps <= 0:
            raise ConfigError(f"bn_eps={bn_eps!r} must be > 0.")

        self.layer_sizes = sizes
        self.noise_std = float(noise_std)
        self.denoising_costs = costs
        pairs = list(zip(sizes[:-1], sizes[1:], strict=True))

        # Encoder, layers 1..L (index l-1): W(l), BN(l), β(l); γ only on the softmax layer.
        self.encoder = nn.ModuleList(nn.Linear(n_in, n_out, bias=False) for n_in, n_out in pairs)
        self.batch_norms = nn.ModuleList(_Standardize(n, bn_momentum, bn_eps) for n in sizes[1:])
        self.beta = nn.ParameterList(nn.Parameter(torch.zeros(n)) for n in sizes[1:])
        self.gamma = nn.Parameter(torch.ones(sizes[-1]))
        # Decoder: V(l) maps layer l back to layer l-1 (index l-1); one combinator per layer 0..L.
        self.decoder = nn.ModuleList(nn.Linear(n_out, n_in, bias=False) for n_in, n_out in pairs)
        self.combinators = nn.ModuleList(VanillaCombinator(n) for n in sizes)
        self.bn_eps = float(bn_eps)

        for linear in (*self.encoder, *self.decoder):
            # N(0, 1 / fan_in), as in the reference code.
            nn.init.normal_(linear.weight, std=linear.in_features**-0.5)

        self._aux: Tensor | None = None
        self._layer_costs: tuple[Tensor, ...] = ()

    @property
    def num_layers(self) -> int:
        """``L``, the number of weight layers."""
        return len(self.layer_sizes) - 1

    def _flatten(self, x: Tensor) -> Tensor:
        """``x: (B, ...) -> (B, N_0)``."""
        if x.dim() < 2 or math.prod(x.shape[1:]) != self.layer_sizes[0]:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not flatten to (B, {self.layer_sizes[0]}); "
                f"layer_sizes[0]={self.layer_sizes[0]} is the number of values per example."
            )
        return rearrange(x, "b ... -> b (...)")

    def _encode(self, x: Tensor, *, noise_std: float, batch_stats: bool) -> _EncoderPass:
        """Run one encoder pass on ``x: (B, N_0)``.

        ``noise_std > 0`` gives the corrupted path; the clean training path (``noise_std = 0``
        with batch statistics) is the one that updates the running averages.
        """
        update_running = batch_stats and noise_std == 0.0

        def corrupt(z: Tensor) -> Tensor:
            return z + noise_std * torch.randn_like(z) if noise_std > 0 else z

        z = corrupt(x)
        zs: list[Tensor] = [z]
        means: list[Tensor | None] = [None]
        stds: list[Tensor | None] = [None]
        h = z
        for l, (linear, bn, beta) in enumerate(
            zip(self.encoder, self.batch_norms, self.beta, strict=True), start=1
        ):
            z, mean, std = bn(linear(h), batch_stats=batch_stats, update_running=update_running)
            z = corrupt(z)
            zs.append(z)
            means.append(mean)
            stds.append(std)
            if l < self.num_layers:
                h = F.relu(z + beta)
        logits = self.gamma * (z + self.beta[-1])
        return _EncoderPass(zs, means, stds, logits.softmax(dim=-1), logits)

    def _batch_norm(self, u: Tensor) -> Tensor:
        """Normalize ``u: (B, N)`` with its own batch moments (decoder; no parameters)."""
        var, mean = torch.var_mean(u, dim=0, correction=0)
        return (u - mean) / torch.sqrt(var + self.bn_eps)

    def _denoising_costs(self, noisy: _EncoderPass, clean: _EncoderPass) -> tuple[Tensor, ...]:
        """Top-down decoder; returns the weighted cost of each layer, input (``l = 0``) first."""
        costs: list[Tensor] = []
        z_hat: Tensor | None = None
        for l in range(self.num_layers, -1, -1):
            if z_hat is None:
                u = self._batch_norm(noisy.top)
            else:
                u = self._batch_norm(self.decoder[l](z_hat))  # V(l+1) ẑ(l+1): (B, N_l)
            z_hat = self.combinators[l](noisy.z[l], u)
            mean, std = clean.mean[l], clean.std[l]
            z_hat_bn = z_hat if mean is None or std is None else (z_hat - mean) / std
            # λ_l / N_l · mean_b Σ_i (…)² is λ_l times the elementwise mean.
            costs.append(self.denoising_costs[l] * F.mse_loss(z_hat_bn, clean.z[l]))
        return tuple(reversed(costs))

    def forward(self, x: Tensor) -> Tensor:
        """``x: (B, ...)`` with ``N_0`` values per example -> logits ``(B, N_L)``.

        Training mode returns the corrupted path's logits and stores the denoising cost.
        """
        x = self._flatten(x)
        if not self.training:
            return self._encode(x, noise_std=0.0, batch_stats=False).logits
        noisy = self._encode(x, noise_std=self.noise_std, batch_stats=True)
        clean = self._encode(x, noise_std=0.0, batch_stats=True)
        self._layer_costs = self._denoising_costs(noisy, clean)
        self._aux = torch.stack(self._layer_costs).sum()
        return noisy.logits

    def aux_loss(self, targets: Tensor | None = None) -> Tensor:
        """Weighted denoising cost (scalar) of the last training-mode forward.

        ``targets`` is unused (fully supervised ladder: the supervised cost is the caller's
        cross entropy); it is accepted for the same signature as latent_aug's wrapper.
        """
        del targets
        if self._aux is None:
            raise NoTrainingForwardError(
                "LadderNetwork.aux_loss() needs a training-mode forward first: call "
                "model.train() and logits = model(x), then model.aux_loss(t)."
            )
        return self._aux

    @property
    def layer_costs(self) -> tuple[float, ...]:
        """Weighted denoising cost of each layer (input first) from the last training forward."""
        return tuple(float(c.detach()) for c in self._layer_costs)
