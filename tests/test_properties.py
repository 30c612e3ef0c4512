"""Property tests: eval identity, finite loss terms and the scale of the section-4.2 noise.

Hypothesis draws batch sizes (1..16), MLP widths, noise std (0..1) and the dtype the model is
built in; examples are few (tiny MLPs) so the file stays fast on a busy CPU.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from latent_aug import wrap
from latent_aug.noise import minmax_noise, perturb_minmax, value_range

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)
DTYPES = st.sampled_from([torch.float32, torch.float64])
STD = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
NUM_CLASSES = 3




def _mlp(in_dim: int, hidden: list[int], dtype: torch.dtype, seed: int = 0) -> nn.Sequential:
    """``(B, in_dim) -> (B, NUM_CLASSES)``: Linear/ReLU per hidden width, then a classifier."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = in_dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, NUM_CLASSES))
    return nn.Sequential(*layers).to(dtype)


def _last_hidden(hidden: list[int]) -> str:
    """Name of the last hidden Linear (z = its ReLU output)."""
    return str(2 * (len(hidden) - 1))


def _span(v: Tensor) -> Tensor:
    """``hi - lo`` of each row of ``v: (B, D)``, shaped ``(B, 1)`` (written out, not imported)."""
    return v.max(dim=1, keepdim=True).values - v.min(dim=1, keepdim=True).values


mlp_case = st.fixed_dictionaries(
    {
        "batch": st.integers(1, 16),
        "in_dim": st.integers(2, 10),
        "hidden": st.lists(st.integers(1, 12), min_size=1, max_size=3),
        "std": STD,
        "dtype": DTYPES,
        "perturb": st.sampled_from(["class_conditional", "random", None]),
        "reconstruction": st.sampled_from(["split", "input", "all"]),
        "noise_range": st.sampled_from(["sample", "batch"]),
    }
)


# ----------------------------------------------------------------------------------------------
# The wrapper on random MLPs
# ----------------------------------------------------------------------------------------------


@SETTINGS
@given(case=mlp_case)
def test_eval_identity_and_finite_terms(case: dict) -> None:
    model = _mlp(case["in_dim"], case["hidden"], case["dtype"])
    reference = copy.deepcopy(model).eval()
    wrapped = wrap(
        model,
        split=_last_hidden(case["hidden"]),
        noise_std=case["std"],
        perturb=case["perturb"],
        reconstruction=case["reconstruction"],
        noise_range=case["noise_range"],
    )
    gen = torch.Generator().manual_seed(case["batch"])
    x = torch.randn(case["batch"], case["in_dim"], generator=gen, dtype=case["dtype"])
    t = torch.randint(0, NUM_CLASSES, (case["batch"],), generator=gen)

    wrapped.train()
    logits = wrapped(x)
    assert logits.shape == (case["batch"], NUM_CLASSES)
    assert logits.dtype == case["dtype"]
    terms = wrapped.losses(t)
    for name, value in terms._asdict().items():
        assert value.dim() == 0, name
        assert torch.isfinite(value).item(), f"{name} = {value}"
    cfg = wrapped.config
    expected_total = (
        cfg.lambda1 * terms.recon_input
        + cfg.lambda2 * (terms.recon_latent + terms.recon_hidden)
        + cfg.perturbed_weight * terms.nll_perturbed
    )
    torch.testing.assert_close(terms.total, expected_total)
    (F.cross_entropy(logits, t) + terms.total).backward()
    for name, p in wrapped.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name

    # Eval mode is the original model, bit for bit, even after a training step's forward.
    wrapped.eval()
    with torch.no_grad():
        assert torch.equal(wrapped(x), reference(x))
        assert torch.equal(wrapped(x), wrapped.model(x))


@SETTINGS
@given(
    batch=st.integers(1, 16),
    hidden=st.lists(st.integers(1, 12), min_size=1, max_size=3),
    dtype=DTYPES,
    kind=st.sampled_from(["class_conditional", "random"]),
)
def test_zero_noise_std_gives_the_clean_nll(
    batch: int, hidden: list[int], dtype: torch.dtype, kind: str
) -> None:
    """With σ = 0, ze = 0: the perturbed pass is the clean pass, so NLL(ŷ, t) = NLL(y, t)."""
    wrapped = wrap(_mlp(5, hidden, dtype), split=_last_hidden(hidden), noise_std=0.0, perturb=kind)
    x = torch.randn(batch, 5, dtype=dtype)
    t = torch.arange(batch) % NUM_CLASSES
    logits = wrapped.train()(x)
    nll = wrapped.losses(t).nll_perturbed
    clean = F.cross_entropy(logits.double(), t)
    torch.testing.assert_close(nll.double(), clean, atol=1e-5, rtol=1e-5)


@SETTINGS
@given(batch=st.integers(1, 16), std=STD.filter(lambda s: s > 0.01), dtype=DTYPES,
       y_space=st.sampled_from(["logits", "probs"]))
def test_class_conditional_noise_is_eq9_with_the_stated_scale(
    batch: int, std: float, dtype: torch.dtype, y_space: str
) -> None:
    """With a linear head decoder g2'(v) = v W + b, Eq. 9 gives ze = ye W exactly, where
    ``ye = ε · σ · (hi - lo)`` of the base vector y (logits or softmax probabilities) per
    sample and ε the global RNG's next ``randn``."""
    hidden = [7, 4]
    wrapped = wrap(
        _mlp(6, hidden, dtype), split=_last_hidden(hidden), noise_std=std,
        decoder_activation="linear", y_space=y_space,
    )
    x = torch.randn(batch, 6, dtype=dtype)
    torch.manual_seed(123)
    z, z_perturbed = wrapped.perturb_latent(x, "class_conditional")
    y = wrapped.head_logits(z)
    if y_space == "probs":
        y = y.softmax(dim=1)
    torch.manual_seed(123)
    eps = torch.randn(y.shape, dtype=dtype)
    ye = eps * std * _span(y)
    weight = wrapped.model[4].weight  # the head Linear (4 -> 3), y = z W^T + b
    atol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(z_perturbed - z, ye @ weight, atol=atol, rtol=1e-4)


@SETTINGS
@given(batch=st.integers(1, 16), std=STD, dtype=DTYPES)
def test_random_latent_noise_has_the_stated_scale(
    batch: int, std: float, dtype: torch.dtype
) -> None:
    wrapped = wrap(_mlp(6, [5], dtype), split="0", noise_std=std, perturb="random")
    x = torch.randn(batch, 6, dtype=dtype)
    torch.manual_seed(7)
    z, z_perturbed = wrapped.perturb_latent(x, "random")
    torch.manual_seed(7)
    expected = torch.randn(z.shape, dtype=dtype) * std * _span(z)
    atol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(z_perturbed - z, expected, atol=atol, rtol=1e-4)


def test_batch_of_one_gives_finite_terms_for_every_method() -> None:
    x = torch.randn(1, 6)
    t = torch.tensor([2])
    for perturb in ("class_conditional", "random", None):
        for recon in ("split", "input", "all"):
            for noise_range in ("sample", "batch"):
                wrapped = wrap(
                    _mlp(6, [5, 4], torch.float32), split="2", perturb=perturb,
                    reconstruction=recon, noise_range=noise_range, check_finite=True,
                )
                wrapped.train()(x)
                terms = wrapped.losses(t)  # check_finite raises on NaN/inf
                assert all(torch.isfinite(v) for v in terms), (perturb, recon, noise_range)


def test_constant_input_gives_finite_terms() -> None:
    """x = 0 through bias-free-at-init layers gives a constant z and y: zero span, no NaN."""
    model = _mlp(6, [5], torch.float32)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
    for perturb in ("class_conditional", "random"):
        wrapped = wrap(copy.deepcopy(model), split="0", perturb=perturb, noise_std=0.5)
        wrapped.train()(torch.zeros(3, 6))
        terms = wrapped.losses(torch.tensor([0, 1, 2]))
        assert all(torch.isfinite(v) for v in terms), perturb


def test_wrapper_parameters_live_on_the_model_device() -> None:
    model = _mlp(6, [5], torch.float32).to("meta")
    wrapped = wrap(model, split="0")
    for name, p in wrapped.named_parameters():
        assert p.device.type == "meta", name
    logits = wrapped.train()(torch.empty(3, 6, device="meta"))
    assert logits.shape == (3, NUM_CLASSES)


# ----------------------------------------------------------------------------------------------
# latent_aug.noise.minmax_noise: the formula, exactly and statistically
# ----------------------------------------------------------------------------------------------


@SETTINGS
@given(
    batch=st.integers(1, 16),
    dim=st.integers(1, 12),
    std=STD,
    dtype=DTYPES,
    seed=st.integers(0, 2**31 - 1),
)
def test_minmax_noise_formula_against_randn(
    batch: int, dim: int, std: float, dtype: torch.dtype, seed: int
) -> None:
    """noise = ε · σ · (hi - lo) per sample, with ε the generator's next ``randn``."""
    v = torch.randn(batch, dim, dtype=dtype, generator=torch.Generator().manual_seed(seed + 1))
    v = v * torch.linspace(0.1, 10.0, batch, dtype=dtype)[:, None]  # different spans per row
    noise = minmax_noise(v, std, generator=torch.Generator().manual_seed(seed))
    eps = torch.randn(v.shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    span = _span(v)
    assert noise.shape == v.shape and noise.dtype == dtype
    torch.testing.assert_close(noise, eps * std * span)
    # De-scaled noise divided by the span is ε·σ (only where the span is not zero).
    rows = span[:, 0] > 0
    torch.testing.assert_close(noise[rows] / span[rows], eps[rows] * std)

    # The paper's recipe, written out: scale to [0, 1], add N(0, σ²), de-scale.
    lo = v.min(dim=1, keepdim=True).values
    scaled = (v - lo) / span
    paper = lo + (scaled + eps * std) * span
    perturbed = perturb_minmax(v, std, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(perturbed[rows], paper[rows])

    # per="batch": one span for the whole batch.
    noise_b = minmax_noise(v, std, per="batch", generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(noise_b, eps * std * (v.max() - v.min()))


def test_minmax_noise_on_images_uses_the_span_of_each_sample() -> None:
    v = torch.rand(4, 2, 3, 3) * torch.tensor([1.0, 2.0, 5.0, 0.0]).view(4, 1, 1, 1)
    span = value_range(v)
    assert span.shape == (4, 1, 1, 1)
    torch.testing.assert_close(span.flatten(), v.flatten(1).amax(1) - v.flatten(1).amin(1))
    noise = minmax_noise(v, 0.3, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(v.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(noise, eps * 0.3 * span)
    assert torch.equal(noise[3], torch.zeros_like(noise[3]))  # the constant sample


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("std", [0.05, 0.2, 1.0])
def test_minmax_noise_statistics(dtype: torch.dtype, std: float) -> None:
    """On 1M draws, noise / (hi - lo) has mean 0, std σ and Gaussian tails."""
    batch, dim = 2000, 500
    gen = torch.Generator().manual_seed(2024)
    # Rows with very different offsets and spans: the normalized noise must not depend on them.
    scale = torch.logspace(-3, 3, batch, dtype=dtype)[:, None]
    v = torch.rand(batch, dim, dtype=dtype, generator=gen) * scale + 100 * scale
    noise = minmax_noise(v, std, generator=gen)
    eps = noise / _span(v)  # (B, D), should be N(0, σ²)
    n = eps.numel()
    mean, sd = eps.mean().item(), eps.std().item()
    assert abs(mean) < 5 * std / math.sqrt(n)
    assert abs(sd / std - 1) < 5 / math.sqrt(2 * n)
    # Per-sample std does not drift with the row's span (first vs last 100 rows).
    row_sd = eps.std(dim=1)
    assert abs(row_sd[:100].mean().item() / std - 1) < 0.01
    assert abs(row_sd[-100:].mean().item() / std - 1) < 0.01
    # Gaussian mass within 1σ and 2σ.
    within1 = (eps.abs() < std).double().mean().item()
    within2 = (eps.abs() < 2 * std).double().mean().item()
    assert abs(within1 - 0.682689) < 0.003
    assert abs(within2 - 0.954500) < 0.002


@pytest.mark.parametrize("per", ["sample", "batch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constant_vector_gives_zero_noise_and_no_nan(per: str, dtype: torch.dtype) -> None:
    v = torch.full((5, 7), 3.25, dtype=dtype)
    noise = minmax_noise(v, 0.7, per=per)
    assert torch.equal(noise, torch.zeros_like(v))
    assert torch.equal(perturb_minmax(v, 0.7, per=per), v)
    one = torch.full((1, 7), -2.0, dtype=dtype)  # a batch of one constant vector
    assert torch.equal(minmax_noise(one, 1.0, per=per), torch.zeros_like(one))


def test_constant_row_in_a_varying_batch_gets_no_noise() -> None:
    v = torch.randn(4, 9)
    v[2] = 1.5
    noise = minmax_noise(v, 0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(noise[2], torch.zeros(9))
    assert (noise[[0, 1, 3]] != 0).all()
    assert torch.isfinite(noise).all()


def _grouped(layers: list[nn.Module], cuts: list[int]) -> nn.Sequential:
    """``layers`` as a Sequential of Sequentials, a new group starting at each index of
    ``cuts`` (groups nest one level: what a staged network looks like to named_modules)."""
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(layers))), len(layers)]
    return nn.Sequential(*(nn.Sequential(*layers[a:b]) for a, b in zip(bounds, bounds[1:])))


@SETTINGS
@given(hidden=st.lists(st.integers(1, 8), min_size=1, max_size=3),
       cuts=st.lists(st.integers(1, 6), max_size=3), batch=st.integers(1, 8))
def test_a_container_split_takes_the_value_leaving_the_container(
    hidden: list[int], cuts: list[int], batch: int
) -> None:
    """For any grouping of an MLP into stages, every listed container is a split point whose
    z is exactly what the container returns (seen by a forward hook)."""
    from latent_aug import list_split_points

    model = _grouped(list(_mlp(5, hidden, torch.float32)), cuts)
    x = torch.randn(batch, 5)
    containers = [name for name in list_split_points(model)
                  if isinstance(model.get_submodule(name), nn.Sequential)]
    assert containers == [str(i) for i in range(len(model) - 1)]  # every stage but the last
    for name in containers:
        seen: list[Tensor] = []
        handle = model.get_submodule(name).register_forward_hook(
            lambda mod, inp, out, seen=seen: seen.append(out))
        reference = model.eval()(x)
        handle.remove()
        wrapped = wrap(model, split=name, latent_after_activation=False).eval()
        with torch.no_grad():
            assert torch.equal(wrapped(x), reference)
            assert torch.equal(wrapped.encode(x), seen[0])
        wrapped.unwrap()
