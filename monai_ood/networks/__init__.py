from .deeplabv3 import DeepLabV3
from .presets import PRESETS, create_prototype_network, feature_layer_for
from .prototype_net import OODOutput, PrototypeOODNet, TrainOutput
from .prototypes import MahalanobisPrototypes, ProjectionHead

__all__ = [
    "DeepLabV3",
    "MahalanobisPrototypes",
    "OODOutput",
    "PRESETS",
    "ProjectionHead",
    "PrototypeOODNet",
    "TrainOutput",
    "create_prototype_network",
    "feature_layer_for",
]
