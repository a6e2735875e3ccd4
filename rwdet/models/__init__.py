"""rwdet models; every model registers itself here on import."""

from rwdet.models import mobilenet_dnw, randwire, sparse_resnet  # noqa: F401  (registration)
from rwdet.models.randwire import RandWire
from rwdet.models.registry import (
    CLASSIFIER_MODULES,
    MODELS,
    build_model,
    get_graphs,
    list_models,
    register_model,
)

__all__ = [
    "CLASSIFIER_MODULES",
    "MODELS",
    "RandWire",
    "build_model",
    "get_graphs",
    "list_models",
    "register_model",
]
