"""rwdet models; every model registers itself here on import."""

from rwdet.models import (  # noqa: F401  (registration)
    conv,
    mobilenet_dnw,
    neural_graph,
    randwire,
    sparse_resnet,
)
from rwdet.models.artifact import ModelFile, ModelSpec, load_model, read_model_file, save_model
from rwdet.models.interface import FeatureInfo, FeatureListModel, StagedClassifier
from rwdet.models.randwire import RandWire
from rwdet.models.registry import (
    CLASSIFIER_MODULES,
    MODELS,
    ModelCapabilities,
    build_model,
    get_graphs,
    list_models,
    model_capabilities,
    register_model,
    stage_outputs,
)

__all__ = [
    "CLASSIFIER_MODULES",
    "MODELS",
    "FeatureInfo",
    "FeatureListModel",
    "ModelCapabilities",
    "ModelFile",
    "ModelSpec",
    "RandWire",
    "StagedClassifier",
    "build_model",
    "get_graphs",
    "list_models",
    "load_model",
    "model_capabilities",
    "read_model_file",
    "register_model",
    "save_model",
    "stage_outputs",
]
