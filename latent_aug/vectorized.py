"""Train several runs of one grid cell at once: stacked parameters, ``vmap``, one Adam.

Runs that share dataset, method, examples per class, epochs and options but differ in their
set (``split``) have the same graph, the same number of steps and the same learning-rate
schedule, so they can step in lockstep:

* each run's parameters are stacked along a new leading dimension ``R`` and every step is
  ``vmap(grad(loss))`` over ``(params, x, t)`` with :func:`torch.func.functional_call`
  (convolutions batch as grouped convolutions);
* Adam is elementwise and every run has the same step count and learning rate, so one Adam
  over the stacked tensors is exactly R independent Adams;
* each run keeps its own initialization (``torch.manual_seed(spec.seed)`` as in
  :func:`~latent_aug.protocol.train_run`), its own data subset and its own shuffling
  generator, so the batches are exactly those of the one-at-a-time run;
* validation and test evaluate all R models in large batches.

What differs from one-at-a-time training: the *noise* of perturbed methods is drawn from
another random stream (``vmap(..., randomness="different")``), so perturbed runs are equal
in distribution, not bit for bit; deterministic methods match to float tolerance (tested).
On CPU this path is not faster (measured: ``vmap`` over models did not help on 2 cores);
it is the lever for GPUs, where one small net per kernel leaves the device idle.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from .data import DataSplit, center_crop
from .decoders import TiedConv
from .errors import ConfigError
from .protocol import LEARNING_RATE, RunResult, RunSpec, build_model, epoch_batches, lr_at


class _TrainLoss(nn.Module):
    """``forward(x, t) -> scalar loss`` of one run: CE(logits, t) + aux terms (pure)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        terms = getattr(self.net, "training_terms", None)
        if terms is None:
            return F.cross_entropy(self.net(x), t)
        step = terms(x)
        return F.cross_entropy(step.logits, t) + self.net.step_losses(step, t).total


def group_key(spec: RunSpec) -> tuple:
    """Runs with the same key can be trained together."""
    return (spec.dataset, spec.method, spec.per_class, spec.epochs, spec.options,
            spec.batch_size)


def can_vectorize(model: nn.Module) -> bool:
    """Models with buffers (batch-norm statistics) or stateful auxiliary losses are trained
    one at a time: their in-place buffer updates do not vmap."""
    return not any(True for _ in model.buffers()) and (
        not hasattr(model, "aux_loss") or hasattr(model, "training_terms")
    )


def stacked_errors(
    net: nn.Module,
    params: dict[str, Tensor],
    xs: list[Tensor],
    ys: list[Tensor],
    crop: int | None = None,
    batch: int = 1000,
    means: list[Tensor] | None = None,
) -> Tensor:
    """``(R,)`` error rates in percent of ``R`` stacked parameter sets of ``net`` (names as
    in ``net``, or with the ``net.`` prefix of the training loss), row ``r`` on its own
    ``xs[r], ys[r]`` (centre-cropped to ``crop``; with ``means``, ``xs[r] - means[r]``, the
    per-channel ``(C,)`` mean subtracted chunk by chunk, so that the ``xs`` can be one shared
    tensor), ``batch`` images per row and call; no host sync. ``net``'s train/eval mode is
    restored."""
    was_training = net.training
    net.eval()
    params = {k.removeprefix("net."): v for k, v in params.items()}

    def logits(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(net, p, (x,))

    if crop:
        xs = [center_crop(x, crop) for x in xs]  # views: only the stacked batch is copied
    n = xs[0].shape[0]
    wrong = torch.zeros(len(xs), device=xs[0].device)
    with torch.no_grad():
        for i in range(0, n, batch):
            if means is None:
                xb = torch.stack([x[i : i + batch] for x in xs])
            else:
                xb = torch.stack([x[i : i + batch] - m.view(1, -1, 1, 1)
                                  for x, m in zip(xs, means)])
            yb = torch.stack([y[i : i + batch] for y in ys])
            wrong += (vmap(logits)(params, xb).argmax(-1) != yb).sum(1)
    net.train(was_training)
    return wrong * (100.0 / n)


def train_runs_vectorized(
    specs: list[RunSpec],
    datas: list[DataSplit],
    *,
    on_epoch: Callable[[int, int, float], None] | None = None,
) -> list[RunResult]:
    """Train ``specs`` (one grid cell, several sets) in lockstep; results in spec order."""
    if len({group_key(s) for s in specs}) != 1:
        raise ConfigError("train_runs_vectorized needs runs that differ only in their split.")
    start = time.perf_counter()
    spec0, data0 = specs[0], datas[0]
    device = data0.train_x.device
    n = data0.train_x.shape[0]
    if any(d.train_x.shape != data0.train_x.shape for d in datas):
        raise ConfigError("Vectorized runs need training sets of the same size.")
    models = []
    for spec in specs:
        torch.manual_seed(spec.seed)
        models.append(build_model(spec).to(device))
    if not can_vectorize(models[0]):
        raise ConfigError(f"Method {spec0.method!r} cannot be vectorized (buffers/state).")
    for module in models[0].modules():
        if isinstance(module, TiedConv):
            module.cpu_kernels = False  # vmap: no channels_last clone, no custom autograd.Function
    loss_module = _TrainLoss(models[0])
    names = [name for name, _ in loss_module.named_parameters()]
    params = {
        name: torch.stack([dict(_TrainLoss(m).named_parameters())[name].detach() for m in models])
        .clone()
        .requires_grad_()
        for name in names
    }
    opt = torch.optim.Adam(params.values(), lr=LEARNING_RATE[spec0.dataset], betas=(0.9, 0.999))

    def one_loss(p: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
        return functional_call(loss_module, p, (x, t))

    step_fn = vmap(grad_and_value(one_loss), in_dims=(0, 0, 0), randomness="different")
    def errors(p: dict[str, Tensor], which: str) -> Tensor:
        """(R,) error rates in percent (no host sync); each run sees its own copy of the set
        (minus its own training mean)."""
        return stacked_errors(models[0], p, [getattr(d, f"{which}_x") for d in datas],
                              [getattr(d, f"{which}_y") for d in datas], data0.crop)

    gens = [torch.Generator(device=device).manual_seed(s.seed) for s in specs]
    best_err = torch.full((len(specs),), float("inf"), device=device)
    best_epoch = torch.zeros(len(specs), dtype=torch.long, device=device)
    best = {k: v.detach().clone() for k, v in params.items()}
    val_hist, loss_hist = [], []
    for epoch in range(spec0.epochs):
        for group in opt.param_groups:
            group["lr"] = lr_at(epoch, LEARNING_RATE[spec0.dataset], spec0.epochs)
        models[0].train()
        total = torch.zeros(len(specs), device=device)
        # each run's batches from its own generator, exactly as in protocol.fit
        for batch in zip(*(epoch_batches(d, spec0.batch_size, g) for d, g in zip(datas, gens))):
            xs, ts = zip(*batch)
            grads, loss = step_fn(params, torch.stack(xs), torch.stack(ts))
            for name, p in params.items():
                p.grad = grads[name]
            opt.step()
            total += loss.detach() * xs[0].shape[0]
        val = errors(params, "valid")
        improved = val < best_err
        best_err = torch.where(improved, val, best_err)
        best_epoch = torch.where(improved, torch.full_like(best_epoch, epoch + 1), best_epoch)
        for k, v in params.items():
            mask = improved.reshape(-1, *([1] * (v.dim() - 1)))
            best[k] = torch.where(mask, v.detach(), best[k])
        val_hist.append(val.tolist())
        loss_hist.append((total / n).tolist())
        if on_epoch is not None:
            for r, v in enumerate(val_hist[-1]):
                on_epoch(r, epoch + 1, v)
    test = errors(best, "test").tolist()
    seconds = time.perf_counter() - start
    return [
        RunResult(
            test_error=test[r],
            best_val_error=float(best_err[r]),
            best_epoch=int(best_epoch[r]),
            epochs=spec0.epochs,
            seconds=seconds / len(specs),
            val_errors=[h[r] for h in val_hist],
            train_losses=[h[r] for h in loss_hist],
        )
        for r in range(len(specs))
    ]
