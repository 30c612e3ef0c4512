"""The vectorized grid path computes what one-at-a-time training computes."""

import pytest
import torch
from models import tiny_split

from latent_aug.protocol import RunSpec, train_run
from latent_aug.vectorized import train_runs_vectorized


@pytest.mark.parametrize("method, dataset", [
    ("feed_forward", "mnist"), ("proposed_base", "mnist"),
    ("feed_forward", "cifar10"),  # random crops from each run's generator
])
def test_vectorized_matches_sequential(method, dataset):
    specs = [RunSpec(dataset, method, 4, s, epochs=3, batch_size=20) for s in (1, 2)]
    datas = [tiny_split(s, dataset=dataset) for s in (1, 2)]
    seq = [train_run(s, d) for s, d in zip(specs, datas)]
    vec = train_runs_vectorized(specs, datas)
    for a, b in zip(seq, vec):
        assert a.train_losses == pytest.approx(b.train_losses, rel=1e-4, abs=1e-4)
        assert a.val_errors == pytest.approx(b.val_errors, abs=1e-6)
        assert a.test_error == pytest.approx(b.test_error, abs=1e-6)
        assert a.best_epoch == b.best_epoch


def test_vectorized_perturbed_runs_train():
    specs = [RunSpec("mnist", "perturb_class_conditional", 4, s, epochs=2, batch_size=20)
             for s in (1, 2, 3)]
    res = train_runs_vectorized(specs, [tiny_split(s) for s in (1, 2, 3)])
    assert all(len(r.train_losses) == 2 and all(torch.isfinite(torch.tensor(r.train_losses)))
               for r in res)
    # different sets see different data, so their losses differ
    assert res[0].train_losses != res[1].train_losses
