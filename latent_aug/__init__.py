"""latent_aug: semantic-noise latent regularization for any PyTorch classifier.

    from latent_aug import wrap
    model = wrap(model, split="fc1")
    loss = F.cross_entropy(model(x), t) + model.aux_loss(t)
"""

from .backbones import CifarNet, MnistNet
from .config import SemanticNoiseConfig
from .decoders import register_decoder
from .errors import (
    AlreadyWrappedError,
    ConfigError,
    DatasetNotFoundError,
    LatentAugError,
    NonFiniteLossError,
    NotACutPointError,
    NoTrainingForwardError,
    SplitNotFoundError,
    TargetError,
    TracingError,
    UnsupportedLayerError,
)
from .losses import LossBreakdown
from .wrapper import SemanticNoiseWrapper, list_split_points, wrap

__version__ = "0.1.0"

__all__ = [
    "AlreadyWrappedError",
    "CifarNet",
    "ConfigError",
    "DatasetNotFoundError",
    "LatentAugError",
    "LossBreakdown",
    "MnistNet",
    "NoTrainingForwardError",
    "NonFiniteLossError",
    "NotACutPointError",
    "SemanticNoiseConfig",
    "SemanticNoiseWrapper",
    "SplitNotFoundError",
    "TargetError",
    "TracingError",
    "UnsupportedLayerError",
    "list_split_points",
    "register_decoder",
    "wrap",
]
