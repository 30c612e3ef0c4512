"""Lanes (latent_aug.lanes) train every run as one-run-at-a-time training does."""

import pytest
import torch
from models import tiny_split

from latent_aug.data import eval_sets, split_from
from latent_aug.errors import ConfigError
from latent_aug.lanes import LaneTrainer, adam_, pack_lanes, train_families, train_runs_in_lanes
from latent_aug.protocol import RunSpec, train_run

# (per_class, set, examples): runs of different lengths, so lanes hold runs back to back
RUNS = [(6, 1, 60), (2, 1, 20), (4, 2, 40), (2, 2, 20), (4, 1, 40)]


def family(method: str, epochs: int = 3, dataset: str = "mnist", runs=RUNS):
    specs = [RunSpec(dataset, method, k, s, epochs=epochs, batch_size=20) for k, s, _ in runs]
    datas = [tiny_split(100 * s + k, n, dataset) for k, s, n in runs]
    return specs, datas


@pytest.mark.parametrize("method, dataset", [
    ("feed_forward", "mnist"), ("proposed_base", "mnist"), ("recon_all", "mnist"),
    # CIFAR-10 trains on random crops drawn from each run's generator: lanes draw a whole
    # epoch's crops ahead, in the sequential order, so the crops (and results) are the same
    ("feed_forward", "cifar10"), ("proposed_base", "cifar10"),
])
def test_lanes_match_sequential_runs(method, dataset):
    if dataset == "mnist":
        specs, datas = family(method)
    else:  # a shorter family: the CIFAR net is 5x the MNIST net's work
        specs, datas = family(method, epochs=2, dataset=dataset, runs=RUNS[:3])
    seq = [train_run(s, d) for s, d in zip(specs, datas)]
    lanes = train_runs_in_lanes(specs, datas, lanes=2)
    for a, b in zip(seq, lanes):
        assert b.train_losses == pytest.approx(a.train_losses, rel=1e-4, abs=1e-5)
        assert b.val_errors == pytest.approx(a.val_errors, abs=1e-6)
        assert b.test_error == pytest.approx(a.test_error, abs=1e-6)
        assert (b.best_epoch, b.best_val_error) == (a.best_epoch, a.best_val_error)


def test_shared_eval_sets_give_the_runs_own_errors():
    """A grid's lanes keep one copy of the validation/test sets and subtract each run's mean
    as they evaluate: the same errors, bit for bit, as each run's own centred copies."""
    g = torch.Generator().manual_seed(0)

    def part(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                torch.arange(n) % 10)

    raw = {"train": part(60), "valid": part(30), "test": part(30)}
    specs = [RunSpec("cifar10", "feed_forward", 2, s, epochs=2, batch_size=20) for s in (1, 2)]
    own = [split_from(raw, "cifar10", 2, s) for s in (1, 2)]
    lean = [split_from(raw, "cifar10", 2, s, with_eval=False) for s in (1, 2)]
    assert lean[0].valid_x is None and not torch.equal(own[0].mean, own[1].mean)
    a = train_runs_in_lanes(specs, own, lanes=2)
    b = train_runs_in_lanes(specs, lean, lanes=2, eval_sets=eval_sets(raw))
    assert [r.val_errors for r in a] == [r.val_errors for r in b]
    assert [r.test_error for r in a] == [r.test_error for r in b]


def test_lane_count_does_not_change_results():
    specs, datas = family("proposed_base", epochs=2)
    one = train_runs_in_lanes(specs, datas, lanes=1)
    many = train_runs_in_lanes(specs, datas, lanes=4)
    for a, b in zip(one, many):
        assert b.train_losses == pytest.approx(a.train_losses, rel=1e-4, abs=1e-5)
        assert b.val_errors == a.val_errors


def test_round_robin_families_match_alone():
    results = {}
    trainers = []
    for method in ("feed_forward", "proposed_base"):
        specs, datas = family(method, epochs=2)
        trainers.append(LaneTrainer(
            specs, datas, lanes=2,
            on_result=lambda run, res, m=method: results.__setitem__((m, run), res)))
    train_families(trainers)
    assert len(results) == 2 * len(RUNS)
    for method in ("feed_forward", "proposed_base"):
        alone = train_runs_in_lanes(*family(method, epochs=2), lanes=2)
        for run, res in enumerate(alone):
            assert results[method, run].train_losses == pytest.approx(res.train_losses, rel=1e-5)


def test_perturbed_family_trains_and_reports_each_run_once():
    specs, datas = family("perturb_class_conditional", epochs=2)
    seen, epochs = [], []
    trainer = LaneTrainer(specs, datas, on_result=lambda run, res: seen.append(run),
                          on_epoch=lambda run, ep, val: epochs.append((run, ep)))
    trainer.run()
    assert sorted(seen) == list(range(len(RUNS)))
    assert sorted(epochs) == sorted((r, e) for r in range(len(RUNS)) for e in (1, 2))
    assert not trainer.step()  # done stays done


def test_adam_matches_torch_adam():
    torch.manual_seed(1)
    p = torch.randn(3, 7)
    ref = [torch.nn.Parameter(row.clone()) for row in p]
    lrs = [0.01, 0.002, 0.005]
    opts = [torch.optim.Adam([q], lr=lr) for q, lr in zip(ref, lrs)]
    m, v, step = torch.zeros_like(p), torch.zeros_like(p), torch.zeros(3, 1)
    lr = torch.tensor(lrs)[:, None]
    for _ in range(5):
        g = torch.randn(3, 7)
        for q, o, row in zip(ref, opts, g):
            q.grad = row.clone()
            o.step()
        adam_(p, g, m, v, step, lr)
    assert torch.allclose(p, torch.stack([q.detach() for q in ref]), rtol=1e-6, atol=1e-7)


def test_pack_lanes_longest_first():
    lanes = pack_lanes([600, 240, 120, 60, 600, 240, 120, 60])
    assert sorted(i for lane in lanes for i in lane) == list(range(8))
    loads = [sum([600, 240, 120, 60, 600, 240, 120, 60][i] for i in lane) for lane in lanes]
    assert len(lanes) == 4 and max(loads) == 600
    assert pack_lanes([]) == []
    assert pack_lanes([5, 5, 5], lanes=1) == [[0, 1, 2]]


def test_bad_families_are_refused():
    specs, datas = family("feed_forward")
    with pytest.raises(ConfigError, match="one method"):
        LaneTrainer([specs[0], RunSpec("mnist", "proposed_base", 2, 1)], datas[:2])
    odd = tiny_split(0, 30)
    with pytest.raises(ConfigError, match="multiple of the batch size"):
        LaneTrainer([specs[0]], [odd])
    with pytest.raises(ConfigError, match="one DataSplit per RunSpec"):
        LaneTrainer(specs, datas[:1])
