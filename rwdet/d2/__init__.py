"""Detectron2 integration: rwdet backbones with FPN, configs, weights transfer, demo data.

Importing this package registers the FPN backbone builders in detectron2's
``BACKBONE_REGISTRY`` and the tree-crown demo datasets in its ``DatasetCatalog``.
"""

from rwdet.d2.backbone import (
    RwdetBackbone,
    build_mobilenet_dnw_fpn_backbone,
    build_popup_resnet_fpn_backbone,
    build_randwire_fpn_backbone,
    build_rwdet_bottom_up,
    build_rwdet_fpn_backbone,
)
from rwdet.d2.checkpoint import RwdetCheckpointer
from rwdet.d2.config import add_rwdet_config
from rwdet.d2.treecrowns import register_treecrowns

register_treecrowns()

__all__ = [
    "RwdetBackbone",
    "RwdetCheckpointer",
    "add_rwdet_config",
    "build_mobilenet_dnw_fpn_backbone",
    "build_popup_resnet_fpn_backbone",
    "build_randwire_fpn_backbone",
    "build_rwdet_bottom_up",
    "build_rwdet_fpn_backbone",
    "register_treecrowns",
]
