"""Dataset checks before a detection run: fail at start, with the fix, not hours in.

COCO comes from detectron2's builtin registration (``coco_2017_train`` / ``coco_2017_val``
under ``$DETECTRON2_DATASETS``, default ``./datasets``). The tree-crown demo splits are
converted from the deepforest package on first use.

A COCO-format json is read once here (detectron2 reads it again when it builds the loader):
a parse error names the file and the position, images the json lists but the disk lacks are
listed (otherwise the first batch that draws one fails, hours in), and the boxes detectron2
changes without a word are counted in one log line: zero or negative width/height (dropped)
and boxes extending outside their image (clipped to it). Existence is checked with one
``os.listdir`` per image folder, not a ``stat`` per image: COCO train has 118k images.

Datasets of the user's own are registered from the command line (``tools/train_net.py
--dataset NAME JSON IMAGE_ROOT``, ``register_cli_datasets``) with detectron2's
``register_coco_instances``; for those, ``MODEL.ROI_HEADS.NUM_CLASSES`` must equal the json's
category count.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from rwdet.d2 import treecrowns
from rwdet.run.errors import UserError

logger = logging.getLogger(__name__)
# Tolerance in pixels for "outside the image": annotation tools round box corners.
CLIP_TOLERANCE = 0.01
SHOW_MISSING = 5
# Metadata key marking a dataset registered by ``register_cli_datasets``.
CLI_MARK = "rwdet_cli_dataset"
DATASET_USAGE = "--dataset NAME JSON IMAGE_ROOT"

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
            check_coco_json(name, meta.json_file, meta.image_root)
            continue
        missing = [
            p
            for p in (meta.get("json_file"), meta.get("image_root"))
            if p is not None and not os.path.exists(p)
        ]
        if not missing:
            if meta.get("json_file") and meta.get("image_root"):
                check_coco_json(name, meta.json_file, meta.image_root)
                if meta.get(CLI_MARK):
                    check_num_classes(cfg, name, meta.json_file, meta.image_root)
                    logger.info(
                        "dataset %r (--dataset): %s, images under %s",
                        name,
                        meta.json_file,
                        meta.image_root,
                    )
            continue
        if "coco" in name:
            raise FileNotFoundError(
                f"dataset {name!r}: {missing} not found.\n" + COCO_LAYOUT.format(root=root)
            )
        raise FileNotFoundError(f"dataset {name!r}: {missing} not found")


def register_cli_datasets(specs) -> list[str]:
    """Register ``[(name, json, image_root), ...]`` (``--dataset``, repeatable) as COCO-format
    datasets; returns the names. Runs in the launcher and again in every spawned worker (a
    fresh process knows only the builtin datasets); registering the same triple twice in one
    process is a no-op, and a name this function registered before is re-registered.

    A wrong number of values, a name detectron2 or rwdet already uses, a name given twice, a
    missing json file or image folder is a one-line ``UserError``.
    """
    names = []
    for spec in specs or ():
        spec = list(spec)
        if len(spec) != 3:
            raise UserError(
                f"--dataset takes 3 values, NAME JSON IMAGE_ROOT, got {len(spec)}: "
                f"{' '.join(map(str, spec)) or '(none)'}; e.g. --dataset mine_train "
                "annotations/train.json images/"
            )
        name, json_file, image_root = (str(v) for v in spec)
        if not name or any(c.isspace() for c in name) or name.startswith("-"):
            raise UserError(f"--dataset: {name!r} is not a usable dataset name; {DATASET_USAGE}")
        if name in names:
            raise UserError(f"--dataset {name!r} is given twice; give each dataset once")
        if not os.path.isfile(json_file):
            what = "is a directory" if os.path.isdir(json_file) else "does not exist"
            what += _override_hint(json_file)
            raise UserError(
                f"--dataset {name}: annotation file {json_file!r} {what}; pass a COCO-format "
                f"json file ({DATASET_USAGE})"
            )
        if not os.path.isdir(image_root):
            what = "is a file" if os.path.exists(image_root) else "does not exist"
            what += _override_hint(image_root)
            raise UserError(
                f"--dataset {name}: image folder {image_root!r} {what}; pass the folder the "
                f"json's file_name entries are relative to ({DATASET_USAGE})"
            )
        json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            if not meta.get(CLI_MARK):
                raise UserError(
                    f"--dataset: the name {name!r} is already registered by detectron2 or "
                    "rwdet (a builtin dataset); choose another name, e.g. "
                    f"{'my_' + name!r}"
                )
            if (meta.json_file, meta.image_root) == (json_file, image_root):
                names.append(name)
                continue
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {CLI_MARK: True}, json_file, image_root)
        names.append(name)
    return names


def _override_hint(value: str) -> str:
    """A config key taken as a path: --dataset got too few values before the overrides."""
    if os.path.exists(value) or not re.fullmatch(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+", value):
        return ""
    return f" (it is a config key: --dataset got fewer than 3 values before {value})"


def check_num_classes(cfg, name: str, json_file: str, image_root: str) -> None:
    """``MODEL.ROI_HEADS.NUM_CLASSES`` equals the dataset's category count (one-line fix)."""
    n = _categories[_file_key(json_file, image_root)]
    if n == 0:
        raise UserError(
            f"dataset {name!r}: {json_file} lists no 'categories'; a COCO-format file needs "
            "a 'categories' list ([{'id': 1, 'name': ...}, ...])"
        )
    have = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    if have != n:
        raise UserError(
            f"dataset {name!r} has {n} categories ({json_file}) but MODEL.ROI_HEADS.NUM_CLASSES "
            f"is {have}; set MODEL.ROI_HEADS.NUM_CLASSES {n}"
        )


_checked: dict[tuple, tuple[int, int]] = {}
_categories: dict[tuple, int] = {}  # same keys: the json's category count


def _file_key(json_file: str, image_root: str) -> tuple:
    st = os.stat(json_file)
    return (os.path.realpath(json_file), st.st_mtime_ns, st.st_size, os.path.realpath(image_root))


def check_coco_json(name: str, json_file: str, image_root: str) -> tuple[int, int]:
    """Validate a COCO-format dataset (module docstring); returns (dropped, clipped) counts.

    The result is kept per file version, so naming a dataset twice reads its json once.
    """
    key = _file_key(json_file, image_root)
    if key not in _checked:
        data = _read_json(name, json_file)
        images = _images(name, json_file, data)
        _check_images_exist(name, json_file, image_root, images)
        cats = data.get("categories")
        _categories[key] = len(cats) if isinstance(cats, list) else 0
        _checked[key] = _count_boxes(name, json_file, data, images)
    dropped, clipped = _checked[key]
    if dropped or clipped:
        logger.warning(
            "dataset %r (%s): %d boxes with zero or negative width/height are dropped and %d "
            "boxes extending outside their image are clipped to it",
            name,
            json_file,
            dropped,
            clipped,
        )
    return dropped, clipped


def _read_json(name: str, json_file: str):
    try:
        with open(json_file, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(
            f"dataset {name!r}: {json_file} is not valid JSON: {e.msg} at line {e.lineno} "
            f"column {e.colno} (char {e.pos}); repair or re-export the annotation file"
        ) from None
    except UnicodeDecodeError as e:
        raise UserError(
            f"dataset {name!r}: {json_file} is not a JSON text file ({e.reason} at byte "
            f"{e.start}); repair or re-export the annotation file"
        ) from None


def _images(name: str, json_file: str, data) -> dict:
    """``{image id: image entry}``, after checking the entries detectron2 reads."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(
            f"dataset {name!r}: {json_file} is not a COCO annotation file (it needs an "
            "'images' list, and 'annotations' and 'categories' lists to train)"
        )
    need = ("id", "file_name", "width", "height")
    bad = [
        i
        for i, im in enumerate(data["images"])
        if not isinstance(im, dict) or any(k not in im for k in need)
    ]
    if bad:
        raise UserError(
            f"dataset {name!r}: {len(bad)} entries of 'images' in {json_file} lack one of "
            f"{list(need)}, e.g. images[{bad[0]}] = {str(data['images'][bad[0]])[:200]}"
        )
    return {im["id"]: im for im in data["images"]}


def _check_images_exist(name: str, json_file: str, image_root: str, images: dict) -> None:
    by_folder: dict[str, list[str]] = {}
    for im in images.values():
        folder, base = os.path.split(os.path.join(image_root, im["file_name"]))
        by_folder.setdefault(folder, []).append(base)
    missing = []
    for folder, files in by_folder.items():
        try:
            present = set(os.listdir(folder))
        except OSError:  # no such folder, or not a folder: all its images are missing
            present = set()
        missing += [os.path.join(folder, f) for f in files if f not in present]
    if missing:
        shown = ", ".join(os.path.relpath(p, image_root) for p in missing[:SHOW_MISSING])
        more = f" and {len(missing) - SHOW_MISSING} more" if len(missing) > SHOW_MISSING else ""
        raise UserError(
            f"dataset {name!r}: {len(missing)} of {len(images)} images listed in {json_file} "
            f"are missing under {image_root}: {shown}{more}; add them or remove their entries "
            "(file names are relative to the image folder)"
        )


def _count_boxes(name: str, json_file: str, data: dict, images: dict) -> tuple[int, int]:
    anns = data.get("annotations") or []
    if not isinstance(anns, list):
        raise UserError(f"dataset {name!r}: 'annotations' in {json_file} is not a list")
    dropped = clipped = 0
    malformed = []
    for i, a in enumerate(anns):
        box = a.get("bbox") if isinstance(a, dict) else None
        try:
            x, y, w, h = (float(v) for v in box)
            ok = all(math.isfinite(v) for v in (x, y, w, h))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            malformed.append(i)
            continue
        if a.get("iscrowd", 0):
            continue  # crowd regions never become training boxes
        if w <= 0 or h <= 0:
            dropped += 1
            continue
        im = images.get(a.get("image_id"))
        if im is None:
            continue  # detectron2 reads annotations per listed image: this one is never used
        t = CLIP_TOLERANCE
        if x < -t or y < -t or x + w > im["width"] + t or y + h > im["height"] + t:
            clipped += 1
    if malformed:
        i = malformed[0]
        raise UserError(
            f"dataset {name!r}: {len(malformed)} annotations in {json_file} have no valid "
            f"'bbox' (4 finite numbers [x, y, width, height]), e.g. annotations[{i}] = "
            f"{str(anns[i])[:200]}"
        )
    return dropped, clipped
