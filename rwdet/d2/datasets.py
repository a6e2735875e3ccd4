"""Dataset checks before a detection run: fail at start, with the fix, not hours in.

COCO comes from detectron2's builtin registration (``coco_2017_train`` / ``coco_2017_val``
under ``$DETECTRON2_DATASETS``, default ``./datasets``). The tree-crown demo splits are
converted from the deepforest package on first use.
"""

from __future__ import annotations

import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from rwdet.d2 import treecrowns

COCO_LAYOUT = """\
expected layout (detectron2's builtin COCO):
  $DETECTRON2_DATASETS/coco/annotations/instances_train2017.json
  $DETECTRON2_DATASETS/coco/annotations/instances_val2017.json
  $DETECTRON2_DATASETS/coco/train2017/*.jpg
  $DETECTRON2_DATASETS/coco/val2017/*.jpg
Download train2017, val2017 and annotations_trainval2017 from https://cocodataset.org and
set DETECTRON2_DATASETS to the folder that contains coco/ (now: {root!r})."""


def dataset_names(cfg) -> list[str]:
    return list(dict.fromkeys(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)))


def check_datasets(cfg, names: list[str] | None = None) -> None:
    """Every dataset the config names is registered and its files exist (tree crowns: made)."""
    root = os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))
    for name in names if names is not None else dataset_names(cfg):
        if name not in DatasetCatalog.list():
            known = sorted(n for n in DatasetCatalog.list() if "coco_2017" in n or "tree" in n)
            raise ValueError(
                f"dataset {name!r} is not registered; e.g. {known}, or register your own "
                "with detectron2.data.datasets.register_coco_instances"
            )
        meta = MetadataCatalog.get(name)
        if meta.get("rwdet_treecrowns_root"):
            treecrowns.prepare(meta.rwdet_treecrowns_root)  # made on first use
            continue
        missing = [
            p
            for p in (meta.get("json_file"), meta.get("image_root"))
            if p is not None and not os.path.exists(p)
        ]
        if not missing:
            continue
        if "coco" in name:
            raise FileNotFoundError(
                f"dataset {name!r}: {missing} not found.\n" + COCO_LAYOUT.format(root=root)
            )
        raise FileNotFoundError(f"dataset {name!r}: {missing} not found")
