"""Peer baselines that regularize the same latent: ISDA and Manifold Mixup.

Both follow the training-loop contract of :class:`~latent_aug.SemanticNoiseWrapper`, so
:func:`latent_aug.protocol.train_run` trains them unchanged::

    logits = m(x)                                           # training mode
    loss = F.cross_entropy(logits, t) + m.aux_loss(t)       # = the method's own loss
    m.eval()(x)                                             # exactly the original model

* **ISDA** (Wang et al., NeurIPS 2019, "Implicit Semantic Data Augmentation"). The head must
  be one ``nn.Linear`` ``y = W z + b``. Online per-class estimates of the mean and covariance
  ``Σ_c`` of z are updated from every batch, and the loss is ``CE(ŷ, t)`` with the augmented
  logits ``ŷ_j = y_j + ½·λ·(w_j − w_t)ᵀ Σ_t (w_j − w_t)`` (the closed-form upper bound of the
  expected CE over infinitely many samples ``z ~ N(z, λΣ_t)``). ``λ = λ0 · epoch / epochs``.
* **Manifold Mixup** (Verma et al., ICML 2019). Per batch a layer k is drawn uniformly from the
  eligible layers, ``λ ~ Beta(α, α)``, the hidden state at k is mixed with a permutation of
  the batch, ``h = λ·h + (1 − λ)·h[perm]``, the forward continues, and the loss is
  ``λ·CE(out, t) + (1 − λ)·CE(out, t[perm])``.

Both cut the model with :func:`latent_aug.splitting.split_model` (the same cut, after the
split layer's activation, that the semantic-noise wrapper uses), so "the latent" means the
same tensor for every method.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import (
    AlreadyWrappedError,
    ConfigError,
    LatentAugError,
    NoTrainingForwardError,
    SplitNotFoundError,
    TargetError,
    UnsupportedLayerError,
    close_matches,
)
from .splitting import Part, split_model, split_points
from .wrapper import _FLAG, SemanticNoiseWrapper, _check_targets

__all__ = [
    "INPUT_LAYER",
    "PEER_METHODS",
    "ClassCovariance",
    "ISDAWrapper",
    "ManifoldMixupWrapper",
    "MixDraw",
    "build",
    "isda_augmented_logits",
    "sample_beta",
    "wrap_isda",
    "wrap_manifold_mixup",
]

#: Name of the "layer" that mixes the raw input (plain input mixup) in Manifold Mixup.
INPUT_LAYER = "input"


# -- shared checks ---------------------------------------------------------------------------


def _check_model(model: Any) -> None:
    """Raise unless ``model`` is a plain, not yet wrapped ``nn.Module``."""
    wrappers = (SemanticNoiseWrapper, ISDAWrapper, ManifoldMixupWrapper)
    if isinstance(model, wrappers) or (isinstance(model, nn.Module) and _FLAG in model.__dict__):
        raise AlreadyWrappedError(
            "This model is already wrapped by latent_aug. Wrap it once; to change method or "
            "options, call .unwrap() on the existing wrapper and wrap the returned model."
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")


def _check_number(name: str, value: Any, *, positive: bool) -> float:
    """``value`` as a float, or :class:`ConfigError` unless finite and >= 0 (> 0)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r}.")
    ok = value > 0 if positive else value >= 0
    if not ok or not math.isfinite(value):
        bound = "> 0" if positive else ">= 0"
        raise ConfigError(f"{name} must be finite and {bound}, got {value!r}.")
    return float(value)


class _PeerWrapper(nn.Module):
    """What both peers share: the wrapped ``self.model``, eval passthrough and ``unwrap``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        model.__dict__[_FLAG] = True

    def _training_input(self, x: Tensor, args: tuple, kwargs: dict) -> bool:
        """True when the forward is a training forward (else the caller runs the model)."""
        if "_unwrapped" in self.__dict__:
            raise LatentAugError("This wrapper was unwrapped; use the model unwrap() returned.")
        if not self.training:
            return False
        if args or kwargs:
            raise TypeError(
                "In training mode the wrapper takes one input tensor x; extra forward "
                "arguments are only passed through in eval mode."
            )
        return True

    def _no_forward(self) -> NoTrainingForwardError:
        return NoTrainingForwardError(
            "aux_loss() needs the outputs of a training-mode forward, but the last call was "
            "none (or ran in eval mode). Call model.train(); logits = model(x) first, then "
            "model.aux_loss(targets)."
        )

    def unwrap(self) -> nn.Module:
        """Return the original model object (with its trained weights); the wrapper is done."""
        self.model.__dict__.pop(_FLAG, None)
        self.__dict__["_unwrapped"] = True
        return self.model


# -- ISDA ------------------------------------------------------------------------------------


class ClassCovariance(nn.Module):
    """Running per-class mean and covariance of features, ISDA's online estimator.

    For class c with ``n`` features seen so far (mean ``μ``, covariance ``Σ``) and ``m`` new
    ones in the batch (mean ``μ'``, covariance ``Σ'``), the update of the ISDA paper is::

        μ ← (n·μ + m·μ') / (n + m)
        Σ ← (n·Σ + m·Σ') / (n + m) + n·m·(μ − μ')(μ − μ')ᵀ / (n + m)²
        n ← n + m

    With the batch covariance normalized by ``m`` (``Σ' = Σ_i (z_i − μ')(z_i − μ')ᵀ / m``) this
    is exactly the *population* covariance (normalized by the count, ``correction=0``) of all
    features of the class seen so far. A class never seen keeps ``μ = 0, Σ = 0``.

    Buffers: ``mean: (C, D)``, ``cov: (C, D, D)``, ``count: (C,)`` (int64).
    """

    mean: Tensor
    cov: Tensor
    count: Tensor

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_classes, dim))
        self.register_buffer("cov", torch.zeros(num_classes, dim, dim))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))

    @torch.no_grad()
    def update(self, z: Tensor, t: Tensor) -> None:
        """Add the features ``z: (B, D)`` of classes ``t: (B,)`` to the estimates."""
        z = z.detach().to(self.mean.dtype)
        onehot = F.one_hot(t, self.mean.shape[0]).to(z.dtype)  # (B, C)
        m = onehot.sum(0)  # (C,)
        batch_mean = onehot.T @ z / m.clamp(min=1)[:, None]  # (C, D)
        centered = z - batch_mean[t]  # (B, D): each feature minus its own class's batch mean
        batch_cov = torch.einsum("bc,bd,be->cde", onehot, centered, centered)
        batch_cov = batch_cov / m.clamp(min=1)[:, None, None]  # (C, D, D)
        n_new = self.count + m.long()
        total = n_new.clamp(min=1).to(z.dtype)
        a = (self.count.to(z.dtype) / total)[:, None]  # (C, 1): n / (n + m); 1 for unseen
        b = m[:, None] / total[:, None]  # (C, 1): m / (n + m)
        delta = self.mean - batch_mean  # (C, D)
        self.cov.mul_(a[..., None]).add_(b[..., None] * batch_cov).add_(
            (a * b)[..., None] * delta[:, :, None] * delta[:, None, :]
        )
        self.mean.mul_(a).add_(b * batch_mean)
        self.count.copy_(n_new)


def isda_augmented_logits(
    y: Tensor, t: Tensor, weight: Tensor, cov: Tensor, lam: float
) -> Tensor:
    """ISDA's ``ŷ_j = y_j + ½·λ·(w_j − w_t)ᵀ Σ_t (w_j − w_t)`` for a sample of class t.

    Args:
        y: ``(B, C)`` logits of the linear head. Gradients flow through it and ``weight``.
        t: ``(B,)`` class indices.
        weight: ``(C, D)`` the head's weight ``W`` (the bias cancels in ``w_j − w_t``).
        cov: ``(C, D, D)`` per-class feature covariance (treated as a constant).
        lam: the strength λ >= 0.

    Returns:
        ``(B, C)`` augmented logits; the true class's entry equals ``y_t``.
    """
    diff = weight[None, :, :] - weight[:, None, :]  # (C_t, C_j, D): diff[t, j] = w_j − w_t
    quad = torch.einsum("tjd,tde,tje->tj", diff, cov.to(diff.dtype), diff)  # (C_t, C_j)
    return y + (0.5 * lam) * quad[t]


class _ISDAStep(NamedTuple):
    """What one ISDA training forward leaves for ``aux_loss``: ``z: (B, D)``, ``y: (B, C)``."""

    z: Tensor
    y: Tensor


class ISDAWrapper(_PeerWrapper):
    """A classifier trained with ISDA's surrogate loss; build it with :func:`wrap_isda`.

    The training forward returns the plain logits ``y`` and keeps z; ``aux_loss(t)`` updates
    the class-conditional covariance estimate from that batch (z detached) and returns
    ``CE(ŷ, t) − CE(y, t)``, so the caller's ``CE(y, t) + aux_loss(t)`` is ISDA's loss, with
    the gradient through ``y`` inside ``ŷ``. The estimate is updated before it is used, as in
    the authors' training loop.

    λ follows ``λ0 · epoch / epochs`` once :meth:`set_epoch` is called (the protocol calls it
    at the start of every epoch, so λ is 0 in the first epoch); until then λ = λ0.

    Attributes:
        estimator: the :class:`ClassCovariance` of z (its buffers are in ``state_dict``).
        lambda0: the final strength λ0.
        lam: the current λ.
    """

    def __init__(self, model: nn.Module, *, split: str, lambda0: float = 0.5) -> None:
        lambda0 = _check_number("lambda0", lambda0, positive=False)
        _check_model(model)
        s = split_model(model, split)
        linear = _linear_head(s.head, split, model)
        super().__init__(model)
        self.estimator = ClassCovariance(linear.out_features, linear.in_features)
        self.lambda0 = lambda0
        self.lam = lambda0
        self.latent_name = s.latent_name
        self._encoder = s.encoder  # plain attributes: their modules are the model's own
        self._head = s.head
        self.__dict__["_linear"] = linear  # not a submodule: no second state_dict key
        self._last: _ISDAStep | None = None
        self._updated = False

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Set ``λ = λ0 · epoch / epochs`` (``epoch`` counts from 0)."""
        if epochs < 1 or not 0 <= epoch <= epochs:
            raise ConfigError(f"Need 0 <= epoch <= epochs and epochs >= 1, got {epoch}/{epochs}.")
        self.lam = self.lambda0 * epoch / epochs

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not self._training_input(x, args, kwargs):
            self._last = None
            return self.model(x, *args, **kwargs)
        z, _ = self._encoder.fn(x)
        if z.dim() != 2:
            raise UnsupportedLayerError(
                f"ISDA needs a latent z of shape (B, D) feeding the linear head; the split "
                f"{self.latent_name!r} gives {tuple(z.shape)}."
            )
        y, _ = self._head.fn(z)
        self._last = _ISDAStep(z, y)
        self._updated = False
        return y

    def augmented_logits(self, targets: Tensor) -> Tensor:
        """``ŷ: (B, C)`` of the last training forward under the current estimate and λ."""
        step = self._last
        if step is None:
            raise self._no_forward()
        return isda_augmented_logits(
            step.y.float(), targets, self._linear.weight.float(), self.estimator.cov, self.lam
        )

    def aux_loss(self, targets: Tensor) -> Tensor:
        """``CE(ŷ, t) − CE(y, t)`` for the last training forward (updates the estimate once)."""
        step = self._last
        if step is None:
            raise self._no_forward()
        _check_targets(targets, step.y)
        if targets.is_floating_point():
            raise TargetError("ISDA needs class indices (torch.long), not class probabilities.")
        if not self._updated:
            self.estimator.update(step.z, targets)
            self._updated = True
        y_aug = self.augmented_logits(targets)
        return F.cross_entropy(y_aug, targets) - F.cross_entropy(step.y.float(), targets)

    def extra_repr(self) -> str:
        return f"latent={self.latent_name!r}, lambda0={self.lambda0}, lam={self.lam}"


def _linear_head(head: Part, split: str, model: nn.Module) -> nn.Linear:
    """The head's single ``nn.Linear``, or :class:`UnsupportedLayerError`."""
    chain = head.chain
    if chain is None or len(chain) != 1 or not isinstance(chain[0].source, nn.Linear):
        what = (
            f"first blocking layer {head.blocker}"
            if chain is None
            else "layers " + ", ".join(f"{op.name} ({type(op.source).__name__})" for op in chain)
        )
        raise UnsupportedLayerError(
            f"ISDA needs the head after split={split!r} of {type(model).__name__} to be one "
            f"nn.Linear (z -> logits); it has {what}. Split at the layer that feeds the "
            f"classifier (see latent_aug.list_split_points(model))."
        )
    return chain[0].source


def wrap_isda(model: nn.Module, *, split: str, lambda0: float = 0.5) -> ISDAWrapper:
    """Train ``model`` with ISDA on the latent after ``split`` (the head must be one Linear)."""
    return ISDAWrapper(model, split=split, lambda0=lambda0)


# -- Manifold Mixup --------------------------------------------------------------------------


class MixDraw(NamedTuple):
    """The random choices of one Manifold Mixup step: layer name, ``λ`` and ``perm: (B,)``."""

    layer: str
    lam: float
    perm: Tensor


def sample_beta(alpha: float) -> float:
    """One draw of ``Beta(α, α)``, accurate for tiny α too.

    ``torch.distributions.Beta`` returns 0.5 for α near 0 (both gamma draws underflow to 0).
    Here ``G = X · U^(1/α)`` with ``X ~ Gamma(α + 1)``, ``U ~ U(0, 1)`` (then ``G ~ Gamma(α)``)
    is kept in log space and ``λ = G1 / (G1 + G2) = sigmoid(log G1 − log G2)``. Drawn on the
    CPU in float64 from torch's global RNG (no device sync).
    """
    conc = torch.full((2,), alpha + 1.0, dtype=torch.float64)
    x = torch.distributions.Gamma(conc, torch.ones_like(conc)).sample()
    u = torch.rand(2, dtype=torch.float64)
    log_g = x.log() + u.clamp(min=torch.finfo(torch.float64).tiny).log() / alpha
    return float(torch.sigmoid(log_g[0] - log_g[1]))


class ManifoldMixupWrapper(_PeerWrapper):
    """A classifier trained with Manifold Mixup; build it with :func:`wrap_manifold_mixup`.

    The training forward draws a layer, λ and a permutation (kept as :attr:`last_draw`),
    mixes the hidden state there and returns the logits of the mixed batch;
    ``aux_loss(t) = (1 − λ)·(CE(out, t[perm]) − CE(out, t))``, so the caller's
    ``CE(out, t) + aux_loss(t)`` is the mixup loss. Randomness comes from torch's global RNG.

    Attributes:
        layers: the eligible layer names (:data:`INPUT_LAYER` mixes the input itself).
        alpha: the Beta(α, α) concentration.
        last_draw: the :class:`MixDraw` of the last training forward.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        split: str,
        alpha: float = 2.0,
        layers: Sequence[str] | None = None,
    ) -> None:
        alpha = _check_number("alpha", alpha, positive=True)
        _check_model(model)
        names = _mixup_layers(model, split, layers)
        parts = {k: split_model(model, k) for k in names if k != INPUT_LAYER}
        super().__init__(model)
        self.alpha = alpha
        self.layers = names
        self.latent_name = split
        self._parts = parts  # plain attribute: their modules are the model's own
        self.last_draw: MixDraw | None = None
        self._out: Tensor | None = None

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not self._training_input(x, args, kwargs):
            self._out = self.last_draw = None
            return self.model(x, *args, **kwargs)
        layer = self.layers[int(torch.randint(len(self.layers), ()))]
        lam = sample_beta(self.alpha)
        perm = torch.randperm(x.shape[0], device=x.device)
        if layer == INPUT_LAYER:
            out = self.model(_mix(x, perm, lam))
        else:
            part = self._parts[layer]
            h, _ = part.encoder.fn(x)
            out, _ = part.head.fn(_mix(h, perm, lam))
        self.last_draw = MixDraw(layer, lam, perm)
        self._out = out
        return out

    def aux_loss(self, targets: Tensor) -> Tensor:
        """``(1 − λ)·(CE(out, t[perm]) − CE(out, t))`` for the last training forward."""
        draw, out = self.last_draw, self._out
        if draw is None or out is None:
            raise self._no_forward()
        _check_targets(targets, out)
        out = out.float()
        swapped = F.cross_entropy(out, targets[draw.perm]) - F.cross_entropy(out, targets)
        return (1.0 - draw.lam) * swapped

    def extra_repr(self) -> str:
        return f"layers={self.layers}, alpha={self.alpha}"


def _mix(h: Tensor, perm: Tensor, lam: float) -> Tensor:
    """``λ·h + (1 − λ)·h[perm]`` for ``h: (B, ...)``."""
    return lam * h + (1.0 - lam) * h[perm]


def _mixup_layers(model: nn.Module, split: str, layers: Sequence[str] | None) -> list[str]:
    """The eligible layers: given (checked), or the input and every split point up to ``split``."""
    split_model(model, split)  # a clear error for a bad latent split
    points = split_points(model)
    if split not in points:
        raise SplitNotFoundError(
            f"split={split!r} is not a split point of {type(model).__name__}: "
            f"{points}. Call latent_aug.list_split_points(model) to see valid names."
        )
    if layers is None:
        return [INPUT_LAYER, *points[: points.index(split) + 1]]
    if isinstance(layers, str) or not isinstance(layers, Sequence):
        raise ConfigError(f"layers must be a list of layer names, got {layers!r}.")
    valid = [INPUT_LAYER, *points]
    for name in layers:
        if name not in valid:
            raise SplitNotFoundError(
                f"layers contains {name!r}, which is not {INPUT_LAYER!r} or a split point of "
                f"{type(model).__name__}.{close_matches(str(name), valid)} Valid: {valid}."
            )
    if not layers:
        raise ConfigError(f"layers must name at least one layer; valid: {valid}.")
    return list(dict.fromkeys(layers))


def wrap_manifold_mixup(
    model: nn.Module,
    *,
    split: str,
    alpha: float = 2.0,
    layers: Sequence[str] | None = None,
) -> ManifoldMixupWrapper:
    """Train ``model`` with Manifold Mixup over ``layers`` (default: the input and every split
    point up to and including ``split``), ``λ ~ Beta(alpha, alpha)``."""
    return ManifoldMixupWrapper(model, split=split, alpha=alpha, layers=layers)


# -- protocol entry point --------------------------------------------------------------------

#: Method name -> (entry point, its options).
PEER_METHODS: dict[str, tuple[Callable[..., nn.Module], tuple[str, ...]]] = {
    "isda": (wrap_isda, ("lambda0",)),
    "manifold_mixup": (wrap_manifold_mixup, ("alpha", "layers")),
}


def build(method: str, model: nn.Module, split: str, options: dict[str, Any]) -> nn.Module:
    """The peer ``method`` applied to ``model`` at the latent ``split`` with ``options``."""
    if method not in PEER_METHODS:
        raise ConfigError(
            f"Unknown peer method {method!r}.{close_matches(method, list(PEER_METHODS))} "
            f"Peer methods: {', '.join(PEER_METHODS)}."
        )
    entry, allowed = PEER_METHODS[method]
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise ConfigError(
            f"Unknown option(s) {unknown} for {method!r}."
            f"{close_matches(unknown[0], list(allowed))} Valid options: {', '.join(allowed)}."
        )
    return entry(model, split=split, **options)
