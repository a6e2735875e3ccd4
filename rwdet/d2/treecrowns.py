"""The embedded detection data: aerial tree-crown photos with boxes from PyPI ``deepforest``.

``deepforest==2.1.0`` ships four annotated RGB photos (Pascal VOC XML): two large NEON
Yellowstone crops (2299x2472 px with 574 trees, 1249x1035 px with 279 trees) and two 400x400
px tiles (OSBS_029: 61 trees; SOAP_061: 37 trees labelled Alive/Dead). The package is only a
data source; it is located with ``importlib`` and never imported.

Conversion to COCO (one category, "tree"; Alive/Dead/Tree all count as trees):

- Each large image is cut at ``H - 400``: the bottom 400-px band is the **val** split, the rest
  is **train**, so no pixel is in both splits. Each part is tiled into a grid of non-overlapping
  tiles of about 400x400 px (the part's width and height divided into round(size / 400)
  equal pieces), which keeps every tile close to the size of the two small photos.
- A box cut by a tile or split border is kept (clipped) when at least half of its area lies
  in the tile, otherwise dropped there.
- The two 400x400 photos go to train whole.
- For choosing hyper-parameters without looking at val, train is split once more into
  **select** (the bottom row of train tiles of each large photo, next to the val band: 9 tiles,
  laid out like val) and **fit** (the other 29). Both are json files over the train images;
  a recipe is chosen by training on fit and scoring on select, then trained on train and
  reported on val (``tools/docs_numbers.py transfer``).

Result: ``$DETECTRON2_DATASETS/treecrowns/{train,val}/*.png`` and
``$DETECTRON2_DATASETS/treecrowns/annotations/instances_{train,val,fit,select}.json`` (default
root ``datasets/``, gitignored), registered as ``treecrowns_{train,val,fit,select}``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import xml.etree.ElementTree as ET
from functools import partial

from PIL import Image

from rwdet.atomic import atomic_write

logger = logging.getLogger(__name__)

TILE = 400
MIN_VISIBLE = 0.5
SPLITS = ("train", "val")
# Subsets of train for hyper-parameter selection (their images live in train/).
SELECTION_SPLITS = ("fit", "select")
# Bump when the conversion rules change, so a stale cache is rebuilt.
FORMAT_VERSION = 2
LARGE = ("2019_YELL_2_528000_4978000_image_crop2", "2019_YELL_2_541000_4977000_image_crop")
SMALL = ("OSBS_029", "SOAP_061")


def deepforest_data_dir() -> str:
    spec = importlib.util.find_spec("deepforest")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the tree-crown demo data comes from PyPI deepforest==2.1.0 (data files only); "
            "install it with: .venv/bin/pip install --no-deps deepforest==2.1.0  (or make setup)"
        )
    for loc in spec.submodule_search_locations:
        d = os.path.join(loc, "data")
        if os.path.isdir(d):
            return d
    raise FileNotFoundError(f"deepforest is installed but has no data folder in {spec.origin}")


def default_root() -> str:
    return os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "treecrowns")


def read_voc(xml_path: str) -> tuple[str, list[tuple[float, float, float, float]]]:
    root = ET.parse(xml_path).getroot()
    boxes = []
    for obj in root.iter("object"):
        b = obj.find("bndbox")
        x0, y0, x1, y1 = (float(b.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
        if x1 > x0 and y1 > y0:
            boxes.append((x0, y0, x1, y1))
    return root.findtext("filename"), boxes


def _cuts(size: int) -> list[int]:
    n = max(1, round(size / TILE))
    return [round(i * size / n) for i in range(n + 1)]


def _clip(boxes, x0, y0, x1, y1):
    """Boxes visible in window (x0, y0, x1, y1), clipped and shifted to its origin."""
    out = []
    for bx0, by0, bx1, by1 in boxes:
        cx0, cy0, cx1, cy1 = max(bx0, x0), max(by0, y0), min(bx1, x1), min(by1, y1)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        if (cx1 - cx0) * (cy1 - cy0) >= MIN_VISIBLE * (bx1 - bx0) * (by1 - by0):
            out.append((cx0 - x0, cy0 - y0, cx1 - x0, cy1 - y0))
    return out


def _tiles(region):
    x0, y0, x1, y1 = region
    xs, ys = _cuts(x1 - x0), _cuts(y1 - y0)
    for j in range(len(ys) - 1):
        for i in range(len(xs) - 1):
            yield (x0 + xs[i], y0 + ys[j], x0 + xs[i + 1], y0 + ys[j + 1])


def plan(data_dir: str) -> dict[str, list[tuple[str, str, tuple, list]]]:
    """{split: [(tile name, source image path, window, boxes in tile coordinates)]}."""
    out = {s: [] for s in SPLITS}
    for stem in LARGE + SMALL:
        xml = os.path.join(data_dir, stem + ".xml")
        if not os.path.isfile(xml):
            raise FileNotFoundError(f"tree-crown annotation {xml} is missing; reinstall deepforest")
        filename, boxes = read_voc(xml)
        image = os.path.join(data_dir, filename)
        if not os.path.isfile(image):
            image = os.path.join(data_dir, stem + ".png")
        with Image.open(image) as im:
            w, h = im.size
        if stem in SMALL:
            out["train"].append((stem, image, (0, 0, w, h), _clip(boxes, 0, 0, w, h)))
            continue
        cut = h - TILE
        for split, region in (("train", (0, 0, w, cut)), ("val", (0, cut, w, h))):
            for win in _tiles(region):
                name = f"{stem}_x{win[0]}_y{win[1]}"
                out[split].append((name, image, win, _clip(boxes, *win)))
    return out


def selection_names(train_tiles) -> set[str]:
    """Names of the select tiles: per large photo, the train tiles of the bottom row."""
    bottom = {}
    for name, _src, win, _boxes in train_tiles:
        stem = name.split("_x")[0]
        if stem in LARGE:
            bottom[stem] = max(bottom.get(stem, -1), win[1])
    return {
        name
        for name, _src, win, _boxes in train_tiles
        if name.split("_x")[0] in bottom and win[1] == bottom[name.split("_x")[0]]
    }


def _subset(data: dict, keep: set[str]) -> dict:
    images = [im for im in data["images"] if im["file_name"][: -len(".png")] in keep]
    ids = {im["id"] for im in images}
    anns = [a for a in data["annotations"] if a["image_id"] in ids]
    return {**data, "images": images, "annotations": anns}


def _write_json(path: str, data: dict) -> None:
    atomic_write(path, lambda f: json.dump(data, f), mode="w")


def json_path(root: str, split: str) -> str:
    return os.path.join(root, "annotations", f"instances_{split}.json")


def is_prepared(root: str) -> bool:
    for split in SPLITS + SELECTION_SPLITS:
        p = json_path(root, split)
        if not os.path.isfile(p):
            return False
        with open(p) as f:
            if json.load(f).get("info", {}).get("rwdet_format") != FORMAT_VERSION:
                return False
    return True


def prepare(root: str | None = None, data_dir: str | None = None) -> str:
    """Convert the deepforest VOC annotations to tiled COCO splits under ``root`` (idempotent)."""
    root = root or default_root()
    if is_prepared(root):
        return root
    data_dir = data_dir or deepforest_data_dir()
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    sources: dict[str, Image.Image] = {}
    tiles_by_split = plan(data_dir)
    for split, tiles in tiles_by_split.items():
        os.makedirs(os.path.join(root, split), exist_ok=True)
        images, anns = [], []
        for image_id, (name, src, win, boxes) in enumerate(tiles, start=1):
            if src not in sources:
                sources[src] = Image.open(src).convert("RGB")
            fname = name + ".png"
            tile = sources[src].crop(win)
            # A unique temp name per writer: every rank of a fresh run may prepare at once.
            atomic_write(os.path.join(root, split, fname), partial(tile.save, format="PNG"))
            images.append(
                {"id": image_id, "file_name": fname, "width": tile.width, "height": tile.height}
            )
            for x0, y0, x1, y1 in boxes:
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": image_id,
                        "category_id": 1,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": (x1 - x0) * (y1 - y0),
                        "iscrowd": 0,
                    }
                )
        data = {
            "info": {
                "description": "deepforest 2.1.0 tree crowns, tiled by rwdet",
                "rwdet_format": FORMAT_VERSION,
            },
            "images": images,
            "annotations": anns,
            "categories": [{"id": 1, "name": "tree"}],
        }
        if split == "train":
            select = selection_names(tiles)
            fit = {t[0] for t in tiles} - select
            for sub, keep in (("fit", fit), ("select", select)):
                _write_json(json_path(root, sub), _subset(data, keep))
        # train/val last: is_prepared checks them too, so a half-made cache is remade.
        _write_json(json_path(root, split), data)
        logger.info("treecrowns %s: %d tiles, %d boxes", split, len(images), len(anns))
    return root


def register_treecrowns(root: str | None = None, prefix: str = "treecrowns") -> None:
    """Register ``<prefix>_{train,val,fit,select}``; data is converted on first use."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import load_coco_json

    r = root or default_root()
    for split in SPLITS + SELECTION_SPLITS:
        name = f"{prefix}_{split}"
        if name in DatasetCatalog.list():
            continue
        folder = os.path.join(r, "val" if split == "val" else "train")

        def load(split=split, name=name, folder=folder):
            prepare(r)
            return load_coco_json(json_path(r, split), folder, name)

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(
            json_file=json_path(r, split),
            image_root=folder,
            evaluator_type="coco",
            thing_classes=["tree"],
            # Marks the demo data: check_datasets prepares this root, and no user dataset
            # that merely has a "tree" class.
            rwdet_treecrowns_root=r,
        )
