"""Helpers for timm backbones: small-input stems, one-call creation, error details.

``wrap(timm_model)`` needs nothing from this module: without ``split`` the wrapper uses timm's
head contract (z = ``forward_head(forward_features(x), pre_logits=True)``, f2 =
``get_classifier()``). These helpers cover what comes before and around that:

* :func:`adapt_resnet_for_cifar`: the usual CIFAR stem for a timm ResNet (3×3 stride-1 first
  convolution, no max-pool), so 32×32 (or 24×24) inputs keep a 4×4 (3×3) map at ``layer4``
  instead of 1×1;
* :func:`create_backbone`: ``timm.create_model`` with random weights, the class count, the input
  size passed to the models that take one (ViTs, ...), and the small stem for ResNets;
* :func:`first_blocking_layer`: the first layer of a model that keeps a tied decoder from
  mirroring it (for error messages; it traces the model, so call it only when needed).

timm is optional: it is imported inside the functions that need it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .errors import ConfigError, TracingError

#: Input sides up to which :func:`create_backbone` gives a ResNet the small-input stem.
SMALL_INPUT_MAX = 64


def adapt_resnet_for_cifar(model: nn.Module) -> nn.Module:
    """Give a timm ``ResNet`` the CIFAR stem, in place, and return it.

    The ImageNet stem (7×7 stride-2 convolution, then 3×3 stride-2 max-pool) shrinks a 32×32
    input to 8×8 before ``layer1`` and to 1×1 at ``layer4``. The CIFAR variant of the ResNet
    papers uses a 3×3 stride-1 convolution and no max-pool: ``layer1`` sees the full 32×32
    map and ``layer4`` a 4×4 one. Input ``(B, C, H, W)`` gives ``layer4`` features
    ``(B, 512·e, ⌈H/8⌉, ⌈W/8⌉)`` (``e`` the block expansion).

    The new convolution gets timm's ResNet initialization (Kaiming-normal, fan-out, ReLU);
    every other weight is untouched, so call this before training. ``feature_info`` and
    ``pretrained_cfg`` are updated to the new reductions and pool size.

    Raises:
        TypeError: ``model`` is not a timm ResNet with a single-convolution stem (the deep
            stems of ``resnet*d`` and ``resnet*t`` are a Sequential of three convolutions).
    """
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise TypeError(
            f"adapt_resnet_for_cifar needs a timm ResNet whose stem is one Conv2d 'conv1' and "
            f"a 'maxpool', got {type(model).__name__} with conv1={type(conv).__name__}. Deep "
            f"stems (resnet*d, resnet*t) are not adapted; use a plain resnet (e.g. resnet18)."
        )
    stride = conv.stride[0]
    pool_stride = _stride(model.maxpool)
    new = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1,
                    bias=conv.bias is not None)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    model.conv1 = new.to(device=conv.weight.device, dtype=conv.weight.dtype)
    model.maxpool = nn.Identity()
    stem = ("conv1", "bn1", "act1")
    for info in getattr(model, "feature_info", None) or []:
        if isinstance(info, dict) and "reduction" in info:
            factor = stride if info.get("module") in stem else stride * pool_stride
            info["reduction"] = max(1, info["reduction"] // factor)
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict):
        cfg = dict(cfg)
        cfg["input_size"] = (conv.in_channels, 32, 32)
        cfg["pool_size"] = (4, 4)
        cfg["first_conv"] = "conv1"
        model.pretrained_cfg = cfg
    return model


def _stride(pool: nn.Module) -> int:
    s = getattr(pool, "stride", 1)
    return int(s[0] if isinstance(s, tuple) else s)


def create_backbone(
    name: str,
    num_classes: int = 10,
    img_size: int = 32,
    *,
    in_chans: int = 3,
    small_input_stem: bool | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A randomly initialized timm classifier for ``(B, in_chans, img_size, img_size)`` inputs.

    Args:
        name: a timm model name (``timm.list_models()``), e.g. ``"resnet18"``, ``"convnext_atto"``,
            ``"vit_tiny_patch16_224"`` (pass ``patch_size=`` for small images).
        num_classes: size of the classifier (the wrapper needs one: ``> 0``).
        img_size: input side; passed to the models whose constructor takes ``img_size``
            (ViTs and other fixed-grid models), ignored by the others.
        in_chans: input channels.
        small_input_stem: give a ResNet the CIFAR stem (:func:`adapt_resnet_for_cifar`);
            ``None``: do so when ``img_size <= 64`` and the model is a plain-stem ResNet.
        **kwargs: passed to ``timm.create_model`` (``drop_rate=``, ``patch_size=``, ...).

    Returns:
        The timm model (never pretrained: the point is training from few examples).
    """
    import timm

    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1 (the wrapper needs a head), got "
                          f"{num_classes}.")
    base = dict(pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    try:
        model = timm.create_model(name, img_size=img_size, **base)
    except TypeError as exc:  # the constructor has no img_size: a fully convolutional model
        if "img_size" not in str(exc):
            raise
        model = timm.create_model(name, **base)
    is_resnet = type(model).__name__ == "ResNet" and isinstance(getattr(model, "conv1", None),
                                                                 nn.Conv2d)
    if small_input_stem is None:
        small_input_stem = is_resnet and img_size <= SMALL_INPUT_MAX
    if small_input_stem:
        adapt_resnet_for_cifar(model)
    return model


def first_blocking_layer(model: nn.Module) -> str | None:
    """The first layer of ``model``'s traced forward that a tied decoder cannot mirror.

    Returns a description such as ``"'add' (inputs ['layer1_0_bn2', 'maxpool']: not a chain,
    e.g. a residual or multi-input layer)"``, the reason tracing failed, or ``None`` when the
    whole forward is a mirrorable chain. Traces the model with torch.fx (about 0.1 s for a
    ResNet-18, 0.5 s for a ViT), so use it for error messages, not on every ``wrap``.
    """
    from .splitting import _ancestors, _chain, trace

    try:
        gm = trace(model)
    except TracingError as exc:
        return f"{type(model).__name__}.forward (not traceable by torch.fx: {exc.__cause__})"
    out = next(n for n in gm.graph.nodes if n.op == "output")
    live = _ancestors(out)  # drops shape assertions such as timm's _assert(H == img_size)
    nodes = [n for n in gm.graph.nodes if n in live and n is not out]
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    _, _, blocker = _chain(nodes, x, dict(gm.named_modules()))
    return blocker
