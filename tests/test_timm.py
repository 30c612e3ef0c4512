"""timm backbones: the no-split head contract, split= inside timm models, DDP.

Every model is created with random weights and run on tiny inputs (batch 4, 32×32).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from gloo import leave_passed_worker
from torch import nn

timm = pytest.importorskip("timm")

from latent_aug import (  # noqa: E402 - after importorskip
    ConfigError,
    MnistNet,
    NotACutPointError,
    SplitNotFoundError,
    UnsupportedLayerError,
    list_split_points,
    wrap,
)
from latent_aug.timm_support import (  # noqa: E402
    adapt_resnet_for_cifar,
    create_backbone,
    first_blocking_layer,
)

#: key -> (timm name, create_model kwargs); num_classes=10 and pretrained=False for all.
MODELS: dict[str, tuple[str, dict]] = {
    "resnet18": ("resnet18", {}),
    "vit_tiny": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8}),
    "convnext_atto": ("convnext_atto", {}),
    "efficientnet_b0": ("efficientnet_b0", {}),
    "mobilenetv3_small_050": ("mobilenetv3_small_050", {}),
}
#: (model, split) cases that torch.fx traces and that cut the model into encoder and head.
SPLITS = [
    ("resnet18", "global_pool.flatten"),
    ("vit_tiny", "fc_norm"),
    ("convnext_atto", "head.flatten"),
    ("mobilenetv3_small_050", "flatten"),
]


def make(key: str, seed: int = 0) -> nn.Module:
    """A fresh copy of the model ``key`` initialized with ``seed`` (creation is cached)."""
    return copy.deepcopy(_create(key, seed))


@functools.cache
def _create(key: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    name, kwargs = MODELS[key]
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


def batch(n: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def first_weight(model: nn.Module) -> nn.Parameter:
    """The first layer's weight: the stem / patch-embedding convolution of every model here."""
    return next(p for p in model.parameters() if p.dim() == 4)


def pre_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


# -- the no-split path: timm's head contract ----------------------------------------------


@pytest.mark.parametrize("key", list(MODELS))
@pytest.mark.usefixtures("forbid_extra_compute")
def test_eval_is_the_original_model(key):
    model = make(key)
    reference = copy.deepcopy(model).eval()
    wrapped = wrap(model).eval()
    x, _ = batch()
    with torch.no_grad():
        assert torch.equal(wrapped(x), reference(x))


@pytest.mark.parametrize("key", list(MODELS))
def test_train_step_and_unwrap(key):
    """One training step, then the state_dict round trip through unwrap."""
    model = make(key)
    reference = copy.deepcopy(model).eval()
    wrapped = wrap(model)  # class-conditional noise; "auto" input decoder -> latent-only
    assert wrapped.input_decoder_mode == "none"
    x, t = batch()
    wrapped.train()
    logits = wrapped(x)
    terms = wrapped.losses(t)
    assert logits.shape == (4, 10)
    assert all(torch.isfinite(v) for v in terms)
    assert terms.recon_input == 0  # latent-only: no input decoder
    assert terms.recon_latent > 0 and terms.nll_perturbed > 0
    weight = first_weight(model)
    # The latent terms alone reach the first layer (through z and the perturbed pass).
    (grad,) = torch.autograd.grad(terms.total, weight, retain_graph=True)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    opt = torch.optim.Adam(wrapped.parameters(), lr=1e-2)
    before = weight.detach().clone()
    (F.cross_entropy(logits, t) + terms.total).backward()
    opt.step()
    assert not torch.equal(before, weight)

    state = wrapped.state_dict()
    model_keys = set(model.state_dict())
    assert {k for k in state if k.startswith("model.")} == {f"model.{k}" for k in model_keys}
    # the tied head decoder reads the classifier's weight: it only adds its own biases
    extra = [k for k in state if not k.startswith("model.")]
    assert extra and all(k.startswith("head_decoder.") and k.endswith("bias") for k in extra)
    wrap(make(key, seed=2)).load_state_dict(state)  # strict: same keys, same shapes

    back = wrapped.unwrap()
    assert back is model
    fresh = make(key, seed=1)
    fresh.load_state_dict(back.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), back.eval()(x))
        assert not torch.equal(back(x), reference(x))  # the trained weights came back
    wrap(back)  # unwrapped models can be wrapped again


@pytest.mark.parametrize("key", ["resnet18", "vit_tiny"])
def test_learned_input_decoder(key):
    model = make(key)
    wrapped = wrap(model, input_decoder="learned", input_shape=(3, 32, 32))
    assert wrapped.input_decoder_mode == "learned"
    x, t = batch()
    wrapped.train()
    wrapped(x)
    terms = wrapped.losses(t)
    assert torch.isfinite(terms.recon_input) and terms.recon_input > 0
    decoder_params = list(wrapped.input_decoder.parameters())
    grads = torch.autograd.grad(terms.recon_input, [first_weight(model), *decoder_params])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_learned_input_decoder_needs_input_shape():
    model = make("mobilenetv3_small_050")
    with pytest.raises(ConfigError, match="input_shape"):
        wrap(model, input_decoder="learned")
    wrap(model)  # the failed wrap left the model untouched


def test_tied_input_decoder_names_the_first_residual():
    model = make("resnet18")
    with pytest.raises(UnsupportedLayerError) as err:
        wrap(model, input_decoder="tied")
    message = str(err.value)
    # resnet18's first non-chain node: layer1.0's residual add of its branch and the stem
    assert "'add'" in message and "layer1_0_bn2" in message and "maxpool" in message
    assert "input_decoder='learned'" in message
    wrap(model)  # nothing was attached by the failed wrap


def test_whole_input_reconstruction_needs_a_chain_encoder():
    model = make("resnet18")
    with pytest.raises(UnsupportedLayerError, match="'add'"):
        wrap(model, reconstruction="input", perturb=None)


# -- split= inside a timm model ------------------------------------------------------------


@pytest.mark.parametrize(("key", "split"), SPLITS)
def test_split_inside_timm_model(key, split):
    model = make(key)
    assert split in list_split_points(model)
    reference = copy.deepcopy(model)
    wrapped = wrap(model, split=split)
    x, t = batch()
    with torch.no_grad():  # z at the split is timm's pre-logits (eval: no dropout)
        wrapped.eval()
        torch.testing.assert_close(wrapped.encode(x), pre_logits(reference.eval(), x))
    wrapped.train()
    reference.train()
    logits = wrapped(x)
    torch.testing.assert_close(logits, reference(x))  # the training forward is the model's
    terms = wrapped.losses(t)
    assert all(torch.isfinite(v) for v in terms) and terms.recon_latent > 0
    (grad,) = torch.autograd.grad(terms.total, first_weight(model))
    assert grad.abs().sum() > 0


def test_split_across_a_residual_is_not_a_cut_point():
    model = make("resnet18")
    with pytest.raises(NotACutPointError, match="layer1.0.conv1"):
        wrap(model, split="layer1.0.conv1")
    assert "layer1.0.conv1" not in list_split_points(model)


def test_split_before_vit_token_pooling():
    """At ``norm`` the head starts with the class-token pooling ``x[:, 0]``: g2' cannot mirror
    it, so the default config fails clearly; random noise without reconstruction works."""
    model = make("vit_tiny")
    with pytest.raises(UnsupportedLayerError, match="head f2"):
        wrap(model, split="norm")
    wrapped = wrap(model, split="norm", perturb="random", reconstruction="none")
    x, t = batch()
    wrapped.train()
    wrapped(x)
    terms = wrapped.losses(t)
    assert wrapped.encode(x).shape[:2] == (4, 17)  # (B, 1 + 16 patches, D): tokens
    assert torch.isfinite(terms.nll_perturbed) and terms.nll_perturbed > 0


def test_non_timm_model_without_split():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(SplitNotFoundError, match="list_split_points") as err:
        wrap(model)
    assert isinstance(err.value, ValueError)
    wrap(model, split="1")


# -- timm_support ----------------------------------------------------------------------------


def test_adapt_resnet_for_cifar():
    model = create_backbone("resnet18", num_classes=10, img_size=32)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    x, t = batch()
    assert model.forward_features(x).shape == (4, 512, 4, 4)
    assert [f["reduction"] for f in model.feature_info] == [1, 1, 2, 4, 8]
    wrapped = wrap(model, input_decoder="learned", input_shape=(3, 32, 32))
    wrapped.train()
    wrapped(x)
    assert torch.isfinite(wrapped.aux_loss(t))
    with pytest.raises(TypeError, match="ResNet"):
        adapt_resnet_for_cifar(make("convnext_atto"))


def test_create_backbone_passes_img_size_where_taken():
    vit = create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8)
    assert tuple(vit.patch_embed.img_size) == (32, 32)
    assert vit(batch()[0]).shape == (4, 10)
    big = create_backbone("resnet18", img_size=224)  # large inputs keep the ImageNet stem
    assert big.conv1.stride == (2, 2)


def test_first_blocking_layer():
    assert first_blocking_layer(MnistNet()) is None  # a plain chain: everything mirrors
    assert "'add'" in first_blocking_layer(make("resnet18"))


# -- DistributedDataParallel -----------------------------------------------------------------

DDP_MODEL = "mobilenetv3_small_050"  # the smallest of the table


def _ddp_step(wrapped: nn.Module, rank: int, forward=None) -> float:
    """One training step's backward on rank ``rank``'s batch, with its own noise seed."""
    x, t = batch(n=4, seed=10 + rank)
    torch.manual_seed(100 + rank)
    logits = (forward or wrapped)(x)
    loss = F.cross_entropy(logits, t) + wrapped.aux_loss(t)
    loss.backward()
    return float(loss.detach())


def _ddp_worker(rank: int, world: int, folder: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                            world_size=world)
    try:
        wrapped = wrap(make(DDP_MODEL))
        ddp = DistributedDataParallel(wrapped)
        wrapped.train()
        loss = _ddp_step(ddp.module, rank, forward=ddp)
        grads = {n: p.grad.clone() for n, p in wrapped.named_parameters()}
        torch.save({"loss": loss, "grads": grads}, f"{folder}/rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while another still talks
    finally:
        dist.destroy_process_group()
    leave_passed_worker()  # reached only when every check above passed


@pytest.mark.slow
def test_ddp_averages_every_gradient(tmp_path):
    """Two gloo processes: each rank's gradients (the wrapper's decoder biases included) are
    the mean of the two single-process gradients of the same batches and noise."""
    import torch.multiprocessing as mp

    # fork skips re-importing torch and timm in the workers (they use one thread, so the
    # parent's OpenMP pool is never touched after the fork); spawn where fork is missing
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, start_method=method)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same kernels, the same rounding
    try:
        for rank in range(2):
            wrapped = wrap(make(DDP_MODEL))
            wrapped.train()
            loss = _ddp_step(wrapped, rank)
            assert loss == pytest.approx(results[rank]["loss"], rel=1e-5)
            single.append({n: p.grad for n, p in wrapped.named_parameters()})
    finally:
        torch.set_num_threads(threads)
    names = set(single[0])
    assert any(n.startswith("head_decoder.") for n in names)
    for res in results:
        assert set(res["grads"]) == names
        for n in names:
            expected = (single[0][n] + single[1][n]) / 2
            torch.testing.assert_close(res["grads"][n], expected, rtol=1e-4, atol=1e-6)
