"""Checkpoint / resume gives the uninterrupted run exactly (by hand and through ``fit``'s epoch
checkpoints), and runs repeat bit for bit (CPU)."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from models import tiny_split
from torch import Tensor

from latent_aug import MnistNet, wrap
from latent_aug.errors import ConfigError
from latent_aug.protocol import RunSpec, fit, train_run

BATCH = 4
STEPS_BEFORE = 3
STEPS_AFTER = 3




def _batches(n: int, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """``n`` batches of random MNIST-shaped inputs ``(BATCH, 1, 28, 28)`` and labels."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(BATCH, 1, 28, 28, generator=gen),
            torch.randint(0, 10, (BATCH,), generator=gen),
        )
        for _ in range(n)
    ]


def _fresh(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = wrap(MnistNet(), split="fc1", perturb="class_conditional")
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: Tensor, t: Tensor) -> Tensor:
    model.train()
    logits = model(x)
    loss = F.cross_entropy(logits, t) + model.aux_loss(t)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def _checkpoint(model: torch.nn.Module, opt: torch.optim.Optimizer) -> bytes:
    buf = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()}, buf
    )
    return buf.getvalue()


def _resume(blob: bytes, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, Tensor]:
    """Fresh objects (built from another seed), loaded from the checkpoint."""
    state = torch.load(io.BytesIO(blob))
    model, opt = _fresh(seed)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    return model, opt, state["rng"]


def test_resume_reproduces_the_uninterrupted_run() -> None:
    data = _batches(STEPS_BEFORE + STEPS_AFTER)
    model, opt = _fresh(seed=0)
    for x, t in data[:STEPS_BEFORE]:
        _step(model, opt, x, t)
    blob = _checkpoint(model, opt)
    straight = [_step(model, opt, x, t) for x, t in data[STEPS_BEFORE:]]
    straight_params = {k: v.clone() for k, v in model.state_dict().items()}

    resumed_model, resumed_opt, rng = _resume(blob, seed=99)
    torch.set_rng_state(rng)
    resumed = [_step(resumed_model, resumed_opt, x, t) for x, t in data[STEPS_BEFORE:]]

    for i, (a, b) in enumerate(zip(straight, resumed)):
        assert torch.equal(a, b), f"step {STEPS_BEFORE + i}: {a.item()} != {b.item()}"
    resumed_params = resumed_model.state_dict()
    assert resumed_params.keys() == straight_params.keys()
    for k, v in straight_params.items():
        assert torch.equal(v, resumed_params[k]), k
    # Adam's moments carry over too: one more identical step keeps them equal.
    x, t = data[-1]
    rng = torch.get_rng_state()
    one_more = _step(model, opt, x, t)
    torch.set_rng_state(rng)
    assert torch.equal(one_more, _step(resumed_model, resumed_opt, x, t))


def test_checkpoint_holds_the_decoder_biases_and_the_rng_matters() -> None:
    """The state dict carries the wrapper's own parameters, and the test above is sensitive:
    resuming without the RNG state draws different noise and gives different losses."""
    data = _batches(STEPS_BEFORE + 1, seed=1)
    model, opt = _fresh(seed=0)
    for x, t in data[:STEPS_BEFORE]:
        _step(model, opt, x, t)
    own = {k for k in model.state_dict() if not k.startswith("model.")}
    assert own, "the tied decoders' biases should be in the wrapper's state_dict"
    blob = _checkpoint(model, opt)
    x, t = data[-1]
    straight = _step(model, opt, x, t)

    resumed_model, resumed_opt, _ = _resume(blob, seed=99)
    torch.manual_seed(12345)  # not the checkpointed RNG state
    assert not torch.equal(straight, _step(resumed_model, resumed_opt, x, t))


def test_a_trained_wrapper_can_be_deep_copied() -> None:
    """Snapshots by model copy (best-model keeping, EMA / SWA) after training steps."""
    model, opt = _fresh(seed=0)
    for x, t in _batches(2):
        _step(model, opt, x, t)
    model.eval()
    snapshot = copy.deepcopy(model)
    x, _ = _batches(1, seed=5)[0]
    with torch.no_grad():
        assert torch.equal(snapshot(x), model(x))
    torch.optim.swa_utils.AveragedModel(model)


# ----------------------------------------------------------------------------------------------
# train_run: same seeds, same device -> the same numbers
# ----------------------------------------------------------------------------------------------


def _numbers(result) -> tuple:
    return (result.train_losses, result.val_errors, result.test_error, result.best_val_error,
            result.best_epoch, result.epochs)


def test_train_run_is_repeatable() -> None:
    data = tiny_split(n=20, n_eval=16)
    spec = RunSpec("mnist", "perturb_class_conditional", per_class=2, split=1, epochs=2,
                   batch_size=8)
    torch.manual_seed(777)  # train_run must seed itself: the outer state may not matter
    first = train_run(spec, data)
    torch.manual_seed(4242)
    torch.rand(100)
    second = train_run(spec, data)
    assert len(first.train_losses) == len(first.val_errors) == 2
    assert all(torch.isfinite(torch.tensor(first.train_losses)))
    assert _numbers(first) == _numbers(second)

    # Another set (another seed) must give other numbers, or the check above proves nothing.
    other = train_run(
        RunSpec("mnist", "perturb_class_conditional", per_class=2, split=2, epochs=2,
                batch_size=8),
        data,
    )
    assert other.train_losses != first.train_losses


# ----------------------------------------------------------------------------------------------
# fit's epoch checkpoints: an interrupted run continues where it stopped, with the same numbers
# ----------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Stands for a kill between two epochs."""


def _stop_after(epochs: int):
    seen: list[int] = []

    def on_epoch(epoch: int, val: float) -> None:
        seen.append(epoch)
        if epoch == epochs:
            raise _Stop

    return on_epoch, seen


@pytest.mark.parametrize(("dataset", "method"), [
    ("mnist", "perturb_class_conditional"),  # semantic noise from the global RNG
    ("mnist", "proposed_base_denoise"),      # input noise from the global RNG
    ("cifar10", "recon_one"),                # crops and flips from the run's generator
    ("mnist", "manifold_mixup"),             # a peer: mixing layer and λ from the global RNG
])
def test_fit_resumed_from_its_epoch_checkpoint_equals_the_uninterrupted_run(
    tmp_path: Path, dataset: str, method: str
) -> None:
    data = tiny_split(n=20, n_eval=10, dataset=dataset)
    spec = RunSpec(dataset, method, per_class=2, split=1, epochs=4, batch_size=8)
    straight_model, straight = fit(spec, data)

    path = tmp_path / "run.pt"
    _interrupted(spec, data, path, after=2, every=0)
    assert path.exists(), "the checkpoint of epoch 2 should be on disk"
    torch.manual_seed(999)  # whatever the process did in between must not matter

    on_epoch, seen = _stop_after(0)
    model, resumed = fit(spec, data, on_epoch=on_epoch, checkpoint=path, checkpoint_every=0)
    assert seen == [3, 4]  # only the epochs after the checkpoint were trained
    assert resumed.resumed_at == (2,) and straight.resumed_at == ()
    assert _numbers(resumed) == _numbers(straight)
    for key, value in straight_model.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    assert not path.exists(), "a finished run deletes its checkpoint"


def test_a_run_cut_off_twice_names_both_continuations(tmp_path: Path) -> None:
    data = tiny_split(n=20, n_eval=10)
    spec = RunSpec("mnist", "perturb_class_conditional", per_class=2, split=1, epochs=5,
                   batch_size=8)
    straight_model, straight = fit(spec, data)
    path = tmp_path / "run.pt"
    _interrupted(spec, data, path, after=1, every=0)
    _interrupted(spec, data, path, after=3, every=0)  # continues from 1, cut off again at 3
    model, resumed = fit(spec, data, checkpoint=path, checkpoint_every=0)
    assert resumed.resumed_at == (1, 3)
    assert _numbers(resumed) == _numbers(straight)
    for key, value in straight_model.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_a_checkpoint_without_its_resume_list_counts_as_continued_once(tmp_path: Path) -> None:
    """Files written before the list of continuations was kept (2ae12d8 to 49b5974)."""
    data = tiny_split(n=20, n_eval=10)
    spec = RunSpec("mnist", "feed_forward", per_class=2, split=1, epochs=4, batch_size=8)
    path = tmp_path / "run.pt"
    _interrupted(spec, data, path, after=2, every=0)
    state = torch.load(path, weights_only=True)
    del state["resumes"]
    torch.save(state, path)
    assert fit(spec, data, checkpoint=path, checkpoint_every=0)[1].resumed_at == (2,)


def _interrupted(spec: RunSpec, data, path: Path, after: int, every: float) -> None:
    """Train ``spec`` with checkpoints to ``path`` and stop it after epoch ``after``."""
    on_epoch, _ = _stop_after(after)
    with pytest.raises(_Stop):
        fit(spec, data, on_epoch=on_epoch, checkpoint=path, checkpoint_every=every)


def test_fit_writes_checkpoints_no_more_often_than_asked(tmp_path: Path) -> None:
    data = tiny_split(n=20, n_eval=10)
    spec = RunSpec("mnist", "proposed_base", per_class=2, split=1, epochs=3, batch_size=8)
    path = tmp_path / "run.pt"
    _interrupted(spec, data, path, after=2, every=3600)
    assert not path.exists()
    with pytest.raises(ConfigError, match="checkpoint_every"):
        fit(spec, data, checkpoint=path, checkpoint_every=-1)


def test_a_checkpoint_of_another_run_is_a_clear_error(tmp_path: Path) -> None:
    data = tiny_split(n=20, n_eval=10)
    spec = RunSpec("mnist", "proposed_base", per_class=2, split=1, epochs=3, batch_size=8)
    path = tmp_path / "run.pt"
    _interrupted(spec, data, path, after=1, every=0)
    other = RunSpec("mnist", "proposed_base", per_class=2, split=2, epochs=3, batch_size=8)
    with pytest.raises(ConfigError, match=r"holds the run .*split=1.*Delete .*run\.pt"):
        fit(other, data, checkpoint=path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable epoch checkpoint"):
        fit(spec, data, checkpoint=path)
