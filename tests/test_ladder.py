"""Tests for the fully supervised ladder network baseline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from latent_aug.errors import ConfigError, LatentAugError
from latent_aug.ladder import LadderNetwork, VanillaCombinator

SIZES = (784, 32, 16, 10)
COSTS = (1000.0, 10.0, 0.1, 0.1)


def make_model(noise_std: float = 0.3, seed: int = 0) -> LadderNetwork:
    torch.manual_seed(seed)
    return LadderNetwork(SIZES, noise_std=noise_std, denoising_costs=COSTS)


def batch(n: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def clean_reference(model: LadderNetwork, x: torch.Tensor, *, batch_stats: bool) -> torch.Tensor:
    """Clean encoder written out from the parameters, independently of the module's code."""
    h = x.reshape(len(x), -1)
    n_layers = len(model.layer_sizes) - 1
    for l in range(n_layers):
        z_pre = h @ model.encoder[l].weight.T
        if batch_stats:
            mean, var = z_pre.mean(0), z_pre.var(0, unbiased=False)
        else:
            mean, var = model.batch_norms[l].running_mean, model.batch_norms[l].running_var
        z = (z_pre - mean) / torch.sqrt(var + model.bn_eps)
        h = torch.relu(z + model.beta[l]) if l < n_layers - 1 else z
    return model.gamma * (h + model.beta[-1])


def test_eval_is_deterministic_clean_path_with_running_stats():
    model = make_model()
    x, _ = batch()
    model.train()
    for _ in range(3):  # move the running averages away from their (0, 1) start
        model(x)
    model.eval()
    with torch.no_grad():
        out1, out2 = model(x), model(x)
        ref = clean_reference(model, x, batch_stats=False)
    assert torch.equal(out1, out2)
    torch.testing.assert_close(out1, ref)
    # Evaluation must not touch the running averages.
    mean_before = model.batch_norms[0].running_mean.clone()
    model(x)
    assert torch.equal(model.batch_norms[0].running_mean, mean_before)


def test_training_forward_returns_corrupted_logits():
    x, _ = batch()
    torch.manual_seed(5)
    noisy_out = make_model(noise_std=0.3).train()(x)
    model = make_model(noise_std=0.0).train()
    out = model(x)
    ref = clean_reference(model, x, batch_stats=True)
    # Without noise the corrupted path is the clean path with batch statistics ...
    torch.testing.assert_close(out, ref)
    # ... and with noise it is not (same weights, same seed for init).
    assert not torch.allclose(noisy_out, ref, atol=1e-3)


def test_running_stats_follow_clean_batch_moments():
    model = make_model()
    x, _ = batch()
    model.train()(x)
    z_pre = x.reshape(len(x), -1) @ model.encoder[0].weight.T
    momentum = model.batch_norms[0].momentum
    torch.testing.assert_close(model.batch_norms[0].running_mean, momentum * z_pre.mean(0))


def test_training_loss_and_gradients_finite_on_every_parameter():
    model = make_model().train()
    with torch.no_grad():  # the default init multiplies a2, a3, a7, a8 by zero; move off it
        for comb in model.combinators:
            comb.a.add_(0.1 * torch.randn_like(comb.a))
    x, t = batch()
    logits = model(x)
    assert logits.shape == (64, 10)
    aux = model.aux_loss(t)
    assert aux.dim() == 0 and torch.isfinite(aux) and aux > 0
    assert len(model.layer_costs) == len(SIZES)
    assert sum(model.layer_costs) == pytest.approx(aux.item(), rel=1e-5)
    loss = F.cross_entropy(logits, t) + aux
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_adam_steps_reduce_total_loss():
    model = make_model().train()
    x, t = batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    totals, supervised = [], []
    for _ in range(20):
        torch.manual_seed(0)  # same noise every step: compare like with like
        ce = F.cross_entropy(model(x), t)
        loss = ce + model.aux_loss(t)
        totals.append(loss.item())
        supervised.append(ce.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert totals[-1] < 0.5 * totals[0], totals
    assert supervised[-1] < 0.5 * supervised[0], supervised


def test_aux_loss_before_training_forward_raises():
    model = make_model()
    with pytest.raises(RuntimeError, match="training-mode forward"):
        model.aux_loss()
    model.eval()(batch()[0])
    with pytest.raises(LatentAugError):
        model.aux_loss()


@pytest.mark.parametrize("sizes", [(12, 7, 3), (784, 20, 10), (6, 5)])
def test_layer_sizes_are_honoured(sizes):
    costs = (1.0,) * len(sizes)
    model = LadderNetwork(sizes, denoising_costs=costs)
    shapes = [tuple(m.weight.shape) for m in model.encoder]
    assert shapes == [(n_out, n_in) for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True)]
    assert [tuple(m.weight.shape) for m in model.decoder] == [(i, o) for o, i in shapes]
    assert [c.a.shape for c in model.combinators] == [(10, n) for n in sizes]
    x = torch.randn(8, sizes[0])
    assert model.train()(x).shape == (8, sizes[-1])
    assert model.eval()(x).shape == (8, sizes[-1])
    with pytest.raises(ValueError, match=f"does not flatten to \\(B, {sizes[0]}\\)"):
        model(torch.randn(8, sizes[0] + 1))


def test_default_architecture_is_the_papers():
    model = LadderNetwork()
    assert model.layer_sizes == (784, 1000, 500, 250, 250, 250, 10)
    assert model.denoising_costs == (1000.0, 10.0, 0.1, 0.1, 0.1, 0.1, 0.1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"layer_sizes": (784,), "denoising_costs": (1.0,)},
        {"layer_sizes": (784, 10), "denoising_costs": (1.0,)},
        {"layer_sizes": (784, 0, 10), "denoising_costs": (1.0, 1.0, 1.0)},
        {"layer_sizes": (784, 10), "denoising_costs": (1.0, 1.0), "noise_std": -0.1},
    ],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(ConfigError):
        LadderNetwork(**kwargs)


def test_vanilla_combinator_formula():
    comb = VanillaCombinator(4)
    with torch.no_grad():
        comb.a.copy_(torch.randn(10, 4))
    z, u = torch.randn(3, 4), torch.randn(3, 4)
    a = comb.a.detach()
    mu = a[0] * torch.sigmoid(a[1] * u + a[2]) + a[3] * u + a[4]
    v = a[5] * torch.sigmoid(a[6] * u + a[7]) + a[8] * u + a[9]
    torch.testing.assert_close(comb(z, u), (z - mu) * v + mu)
    # Reference initialization: a2 = a7 = 1, the rest 0, so ẑ starts at 0.
    fresh = VanillaCombinator(4)
    assert torch.equal(fresh(z, u), torch.zeros_like(z))
