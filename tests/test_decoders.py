"""Tests of ``latent_aug.decoders``: tied mirrors are true transposes of the encoder's layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import CASE_BY_NAME, ShrinkNet, cases
from torch import Tensor, nn

from latent_aug import UnsupportedLayerError, register_decoder, wrap
from latent_aug import decoders as D
from latent_aug.decoders import (
    LearnedInputDecoder,
    MirrorContext,
    TiedConv,
    TiedLinear,
    Unflatten,
    Unpool,
    mirror,
    registered_names,
)


def inner(a: Tensor, b: Tensor) -> Tensor:
    return (a.double() * b.double()).sum()


# ----------------------------------------------------------------------------------------
# Weight layers: the mirror is the adjoint (transpose) of the layer, with its own weight
# ----------------------------------------------------------------------------------------


def test_tied_linear_is_the_transpose():
    lin = nn.Linear(5, 3)
    dec = TiedLinear(lin, bias=False)
    x, v = torch.randn(4, 5), torch.randn(4, 3)
    out = dec(v, x)
    assert out.shape == x.shape
    # <W x, v> == <x, W^T v>
    torch.testing.assert_close(inner(F.linear(x, lin.weight), v), inner(x, out))
    assert dec.source.weight is lin.weight
    assert list(dec.parameters()) == []
    with_bias = TiedLinear(lin, bias=True)
    assert [tuple(p.shape) for p in with_bias.parameters()] == [(5,)]


CONVS = {
    "2d_stride2_even": (nn.Conv2d(3, 4, 3, stride=2, padding=1), (2, 3, 8, 8)),
    "2d_stride2_odd": (nn.Conv2d(3, 4, 3, stride=2, padding=1), (2, 3, 7, 9)),
    "2d_5x5_pad2": (nn.Conv2d(3, 5, 5, padding=2), (2, 3, 6, 6)),
    "2d_no_pad_stride3": (nn.Conv2d(2, 3, 3, stride=3), (2, 2, 11, 10)),
    "2d_dilation": (nn.Conv2d(2, 3, 3, padding=2, dilation=2), (2, 2, 9, 9)),
    "2d_groups": (nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 5, 5)),
    "2d_same": (nn.Conv2d(2, 3, 3, padding="same"), (2, 2, 6, 7)),
    "2d_valid": (nn.Conv2d(2, 3, 3, padding="valid"), (2, 2, 6, 7)),
    "2d_rect_kernel": (nn.Conv2d(2, 3, (3, 1), stride=(2, 1), padding=(1, 0)), (2, 2, 7, 4)),
    "1d": (nn.Conv1d(2, 3, 3, stride=2, padding=1), (2, 2, 9)),
    "3d": (nn.Conv3d(1, 2, 3, stride=2, padding=1), (2, 1, 5, 6, 5)),
    "3d_unbatched": (nn.Conv3d(2, 3, 3, stride=2, padding=1), (2, 5, 6, 5)),  # 4-D, not 2-D
    "2d_unbatched": (nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 7, 9)),
}


@pytest.mark.parametrize("name", list(CONVS))
def test_tied_conv_is_the_transpose_and_restores_the_input_size(name: str):
    conv, shape = CONVS[name]
    dec = TiedConv(conv, bias=False)
    x = torch.randn(shape, dtype=torch.float64)  # the decoder casts the weight to v's dtype
    y = conv._conv_forward(x, conv.weight.double(), None)  # the layer without its bias
    v = torch.randn(y.shape, dtype=torch.float64)
    out = dec(v, x)
    assert out.shape == x.shape  # output_padding recovers odd sizes that stride would lose
    torch.testing.assert_close(inner(y, v), inner(x, out), rtol=1e-10, atol=1e-10)
    assert dec.source.weight is conv.weight


def test_tied_conv_bias_is_per_input_channel():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    dec = TiedConv(conv, bias=True)
    with torch.no_grad():
        dec.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    x = torch.randn(1, 3, 5, 5)
    out = dec(torch.zeros(1, 4, 5, 5), x)
    assert torch.equal(out[0, 1], torch.full((5, 5), 2.0))


@pytest.mark.parametrize("cpu_kernels", [True, False])
@pytest.mark.parametrize("batched", [True, False, "empty"])
@pytest.mark.parametrize("out_channels", [3, 1])
def test_tied_conv_cpu_fast_path_matches_the_fused_transpose(
    cpu_kernels: bool, batched: bool | str, out_channels: int
):
    # On CPU the bias is added after the transpose, 4-D input may go channels_last, and a
    # single-channel output uses the phase kernel (speed); values and gradients must equal one
    # conv_transpose2d call with the bias fused.
    conv = nn.Conv2d(out_channels, 4, 3, stride=2, padding=1)
    dec = TiedConv(conv, bias=True)
    dec.cpu_kernels = cpu_kernels
    with torch.no_grad():
        dec.bias.normal_()
    n = 0 if batched == "empty" else 2  # an empty batch must work too
    x = torch.randn(n, out_channels, 7, 9) if batched else torch.randn(out_channels, 7, 9)
    v = torch.randn((n, 4, 4, 5) if batched else (4, 4, 5), requires_grad=True)
    out = dec(v, x)
    ref = F.conv_transpose2d(v, conv.weight, dec.bias, stride=2, padding=1, output_padding=0)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (v, conv.weight, dec.bias), g)
    refs = torch.autograd.grad(ref, (v, conv.weight, dec.bias), g)
    for a, b in zip(grads, refs):
        torch.testing.assert_close(a, b)


def _layout(t: Tensor) -> str:
    if t.dim() != 4 or t.is_contiguous():
        return "contiguous"
    return "channels_last" if t.is_contiguous(memory_format=torch.channels_last) else "other"


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_decoder_activations_see_one_layout_in_their_backward(cpu_kernels: bool):
    # The CPU transposes want channels_last (several output channels) or contiguous (one)
    # input; the decoder converts before the activation in front of them, so each ReLU's
    # backward gets a gradient in the layout of the tensor it saved (mixed layouts run an
    # elementwise kernel many times slower).
    from torch.utils._python_dispatch import TorchDispatchMode

    from latent_aug import MnistNet

    seen: list[tuple[str, str]] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.threshold_backward.default:
                seen.append((_layout(args[0]), _layout(args[1])))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = wrap(MnistNet(), split="fc1")
    for m in model.modules():
        if isinstance(m, TiedConv):
            m.cpu_kernels = cpu_kernels
    x, t = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    logits = model(x)
    loss = F.cross_entropy(logits, t) + model.aux_loss(t)
    with Record():
        loss.backward()
    decoder_side = [pair for pair in seen if pair[1] == "channels_last"]
    assert len(seen) == 8  # 4 ReLUs in the encoder, 3 in the input decoder, 1 in g2'
    assert all(grad == saved for grad, saved in seen), seen
    # before the 96->64, 64->32 and 32->1 transposes (all three run on channels_last input)
    assert len(decoder_side) == (3 if cpu_kernels else 0)


def test_tied_conv_preferred_layout():
    wide, single = TiedConv(nn.Conv2d(3, 4, 3), bias=True), TiedConv(nn.Conv2d(1, 4, 3), bias=True)
    v = torch.randn(2, 4, 5, 5)
    assert wide.preferred_layout(v).is_contiguous(memory_format=torch.channels_last)
    kernels = [single._cpu_kernel(t) for t in (v, v.double(), v.half())]
    assert kernels == ["phase", "phase", "onednn"]
    assert single.preferred_layout(v).is_contiguous(memory_format=torch.channels_last)
    assert single.preferred_layout(v.double()).is_contiguous(memory_format=torch.channels_last)
    assert single.preferred_layout(v.half()).is_contiguous()  # oneDNN path: left as it is
    wide.cpu_kernels = False
    assert wide.preferred_layout(v) is v
    assert wide.preferred_layout(v[0]) is not None  # unbatched input passes unchanged
    assert wide.preferred_layout(v[0]).dim() == 3


@pytest.mark.parametrize(
    "conv",
    [nn.Conv2d(2, 3, 4, padding="same"), nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")],
    ids=["same_even_kernel", "reflect_padding"],
)
def test_conv_without_a_tied_transpose_is_rejected(conv: nn.Conv2d):
    with pytest.raises(UnsupportedLayerError) as info:
        TiedConv(conv, bias=True)
    assert isinstance(info.value, TypeError)


def test_decoder_reads_the_weight_at_call_time():
    lin = nn.Linear(4, 3)
    dec = TiedLinear(lin, bias=False)
    v, x = torch.randn(2, 3), torch.randn(2, 4)
    before = dec(v, x)
    with torch.no_grad():
        lin.weight.mul_(2)
    torch.testing.assert_close(dec(v, x), 2 * before)
    lin.load_state_dict({"weight": torch.zeros(3, 4), "bias": torch.zeros(3)})
    assert torch.equal(dec(v, x), torch.zeros(2, 4))


@cases
def test_wrapped_decoders_own_only_biases(case):
    w = wrap(case.factory(), split=case.split)
    for decoder in (w.input_decoder, w.head_decoder):
        names = [n for n, _ in decoder.named_parameters()]
        assert names and all(n.endswith(".bias") for n in names), names
    w = wrap(case.factory(), split=case.split, decoder_bias=False)
    assert list(w.input_decoder.parameters()) == []
    assert list(w.head_decoder.parameters()) == []


@cases
def test_reconstruct_input_has_the_input_shape(case):
    w = wrap(case.factory(), split=case.split)
    x, _ = case.batch(3)
    with torch.no_grad():
        z = w.encode(x)
        assert w.reconstruct_input(z, x).shape == x.shape
        # one example input gives the shapes for a whole batch of latents
        assert w.reconstruct_input(z, x[:1]).shape == x.shape


# ----------------------------------------------------------------------------------------
# Non-weight layers
# ----------------------------------------------------------------------------------------


def test_unpool_restores_the_recorded_size():
    x = torch.randn(2, 3, 7, 9)
    pooled = F.max_pool2d(x, 2)
    out = Unpool()(pooled, x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, F.interpolate(pooled, size=(7, 9), mode="nearest"))
    g = F.adaptive_avg_pool2d(x, 1)
    for v in (g, g.flatten(1)):  # global pooling, with or without the 1x1 dims
        out = Unpool()(v, x)
        assert out.shape == x.shape
        assert torch.equal(out[:, :, 3, 5], g[:, :, 0, 0])


def test_unflatten_restores_the_recorded_shape():
    x = torch.randn(2, 3, 4, 5)
    assert torch.equal(Unflatten()(x.flatten(1), x), x)


def test_inplace_activation_is_mirrored_out_of_place():
    relu = nn.ReLU(inplace=True)
    kind, step = mirror(relu, MirrorContext(), name="relu")
    assert kind == "activation"
    v = torch.randn(3, 4)
    original = v.clone()
    out = step(v, v)
    assert torch.equal(v, original)
    assert torch.equal(out, original.clamp(min=0))
    assert relu.inplace  # the user's module is not changed


@pytest.mark.parametrize("source", [nn.ReLU(), nn.Tanh()], ids=["relu", "tanh"])
def test_linear_decoder_activation_drops_activations(source: nn.Module):
    v = torch.randn(3, 4)
    _, mirrored = mirror(source, MirrorContext(activation="mirror"), name="a")
    _, dropped = mirror(source, MirrorContext(activation="linear"), name="a")
    torch.testing.assert_close(mirrored(v, v), source(v))
    assert torch.equal(dropped(v, v), v)


@pytest.mark.parametrize(
    "source",
    [nn.BatchNorm2d(3), nn.Dropout(0.5), nn.Identity(), nn.LayerNorm(4)],
    ids=["batchnorm", "dropout", "identity", "layernorm"],
)
def test_normalization_and_dropout_mirror_as_identity(source: nn.Module):
    kind, step = mirror(source, MirrorContext(), name="n")
    v = torch.randn(2, 3, 4, 4)
    assert kind == "identity"
    assert torch.equal(step(v, v), v)


def test_learned_input_decoder_output_shape_for_odd_sizes():
    dec = LearnedInputDecoder(latent_dim=12, input_shape=(3, 10, 13))
    assert dec(torch.randn(5, 12)).shape == (5, 3, 10, 13)
    assert sum(p.numel() for p in dec.parameters()) > 0


# ----------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------


def test_unsupported_layer_error_names_layer_and_lists_registered():
    with pytest.raises(UnsupportedLayerError) as info:
        mirror(nn.Hardshrink(), MirrorContext(), name="encoder.shrink")
    msg = str(info.value)
    assert isinstance(info.value, TypeError)
    assert "'encoder.shrink'" in msg and "Hardshrink" in msg
    assert "Linear" in msg and "Conv2d" in msg and "register_decoder" in msg
    names = registered_names()
    assert names == sorted(names)
    assert {"Linear", "Conv1d", "Conv2d", "Conv3d", "ReLU", "MaxPool2d", "Flatten"} <= set(names)


class _Negate(nn.Module):
    """A mirror step for Hardshrink, only to see that the registered factory is used."""

    calls = 0

    def forward(self, v: Tensor, x_in: Tensor) -> Tensor:
        type(self).calls += 1
        return -v


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made in a test vanish after it."""
    monkeypatch.setattr(D, "_REGISTRY", dict(D._REGISTRY))




def test_register_decoder_for_a_torch_layer(scratch_registry):
    with pytest.raises(UnsupportedLayerError):
        wrap(ShrinkNet(), split="fc2", input_decoder="tied")

    @register_decoder(nn.Hardshrink)
    def _mirror_shrink(source, ctx):
        return "activation", _Negate()

    assert "Hardshrink" in registered_names()
    w = wrap(ShrinkNet(), split="fc2", input_decoder="tied")
    assert any(isinstance(s, _Negate) for s in w.input_decoder.steps)
    x, t = torch.randn(4, 6), torch.randint(0, 3, (4,))
    _Negate.calls = 0
    w.train()(x)
    assert _Negate.calls == 1
    assert torch.isfinite(w.aux_loss(t))


class _Scale(nn.Module):
    """A user-defined layer: ``x * s`` with a learned per-feature scale."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.full((n,), 2.0))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.s


class _ScaleStep(nn.Module):
    def __init__(self, source: _Scale) -> None:
        super().__init__()
        object.__setattr__(self, "source", source)

    def forward(self, v: Tensor, x_in: Tensor) -> Tensor:
        return v * self.source.s  # a diagonal map is its own transpose


class _ScaleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.scale = _Scale(8)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.scale(self.fc1(x))))))


def test_register_decoder_for_a_user_module(scratch_registry):
    @register_decoder(_Scale)
    def _mirror_scale(source, ctx):
        return "affine", _ScaleStep(source)

    model = _ScaleNet()
    w = wrap(model, split="fc2", input_decoder="tied")
    steps = [s for s in w.input_decoder.steps if isinstance(s, _ScaleStep)]
    assert len(steps) == 1 and steps[0].source is model.scale
    x, t = torch.randn(4, 6), torch.randint(0, 3, (4,))
    w.train()(x)
    assert torch.isfinite(w.aux_loss(t))


def test_mnist_input_decoder_mirrors_the_encoder_in_reverse():
    case = CASE_BY_NAME["mnist"]
    model = case.factory()
    w = wrap(model, split=case.split)
    sources = [s.source for s in w.input_decoder.steps if hasattr(s, "source")]
    assert sources == [model.fc1, model.conv3, model.conv2, model.conv1]
