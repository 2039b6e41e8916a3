"""Model registry: ``create_model(name, num_classes=..., in_channels=..., mean=..., std=...)``.

Every entry is imported here explicitly, so one look shows them all.
"""

from edgeguard.models import mobilenetv2, resnet_cifar, smallcnn  # noqa: F401  (registers the entries)
from edgeguard.models.base import MODELS, Backbone, EdgeModel, Normalize, count_parameters, create_model

__all__ = ["MODELS", "Backbone", "EdgeModel", "Normalize", "count_parameters", "create_model"]
