"""The paper's reference networks (section 4.2, Figure 4).

Choices the paper leaves open, and what we use:

* activation: ReLU after every convolution and hidden fully-connected layer (Figure 4 draws
  none; ReLU is the standard choice of the time and of TensorFlow's examples);
* padding: ``(k - 1) // 2`` zeros, TensorFlow's "SAME" output sizes (MNIST 28 -> 14 -> 7 -> 4,
  CIFAR-10 24 -> 24 -> 12 -> 6 -> 3);
* latent z: the last hidden layer, i.e. the input of the classifier (``fc1`` of the MNIST
  net, ``fc2`` of the CIFAR-10 net), taken after its ReLU;
* initialization: Glorot-uniform weights and zero biases (TensorFlow's default then),
  not PyTorch's Kaiming-uniform default.
"""

from __future__ import annotations

from torch import Tensor, nn


def _init_glorot(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


class MnistNet(nn.Module):
    """MNIST net: conv 3×3/2 ×32, ×64, ×96, fc 128 (z = ``fc1``), fc 10. Input (B, 1, 28, 28)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(64, 96, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(96 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, num_classes)
        self.act = nn.ReLU()
        _init_glorot(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.act(self.conv3(x))
        z = self.act(self.fc1(x.flatten(1)))
        return self.fc2(z)


class CifarNet(nn.Module):
    """CIFAR-10 net on 24×24 crops: conv 5×5/1 ×64, 3×3/2 ×64, ×64, ×96, fc 128, 128
    (z = ``fc2``), fc 10. Input (B, 3, 24, 24)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 5, stride=1, padding=2)
        self.conv2 = nn.Conv2d(64, 64, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, stride=2, padding=1)
        self.conv4 = nn.Conv2d(64, 96, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(96 * 3 * 3, 128)
        self.fc2 = nn.Linear(128, 128)
        self.fc3 = nn.Linear(128, num_classes)
        self.act = nn.ReLU()
        _init_glorot(self)

    def forward(self, x: Tensor) -> Tensor:
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = self.act(conv(x))
        x = self.act(self.fc1(x.flatten(1)))
        z = self.act(self.fc2(x))
        return self.fc3(z)


#: The split point (latent z) of each reference backbone.
LATENT = {"mnist": "fc1", "cifar10": "fc2"}


def reference_backbone(dataset: str) -> nn.Module:
    """The paper's network for ``"mnist"`` or ``"cifar10"``."""
    if dataset == "mnist":
        return MnistNet()
    if dataset == "cifar10":
        return CifarNet()
    raise ValueError(f"No reference backbone for dataset {dataset!r}; use 'mnist' or 'cifar10'.")
