"""Tests for the peer baselines ISDA and Manifold Mixup (latent_aug/peers.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import tiny_split
from torch import nn

from latent_aug import CifarNet, MnistNet, list_split_points
from latent_aug.errors import (
    AlreadyWrappedError,
    ConfigError,
    LatentAugError,
    NoTrainingForwardError,
    SplitNotFoundError,
    TargetError,
    UnsupportedLayerError,
)
from latent_aug.peers import (
    INPUT_LAYER,
    ClassCovariance,
    ISDAWrapper,
    ManifoldMixupWrapper,
    build,
    sample_beta,
    wrap_isda,
    wrap_manifold_mixup,
)
from latent_aug.protocol import RunSpec, build_model, train_run

# (model factory, latent split, input shape (C, H, W)), as the protocol uses them.
CASES = [
    pytest.param(MnistNet, "fc1", (1, 28, 28), id="mnist-fc1"),
    pytest.param(CifarNet, "fc2", (3, 24, 24), id="cifar-fc2"),
]
WRAPPERS = [
    pytest.param(lambda m, s: wrap_isda(m, split=s), id="isda"),
    pytest.param(lambda m, s: wrap_manifold_mixup(m, split=s), id="mixup"),
]


def batch(shape, n: int = 8, seed: int = 0, classes: int = 10):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def make(factory, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return factory()


# -- ISDA estimator ----------------------------------------------------------------------------


def test_class_covariance_matches_population_covariance_of_the_stream():
    """Normalization: the estimate is torch.cov(..., correction=0) of every feature seen."""
    num_classes, dim = 4, 5
    est = ClassCovariance(num_classes, dim)
    g = torch.Generator().manual_seed(0)
    seen_z, seen_t = [], []
    # Uneven batches: one misses classes, one has a single sample of a class.
    for n, labels in [(7, None), (3, [0, 0, 2]), (1, [1]), (9, None), (5, [3, 3, 3, 0, 1])]:
        z = torch.randn(n, dim, generator=g) * torch.arange(1.0, dim + 1) + 3.0
        t = torch.randint(0, 3, (n,), generator=g) if labels is None else torch.tensor(labels)
        est.update(z, t)
        seen_z.append(z)
        seen_t.append(t)
    z_all, t_all = torch.cat(seen_z).double(), torch.cat(seen_t)
    for c in range(num_classes):
        zc = z_all[t_all == c]
        assert int(est.count[c]) == zc.shape[0]
        torch.testing.assert_close(est.mean[c].double(), zc.mean(0), atol=1e-5, rtol=1e-5)
        direct = torch.cov(zc.T, correction=0)
        torch.testing.assert_close(est.cov[c].double(), direct, atol=1e-4, rtol=1e-5)


def test_class_covariance_unseen_class_stays_zero():
    est = ClassCovariance(3, 2)
    est.update(torch.randn(6, 2), torch.tensor([0, 1, 0, 1, 0, 1]))
    assert int(est.count[2]) == 0
    assert torch.count_nonzero(est.cov[2]) == 0 and torch.count_nonzero(est.mean[2]) == 0
    assert torch.count_nonzero(est.cov[0]) > 0


# -- ISDA wrapper ------------------------------------------------------------------------------


def _isda_reference(y, t, weight, cov, lam):
    """The paper's formula, one sample and one class at a time."""
    out = y.clone()
    for i in range(y.shape[0]):
        for j in range(y.shape[1]):
            d = weight[j] - weight[t[i]]
            out[i, j] = y[i, j] + 0.5 * lam * d @ cov[t[i]] @ d
    return out


@pytest.mark.parametrize("factory, split, shape", CASES)
def test_isda_loss_is_ce_of_augmented_logits(factory, split, shape):
    model = make(factory)
    m = wrap_isda(model, split=split, lambda0=0.7).train()
    for seed in range(3):  # warm the estimator up
        x, t = batch(shape, n=16, seed=seed)
        m(x)
        m.aux_loss(t)
    x, t = batch(shape, n=8, seed=10)
    y = m(x)
    torch.testing.assert_close(y, model.train()(x))  # the forward returns the plain logits
    aux = m.aux_loss(t)
    head = model.fc2 if split == "fc1" else model.fc3
    ref = _isda_reference(y.detach(), t, head.weight.detach(), m.estimator.cov, 0.7)
    y_aug = m.augmented_logits(t)
    torch.testing.assert_close(y_aug.detach(), ref, atol=1e-5, rtol=1e-5)
    # The true class's logit is unchanged; the others only grow (Σ is PSD).
    rows = torch.arange(len(t))
    torch.testing.assert_close(y_aug[rows, t], y[rows, t])
    assert bool((y_aug.detach() >= y.detach() - 1e-6).all())
    total = F.cross_entropy(y, t) + aux
    torch.testing.assert_close(total, F.cross_entropy(ref, t), atol=1e-5, rtol=1e-5)
    assert float(aux.detach()) > 0


def test_isda_lambda0_zero_gives_zero_aux_but_still_estimates():
    m = wrap_isda(make(MnistNet), split="fc1", lambda0=0.0).train()
    for seed in range(2):
        x, t = batch((1, 28, 28), seed=seed)
        m(x)
        aux = m.aux_loss(t)
        assert abs(float(aux.detach())) < 1e-6
    assert int(m.estimator.count.sum()) == 16
    assert torch.count_nonzero(m.estimator.cov) > 0


def test_isda_estimator_updates_once_per_forward():
    m = wrap_isda(make(MnistNet), split="fc1").train()
    x, t = batch((1, 28, 28))
    m(x)
    m.aux_loss(t)
    m.aux_loss(t)
    assert int(m.estimator.count.sum()) == x.shape[0]


def test_isda_set_epoch_schedules_lambda():
    m = wrap_isda(make(MnistNet), split="fc1", lambda0=0.5)
    assert m.lam == 0.5  # before any set_epoch: λ0
    m.set_epoch(0, 4)
    assert m.lam == 0.0
    m.set_epoch(3, 4)
    assert m.lam == pytest.approx(0.375)
    with pytest.raises(ConfigError):
        m.set_epoch(5, 4)


def test_isda_gradient_reaches_first_conv_and_head_weight():
    model = make(MnistNet)
    m = wrap_isda(model, split="fc1").train()
    x, t = batch((1, 28, 28), n=16)
    m(x)
    m.aux_loss(t)  # estimate Σ first so the quadratic term is non-zero
    model.zero_grad()
    (F.cross_entropy(m(x), t) + m.aux_loss(t)).backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
    assert m.estimator.cov.grad is None


def test_isda_head_must_be_linear():
    model = make(MnistNet)
    with pytest.raises(UnsupportedLayerError, match="nn.Linear") as info:
        wrap_isda(model, split="conv3")
    assert isinstance(info.value, LatentAugError)
    wrap_isda(model, split="fc1")  # the failed wrap left the model untouched


def test_isda_rejects_soft_targets_and_missing_forward():
    m = wrap_isda(make(MnistNet), split="fc1").train()
    with pytest.raises(NoTrainingForwardError):
        m.aux_loss(torch.zeros(2, dtype=torch.long))
    x, _ = batch((1, 28, 28), n=2)
    m(x)
    with pytest.raises(TargetError):
        m.aux_loss(torch.full((2, 10), 0.1))


# -- Manifold Mixup ----------------------------------------------------------------------------


def _mnist_mixed_reference(model: MnistNet, x, layer, lam, perm):
    """MnistNet's forward written out, mixing after ``layer``'s activation."""

    def mix(h):
        return lam * h + (1 - lam) * h[perm]

    h = mix(x) if layer == INPUT_LAYER else x
    for name in ("conv1", "conv2", "conv3"):
        h = torch.relu(getattr(model, name)(h))
        h = mix(h) if layer == name else h
    h = torch.relu(model.fc1(h.flatten(1)))
    h = mix(h) if layer == "fc1" else h
    return model.fc2(h)


@pytest.mark.parametrize("layer", [INPUT_LAYER, "conv1", "conv2", "conv3", "fc1"])
def test_mixup_matches_handwritten_mix_at_each_layer(layer):
    model = make(MnistNet)
    m = wrap_manifold_mixup(model, split="fc1", alpha=2.0, layers=[layer]).train()
    x, t = batch((1, 28, 28))
    torch.manual_seed(3)
    out = m(x)
    draw = m.last_draw
    assert draw.layer == layer and 0 < draw.lam < 1
    assert sorted(draw.perm.tolist()) == list(range(len(x)))
    ref = _mnist_mixed_reference(model, x, layer, draw.lam, draw.perm)
    torch.testing.assert_close(out, ref)
    loss = F.cross_entropy(out, t) + m.aux_loss(t)
    expected = draw.lam * F.cross_entropy(ref, t) + (1 - draw.lam) * F.cross_entropy(
        ref, t[draw.perm]
    )
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("factory, split, shape", CASES)
def test_mixup_alpha_to_zero_is_plain_training(factory, split, shape):
    """λ ≈ 1 mixes nothing; λ ≈ 0 is the permuted batch with permuted targets."""
    model = make(factory)
    m = wrap_manifold_mixup(model, split=split, alpha=1e-6).train()
    x, t = batch(shape, n=6)
    plain = F.cross_entropy(model(x), t)
    lams, layers, permuted_draws = set(), set(), 0
    for seed in range(8):
        torch.manual_seed(seed)
        loss = F.cross_entropy(m(x), t) + m.aux_loss(t)
        lams.add(round(m.last_draw.lam, 3))
        layers.add(m.last_draw.layer)
        moved = not torch.equal(m.last_draw.perm, torch.arange(len(x)))
        permuted_draws += int(moved and m.last_draw.lam < 0.5)
        torch.testing.assert_close(loss, plain, atol=1e-5, rtol=1e-5)
    assert lams == {0.0, 1.0}  # both extremes were exercised,
    assert permuted_draws > 0  # and λ ≈ 0 with a batch that really moved
    assert len(layers) > 1


def test_mixup_default_layers_are_input_and_split_points_up_to_latent():
    model = make(CifarNet)
    points = list_split_points(model)
    m = wrap_manifold_mixup(model, split="fc2")
    assert m.layers == [INPUT_LAYER, *points[: points.index("fc2") + 1]]
    assert m.layers[-1] == "fc2" and len(m.layers) == 7
    m.unwrap()
    assert wrap_manifold_mixup(model, split="conv2").layers == [INPUT_LAYER, "conv1", "conv2"]


class TinyMlp(nn.Module):
    """Three linear layers: split points "fc1" and "fc2"."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_mixup_draws_layers_uniformly():
    m = wrap_manifold_mixup(make(TinyMlp), split="fc2").train()
    assert m.layers == [INPUT_LAYER, "fc1", "fc2"]
    x = torch.randn(2, 4)
    torch.manual_seed(0)
    counts = dict.fromkeys(m.layers, 0)
    for _ in range(90):
        m(x)
        counts[m.last_draw.layer] += 1
    assert all(c >= 15 for c in counts.values()), counts


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_sample_beta_moments(alpha):
    torch.manual_seed(0)
    v = torch.tensor([sample_beta(alpha) for _ in range(4000)])
    assert float(v.mean()) == pytest.approx(0.5, abs=0.02)
    assert float(v.var()) == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.1)


def test_mixup_gradient_reaches_first_conv_from_latent_mix():
    model = make(MnistNet)
    m = wrap_manifold_mixup(model, split="fc1", layers=["fc1"]).train()
    x, t = batch((1, 28, 28))
    (F.cross_entropy(m(x), t) + m.aux_loss(t)).backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0


def test_mixup_aux_needs_a_training_forward():
    m = wrap_manifold_mixup(make(MnistNet), split="fc1")
    x, t = batch((1, 28, 28))
    m.eval()(x)
    with pytest.raises(NoTrainingForwardError):
        m.aux_loss(t)


# -- both --------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap_fn", WRAPPERS)
@pytest.mark.parametrize("factory, split, shape", CASES)
def test_eval_mode_is_the_original_model(wrap_fn, factory, split, shape):
    model = make(factory)
    m = wrap_fn(model, split)
    x, _ = batch(shape)
    with torch.no_grad():
        assert torch.equal(m.eval()(x), model.eval()(x))


@pytest.mark.parametrize("wrap_fn", WRAPPERS)
def test_state_dict_unwrap_and_double_wrap(wrap_fn):
    model = make(MnistNet)
    m = wrap_fn(model, "fc1")
    model_keys = {f"model.{k}" for k in model.state_dict()}
    extra = set(m.state_dict()) - model_keys
    assert model_keys <= set(m.state_dict())
    assert extra == ({"estimator.mean", "estimator.cov", "estimator.count"}
                     if isinstance(m, ISDAWrapper) else set())
    with pytest.raises(AlreadyWrappedError):
        wrap_isda(model, split="fc1")
    with pytest.raises(AlreadyWrappedError):
        wrap_manifold_mixup(m, split="fc1")
    assert m.unwrap() is model
    with pytest.raises(LatentAugError):
        m(batch((1, 28, 28))[0])
    wrap_fn(model, "fc1")  # unwrapped: can be wrapped again


def test_argument_validation():
    model = make(MnistNet)
    with pytest.raises(ConfigError):
        wrap_isda(model, split="fc1", lambda0=-0.1)
    for alpha in (0.0, -1.0, float("inf"), True):
        with pytest.raises(ConfigError):
            wrap_manifold_mixup(model, split="fc1", alpha=alpha)
    with pytest.raises(SplitNotFoundError, match="'conv2'"):
        wrap_manifold_mixup(model, split="fc1", layers=["conv2", "cnv2"])
    with pytest.raises(ConfigError):
        wrap_manifold_mixup(model, split="fc1", layers=[])
    with pytest.raises(SplitNotFoundError, match="fc1"):
        wrap_isda(model, split="fc_1")
    with pytest.raises(ConfigError, match="manifold_mixup"):
        build("manifold_mixp", model, "fc1", {})
    with pytest.raises(ConfigError, match="alpha"):
        build("manifold_mixup", model, "fc1", {"alpah": 1.0})
    assert isinstance(build("isda", model, "fc1", {"lambda0": 0.1}), ISDAWrapper)


# -- the protocol trains both unchanged --------------------------------------------------------


@pytest.mark.parametrize(
    "method, options, cls",
    [
        ("isda", (("lambda0", 0.5),), ISDAWrapper),
        ("manifold_mixup", (("alpha", 1.0), ("layers", ("input", "fc1"))), ManifoldMixupWrapper),
    ],
)
def test_protocol_train_run(method, options, cls):
    spec = RunSpec("mnist", method, per_class="all", split=1, epochs=2, options=options,
                   batch_size=10)
    assert isinstance(build_model(spec), cls)
    result = train_run(spec, tiny_split(n=30, n_eval=10))
    assert len(result.val_errors) == 2 and len(result.train_losses) == 2
    assert all(torch.isfinite(torch.tensor(result.train_losses)))
    assert 0.0 <= result.test_error <= 100.0 and result.best_epoch in (1, 2)
