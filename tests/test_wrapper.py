"""Tests of ``latent_aug.wrap`` / ``SemanticNoiseWrapper`` over the table in ``models.py``."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from gloo import free_port, leave_passed_worker
from models import (
    CASE_BY_NAME,
    CASES,
    MLP,
    Case,
    ResBlock,
    ResidualCNN,
    ShrinkNet,
    StagedCNN,
    cases,
)
from torch import Tensor, nn

import latent_aug
from latent_aug import (
    AlreadyWrappedError,
    ConfigError,
    LatentAugError,
    MnistNet,
    NonFiniteLossError,
    NotACutPointError,
    NoTrainingForwardError,
    SemanticNoiseConfig,
    SemanticNoiseWrapper,
    SplitNotFoundError,
    TargetError,
    UnsupportedLayerError,
    list_split_points,
    wrap,
)
from latent_aug.protocol import METHODS

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def train_step(w: SemanticNoiseWrapper, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """One training forward: ``(logits (B, K), loss = CE + aux)``."""
    w.train()
    logits = w(x)
    return logits, F.cross_entropy(logits, t) + w.aux_loss(t)


def decoder_bias(w: SemanticNoiseWrapper, decoder: str) -> nn.Parameter:
    """The single bias parameter of ``decoder`` (the head decoder has one weight layer)."""
    params = [p for n, p in w.named_parameters() if n.startswith(decoder + ".")]
    assert len(params) == 1, [n for n, _ in w.named_parameters()]
    return params[0]


def tied_sources(decoder: nn.Module) -> list[nn.Module]:
    """The encoder modules whose weights the steps of a tied decoder read, in decoder order."""
    return [step.source for step in decoder.steps if hasattr(step, "source")]


# ----------------------------------------------------------------------------------------
# Eval mode is the original model
# ----------------------------------------------------------------------------------------


@cases
def test_eval_is_the_original_model_and_runs_no_decoder(case: Case, request):
    model = case.factory()
    reference = copy.deepcopy(model)
    w = wrap(model, split=case.split)
    x, _ = case.batch()
    request.getfixturevalue("forbid_extra_compute")  # from here on a decoder call raises
    with torch.no_grad():
        assert torch.equal(w.eval()(x), reference.eval()(x))
        assert torch.equal(w(x), reference(x))  # a second eval call: still nothing extra


@cases
def test_training_forward_returns_the_models_own_logits(case: Case):
    model = case.factory()
    reference = copy.deepcopy(model)
    w = wrap(model, split=case.split)
    x, _ = case.batch()
    torch.testing.assert_close(w.train()(x), reference.train()(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------
# Tied weights: one tensor, one state_dict key, one gradient
# ----------------------------------------------------------------------------------------


@cases
def test_decoders_read_the_encoders_own_parameters(case: Case):
    model = case.factory()
    w = wrap(model, split=case.split)
    first = getattr(model, case.first)
    sources = tied_sources(w.input_decoder)
    # g1' mirrors the encoder top-down: its last weight step is the first layer itself.
    assert sources[-1] is first
    assert sources[-1].weight is first.weight
    own = {id(m) for m in model.modules()}
    assert all(id(s) in own for s in sources)
    encoder_layers = [
        m for m in model.modules()
        if isinstance(m, WEIGHT_LAYERS) and m is not getattr(model, case.classifier)
    ]
    assert {id(s) for s in sources} == {id(m) for m in encoder_layers}
    assert tied_sources(w.head_decoder) == [getattr(model, case.classifier)]
    assert tied_sources(w.head_decoder)[0].weight is getattr(model, case.classifier).weight


@cases
def test_state_dict_holds_model_keys_plus_decoder_biases_only(case: Case):
    model = case.factory()
    model_sd = model.state_dict()
    w = wrap(model, split=case.split)
    sd = w.state_dict()
    model_keys = {"model." + k for k in model_sd}
    assert model_keys <= set(sd)
    extra = set(sd) - model_keys
    assert extra, "the decoders should have biases with decoder_bias=True"
    for key in extra:
        assert key.split(".")[0] in ("input_decoder", "head_decoder", "full_decoder"), key
        assert key.endswith(".bias"), key
    # one bias per tied weight layer: the encoder's layers (g1') plus the classifier (g2')
    n_weight_layers = sum(isinstance(m, WEIGHT_LAYERS) for m in model.modules())
    assert len(extra) == n_weight_layers
    for key, value in model_sd.items():  # same storage, not a copy
        assert sd["model." + key].data_ptr() == value.data_ptr()


@cases
def test_parameters_have_no_duplicates(case: Case):
    model = case.factory()
    n_model = len(list(model.parameters()))
    w = wrap(model, split=case.split)
    named = list(w.named_parameters(remove_duplicate=False))
    ids = [id(p) for _, p in named]
    assert len(ids) == len(set(ids)), [n for n, _ in named]
    n_biases = sum(not n.startswith("model.") for n, _ in named)
    assert len(ids) == n_model + n_biases


@cases
def test_reconstruction_alone_gives_the_first_layer_a_gradient(case: Case):
    model = case.factory()
    w = wrap(model, split=case.split, perturb=None)
    x, t = case.batch()
    w.train()
    w(x)
    parts = w.losses(t)
    assert float(parts.nll_perturbed) == 0.0
    first = getattr(model, case.first)
    (step,) = [s for s in w.input_decoder.steps if getattr(s, "source", None) is first]
    grad_w, grad_b = torch.autograd.grad(parts.total, [first.weight, step.bias])
    assert grad_w.abs().sum() > 0
    assert grad_b.abs().sum() > 0  # the decoder's own bias learns too


# ----------------------------------------------------------------------------------------
# Loss terms
# ----------------------------------------------------------------------------------------


@cases
def test_loss_terms_finite_and_decreasing_over_adam_steps(case: Case):
    w = wrap(case.factory(), split=case.split)
    x, t = case.batch(8)
    opt = torch.optim.Adam(w.parameters(), lr=1e-3)
    totals = []
    for _ in range(20):
        torch.manual_seed(123)  # the same noise draw every step: a fixed objective
        logits = w.train()(x)
        parts = w.losses(t)
        for name, value in parts._asdict().items():
            assert value.dim() == 0 and torch.isfinite(value), name
        cfg = w.config
        expected = (
            cfg.lambda1 * parts.recon_input
            + cfg.lambda2 * (parts.recon_latent + parts.recon_hidden)
            + cfg.perturbed_weight * parts.nll_perturbed
        )
        torch.testing.assert_close(parts.total, expected)
        torch.testing.assert_close(w.aux_loss(t), parts.total)
        loss = F.cross_entropy(logits, t) + parts.total
        totals.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert parts.recon_input > 0 and parts.recon_latent > 0 and parts.nll_perturbed > 0
    assert totals[-1] < totals[0], totals
    assert sum(totals[-5:]) < sum(totals[:5]), totals


def test_mlp_terms_match_eq5_and_eq12_written_out():
    """Eq. 5 / 12 on the MLP by hand: decoders are transposed weights, ReLU mirrored."""
    x, t = CASE_BY_NAME["mlp"].batch(6)
    for reconstruction in ("split", "input", "all"):
        model = MLP()
        w = wrap(model, split="fc2", perturb=None, reconstruction=reconstruction)
        with torch.no_grad():  # non-zero decoder biases, so a dropped bias shows
            for p in w.parameters():
                if p.dim() == 1:
                    p.normal_()
        biases = {n: p for n, p in w.named_parameters() if not n.startswith("model.")}
        w.train()
        logits = w(x)
        parts = w.losses(t)

        def by_weight(weight, name, biases=biases):
            """The decoder bias sized like ``weight``'s input, inside decoder ``name``."""
            hits = [p for n, p in biases.items()
                    if n.startswith(name) and p.shape[0] == weight.shape[1]]
            assert len(hits) == 1, list(biases)
            return hits[0]

        h1 = torch.relu(model.fc1(x.flatten(1)))
        z = torch.relu(model.fc2(h1))
        y = logits.softmax(dim=1)  # the decoders read y as probabilities (y_space default)
        sq = lambda a, b: (a - b).pow(2).sum() / a.shape[0]  # noqa: E731
        if reconstruction == "split":
            w2, w1, wo = model.fc2.weight, model.fc1.weight, model.out.weight
            x_rec = torch.relu(z @ w2 + by_weight(w2, "input_decoder")) @ w1
            x_rec = (x_rec + by_weight(w1, "input_decoder")).reshape(x.shape)
            z_rec = torch.relu(y @ wo + by_weight(wo, "head_decoder"))
            torch.testing.assert_close(parts.recon_input, sq(x, x_rec))
            torch.testing.assert_close(parts.recon_latent, sq(z, z_rec))
            assert float(parts.recon_hidden) == 0.0
        else:
            wo, w2, w1 = model.out.weight, model.fc2.weight, model.fc1.weight
            z_rec = torch.relu(y @ wo + by_weight(wo, "full_decoder"))
            h1_rec = torch.relu(z_rec @ w2 + by_weight(w2, "full_decoder"))
            x_rec = (h1_rec @ w1 + by_weight(w1, "full_decoder")).reshape(x.shape)
            torch.testing.assert_close(parts.recon_input, sq(x, x_rec))
            assert float(parts.recon_latent) == 0.0
            hidden = sq(z, z_rec) + sq(h1, h1_rec) if reconstruction == "all" else 0.0 * z.sum()
            torch.testing.assert_close(parts.recon_hidden, hidden)


# ----------------------------------------------------------------------------------------
# The perturbation of Eq. 9 and of "random"
# ----------------------------------------------------------------------------------------


def _classifier_inputs(module: nn.Module) -> list[Tensor]:
    """Record every input the classifier sees (z, then z + ze in a training forward)."""
    seen: list[Tensor] = []
    module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    return seen


@cases
@pytest.mark.parametrize("y_space", ["logits", "probs"])
def test_class_conditional_noise_is_eq9(case: Case, y_space: str):
    """ze = g2'(y + ye) - g2'(y), ye the min-max scaled Gaussian noise of section 4.2."""
    model = case.factory()
    std = 0.3
    w = wrap(model, split=case.split, noise_std=std, y_space=y_space)
    classifier = getattr(model, case.classifier)
    bias = decoder_bias(w, "head_decoder")
    with torch.no_grad():
        bias.normal_()
    seen = _classifier_inputs(classifier)
    x, t = case.batch(6)
    torch.manual_seed(7)
    logits = w.train()(x)
    parts = w.losses(t)
    assert len(seen) == 2, "one clean and one perturbed pass through the head"
    z, z_perturbed = seen

    with torch.no_grad():
        y = logits.softmax(dim=1) if y_space == "probs" else logits
        torch.manual_seed(7)
        eps = torch.randn(y.shape)
        span = y.amax(dim=1, keepdim=True) - y.amin(dim=1, keepdim=True)
        ye = eps * std * span

        def g2(v: Tensor) -> Tensor:
            return torch.relu(v @ classifier.weight + bias)

        ze = g2(y + ye) - g2(y)
        torch.testing.assert_close(z_perturbed - z, ze, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(parts.recon_latent, (z - g2(y)).pow(2).sum() / len(z))
        nll = F.cross_entropy(classifier(z + ze), t)
        torch.testing.assert_close(parts.nll_perturbed, nll, rtol=1e-4, atol=1e-5)


@cases
def test_random_noise_is_minmax_scaled_on_z(case: Case):
    model = case.factory()
    std = 0.25
    w = wrap(model, split=case.split, perturb="random", noise_std=std)
    seen = _classifier_inputs(getattr(model, case.classifier))
    x, _ = case.batch(6)
    torch.manual_seed(11)
    w.train()(x)
    z, z_perturbed = seen
    torch.manual_seed(11)
    eps = torch.randn(z.shape)
    span = z.amax(dim=1, keepdim=True) - z.amin(dim=1, keepdim=True)
    torch.testing.assert_close(z_perturbed - z, eps * std * span, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("perturb", ["random", "class_conditional"])
def test_perturb_latent_matches_training_noise(perturb: str):
    case = CASE_BY_NAME["mnist"]
    model = case.factory()
    w = wrap(model, split=case.split, perturb=perturb)
    seen = _classifier_inputs(model.fc2)
    x, _ = case.batch(5)
    w.train()
    torch.manual_seed(3)
    w(x)
    torch.manual_seed(3)
    with torch.no_grad():
        z, z_perturbed = w.perturb_latent(x, perturb)
    torch.testing.assert_close(z, seen[0])
    torch.testing.assert_close(z_perturbed, seen[1])


# ----------------------------------------------------------------------------------------
# Unwrap and state_dict round trip
# ----------------------------------------------------------------------------------------


@cases
def test_unwrap_and_state_dict_round_trip(case: Case):
    model = case.factory()
    before = copy.deepcopy(model.state_dict())
    w = wrap(model, split=case.split)
    x, t = case.batch()
    opt = torch.optim.SGD(w.parameters(), lr=0.1)
    _, loss = train_step(w, x, t)
    loss.backward()
    opt.step()

    wrapper_sd = copy.deepcopy(w.state_dict())
    other = wrap(case.factory(), split=case.split)
    other.load_state_dict(wrapper_sd, strict=True)
    torch.manual_seed(5)
    train_step(w, x, t)
    torch.manual_seed(5)
    train_step(other, x, t)
    assert w.losses(t).as_floats() == other.losses(t).as_floats()

    unwrapped = w.unwrap()
    assert unwrapped is model
    changed = [k for k, v in before.items() if not torch.equal(v, unwrapped.state_dict()[k])]
    assert changed, "training through the wrapper must update the model's own weights"
    fresh = case.factory()
    fresh.load_state_dict(unwrapped.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), unwrapped.eval()(x))
    with pytest.raises(LatentAugError):
        w(x)
    again = wrap(unwrapped, split=case.split)  # unwrapping makes the model wrappable again
    assert again.model is model


# ----------------------------------------------------------------------------------------
# Errors: library class and builtin, with a useful message
# ----------------------------------------------------------------------------------------


def test_unknown_split_names_close_match_and_list_split_points():
    with pytest.raises(SplitNotFoundError) as info:
        wrap(MnistNet(), split="fc_1")
    assert isinstance(info.value, ValueError)
    assert "'fc1'" in str(info.value) and "list_split_points" in str(info.value)


def test_split_at_the_output_layer_is_an_error():
    with pytest.raises(SplitNotFoundError) as info:
        wrap(MnistNet(), split="fc2")
    assert isinstance(info.value, ValueError)
    assert "output" in str(info.value)


def test_split_inside_a_skip_connection_is_an_error():
    with pytest.raises(NotACutPointError) as info:
        wrap(ResidualCNN(), split="inner")
    assert isinstance(info.value, ValueError)
    assert "list_split_points" in str(info.value)


def test_wrapping_twice_is_an_error_and_a_failed_wrap_leaves_the_model_alone():
    model = MnistNet()
    with pytest.raises(SplitNotFoundError):
        wrap(model, split="nope")
    w = wrap(model, split="fc1")  # the failed wrap did not mark or change the model
    for target in (w, model):
        with pytest.raises(AlreadyWrappedError) as info:
            wrap(target, split="fc1")
        assert isinstance(info.value, RuntimeError)
        assert "unwrap" in str(info.value)


def test_tied_input_decoder_on_a_residual_encoder_names_the_blocking_layer():
    model = ResidualCNN()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnsupportedLayerError) as info:
        wrap(model, split="fc1", input_decoder="tied")
    assert isinstance(info.value, TypeError)
    assert "'add'" in str(info.value)
    assert "learned" in str(info.value)  # the way out
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    w = wrap(model, split="fc1")  # "auto" falls back to latent-only
    assert w.input_decoder is None and w.input_decoder_mode == "none"




@pytest.mark.parametrize(
    ("split", "options"),
    [("fc2", {"input_decoder": "tied"}), ("fc1", {})],
    ids=["encoder", "head"],
)
def test_unsupported_layer_is_named(split: str, options: dict):
    with pytest.raises(UnsupportedLayerError) as info:
        wrap(ShrinkNet(), split=split, **options)
    assert isinstance(info.value, TypeError)
    assert "Hardshrink" in str(info.value)


def test_aux_loss_needs_a_training_forward():
    case = CASE_BY_NAME["mlp"]
    w = wrap(case.factory(), split=case.split)
    x, t = case.batch()
    with pytest.raises(NoTrainingForwardError) as info:
        w.aux_loss(t)
    assert isinstance(info.value, RuntimeError)
    w.train()(x)
    w.aux_loss(t)
    with torch.no_grad():
        w.eval()(x)
    with pytest.raises(NoTrainingForwardError):  # the eval forward invalidates the last step
        w.aux_loss(t)


@pytest.mark.parametrize(
    "make_targets",
    [
        lambda t, k: t[:, None],  # shape (B, 1)
        lambda t, k: t[:-1],  # one short
        lambda t, k: t.float(),  # float indices
        lambda t, k: t.bool(),  # not an index dtype
        lambda t, k: torch.full_like(t, k),  # == num_classes
        lambda t, k: torch.full_like(t, -1),
        lambda t, k: t.tolist(),  # not a tensor
    ],
    ids=["shape", "length", "float", "bool", "too_high", "negative", "list"],
)
def test_bad_targets(make_targets):
    case = CASE_BY_NAME["mlp"]
    w = wrap(case.factory(), split=case.split)
    x, t = case.batch()
    w.train()(x)
    with pytest.raises(TargetError) as info:
        w.aux_loss(make_targets(t, case.num_classes))
    assert isinstance(info.value, ValueError)


def test_soft_targets_of_the_logits_shape_are_accepted():
    case = CASE_BY_NAME["mlp"]
    w = wrap(case.factory(), split=case.split)
    x, t = case.batch()
    w.train()(x)
    soft = F.one_hot(t, case.num_classes).float()
    torch.testing.assert_close(w.aux_loss(soft), w.aux_loss(t))


def test_unknown_config_option_suggests_the_right_one():
    with pytest.raises(ConfigError) as info:
        wrap(MnistNet(), split="fc1", lamda1=0.1)
    assert isinstance(info.value, ValueError)
    assert "'lambda1'" in str(info.value)


@pytest.mark.parametrize(
    "options",
    [{"lambda1": -0.1}, {"lambda2": -1}, {"noise_std": -0.2}, {"noise_std": float("nan")},
     {"perturb": "gaussian"}, {"reconstruction": "everything"}],
    ids=["lambda1", "lambda2", "noise_std", "noise_nan", "perturb", "reconstruction"],
)
def test_bad_config_values(options: dict):
    name = next(iter(options))
    for make in (lambda: wrap(MnistNet(), split="fc1", **options),
                 lambda: SemanticNoiseConfig(**options)):
        with pytest.raises(ConfigError) as info:
            make()
        assert isinstance(info.value, ValueError)
        assert name in str(info.value)


def test_nan_input_with_check_finite_names_the_term():
    case = CASE_BY_NAME["mnist"]
    w = wrap(case.factory(), split=case.split, check_finite=True)
    x, t = case.batch()
    x[0, 0, 0, 0] = float("nan")
    w.train()(x)
    with pytest.raises(NonFiniteLossError) as info:
        w.aux_loss(t)
    assert isinstance(info.value, FloatingPointError)
    assert "'recon_input'" in str(info.value)


def test_errors_are_exported_and_subclass_the_library_error():
    for name in latent_aug.__all__:
        obj = getattr(latent_aug, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and obj is not LatentAugError:
            assert issubclass(obj, LatentAugError), name
            builtin = [b for b in obj.__mro__[1:] if b.__module__ == "builtins"
                       and b not in (Exception, BaseException, object)]
            assert builtin, f"{name} should also subclass a builtin error (ValueError, ...)"


# ----------------------------------------------------------------------------------------
# Config variants
# ----------------------------------------------------------------------------------------

VARIANTS = {
    "recon_split": {"reconstruction": "split"},
    "recon_input": {"reconstruction": "input"},
    "recon_all": {"reconstruction": "all"},
    "recon_none": {"reconstruction": "none"},
    "perturb_none": {"perturb": None},
    "perturb_random": {"perturb": "random"},
    "perturb_class_conditional": {"perturb": "class_conditional"},
    "recon_none_perturb_random": {"reconstruction": "none", "perturb": "random"},
    "recon_none_perturb_none": {"reconstruction": "none", "perturb": None},
    "y_space_probs": {"y_space": "probs"},
    "detach_noise": {"detach_noise": True},
    "decoder_activation_linear": {"decoder_activation": "linear"},
    "l2_reduction_mean": {"l2_reduction": "mean"},
    "latent_after_activation_false": {"latent_after_activation": False},
    "noise_range_batch": {"noise_range": "batch"},
    "decoder_bias_false": {"decoder_bias": False},
    "denoise_std": {"denoise_std": 0.1},
    "input_decoder_none": {"input_decoder": "none"},
}


@cases
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variants_run_and_give_finite_losses(case: Case, variant: str):
    options = VARIANTS[variant]
    w = wrap(case.factory(), split=case.split, **options)
    x, t = case.batch()
    _, loss = train_step(w, x, t)
    parts = w.losses(t)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in parts)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in w.parameters() if p.grad is not None)
    cfg = w.config
    parts_f = parts.as_floats()
    # each term is on exactly when the config asks for it
    assert (parts_f["nll_perturbed"] > 0) == (cfg.perturb is not None)
    assert (parts_f["recon_latent"] > 0) == (
        cfg.reconstruction == "split"
    ), "recon_latent is Eq. 5's L2(z, g2'(y))"
    has_input = cfg.reconstruction in ("input", "all") or (
        cfg.reconstruction == "split" and cfg.input_decoder != "none"
    )
    assert (parts_f["recon_input"] > 0) == has_input
    assert (parts_f["recon_hidden"] > 0) == (cfg.reconstruction == "all")
    if variant == "decoder_bias_false":
        assert all(k.startswith("model.") for k in w.state_dict())


_PAPER_METHODS = {k: v for k, v in METHODS.items() if v is not None}


@pytest.mark.parametrize(
    "options",
    [pytest.param(v, id=k) for k, v in VARIANTS.items()]
    + [pytest.param(v, id="paper_" + k) for k, v in _PAPER_METHODS.items()],
)
def test_every_parameter_gets_a_gradient(options: dict):
    """What DistributedDataParallel(find_unused_parameters=False) needs of every step."""
    case = CASE_BY_NAME["mnist"]
    w = wrap(case.factory(), split=case.split, **options)
    x, t = case.batch()
    _, loss = train_step(w, x, t)
    loss.backward()
    assert [n for n, p in w.named_parameters() if p.grad is None] == []


def test_detach_noise_stops_the_gradient_through_the_noise_path():
    case = CASE_BY_NAME["mlp"]
    grads = {}
    for detach in (False, True):
        model = case.factory()
        w = wrap(model, split=case.split, reconstruction="none", detach_noise=detach)
        x, t = case.batch()
        torch.manual_seed(2)
        w.train()(x)
        nll = w.losses(t).nll_perturbed
        grads[detach] = torch.autograd.grad(nll, decoder_bias(w, "head_decoder"),
                                            allow_unused=True)[0]
    assert grads[False] is not None and grads[False].abs().sum() > 0
    assert grads[True] is None or grads[True].abs().sum() == 0


@cases
def test_recon_all_reconstructs_every_hidden_layer(case: Case):
    model = case.factory()
    w = wrap(model, split=case.split, reconstruction="all", perturb=None)
    x, t = case.batch()
    w.train()(x)
    first = w.losses(t).as_floats()["recon_hidden"]
    assert first > 0
    with torch.no_grad():
        getattr(model, case.hidden).weight.mul_(1.5)
    w.train()(x)
    assert w.losses(t).as_floats()["recon_hidden"] != first


# ----------------------------------------------------------------------------------------
# Explicit form, split points
# ----------------------------------------------------------------------------------------


def _explicit_parts(bare_head: bool) -> tuple[nn.Module, nn.Module]:
    encoder = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 12),
        nn.ReLU(),
    )
    head = nn.Linear(12, 3) if bare_head else nn.Sequential(nn.Linear(12, 3))
    return encoder, head


@pytest.mark.parametrize("bare_head", [False, True], ids=["sequential_head", "bare_linear_head"])
def test_explicit_encoder_head_form(bare_head: bool):
    encoder, head = _explicit_parts(bare_head)
    w = SemanticNoiseWrapper(encoder=encoder, head=head, perturb="class_conditional")
    x = torch.rand(5, 1, 8, 8)
    t = torch.randint(0, 3, (5,))
    _, loss = train_step(w, x, t)
    assert torch.isfinite(loss)
    parts = w.losses(t)
    assert parts.recon_input > 0 and parts.recon_latent > 0 and parts.nll_perturbed > 0
    loss.backward()
    assert encoder[0].weight.grad.abs().sum() > 0
    assert w.input_decoder_mode == "tied"
    assert tied_sources(w.input_decoder)[-1] is encoder[0]
    assert {k.split(".")[1] for k in w.state_dict() if k.startswith("model.")} == {
        "encoder", "head"
    }
    with torch.no_grad():
        assert torch.equal(w.eval()(x), head(encoder(x)))


def test_explicit_form_argument_errors():
    with pytest.raises(ConfigError):
        SemanticNoiseWrapper(encoder=nn.Linear(3, 3))
    with pytest.raises(ConfigError):
        SemanticNoiseWrapper(MnistNet(), encoder=nn.Linear(3, 3), head=nn.Linear(3, 3))


def test_list_split_points_of_mnist_net():
    assert list_split_points(MnistNet()) == ["conv1", "conv2", "conv3", "fc1"]


def test_list_split_points_excludes_layers_inside_a_skip():
    points = list_split_points(ResidualCNN())
    assert "inner" not in points
    assert points == ["stem", "fc1"]


def test_list_split_points_names_containers_after_their_last_layer():
    assert list_split_points(StagedCNN()) == ["features.0", "features.1", "features.2",
                                              "features", "fc1"]


def test_a_head_that_cannot_be_mirrored_names_the_split_points_that_can():
    assert list_split_points(StagedCNN(), tied_head=True) == ["features.2", "features", "fc1"]
    with pytest.raises(UnsupportedLayerError, match="points where it can: 'features.2', "
                                                    "'features', 'fc1'"):
        wrap(StagedCNN(), split="features.1")  # the head starts with the residual block
    wrapped = wrap(StagedCNN(), split="features.1", perturb="random", reconstruction="none")
    assert wrapped.head_decoder is None


@pytest.mark.parametrize("split", ["features", "features.2"])
def test_split_at_a_container_takes_its_output_as_z(split: str):
    """A Sequential (or a residual block) is not one traced call; z is the value that
    leaves it, here the residual block's sum."""
    model = StagedCNN()
    reference = copy.deepcopy(model)
    w = wrap(model, split=split)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        torch.testing.assert_close(w.eval().encode(x), reference.features(x), rtol=0, atol=0)
        assert torch.equal(w(x), reference.eval()(x))
    w.train()
    _, loss = train_step(w, x, t)
    terms = w.losses(t)
    assert torch.isfinite(loss) and terms.recon_latent > 0  # the head's tied decoder runs
    (grad,) = torch.autograd.grad(terms.total, model.features[2].conv.weight)
    assert grad.abs().sum() > 0


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = ResBlock(1)
        self.fc = nn.Linear(64, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.block(self.block(x)), 1))


class _Pair(nn.Module):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return torch.tanh(x), torch.sigmoid(x)


class _TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair = _Pair()
        self.fc = nn.Linear(64, 3)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.pair(x)
        return self.fc(torch.flatten(a * b, 1))


@pytest.mark.parametrize(("model", "split", "message"), [
    (_Twice(), "block", "ambiguous: the forward runs it 2 times"),
    (_TwoOutputs(), "pair", "do not hand exactly one value"),
])
def test_a_container_without_one_output_is_an_error(model: nn.Module, split: str, message: str):
    with pytest.raises(SplitNotFoundError, match=message) as info:
        wrap(model, split=split)
    assert "list_split_points" in str(info.value)
    assert split not in list_split_points(model)


@pytest.mark.parametrize("split", ["conv1", "conv2", "conv3", "fc1"])
def test_every_listed_split_point_wraps_and_trains(split: str):
    case = CASE_BY_NAME["mnist"]
    w = wrap(case.factory(), split=split)
    x, t = case.batch()
    _, loss = train_step(w, x, t)
    assert torch.isfinite(loss)
    loss.backward()


# ----------------------------------------------------------------------------------------
# autocast, torch.compile
# ----------------------------------------------------------------------------------------


@cases
def test_autocast_bf16_training_step(case: Case):
    w = wrap(case.factory(), split=case.split)
    x, t = case.batch()
    opt = torch.optim.Adam(w.parameters(), lr=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = train_step(w, x, t)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in w.losses(t))
    loss.backward()
    first = getattr(w.model, case.first).weight
    assert first.grad is not None and first.grad.dtype == torch.float32
    assert torch.isfinite(first.grad).all()
    opt.step()


def _compile_smoke(backend: str) -> None:
    case = CASE_BY_NAME["mlp"]
    w = wrap(case.factory(), split=case.split)
    compiled = torch.compile(w, backend=backend)
    x, t = case.batch()
    compiled.train()
    logits = compiled(x)
    loss = F.cross_entropy(logits, t) + w.aux_loss(t)
    assert logits.shape == (len(x), case.num_classes)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(w.model.fc1.weight.grad).all()
    compiled.eval()
    with torch.no_grad():
        out = compiled(x)
        assert out.shape == logits.shape and torch.isfinite(out).all()
        torch.testing.assert_close(out, w.model(x))


def test_torch_compile_smoke_aot_eager():
    """Dynamo + AOTAutograd without code generation (a few seconds)."""
    _compile_smoke("aot_eager")


@pytest.mark.slow
def test_torch_compile_smoke_inductor():
    """The default backend generates C++; about 45 s on a loaded 2-core CPU."""
    _compile_smoke("inductor")


# ----------------------------------------------------------------------------------------
# DDP
# ----------------------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
        w = wrap(MnistNet(), split="fc1")
        ddp = DistributedDataParallel(w, find_unused_parameters=False)
        start = torch.cat([p.detach().flatten() for p in ddp.parameters()])
        opt = torch.optim.Adam(ddp.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(100 + rank)  # different data per rank
        for _ in range(2):
            x = torch.rand(4, 1, 28, 28, generator=g)
            t = torch.randint(0, 10, (4,), generator=g)
            opt.zero_grad()
            logits = ddp(x)
            loss = F.cross_entropy(logits, t) + ddp.module.aux_loss(t)
            loss.backward()
            opt.step()
        flat = torch.cat([p.detach().flatten() for p in ddp.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        if rank == 0:
            torch.save(
                {"params": gathered, "moved": float((flat - start).abs().max())},
                os.path.join(out_dir, "result.pt"),
            )
        dist.barrier()  # no rank tears gloo down while another still talks (seen: SIGABRT)
    finally:
        dist.destroy_process_group()
    leave_passed_worker()  # reached only when every check above passed


@pytest.mark.slow
def test_ddp_two_cpu_processes_keep_parameters_identical(tmp_path):
    """About 25 s on a loaded 2-core CPU (two spawned interpreters importing torch)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "result.pt")
    rank0, rank1 = result["params"]
    assert result["moved"] > 0
    assert torch.equal(rank0, rank1)


def test_cases_table_is_consistent():
    """Every case's named layers exist and the factory builds a working classifier."""
    for case in CASES:
        model = case.factory()
        for attr in (case.split, case.first, case.hidden, case.classifier):
            assert isinstance(getattr(model, attr), nn.Module), (case.name, attr)
        x, _ = case.batch()
        assert model(x).shape == (len(x), case.num_classes)
