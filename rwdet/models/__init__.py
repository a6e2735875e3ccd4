"""rwdet models; every model registers itself here on import."""

from rwdet.models import randwire  # noqa: F401  (registers randwire_*)
from rwdet.models import mobilenet_dnw, sparse_resnet  # noqa: F401  (mobilenetv1_*, resnet*_)
from rwdet.models.randwire import RandWire
from rwdet.models.registry import MODELS, build_model, get_graphs, list_models, register_model

__all__ = ["MODELS", "RandWire", "build_model", "get_graphs", "list_models", "register_model"]
