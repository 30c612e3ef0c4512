"""``SemanticNoiseWrapper``: the user's classifier plus Eq. (7)'s extra terms.

Training forward (one encoder pass)::

    x ──f1──► z ──f2──► y                       (returned: the model's own logits)
              │        └─g2'(y), g2'(y + ye)──► zR, ze = g2'(y+ye) − g2'(y)   (Eq. 9)
              ├─g1'(z) ──► xR                   (Eq. 5, input reconstruction)
              └─f2(z + ze) ──► ŷ                (Eq. 7, perturbed pass)

``aux_loss(t) = λ1·L2(x, xR) + λ2·L2(z, zR) + NLL(ŷ, t)``; the user adds it to their own
``NLL(y, t)`` (λ3 = 1). In eval mode the wrapper calls the original model and nothing else.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SemanticNoiseConfig, check_fields
from .decoders import ChainOp, LearnedInputDecoder, MirrorContext, TiedDecoder, is_activation
from .errors import (
    AlreadyWrappedError,
    ConfigError,
    LatentAugError,
    NonFiniteLossError,
    NoTrainingForwardError,
    SplitNotFoundError,
    TargetError,
    UnsupportedLayerError,
)
from .losses import LossBreakdown, l2
from .noise import minmax_noise
from .splitting import Part, _with_post, split_model, split_points, trace_part

_FLAG = "_latent_aug_wrapped"


@dataclass
class TrainingTerms:
    """What one training forward computes: the logits and the raw auxiliary terms."""

    logits: Tensor
    perturbed_logits: Tensor | None
    recon_input: Tensor
    recon_latent: Tensor
    recon_hidden: Tensor


def _is_timm(model: nn.Module) -> bool:
    return all(
        hasattr(model, a) for a in ("forward_features", "forward_head", "get_classifier")
    )


def _timm_parts(model: nn.Module) -> tuple[Part, Part, str]:
    """Encoder = features + pooled pre-logits, head = the classifier (timm's head contract)."""
    classifier = model.get_classifier()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("classifier", "classifier") if isinstance(cfg, dict) else "classifier"
    if not isinstance(classifier, nn.Module) or isinstance(classifier, nn.Identity):
        raise SplitNotFoundError(
            f"{type(model).__name__} has no classifier (get_classifier() returned "
            f"{type(classifier).__name__}); create it with num_classes > 0, or pass split=."
        )

    def encode(x: Tensor) -> tuple[Tensor, list[Tensor]]:
        return model.forward_head(model.forward_features(x), pre_logits=True), []

    head = trace_part(classifier)
    if head.chain is not None:
        head.chain = [ChainOp(name if len(head.chain) == 1 else f"{name}.{op.name}", op.source,
                              op.index, op.post) for op in head.chain]
    encoder = Part(encode, None, None)  # blocker: named on demand by _encoder_blocker
    return encoder, head, f"{name} input (pre-logits)"


def _full_chain(encoder: Part, head: Part) -> list[ChainOp]:
    """Encoder and head chains as one chain over ``[x, enc vals..., head vals...]``."""
    k = len(encoder.chain)
    shifted = [ChainOp(op.name, op.source, op.index + k, op.post + k) for op in head.chain]
    return _with_post(list(encoder.chain) + shifted)


class SemanticNoiseWrapper(nn.Module):
    """A classifier with tied decoders and latent perturbation (Eq. 5/7/9 of the paper).

    Build it with :func:`wrap`, or explicitly for models torch.fx cannot trace::

        SemanticNoiseWrapper(encoder=f1, head=f2, perturb="class_conditional")

    Args:
        model: the classifier to wrap (``None`` with ``encoder``/``head``).
        split: dotted module name whose output is z (see :func:`list_split_points`); a
            container (a ``Sequential`` stage, a residual block) gives the value that leaves
            it. For timm models it may be omitted: z is then the classifier's input (pooled
            pre-logits).
        encoder, head: the explicit halves, ``z = encoder(x)``, ``logits = head(z)``.
        config: a :class:`SemanticNoiseConfig`; keyword ``options`` override its fields.
        input_shape: ``(C, H, W)`` of one input, needed only by ``input_decoder="learned"``.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        split: str | None = None,
        encoder: nn.Module | None = None,
        head: nn.Module | None = None,
        config: SemanticNoiseConfig | None = None,
        input_shape: tuple[int, ...] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        # Everything is validated and built before the model is touched: a failed wrap
        # leaves it exactly as it was.
        cfg = _make_config(config, options)
        model, enc, hd, latent_name = _resolve_parts(model, split, encoder, head, cfg)
        ctx = MirrorContext(activation=cfg.decoder_activation, bias=cfg.decoder_bias)
        input_decoder, mode = _build_input_decoder(model, enc, cfg, ctx, input_shape)
        head_decoder = full_decoder = None
        if cfg.uses_head_decoder:
            if hd.chain is None:
                raise UnsupportedLayerError(
                    f"The head f2 cannot be mirrored into the tied decoder g2' (y -> z): first "
                    f"blocking layer {hd.blocker}. Split closer to the classifier"
                    f"{_tied_head_hint(model, cfg)}, or use reconstruction='none' with "
                    f"perturb='random' or None."
                )
            tail = []
            if cfg.latent_after_activation and enc.chain and _ends_in_activation(enc.chain):
                last = enc.chain[-1]
                tail = [ChainOp(last.name, last.source, 0, 0)]
            head_decoder = TiedDecoder(hd.chain, ctx, tail=tail)
        if cfg.reconstruction in ("input", "all"):
            if enc.chain is None:
                raise UnsupportedLayerError(
                    f"reconstruction={cfg.reconstruction!r} decodes x through the whole tied "
                    f"decoder, but the encoder is not a chain of registered layers; first "
                    f"blocking layer: {_encoder_blocker(model, enc)}. Use "
                    f"reconstruction='split' with input_decoder='learned' or 'none'."
                )
            full_decoder = TiedDecoder(_full_chain(enc, hd), ctx)

        self.model = model
        self.config = cfg
        self.input_decoder = input_decoder
        self.head_decoder = head_decoder
        self.full_decoder = full_decoder
        self.latent_name = latent_name
        self.input_decoder_mode = mode
        self._encoder = enc  # plain attributes: their modules are the model's own
        self._head = hd
        self._last: TrainingTerms | None = None
        self.last_losses: LossBreakdown | None = None
        model.__dict__[_FLAG] = True

    # -- forward -------------------------------------------------------------------------

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if "_unwrapped" in self.__dict__:
            raise LatentAugError("This wrapper was unwrapped; use the model unwrap() returned.")
        if not self.training:
            self._last = None
            return self.model(x, *args, **kwargs)
        if args or kwargs:
            raise TypeError(
                "In training mode the wrapper takes one input tensor x; extra forward "
                "arguments are only passed through in eval mode."
            )
        self._last = self.training_terms(x)
        return self._last.logits

    def training_terms(self, x: Tensor) -> TrainingTerms:
        """Everything one training step computes from ``x``, without storing it (a pure
        function of the parameters: usable under ``torch.func.functional_call``/``vmap``)."""
        cfg = self.config
        x_in = x + cfg.denoise_std * torch.randn_like(x) if cfg.denoise_std > 0 else x
        z, enc_vals = self._encoder.fn(x_in)
        y, head_vals = self._head.fn(z)
        if not isinstance(y, Tensor):
            raise TypeError(
                f"The head returned {type(y).__name__}; latent_aug needs a logits tensor."
            )
        zero = y.new_zeros((), dtype=torch.promote_types(y.dtype, torch.float32))
        rec_x = rec_z = rec_h = zero
        y_base = self._y_base(y)
        z_rec, ze = self._latent_noise(z, y_base, head_vals, cfg.perturb, cfg.noise_std)
        if z_rec is not None and cfg.reconstruction == "split":
            rec_z = l2(z, z_rec, cfg.l2_reduction)
        if cfg.reconstruction == "split" and self.input_decoder is not None:
            x_rec = self.input_decoder(z, [x_in, *enc_vals])
            rec_x = l2(x, x_rec, cfg.l2_reduction)
        elif self.full_decoder is not None:
            vals = [x_in, *enc_vals, *head_vals]
            x_rec, taps = self.full_decoder(y_base, vals, taps=True)
            rec_x = l2(x, x_rec, cfg.l2_reduction)
            if cfg.reconstruction == "all":
                rec_h = sum((l2(vals[i], h, cfg.l2_reduction) for h, i in taps), zero)
        y_perturbed = None
        if ze is not None:
            if cfg.detach_noise:
                ze = ze.detach()
            y_perturbed, _ = self._head.fn(z + ze.to(z.dtype))
        return TrainingTerms(y, y_perturbed, rec_x, rec_z, rec_h)

    def _y_base(self, y: Tensor) -> Tensor:
        return y.softmax(dim=1) if self.config.y_space == "probs" else y

    def _latent_noise(
        self, z: Tensor, y_base: Tensor, head_vals: list[Tensor], kind: str | None, std: float
    ) -> tuple[Tensor | None, Tensor | None]:
        """``(zR, ze)``: the head decoder's reconstruction of z (when g2' runs) and the
        additive latent noise of ``kind`` (``None`` for no perturbation)."""
        cfg = self.config
        z_rec = ze = None
        if self.head_decoder is not None or kind == "class_conditional":
            if self.head_decoder is None:
                raise UnsupportedLayerError("Class-conditional noise needs the head decoder g2'.")
            head_in = [z, *head_vals]
            if kind == "class_conditional":
                ye = minmax_noise(y_base, std, per=cfg.noise_range)
                both = self.head_decoder(torch.cat([y_base, y_base + ye]), head_in)
                z_rec, z_rec_perturbed = both.chunk(2)
                ze = z_rec_perturbed - z_rec  # Eq. 9: g2'(y + ye) - g2'(y)
            else:
                z_rec = self.head_decoder(y_base, head_in)
        if kind == "random":
            ze = minmax_noise(z, std, per=cfg.noise_range)
        return z_rec, ze

    # -- analysis (figures, diagnostics) ----------------------------------------------------

    def encode(self, x: Tensor) -> Tensor:
        """The latent ``z = f1(x)`` (runs in the current mode; no state is stored)."""
        return self._encoder.fn(x)[0]

    def head_logits(self, z: Tensor) -> Tensor:
        """``f2(z)``."""
        return self._head.fn(z)[0]

    def perturb_latent(
        self, x: Tensor, kind: str = "class_conditional", std: float | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(z, z + ze)`` for inputs ``x``, with the noise of ``kind`` (``"random"`` or
        ``"class_conditional"``) exactly as training draws it; ``std`` defaults to the
        config's ``noise_std``."""
        if kind not in ("random", "class_conditional"):
            raise ConfigError(f"kind must be 'random' or 'class_conditional', got {kind!r}.")
        z, _ = self._encoder.fn(x)
        y, head_vals = self._head.fn(z)
        std = self.config.noise_std if std is None else std
        _, ze = self._latent_noise(z, self._y_base(y), head_vals, kind, std)
        return z, z + ze

    def reconstruct_input(self, z: Tensor, x: Tensor) -> Tensor:
        """``g1'(z)``: the input decoded from latents ``z`` (``x`` gives the shapes: one
        example input per row of ``z``, or a single example broadcast)."""
        if self.input_decoder is None:
            raise ConfigError(
                f"This wrapper has no input decoder (input_decoder={self.input_decoder_mode!r})."
            )
        if x.shape[0] != z.shape[0]:
            x = x[:1].expand(z.shape[0], *x.shape[1:])
        _, vals = self._encoder.fn(x)
        return self.input_decoder(z, [x, *vals])

    # -- losses --------------------------------------------------------------------------

    def losses(self, targets: Tensor) -> LossBreakdown:
        """The named loss terms of the last training forward (see :class:`LossBreakdown`)."""
        step = self._last
        if step is None:
            raise NoTrainingForwardError(
                "aux_loss() needs the outputs of a training-mode forward, but the last call "
                "was none (or ran in eval mode). Call model.train(); logits = model(x) first, "
                "then model.aux_loss(targets)."
            )
        _check_targets(targets, step.logits)
        out = self.step_losses(step, targets)
        if self.config.check_finite:
            for name, value in out._asdict().items():
                if not bool(torch.isfinite(value)):
                    raise NonFiniteLossError(
                        f"Loss term {name!r} is {float(value.detach())} (check_finite=True). "
                        f"Look for NaN/inf in the inputs or a diverging learning rate."
                    )
        self.last_losses = out
        return out

    def step_losses(self, step: TrainingTerms, targets: Tensor) -> LossBreakdown:
        """The loss terms of ``step`` (from :meth:`training_terms`), unchecked and pure."""
        cfg = self.config
        nll = (
            F.cross_entropy(step.perturbed_logits, targets)
            if step.perturbed_logits is not None
            else step.recon_input.new_zeros(())
        )
        total = (
            cfg.lambda1 * step.recon_input
            + cfg.lambda2 * (step.recon_latent + step.recon_hidden)
            + cfg.perturbed_weight * nll
        )
        return LossBreakdown(step.recon_input, step.recon_latent, step.recon_hidden, nll, total)

    def aux_loss(self, targets: Tensor) -> Tensor:
        """``λ1·L2(x, xR) + λ2·L2(z, zR) + NLL(ŷ, t)`` for the last training forward."""
        return self.losses(targets).total

    def __getstate__(self) -> dict[str, Any]:
        # The last step's tensors belong to an autograd graph: copies (deepcopy, pickling,
        # swa_utils.AveragedModel) start without them.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state["_last"] = None
        state["last_losses"] = None
        return state

    # -- unwrapping ----------------------------------------------------------------------

    def unwrap(self) -> nn.Module:
        """Return the original model object (with its trained weights); the wrapper is done."""
        self.model.__dict__.pop(_FLAG, None)
        self.__dict__["_unwrapped"] = True
        return self.model

    def extra_repr(self) -> str:
        return f"latent={self.latent_name!r}, input_decoder={self.input_decoder_mode!r}"


def _encoder_blocker(model: nn.Module, enc: Part) -> str:
    """What keeps the encoder from being mirrored. timm's encoder is opaque (forward_features),
    so the model is traced only here, on the error path, to name the layer."""
    if enc.blocker is not None:
        return enc.blocker
    from .timm_support import first_blocking_layer

    found = first_blocking_layer(model) or "none found by tracing the whole forward"
    return (
        f"{found} in {type(model).__name__}.forward_features (wrapped without split=, as a "
        f"timm backbone; split= at a module makes the encoder a traced graph)"
    )


def _ends_in_activation(chain: list[ChainOp]) -> bool:
    return is_activation(chain[-1].source)


def _make_config(config: SemanticNoiseConfig | None, options: dict[str, Any]):
    if config is not None and not isinstance(config, SemanticNoiseConfig):
        raise ConfigError(f"config must be a SemanticNoiseConfig, got {type(config).__name__}.")
    check_fields(options)
    return (config or SemanticNoiseConfig()).replace(**options)


def _resolve_parts(model, split, encoder, head, cfg):
    if isinstance(model, SemanticNoiseWrapper) or (model is not None and _FLAG in model.__dict__):
        raise AlreadyWrappedError(
            "This model is already wrapped by latent_aug. Wrap it once; to change options, "
            "call .unwrap() on the existing wrapper and wrap the returned model."
        )
    if model is not None and (encoder is not None or head is not None):
        raise ConfigError("Pass either model (with split) or encoder= and head=, not both.")
    if model is None:
        if encoder is None or head is None:
            raise ConfigError("The explicit form needs both encoder= and head= modules.")
        if split is not None:
            raise ConfigError("split= applies to model=, not to the explicit encoder=/head= form.")
        model = nn.Sequential(OrderedDict(encoder=encoder, head=head))
        return model, trace_part(encoder), trace_part(head), "encoder output"
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if split is None:
        if _is_timm(model):
            enc, hd, name = _timm_parts(model)
            return model, enc, hd, name
        raise SplitNotFoundError(
            f"{type(model).__name__} is not a timm model, so split= is required: name the "
            f"layer whose output is the latent z. Valid names: call "
            f"latent_aug.list_split_points(model)."
        )
    s = split_model(model, split, after_activation=cfg.latent_after_activation)
    return model, s.encoder, s.head, s.latent_name


def _tied_head_hint(model: nn.Module | None, cfg: SemanticNoiseConfig) -> str:
    """`` (points where it can: 'a', 'b')`` for a model split by name, else ``""``."""
    if model is None:
        return ""
    points = split_points(model, tied_head=True, after_activation=cfg.latent_after_activation)
    if not points:
        return " (no split point of this model has a head it can mirror)"
    shown = ", ".join(repr(p) for p in points[-5:])
    return f" (points where it can: {'..., ' if len(points) > 5 else ''}{shown})"


def _build_input_decoder(model, enc: Part, cfg, ctx, input_shape):
    """The decoder g1' (z -> x) the config asks for, and the mode actually used."""
    if cfg.reconstruction != "split":
        return None, "full" if cfg.reconstruction in ("input", "all") else "none"
    mode = cfg.input_decoder
    if mode == "auto":
        mode = "tied" if enc.chain is not None else "none"
    if mode == "tied":
        if enc.chain is None:
            raise UnsupportedLayerError(
                f"input_decoder='tied' needs an encoder that is a chain of registered layers; "
                f"first blocking layer: {_encoder_blocker(model, enc)}. Use "
                f"input_decoder='learned' (a small "
                f"decoder with its own weights) or 'none' (latent-only, λ1 unused)."
            )
        return TiedDecoder(enc.chain, ctx), "tied"
    if mode == "learned":
        if input_shape is None:
            raise ConfigError(
                "input_decoder='learned' needs input_shape=(C, H, W) of one input sample to "
                "size the decoder."
            )
        latent_dim = _latent_dim(model, enc, input_shape)
        decoder = LearnedInputDecoder(latent_dim, tuple(input_shape))
        param = next(model.parameters(), None)
        if param is not None:
            decoder = decoder.to(device=param.device, dtype=param.dtype)
        return decoder, "learned"
    return None, "none"


@torch.no_grad()
def _latent_dim(model: nn.Module, enc: Part, input_shape) -> int:
    """Size of flattened z, from one eval-mode pass on zeros (modes restored after)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else "cpu"
        z, _ = enc.fn(torch.zeros(2, *input_shape, device=device))
    finally:
        for m, mode in modes:
            m.training = mode
    return int(z[0].numel())


def _check_targets(targets: Any, logits: Tensor) -> None:
    if not isinstance(targets, Tensor):
        raise TargetError(f"targets must be a tensor, got {type(targets).__name__}.")
    n_cls = logits.shape[1] if logits.dim() > 1 else None
    if targets.is_floating_point():
        if targets.shape != logits.shape:
            raise TargetError(
                f"Float targets are read as class probabilities and must have the logits' "
                f"shape {tuple(logits.shape)}, got {tuple(targets.shape)}. For class indices "
                f"pass an integer (torch.long) tensor."
            )
        return
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TargetError(f"targets must hold class indices (torch.long), got {targets.dtype}.")
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(targets.shape) != expected:
        raise TargetError(
            f"targets have shape {tuple(targets.shape)} but the logits {tuple(logits.shape)} "
            f"need {expected}: one class index per sample."
        )
    if targets.device.type == "cpu" and targets.numel():  # range check without a GPU sync
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or (n_cls is not None and hi >= n_cls):
            raise TargetError(
                f"targets must be class indices in [0, {n_cls}), got values in [{lo}, {hi}]."
            )


def wrap(
    model: nn.Module,
    *,
    split: str | None = None,
    config: SemanticNoiseConfig | None = None,
    input_shape: tuple[int, ...] | None = None,
    **options: Any,
) -> SemanticNoiseWrapper:
    """Add the semantic-noise regularizer to ``model``, split at the module ``split``.

    ``options`` are :class:`SemanticNoiseConfig` fields (``perturb=``, ``noise_std=``,
    ``lambda1=``, ...). Usage::

        model = wrap(model, split="fc1")
        logits = model(x)
        loss = F.cross_entropy(logits, t) + model.aux_loss(t)
    """
    return SemanticNoiseWrapper(
        model, split=split, config=config, input_shape=input_shape, **options
    )


def list_split_points(model: nn.Module, *, tied_head: bool = False) -> list[str]:
    """Module names that ``wrap(model, split=...)`` accepts, in execution order; with
    ``tied_head=True`` only those where the head can be mirrored into the tied decoder g2'
    (needed by the default class-conditional noise and the latent reconstruction)."""
    return split_points(model, tied_head=tied_head)
