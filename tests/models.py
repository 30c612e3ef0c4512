"""The table of small classifiers the wrapper tests are parametrized over.

Each :class:`Case` names a model factory, the split (the layer whose output is z), the shape
of one input, and the layers some tests poke at. Every model ends in a single ``Linear``
classifier right after ``split``'s ReLU, so the head decoder g2' is
``v -> relu(v @ W_classifier + b)`` for all of them (the class-conditional test relies on it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latent_aug import CifarNet, MnistNet
from latent_aug.data import DataSplit


class MLP(nn.Module):
    """Flatten -> fc1 -> ReLU -> fc2 (z) -> ReLU -> out. Input (B, 1, 4, 4)."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 12)
        self.fc2 = nn.Linear(12, 8)
        self.out = nn.Linear(8, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc1(x.flatten(1)))
        z = torch.relu(self.fc2(h))
        return self.out(z)


class FunctionalCNN(nn.Module):
    """Functional ReLUs and ``x.view(x.size(0), -1)``. Input (B, 1, 16, 16)."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = x.view(x.size(0), -1)
        z = F.relu(self.fc1(x))
        return self.fc2(z)


class PoolBNCNN(nn.Module):
    """Conv -> BatchNorm2d -> ReLU -> MaxPool2d, twice, then fc1 (z), fc2. Input (B, 3, 16, 16)."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        z = self.relu3(self.fc1(self.flatten(x)))
        return self.fc2(z)


class ResidualCNN(nn.Module):
    """A residual block before the split: ``h + relu(inner(h))``. Input (B, 1, 8, 8)."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.inner = nn.Conv2d(4, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 8 * 8, 16)
        self.fc2 = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.stem(x))
        h = h + F.relu(self.inner(h))
        z = F.relu(self.fc1(torch.flatten(h, 1)))
        return self.fc2(z)


@dataclass(frozen=True)
class Case:
    """One row of the table.

    Attributes:
        name: test id.
        factory: builds a fresh model (deterministic given the torch seed).
        split: the layer whose (post-ReLU) output is z.
        input_shape: ``(C, H, W)`` of one input.
        num_classes: width of the logits.
        first: the first weight layer (the input decoder's last step mirrors it).
        hidden: a weight layer strictly inside the encoder, below ``split``.
        classifier: the final ``Linear`` (the whole head f2).
    """

    name: str
    factory: Callable[[], nn.Module]
    split: str
    input_shape: tuple[int, ...]
    num_classes: int
    first: str
    hidden: str
    classifier: str

    def batch(self, n: int = 4, seed: int = 0) -> tuple[Tensor, Tensor]:
        """A fixed batch ``x: (n, *input_shape)``, ``t: (n,)`` with every row distinct."""
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(n, *self.input_shape, generator=g)
        t = torch.randint(0, self.num_classes, (n,), generator=g)
        return x, t


CASES = [
    Case("mlp", MLP, "fc2", (1, 4, 4), 3, "fc1", "fc1", "out"),
    Case("mnist", MnistNet, "fc1", (1, 28, 28), 10, "conv1", "conv2", "fc2"),
    Case("functional", FunctionalCNN, "fc1", (1, 16, 16), 5, "conv1", "conv2", "fc2"),
    Case("pool_bn", PoolBNCNN, "fc1", (3, 16, 16), 4, "conv1", "conv2", "fc2"),
    Case("cifar", CifarNet, "fc2", (3, 24, 24), 10, "conv1", "conv3", "fc3"),
]
CASE_BY_NAME = {c.name: c for c in CASES}

#: ``@cases`` parametrizes a test over the table as ``case``.
cases = pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])


class ShrinkNet(nn.Module):
    """fc1 -> Hardshrink (no registered decoder) -> fc2 (z) -> ReLU -> fc3."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.shrink = nn.Hardshrink()
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(torch.relu(self.fc2(self.shrink(self.fc1(x)))))


def tiny_split(seed: int = 0, n: int = 40, dataset: str = "mnist", n_eval: int = 30) -> DataSplit:
    """A run's data of random images (``n`` training, ``n_eval`` validation, the validation
    set reversed as test), shaped like ``dataset`` (CIFAR-10: 32×32 with 24×24 crops)."""
    g = torch.Generator().manual_seed(seed)
    shape, crop = ((1, 28, 28), None) if dataset == "mnist" else ((3, 32, 32), 24)
    x = torch.randn(n, *shape, generator=g)
    y = torch.arange(n) % 10
    xv = torch.randn(n_eval, *shape, generator=g)
    yv = torch.arange(n_eval) % 10
    return DataSplit(dataset, x, y, xv, yv, xv.flip(0), yv.flip(0), torch.zeros(1),
                     torch.arange(n), crop)


class ResBlock(nn.Module):
    """``x + relu(conv(x))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + F.relu(self.conv(x))


class StagedCNN(nn.Module):
    """A container split point: ``features`` is a Sequential ending in a residual block, so
    its output is the block's sum, not a layer's. Input (B, 1, 8, 8)."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), ResBlock(4))
        self.fc1 = nn.Linear(4 * 8 * 8, 16)
        self.fc2 = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        z = F.relu(self.fc1(torch.flatten(self.features(x), 1)))
        return self.fc2(z)
