"""Tests for the paper's Figures 5-8, the preservation scores, checkpoints and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from latent_aug import MnistNet, SemanticNoiseWrapper, wrap
from latent_aug import figures as fg
from latent_aug.protocol import RunSpec, build_model

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
        nn.Linear(16, 10),
    )


# (model factory, split, input shape): one table every figure test runs over.
CASES = [
    pytest.param(MnistNet, "fc1", (1, 28, 28), id="mnistnet-fc1"),
    pytest.param(tiny_mlp, "3", (1, 8, 8), id="mlp-3"),
]


def make_wrapped(factory, split, shape, n=24, seed=0):
    torch.manual_seed(seed)
    wrapped = wrap(factory(), split=split, perturb=None)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, *shape, generator=g)
    return wrapped, x


def own_labels(wrapped: SemanticNoiseWrapper, x: torch.Tensor) -> torch.Tensor:
    """The classes the untrained network itself assigns (so std 0 must agree 100%)."""
    with torch.no_grad():
        return wrapped.head_logits(wrapped.encode(x)).argmax(dim=1)


def assert_png(path: Path) -> None:
    import matplotlib.pyplot as plt

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = plt.imread(path)
    assert image.ndim == 3 and image.shape[0] > 10 and image.shape[1] > 10
    assert image.std() > 0  # something was drawn
    assert not list(path.parent.glob(f".{path.name}.*.tmp"))  # no temp file left behind


@pytest.mark.parametrize(("factory", "split", "shape"), CASES)
def test_reconstruction_grid_png_restores_mode_and_rng(tmp_path, factory, split, shape):
    wrapped, x = make_wrapped(factory, split, shape, n=4)
    wrapped.train()
    rng = torch.random.get_rng_state()
    out = fg.reconstruction_grid(wrapped, x, tmp_path / "f5.png", samples=2,
                                 mean=torch.tensor([0.1]))
    assert out == tmp_path / "f5.png"
    assert_png(out)
    assert wrapped.training and all(m.training for m in wrapped.modules())
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_reconstruction_grid_size_follows_examples_and_samples(tmp_path):
    import matplotlib.pyplot as plt

    wrapped, x = make_wrapped(MnistNet, "fc1", (1, 28, 28), n=6)
    small = plt.imread(fg.reconstruction_grid(wrapped, x[:2], tmp_path / "a.png", samples=1))
    large = plt.imread(fg.reconstruction_grid(wrapped, x, tmp_path / "b.png", samples=4))
    assert large.shape[0] > small.shape[0] and large.shape[1] > small.shape[1]


class _FirstTwoDims:
    """Stand-in for sklearn's TSNE: coordinates are the first two features, so the test can
    follow each point through the bookkeeping."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def fit_transform(self, points):
        return points[:, :2].copy()


def test_embedding_bookkeeping(monkeypatch):
    pytest.importorskip("sklearn")
    import sklearn.manifold

    monkeypatch.setattr(sklearn.manifold, "TSNE", _FirstTwoDims)
    wrapped, x = make_wrapped(MnistNet, "fc1", (1, 28, 28), n=30)
    y = torch.arange(30) % 3
    emb = fg.embed_latents(wrapped, x[:6], y[:6], x[6:], y[6:], perturbations=2, std=0.0,
                           max_background=10, seed=3)
    with torch.no_grad():
        z_train = wrapped.encode(x[:6])[:, :2].numpy()
        z_other = wrapped.encode(x[6:])[:, :2].numpy()
    assert emb.background.shape == (10, 2) and emb.background_total == 24
    assert "10 of the 24" in emb.background_note()
    # the background is a subsample of the unseen examples, with their own labels
    for point, label in zip(emb.background, emb.background_y):
        match = np.flatnonzero(np.abs(z_other - point).max(axis=1) < 1e-5)
        assert len(match) >= 1 and label in y[6:][match].numpy()
    np.testing.assert_array_equal(emb.train, z_train)
    np.testing.assert_array_equal(emb.train_y, y[:6].numpy())
    # std 0: each training latent's P perturbed copies follow it (example-major)
    np.testing.assert_array_equal(emb.perturbed["random"], np.repeat(z_train, 2, axis=0))
    np.testing.assert_allclose(emb.perturbed["class_conditional"], np.repeat(z_train, 2, axis=0),
                               atol=1e-4)
    np.testing.assert_array_equal(emb.perturbed_y, np.repeat(y[:6].numpy(), 2))
    full = fg.embed_latents(wrapped, x[:6], y[:6], x[6:], y[6:], max_background=None)
    assert full.background.shape == (24, 2) and "all 24" in full.background_note()


@pytest.mark.parametrize(("factory", "split", "shape"), CASES)
def test_tsne_figures_write_pngs(tmp_path, factory, split, shape):
    pytest.importorskip("sklearn")
    wrapped, x = make_wrapped(factory, split, shape, n=40)
    y = torch.arange(40) % 4
    emb = fg.tsne_figure(wrapped, x[:8], y[:8], x[8:], y[8:], tmp_path / "f6.png",
                         perturbations=2, highlight=(0, 1), max_background=20, perplexity=5.0)
    assert_png(tmp_path / "f6.png")
    assert emb.train.shape == (8, 2) and emb.background.shape == (20, 2)
    assert emb.perturbed["class_conditional"].shape == (16, 2)
    assert np.isfinite(np.concatenate([emb.background, emb.train, *emb.perturbed.values()])).all()
    assert_png(fg.tsne_per_class(emb, tmp_path / "f7.png"))


@pytest.mark.parametrize(("factory", "split", "shape"), CASES)
def test_preservation_scores_baseline_and_heavy_noise(factory, split, shape):
    wrapped, x = make_wrapped(factory, split, shape, n=60)
    y = own_labels(wrapped, x)
    rows = fg.preservation_scores(wrapped, x, y, x, y, stds=(0.2, 50.0), samples=2,
                                  batch_size=17)
    assert [(r["kind"], r["std"]) for r in rows] == [
        (k, s) for k in ("random", "class_conditional") for s in (0.0, 0.2, 50.0)
    ]
    for r in rows:
        assert set(r) == set(fg.SCORE_COLUMNS)
        assert r["n"] == (60 if r["std"] == 0 else 120)
        if r["std"] == 0:  # unperturbed: the head agrees with itself, z's nearest is itself
            assert r["head_agreement"] == 1.0 and r["nearest_agreement"] == 1.0
        if r["std"] == 50.0:
            assert r["head_agreement"] < 0.6, r


def test_preservation_std0_equals_independent_computation():
    wrapped, x = make_wrapped(MnistNet, "fc1", (1, 28, 28), n=50)
    y = torch.arange(50) % 10  # not the model's predictions: accuracy below 1
    ref_x, ref_y = x[20:], own_labels(wrapped, x[20:])
    rows = fg.preservation_scores(wrapped, x[:20], y[:20], ref_x, ref_y, stds=(0.3,))
    with torch.no_grad():
        z, z_ref = wrapped.encode(x[:20]), wrapped.encode(ref_x)
        head = int((wrapped.head_logits(z).argmax(1) == y[:20]).sum()) / 20
    nearest = [int(ref_y[min(range(30), key=lambda j: float(((z[i] - z_ref[j]) ** 2).sum()))])
               for i in range(20)]
    near = int(np.sum(np.array(nearest) == y[:20].numpy())) / 20
    base = [r for r in rows if r["std"] == 0]
    assert len(base) == 2
    for r in base:
        assert (r["head_agreement"], r["nearest_agreement"]) == (head, near)


def test_nearest_is_chunk_independent():
    g = torch.Generator().manual_seed(0)
    q, ref = torch.randn(37, 5, generator=g), torch.randn(23, 5, generator=g)
    expected = torch.cdist(q, ref).argmin(1)
    assert torch.equal(fg._nearest(q, ref, max_elements=50), expected)
    assert torch.equal(fg._nearest(q, ref, max_elements=1), expected)


def test_preservation_scores_validates():
    wrapped, x = make_wrapped(tiny_mlp, "3", (1, 8, 8), n=4)
    y = own_labels(wrapped, x)
    with pytest.raises(ValueError, match="stds"):
        fg.preservation_scores(wrapped, x, y, x, y, stds=(-0.1,))
    with pytest.raises(ValueError, match="one class index per example"):
        fg.preservation_scores(wrapped, x, y[:2], x, y)


def test_scores_csv_roundtrip_and_plot(tmp_path):
    wrapped, x = make_wrapped(tiny_mlp, "3", (1, 8, 8), n=30)
    y = own_labels(wrapped, x)
    rows = fg.preservation_scores(wrapped, x, y, x, y, stds=(0.1, 0.4), samples=2)
    path = fg.write_scores_csv(rows, tmp_path / "sub" / "scores.csv")
    assert fg.read_scores_csv(path) == rows
    assert not list(path.parent.glob("*.tmp"))
    fg.write_scores_csv(rows[:1], path)  # overwrite in place
    assert fg.read_scores_csv(path) == rows[:1]
    assert_png(fg.plot_scores(rows, tmp_path / "scores.png"))


def test_checkpoint_roundtrip(tmp_path):
    spec = RunSpec("mnist", "proposed_base", 10, 2, epochs=3)
    model = build_model(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # biases of the decoders are no longer zero
    path = fg.save_checkpoint(model, spec, tmp_path / fg.checkpoint_name(spec))
    assert path.name == "mnist_proposed_base_pc10_set2_e3.pt"
    loaded, loaded_spec = fg.load_checkpoint(path)
    assert loaded_spec == spec
    assert isinstance(loaded, SemanticNoiseWrapper) and not loaded.training
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(loaded(x), model.eval()(x))


def _fake_mnist(root: Path, per_class: int = 8) -> None:
    g = np.random.default_rng(0)

    def part(n_per_class):
        y = np.repeat(np.arange(10), n_per_class)
        return g.integers(0, 256, (len(y), 28, 28), dtype=np.uint8), y

    (xtr, ytr), (xva, yva), (xte, yte) = part(per_class), part(2), part(2)
    np.savez(root / "mnist.npz", x_train=xtr, y_train=ytr, x_valid=xva, y_valid=yva,
             x_test=xte, y_test=yte)


def test_make_figures_end_to_end_and_reuses_checkpoints(tmp_path):
    pytest.importorskip("sklearn")
    _fake_mnist(tmp_path)
    logs: list[str] = []
    kwargs = dict(dataset="mnist", data_dir=tmp_path, out_dir=tmp_path / "out",
                  checkpoint_dir=tmp_path / "ckpt", epochs=1, recon_per_class=3,
                  embed_per_class=2, max_background=12, stds=(0.2,), samples=1,
                  perplexity=5.0, log=logs.append)
    written = fg.make_figures(**kwargs)
    assert set(written) == set(fg.FIGURE_FILES)
    for key, path in written.items():
        assert path == tmp_path / "out" / fg.FIGURE_FILES[key]
        if path.suffix == ".png":
            assert_png(path)
    rows = fg.read_scores_csv(written["scores_csv"])
    assert {r["kind"] for r in rows} == {"random", "class_conditional"}
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "mnist_proposed_base_pc2_set1_e1.pt", "mnist_proposed_base_pc3_set1_e1.pt"
    ]
    assert sum(m.startswith("training") for m in logs) == 2
    assert not any(m.startswith("loaded") for m in logs)
    # a second run loads the saved network instead of training (it needs no data then)
    logs.clear()
    spec = RunSpec("mnist", "proposed_base", 2, 1, epochs=1)
    model = fg._trained(spec, None, tmp_path / "ckpt", "cpu", logs.append)
    assert logs == [f"loaded {tmp_path / 'ckpt' / fg.checkpoint_name(spec)}"]
    assert isinstance(model, SemanticNoiseWrapper)
    with pytest.raises(ValueError, match="holds the run"):  # a file of another run
        other = RunSpec("mnist", "proposed_base", 2, 1, epochs=9)
        fg.save_checkpoint(build_model(other), other, tmp_path / "c2" / fg.checkpoint_name(spec))
        fg._trained(spec, None, tmp_path / "c2", "cpu", None)


def test_cli_figures_passes_arguments(monkeypatch, tmp_path, capsys):
    from latent_aug import cli

    seen = {}

    def fake_make_figures(**kwargs):
        seen.update(kwargs)
        return {"figure5": tmp_path / "f5.png"}

    monkeypatch.setattr(fg, "make_figures", fake_make_figures)
    code = cli.main(["figures", "--dataset", "mnist", "--data-dir", "D", "--out", "O",
                     "--epochs", "7", "--checkpoint-dir", "C", "--max-background", "500",
                     "--device", "cpu"])
    assert code == 0
    assert (seen["dataset"], seen["data_dir"], seen["out_dir"], seen["epochs"],
            seen["checkpoint_dir"], seen["max_background"], seen["device"]) == (
        "mnist", "D", "O", 7, "C", 500, "cpu")
    assert str(tmp_path / "f5.png") in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["figures", "--epochs", "0"])
    with pytest.raises(SystemExit):
        cli.main([])


def test_imports_stay_light():
    """``import latent_aug.figures`` / ``latent_aug.cli`` pull in neither the plotting
    libraries nor anything from benchmarks/."""
    code = (
        "import sys, latent_aug, latent_aug.figures, latent_aug.cli\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('matplotlib', 'sklearn', 'benchmarks')]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "[]"
