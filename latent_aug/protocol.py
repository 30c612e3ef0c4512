"""The paper's training protocol (section 4.2) and its methods, as one code path.

Adam (β = 0.9, 0.999), learning rate 0.005 (MNIST) / 0.002 (CIFAR-10) divided by 5 every 40
epochs until epoch 120, batch 100, λ1 = λ2 = 0.03 / 0.01, λ3 = 1. Validation error after
every epoch; the reported test error is that of the epoch with the best validation error
(the earliest, on ties). Every method is :func:`latent_aug.wrap` with a different config,
except ``feed_forward`` (the bare model) and ``ladder`` (Table 4's ladder network).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import LATENT, reference_backbone
from .config import PAPER_LAMBDAS
from .data import DataSplit, center_crop, random_crop_flip
from .errors import ConfigError, close_matches
from .files import atomic_write

#: Config overrides of each method (None: the bare model). λ's are added per dataset.
METHODS: dict[str, dict[str, Any] | None] = {
    "feed_forward": None,
    "recon_one": {"reconstruction": "input", "perturb": None},
    "recon_all": {"reconstruction": "all", "perturb": None},
    "proposed_base": {"reconstruction": "split", "perturb": None},
    "perturb_random": {"reconstruction": "split", "perturb": "random"},
    "perturb_class_conditional": {"reconstruction": "split", "perturb": "class_conditional"},
    "recon_one_denoise": {"reconstruction": "input", "perturb": None, "denoise_std": 0.1},
    "recon_all_denoise": {"reconstruction": "all", "perturb": None, "denoise_std": 0.1},
    "proposed_base_denoise": {"reconstruction": "split", "perturb": None, "denoise_std": 0.1},
    "ladder": None,
    "isda": None,  # peers (latent_aug.peers): configured there, at the same latent split
    "manifold_mixup": None,
}
PEER_METHODS = ("isda", "manifold_mixup")
#: The methods that are :func:`latent_aug.wrap` configurations (config options apply to them).
WRAPPED_METHODS = tuple(m for m, overrides in METHODS.items() if overrides is not None)
TABLE1_METHODS = [
    "feed_forward", "recon_one", "recon_all", "proposed_base", "perturb_random",
    "perturb_class_conditional",
]
LEARNING_RATE = {"mnist": 0.005, "cifar10": 0.002}
#: ``(C, H, W)`` of what a model sees per dataset (CIFAR-10: the 24×24 crops).
INPUT_SHAPE = {"mnist": (1, 28, 28), "cifar10": (3, 24, 24)}


@dataclass(frozen=True)
class RunSpec:
    """One training run of a grid."""

    dataset: str
    method: str
    per_class: int | str
    split: int
    epochs: int = 120
    # extra config overrides (ablation), plus two run options that are not config fields:
    # ("init", "torch") and ("backbone", "<timm model name>") (default: the reference net)
    options: tuple[tuple[str, Any], ...] = ()
    batch_size: int = 100

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(
                f"Unknown method {self.method!r}.{close_matches(self.method, list(METHODS))} "
                f"Methods: {', '.join(METHODS)}."
            )
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}.")

    @property
    def seed(self) -> int:
        """The same initialization and batch order for every method of one set."""
        return 1000 * self.split + (0 if self.per_class == "all" else int(self.per_class))


@dataclass
class RunResult:
    test_error: float
    best_val_error: float
    best_epoch: int
    epochs: int
    seconds: float
    val_errors: list[float] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    #: the epoch each piece after the first was continued from, in order (empty: trained
    #: from the first epoch in one go; ``(19, 106)``: cut off twice, at epochs 19 and 106)
    resumed_at: tuple[int, ...] = ()


def lr_at(epoch: int, base: float, epochs: int = 120) -> float:
    """Step schedule: ``base / 5**k`` for the k-th block of 40 epochs, until epoch 120.

    Runs shorter than 120 epochs get the same three steps, compressed: blocks of
    ``ceil(epochs / 3)`` epochs (the paper's schedule at ``epochs=120``).
    """
    block = 40 if epochs >= 120 else max(1, -(-epochs // 3))
    return base / 5 ** min(epoch // block, 2)


def build_model(spec: RunSpec, num_classes: int = 10) -> nn.Module:
    """The network a run trains: the reference backbone, wrapped per the method."""
    options = dict(spec.options)
    if spec.method == "ladder":
        if options:
            raise ConfigError(f"The ladder network takes no options, got {sorted(options)}.")
        from .ladder import LadderNetwork

        return LadderNetwork()
    backbone = options.pop("backbone", "reference")
    if backbone != "reference":
        return _timm_model(spec, backbone, options, num_classes)
    model = reference_backbone(spec.dataset)
    if options.pop("init", "glorot") == "torch":  # ablation: PyTorch's default init instead
        for m in model.modules():
            if hasattr(m, "reset_parameters") and m is not model:
                m.reset_parameters()
    overrides = METHODS.get(spec.method)
    if spec.method in PEER_METHODS:
        from . import peers

        return peers.build(spec.method, model, LATENT[spec.dataset], options)
    if overrides is None:
        return model
    from .wrapper import wrap

    lam = PAPER_LAMBDAS[spec.dataset]
    return wrap(model, split=LATENT[spec.dataset],
                **{"lambda1": lam, "lambda2": lam, **overrides, **options})


def _timm_model(spec: RunSpec, backbone: str, options: dict, num_classes: int) -> nn.Module:
    """A timm backbone (random weights, sized to the dataset's input), wrapped per the method
    with timm's head contract: z = the classifier's input (pre-logits)."""
    from .timm_support import create_backbone

    if spec.method in PEER_METHODS:
        raise ConfigError(f"Method {spec.method!r} runs on the reference backbone only, not "
                          f"on backbone={backbone!r}.")
    if "init" in options:
        raise ConfigError("The 'init' option applies to the reference backbones only.")
    c, h, _ = INPUT_SHAPE[spec.dataset]
    model = create_backbone(backbone, num_classes=num_classes, img_size=h, in_chans=c)
    overrides = METHODS.get(spec.method)
    if overrides is None:
        return model
    from .wrapper import wrap

    lam = PAPER_LAMBDAS[spec.dataset]
    return wrap(model, input_shape=INPUT_SHAPE[spec.dataset],
                **{"lambda1": lam, "lambda2": lam, **overrides, **options})


@torch.no_grad()
def error_rate(model: nn.Module, x: Tensor, y: Tensor, crop: int | None, batch: int = 250):
    """Error in percent, as a 0-dim tensor (no host sync).

    Batches of 250: on CPU faster than 500 or 1000 (activations stay in cache; about 10 %
    with :func:`latent_aug.allocator.keep_freed_memory`, twice without it, when every
    batch's blocks are page-faulted in afresh), same predictions (MNIST net, 1 thread)."""
    model.eval()
    wrong = torch.zeros((), dtype=torch.long, device=x.device)
    for i in range(0, x.shape[0], batch):
        xb = x[i : i + batch]
        if crop:
            xb = center_crop(xb, crop)
        wrong += (model(xb).argmax(1) != y[i : i + batch]).sum()
    return wrong.float() * (100.0 / x.shape[0])


def epoch_batches(
    data: DataSplit, batch_size: int, gen: torch.Generator
) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of training batches ``(x, t)``: an order drawn from ``gen``, then each batch's
    random crop (when the dataset has one) from the same generator, in this sequence."""
    n = data.train_x.shape[0]
    order = torch.randperm(n, generator=gen, device=data.train_x.device)
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        xb = data.train_x[idx]
        if data.crop:
            xb = random_crop_flip(xb, data.crop, generator=gen)
        yield xb, data.train_y[idx]


def train_run(
    spec: RunSpec,
    data: DataSplit,
    *,
    on_epoch: Callable[[int, float], None] | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: float = 60.0,
) -> RunResult:
    """Train one run with the paper's protocol and return its best-validation test error."""
    return fit(spec, data, on_epoch=on_epoch, checkpoint=checkpoint,
               checkpoint_every=checkpoint_every)[1]


def fit(
    spec: RunSpec,
    data: DataSplit,
    *,
    on_epoch: Callable[[int, float], None] | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: float = 60.0,
) -> tuple[nn.Module, RunResult]:
    """Train one run; return the network (best-validation weights, eval mode) and result.

    With ``checkpoint`` (a file path), the run's whole state (weights, Adam's moments, the
    batch-order generator, the global RNG that draws the semantic / input noise, the best
    epoch's weights and the per-epoch history) is written there atomically after an epoch
    whenever ``checkpoint_every`` seconds have passed since the last write (0: every epoch).
    A later call with the same spec and path continues from that epoch instead of the first,
    and computes exactly what the uninterrupted run computes (on the same device and thread
    count); the file is deleted when the run ends. A file from another run is a
    :class:`~latent_aug.errors.ConfigError`.
    """
    if checkpoint_every < 0:
        raise ConfigError(f"checkpoint_every is a number of seconds >= 0 (0: after every "
                          f"epoch), got {checkpoint_every}.")
    start = time.perf_counter()
    device = data.train_x.device
    torch.manual_seed(spec.seed)
    model = build_model(spec).to(device)
    gen = torch.Generator(device=device).manual_seed(spec.seed)
    base_lr = LEARNING_RATE[spec.dataset]
    opt = torch.optim.Adam(model.parameters(), lr=base_lr, betas=(0.9, 0.999))
    aux = getattr(model, "aux_loss", None)
    epoch_hook = getattr(model, "set_epoch", None)
    n = data.train_x.shape[0]
    best = (float("inf"), -1)
    best_state = None
    val_errors, losses = [], []
    first_epoch, earlier_seconds, resumes = 0, 0.0, ()
    state = load_epoch_checkpoint(checkpoint, spec) if checkpoint else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None:  # absent in files of CPU runs from 2ae12d8
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        best, best_state = (state["best_error"], state["best_epoch"]), state["best_state"]
        val_errors, losses = list(state["val_errors"]), list(state["train_losses"])
        first_epoch, earlier_seconds = state["epoch"], state["seconds"]
        # files from before "resumes" was kept know only their own epoch
        resumes = (*state.get("resumes", ()), first_epoch)
    last_write = time.perf_counter()
    for epoch in range(first_epoch, spec.epochs):
        for group in opt.param_groups:
            group["lr"] = lr_at(epoch, base_lr, spec.epochs)
        if epoch_hook is not None:
            epoch_hook(epoch, spec.epochs)
        model.train()
        total = torch.zeros((), device=device)
        for xb, yb in epoch_batches(data, spec.batch_size, gen):
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            if aux is not None:
                loss = loss + aux(yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * yb.numel()
        val = float(error_rate(model, data.valid_x, data.valid_y, data.crop))
        val_errors.append(val)
        losses.append(float(total) / n)
        if val < best[0]:
            best = (val, epoch + 1)
            best_state = copy.deepcopy(model.state_dict())
        now = time.perf_counter()
        if checkpoint and epoch + 1 < spec.epochs and now - last_write >= checkpoint_every:
            snapshot = {
                "format": CHECKPOINT_FORMAT, "spec": repr(spec), "epoch": epoch + 1,
                "seconds": earlier_seconds + now - start, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "generator": gen.get_state(),
                # the CPU generator draws some noise even on CUDA (Manifold Mixup's layer, λ)
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "best_error": best[0], "best_epoch": best[1], "best_state": best_state,
                "val_errors": val_errors, "train_losses": losses, "resumes": resumes,
            }
            atomic_write(checkpoint, lambda f, snap=snapshot: torch.save(snap, f))
            last_write = time.perf_counter()
        if on_epoch is not None:
            on_epoch(epoch + 1, val)
    model.load_state_dict(best_state)
    test = float(error_rate(model, data.test_x, data.test_y, data.crop))
    if checkpoint:
        Path(checkpoint).unlink(missing_ok=True)
    return model.eval(), RunResult(
        test_error=test,
        best_val_error=best[0],
        best_epoch=best[1],
        epochs=spec.epochs,
        seconds=earlier_seconds + time.perf_counter() - start,
        val_errors=val_errors,
        train_losses=losses,
        resumed_at=resumes,
    )


# -- epoch checkpoints ------------------------------------------------------------------------

CHECKPOINT_FORMAT = 1


def load_epoch_checkpoint(path: str | os.PathLike, spec: RunSpec) -> dict[str, Any] | None:
    """The state :func:`fit` wrote to ``path`` for ``spec`` (tensors on the CPU; loading them
    into the model and optimizer moves them to the run's device), or ``None`` when there is
    no file. A file that is not such a checkpoint, or one that belongs to another run, raises
    :class:`~latent_aug.errors.ConfigError` naming the file."""
    path = Path(path)
    if not path.exists():
        return None
    fix = f"Delete {path} to train this run from its first epoch, or use another folder."
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ConfigError(f"{path} is not a readable epoch checkpoint ({err}). {fix}") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not an epoch checkpoint of format {CHECKPOINT_FORMAT} "
                          f"(written by another latent_aug version?). {fix}")
    if state["spec"] != repr(spec):
        raise ConfigError(f"{path} holds the run {state['spec']}, not {spec!r}. {fix}")
    return state

