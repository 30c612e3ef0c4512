"""Tied decoders: mirror an encoder (or head) layer by layer, reading its own weights.

A decoder for a chain of layers ``[op_1, ..., op_n]`` runs the mirror of each layer in
reverse order. Weight layers are transposed (``Linear`` -> ``v @ W``, ``ConvNd`` ->
``conv_transposeNd`` with the same weight, stride, padding, dilation and groups), so the
decoder has no weights of its own, only one bias per weight layer. The weight is *read* from
the encoder module at every call: one tensor, one state_dict key, one gradient.

Mirrors are looked up in a registry keyed by module type, function or tensor-method name,
so supporting a new layer is one :func:`register_decoder` call::

    @register_decoder(MyLayer)
    def _mirror_my_layer(source, ctx):
        return "activation", MyInverseStep(source)

Each mirror step is called as ``step(v, x_in)`` where ``x_in`` is the tensor that entered the
mirrored layer during the forward pass (used only for its shape, e.g. the output size of a
transposed convolution or of an unflatten).

Documented inverses of non-invertible layers:

* activations are re-applied (``decoder_activation="mirror"``) so that each reconstructed
  hidden layer lies in the range of the layer it reconstructs, or dropped (``"linear"``);
* dropout, identity and normalization layers (BatchNorm, LayerNorm, GroupNorm) are the
  identity: inverting a normalization with running statistics is ill-conditioned where a
  scale is near zero, and the reconstruction targets are the normalized values anyway;
* max/average/adaptive pooling is undone by nearest-neighbour upsampling to the recorded
  input size (the adjoint of average pooling up to a constant);
* flatten/view/reshape is undone by reshaping to the recorded input shape.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UnsupportedLayerError
from .transpose import phase_conv_transpose2d

Kind = Literal["affine", "activation", "identity", "reshape", "pool"]


@dataclass(frozen=True)
class MirrorContext:
    """Options that shape every mirror step."""

    activation: Literal["mirror", "linear"] = "mirror"
    bias: bool = True


@dataclass(frozen=True)
class FunctionCall:
    """A functional op of the traced graph: ``fn(input, *args, **kwargs)``."""

    fn: Callable[..., Tensor]
    args: tuple = ()
    kwargs: dict | None = None


MirrorFactory = Callable[[Any, MirrorContext], tuple[Kind, nn.Module]]
_REGISTRY: dict[Any, MirrorFactory] = {}


def register_decoder(*keys: Any) -> Callable[[MirrorFactory], MirrorFactory]:
    """Register ``factory(source, ctx) -> (kind, step)`` for module types, functions or
    tensor-method names (strings)."""

    def decorate(factory: MirrorFactory) -> MirrorFactory:
        for key in keys:
            _REGISTRY[key] = factory
        return factory

    return decorate


def registered_names() -> list[str]:
    """Human-readable names of every registered layer type, function and method."""
    names = []
    for key in _REGISTRY:
        if isinstance(key, str):
            names.append(f"Tensor.{key}")
        elif isinstance(key, type):
            names.append(key.__name__)
        else:
            names.append(f"{getattr(key, '__module__', '')}.{getattr(key, '__name__', key)}")
    return sorted(set(names))


def find_factory(source: Any) -> MirrorFactory | None:
    """The registered factory for a module (by its type's MRO), function or method name."""
    if isinstance(source, nn.Module):
        for cls in type(source).__mro__:
            if cls in _REGISTRY:
                return _REGISTRY[cls]
        return None
    key = source.fn if isinstance(source, FunctionCall) else source
    try:
        return _REGISTRY.get(key)
    except TypeError:  # unhashable target
        return None


def mirror(source: Any, ctx: MirrorContext, *, name: str) -> tuple[Kind, nn.Module]:
    """Build the mirror step of one layer, or raise :class:`UnsupportedLayerError`."""
    factory = find_factory(source)
    if factory is None:
        what = type(source).__name__ if isinstance(source, nn.Module) else _describe(source)
        raise UnsupportedLayerError(
            f"Layer {name!r} ({what}) has no registered decoder, so the tied decoder cannot "
            f"mirror it. Registered: {', '.join(registered_names())}. Options: split the model "
            f"below this layer, use input_decoder='learned' or 'none' (latent-only), or "
            f"register a mirror with latent_aug.register_decoder({what})."
        )
    return factory(source, ctx)


def _describe(source: Any) -> str:
    fn = source.fn if isinstance(source, FunctionCall) else source
    if isinstance(fn, str):
        return f"Tensor.{fn}"
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__name__', fn)}"


def _keep_reference(step: nn.Module, name: str, module: nn.Module) -> None:
    """Point ``step.<name>`` at the encoder's module *without* registering it as a child,
    so its parameters are not duplicated in the wrapper's ``state_dict``/``parameters()``."""
    object.__setattr__(step, name, module)


def _zero_bias(weight: Tensor, size: int) -> nn.Parameter:
    """A decoder bias on the encoder weight's device and in its dtype."""
    return nn.Parameter(torch.zeros(size, device=weight.device, dtype=weight.dtype))


class TiedLinear(nn.Module):
    """``v: (..., out) -> (..., in)``: ``v @ W + b`` with ``W`` the encoder's own weight."""

    def __init__(self, source: nn.Linear, bias: bool) -> None:
        super().__init__()
        _keep_reference(self, "source", source)
        self.bias = _zero_bias(source.weight, source.in_features) if bias else None

    def forward(self, v: Tensor, x_in: Tensor) -> Tensor:
        out = v @ self.source.weight.to(v.dtype)
        return out + self.bias.to(v.dtype) if self.bias is not None else out


_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class TiedConv(nn.Module):
    """Transposed convolution with the encoder's own weight; output size = recorded input size.

    ``cpu_kernels`` (default True) lets the CPU path pick faster kernels for 2-D transposes
    (channels_last input, or :func:`latent_aug.transpose.phase_conv_transpose2d` for
    single-channel output); set it False where they are not allowed (inside ``vmap``, as
    :mod:`latent_aug.vectorized` does).
    """

    cpu_kernels = True

    def __init__(self, source: nn.modules.conv._ConvNd, bias: bool) -> None:
        super().__init__()
        if source.padding_mode != "zeros":
            raise UnsupportedLayerError(
                f"Conv with padding_mode={source.padding_mode!r} has no tied transpose; only "
                f"'zeros' is supported. Use input_decoder='learned' or 'none'."
            )
        _keep_reference(self, "source", source)
        self.dims = len(source.kernel_size)
        self.padding = _explicit_padding(source)
        self.bias = _zero_bias(source.weight, source.in_channels) if bias else None

    def forward(self, v: Tensor, x_in: Tensor) -> Tensor:
        src = self.source
        size_in = v.shape[-self.dims :]
        target = x_in.shape[-self.dims :]
        output_padding = tuple(
            t - ((n - 1) * s - 2 * p + d * (k - 1) + 1)
            for t, n, s, p, d, k in zip(
                target, size_in, src.stride, self.padding, src.dilation, src.kernel_size
            )
        )
        bias = self.bias.to(v.dtype) if self.bias is not None else None
        kernel = self._cpu_kernel(v)
        if kernel is None:
            return self._transpose(v, bias, output_padding)
        return self._cpu_2d(v, bias, output_padding, kernel)

    def _cpu_kernel(self, v: Tensor) -> Literal["channels_last", "phase", "onednn"] | None:
        """Which CPU path :meth:`forward` takes for ``v`` (the one place that decides):
        ``"channels_last"`` (oneDNN on channels_last input, several output channels),
        ``"phase"`` (:func:`~latent_aug.transpose.phase_conv_transpose2d`, one output
        channel, dilation 1, float32/64, eager), ``"onednn"`` (one output channel otherwise),
        or None (the generic transpose, bias fused)."""
        src = self.source
        if not (v.device.type == "cpu" and self.cpu_kernels and self.dims == 2 and v.dim() == 4
                and v.shape[0] > 0 and src.groups == 1):  # oneDNN: no empty batch
            return None
        if src.in_channels > 1:
            return "channels_last"
        if (v.dtype in (torch.float32, torch.float64) and tuple(src.dilation) == (1, 1)
                and not torch.compiler.is_compiling()):  # a custom autograd.Function: eager
            return "phase"
        return "onednn"

    def preferred_layout(self, v: Tensor) -> Tensor:
        """``v`` in the memory layout :meth:`_cpu_2d` runs fastest on (channels_last for
        both oneDNN when the transpose writes several channels and the phase kernel), so
        that the decoder can convert early, before the activations in front of this
        transpose; unchanged where neither path runs."""
        if self._cpu_kernel(v) in ("channels_last", "phase"):
            return v.contiguous(memory_format=torch.channels_last)
        return v

    def _cpu_2d(self, v: Tensor, bias: Tensor | None, output_padding: tuple[int, ...],
                kernel: Literal["channels_last", "phase", "onednn"]) -> Tensor:
        """The same transpose through faster CPU kernels. Measured on the paper's MNIST net
        (benchmarks/results/overhead.md): oneDNN's deconvolution is about 2x slower with a
        fused bias than without, and faster on channels_last input when it writes several
        channels; when it writes one (a grayscale input layer) the phase kernel of
        :mod:`latent_aug.transpose` is faster than both oneDNN and PyTorch's native kernel
        and needs no layout conversion."""
        src = self.source
        if kernel == "phase":
            return phase_conv_transpose2d(v, src.weight.to(v.dtype), bias, src.stride,
                                          self.padding, output_padding)
        if kernel == "channels_last":
            v = v.contiguous(memory_format=torch.channels_last)
        out = self._transpose(v, None, output_padding)
        # in place: the transpose's backward does not read its output, and a fresh buffer
        # for the sum would be one more page-faulted hidden layer per step
        return out if bias is None else out.add_(bias.view(-1, 1, 1))

    def _transpose(self, v: Tensor, bias: Tensor | None, output_padding: tuple[int, ...]) -> Tensor:
        src = self.source
        return _CONV_T[self.dims](
            v,
            src.weight.to(v.dtype),
            bias,
            stride=src.stride,
            padding=self.padding,
            output_padding=output_padding,
            groups=src.groups,
            dilation=src.dilation,
        )


def _explicit_padding(conv: nn.modules.conv._ConvNd) -> tuple[int, ...]:
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    pads = []
    for k, d in zip(conv.kernel_size, conv.dilation):
        if (d * (k - 1)) % 2:
            raise UnsupportedLayerError(
                f"Conv with padding='same' and even effective kernel {k} pads asymmetrically; "
                f"its tied transpose is not supported. Use explicit padding."
            )
        pads.append(d * (k - 1) // 2)
    return tuple(pads)


class Apply(nn.Module):
    """Re-apply an activation (module or function) to the reconstruction."""

    def __init__(self, fn: Callable[..., Tensor], args: tuple = (), kwargs: dict | None = None):
        super().__init__()
        if isinstance(fn, nn.Module):
            _keep_reference(self, "fn", fn)
        else:
            self.fn = fn
        self.args = args
        self.kwargs = kwargs or {}

    def forward(self, v: Tensor, x_in: Tensor) -> Tensor:
        return self.fn(v, *self.args, **self.kwargs)


class Passthrough(nn.Module):
    def forward(self, v: Tensor, x_in: Tensor) -> Tensor:
        return v


class Unflatten(nn.Module):
    """Undo flatten/view/reshape: back to the recorded per-sample shape."""

    def forward(self, v: Tensor, x_in: Tensor) -> Tensor:
        return v.reshape(v.shape[0], *x_in.shape[1:])


class Unpool(nn.Module):
    """Undo pooling by nearest-neighbour upsampling to the recorded spatial size."""

    def forward(self, v: Tensor, x_in: Tensor) -> Tensor:
        if v.dim() == x_in.dim() - 2 or v.shape[2:] == torch.Size([1] * (x_in.dim() - 2)):
            # global pooling (B, C) or (B, C, 1, 1): broadcast back over space
            v = v.reshape(v.shape[0], v.shape[1], *([1] * (x_in.dim() - 2)))
            return v.expand(v.shape[0], v.shape[1], *x_in.shape[2:])
        return F.interpolate(v, size=tuple(x_in.shape[2:]), mode="nearest")


# --- registrations -----------------------------------------------------------------------

_ACT_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.PReLU,
)
_ACT_FUNCTIONS = (
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    torch.tanh, F.tanh, torch.sigmoid, F.sigmoid, F.softplus, F.hardswish, F.hardsigmoid,
    F.hardtanh,
)
_ACT_METHODS = ("relu", "tanh", "sigmoid")
_IDENTITY_MODULES = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm,
)
_IDENTITY_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.batch_norm)
_IDENTITY_METHODS = ("contiguous", "clone", "float", "to", "type_as")
_RESHAPE = (nn.Flatten, torch.flatten, "flatten", "view", "reshape", torch.reshape, "squeeze")
_POOL = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d,
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.max_pool1d, F.avg_pool1d,
)
# Structural methods that the tracer emits between layers and that are not layers.
SHAPE_METHODS = ("size", "dim")
SHAPE_ATTRS = ("shape", "ndim", "dtype", "device")
SHAPE_FUNCTIONS = (getattr, operator.getitem, operator.mul, operator.floordiv, operator.add)


@register_decoder(nn.Linear)
def _mirror_linear(source: nn.Linear, ctx: MirrorContext) -> tuple[Kind, nn.Module]:
    return "affine", TiedLinear(source, ctx.bias)


@register_decoder(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _mirror_conv(source: nn.modules.conv._ConvNd, ctx: MirrorContext):
    return "affine", TiedConv(source, ctx.bias)


@register_decoder(*_ACT_MODULES, *_ACT_FUNCTIONS, *_ACT_METHODS)
def _mirror_activation(source: Any, ctx: MirrorContext) -> tuple[Kind, nn.Module]:
    if ctx.activation == "linear":
        return "activation", Passthrough()
    if isinstance(source, nn.Module):
        if getattr(source, "inplace", False):
            source = copy.copy(source)
            source.inplace = False
        return "activation", Apply(source)
    if isinstance(source, FunctionCall):
        fn = getattr(torch, source.fn) if isinstance(source.fn, str) else source.fn
        kwargs = {k: v for k, v in (source.kwargs or {}).items() if k != "inplace"}
        return "activation", Apply(fn, source.args, kwargs)
    return "activation", Apply(source)


@register_decoder(*_IDENTITY_MODULES, *_IDENTITY_FUNCTIONS, *_IDENTITY_METHODS)
def _mirror_identity(source: Any, ctx: MirrorContext) -> tuple[Kind, nn.Module]:
    return "identity", Passthrough()


@register_decoder(*_RESHAPE)
def _mirror_reshape(source: Any, ctx: MirrorContext) -> tuple[Kind, nn.Module]:
    return "reshape", Unflatten()


@register_decoder(*_POOL)
def _mirror_pool(source: Any, ctx: MirrorContext) -> tuple[Kind, nn.Module]:
    return "pool", Unpool()


def is_activation(source: Any) -> bool:
    """Whether ``source`` (module, FunctionCall or method name) mirrors as an activation."""
    return find_factory(source) is _mirror_activation


def keeps_space(source: Any) -> bool:
    """Activations and identity-like layers: they do not change what space a value is in."""
    return find_factory(source) in (_mirror_activation, _mirror_identity)


# --- decoders built from a chain ----------------------------------------------------------


@dataclass(frozen=True)
class ChainOp:
    """One layer of an encoder/head chain.

    ``index`` is the position of its output in the chain's value list ``vals`` (``vals[0]`` is
    the chain input, ``vals[i]`` the output of op ``i``); its input is ``vals[index - 1]``.
    ``post`` is the index of the last activation/identity value that directly follows it
    (the hidden representation this layer produces).
    """

    name: str
    source: Any
    index: int
    post: int


def _layout_points(built: list[tuple[ChainOp, Kind, nn.Module]]) -> dict[int, TiedConv]:
    """Where the decoder converts to the memory layout a following :class:`TiedConv` wants.

    On CPU a 2-D tied transpose runs on channels_last input (:meth:`TiedConv._cpu_2d`),
    and the gradient it returns for that input comes in the same layout. Converting right
    before the transpose would leave the activations in front of it saving tensors in the
    other layout, and their backward (e.g. ``threshold_backward``) would then mix layouts:
    an elementwise kernel 5-20x slower than on matching ones (measured on the MNIST net's
    decoder). So the conversion happens before the run of activations and identities that
    precedes the transpose. Returns ``{step position: its TiedConv}``.
    """
    points: dict[int, TiedConv] = {}
    for j, (_, _, step) in enumerate(built):
        if not isinstance(step, TiedConv):  # the TiedConv decides at run time (_cpu_kernel)
            continue
        i = j
        while i > 0 and built[i - 1][1] in ("activation", "identity"):
            i -= 1
        points[i] = step
    return points


class TiedDecoder(nn.Module):
    """Runs the mirrors of a chain in reverse.

    ``forward(v, vals)`` decodes ``v`` (in the space of the chain's output) back to the space
    of ``vals[0]``. With ``taps=True`` it also returns ``[(h_R, target_index)]``: the
    reconstruction of every hidden representation produced by a weight layer (except the
    top one, whose output is the decoder's input), for Eq. 12.
    """

    def __init__(self, ops: list[ChainOp], ctx: MirrorContext, *, tail: list[ChainOp] = ()):
        super().__init__()
        built: list[tuple[ChainOp, Kind, nn.Module]] = []
        for op in reversed(ops):
            kind, step = mirror(op.source, ctx, name=op.name)
            if not built and kind in ("activation", "identity"):
                continue  # the top's own activation: the decoder input is already past it
            built.append((op, kind, step))
        for op in tail:  # e.g. the activation that produced z, for g2'
            kind, step = mirror(op.source, ctx, name=op.name)
            built.append((op, kind, step))
        self.steps = nn.ModuleList(step for _, _, step in built)
        self.in_index = [op.index - 1 for op, _, _ in built]
        affine = [i for i, (_, kind, _) in enumerate(built) if kind == "affine"]
        # tap before every transposed weight layer except the first one run (the top)
        self.taps = {i: built[i][0].post for i in affine[1:]}
        self.layout_at = _layout_points(built)

    def forward(
        self, v: Tensor, vals: list[Tensor], taps: bool = False
    ) -> Tensor | tuple[Tensor, list[tuple[Tensor, int]]]:
        found = []
        for pos, (step, idx) in enumerate(zip(self.steps, self.in_index)):
            if pos in self.layout_at:
                v = self.layout_at[pos].preferred_layout(v)
            if taps and pos in self.taps:
                found.append((v, self.taps[pos]))
            v = step(v, vals[idx] if idx >= 0 else vals[0])
        return (v, found) if taps else v


class LearnedInputDecoder(nn.Module):
    """A small decoder with its own weights, ``z: (B, D) -> x: (B, C, H, W)``.

    For encoders the tied decoder cannot mirror (residual, attention): a linear layer to a
    ``(64, ⌈H/4⌉, ⌈W/4⌉)`` map, two stride-2 transposed convolutions, and a resize to (H, W).
    """

    def __init__(self, latent_dim: int, input_shape: tuple[int, int, int]):
        super().__init__()
        c, h, w = input_shape
        self.input_shape = tuple(input_shape)
        self.h0, self.w0 = -(-h // 4), -(-w // 4)
        self.fc = nn.Linear(latent_dim, 64 * self.h0 * self.w0)
        self.up = nn.Sequential(
            nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(32, c, 4, stride=2, padding=1),
        )

    def forward(self, z: Tensor, vals: list[Tensor] | None = None) -> Tensor:
        z = z.flatten(1)
        v = self.fc(z).reshape(z.shape[0], 64, self.h0, self.w0)
        v = self.up(v)
        return F.interpolate(v, size=self.input_shape[1:], mode="bilinear", align_corners=False)
