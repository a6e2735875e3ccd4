#!/usr/bin/env python
"""Draw a detector's boxes on a held-out image next to its ground truth (one PNG).

    python tools/visualize_det.py --config-file configs/frcnn_randwire_demo.yaml \
        MODEL.WEIGHTS output/det/frcnn_randwire_demo/model_final.pth
    python tools/visualize_det.py --config-file ... --dataset mine_val val.json images/ \
        --split mine_val --index 3 --out boxes.png MODEL.WEIGHTS ... MODEL.ROI_HEADS.NUM_CLASSES 3

Left: the predictions above --score-thresh; right: the annotated boxes. The image is the
--index-th of the split (default: DATASETS.TEST[0], the held-out tiles in the demo). The config,
weights and graphs are read as tools/train_net.py --eval-only reads them (safe YAML, graph
checks). Drawing uses detectron2's Visualizer (OpenCV, installed by make setup).
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rwdet.d2  # noqa: E402,F401  (registers the rwdet backbones and demo datasets)
from rwdet.run.errors import UserError, run_cli  # noqa: E402

PROG = "visualize_det.py"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{message} (see {PROG} --help)")


def parse_args(argv):
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", required=True, help="Detectron2 config of the detector")
    p.add_argument("--split", default=None, help="registered dataset (default DATASETS.TEST[0])")
    p.add_argument("--index", type=int, default=0, help="which image of the split (default 0)")
    p.add_argument("--score-thresh", type=float, default=0.5, help="boxes drawn above this")
    p.add_argument("--out", default=None, help="PNG to write (default: OUTPUT_DIR/boxes_<split>"
                   "_<index>.png)")  # fmt: skip
    p.add_argument("--dataset", nargs=3, action="append", default=[],
                   metavar=("NAME", "JSON", "IMAGE_ROOT"),
                   help="register a COCO-format dataset, as tools/train_net.py does")  # fmt: skip
    p.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides")
    args = p.parse_intermixed_args(argv)
    if not 0.0 <= args.score_thresh <= 1.0:
        raise UserError(f"--score-thresh {args.score_thresh} is out of range; use 0..1")
    if args.index < 0:
        raise UserError(f"--index {args.index} is out of range; it must be >= 0")
    if not os.path.isfile(args.config_file):
        raise UserError(f"--config-file {args.config_file!r} does not exist")
    return args


def pick_record(split: str, index: int) -> dict:
    from detectron2.data import DatasetCatalog

    if split not in DatasetCatalog.list():
        raise UserError(
            f"--split {split!r} is not a registered dataset; register it with --dataset NAME "
            "JSON IMAGE_ROOT, or pick one of the registered ones (e.g. treecrowns_val)"
        )
    records = DatasetCatalog.get(split)
    if index >= len(records):
        raise UserError(
            f"--index {index}: {split!r} has {len(records)} images (0..{len(records) - 1})"
        )
    return records[index]


def draw(cfg, model, record: dict, split: str, score_thresh: float):
    """((H, 2W, 3) RGB image: predictions | ground truth, boxes drawn, boxes annotated)."""
    from detectron2.data import MetadataCatalog
    from detectron2.data import detection_utils as utils
    from detectron2.data import transforms as T
    from detectron2.utils.visualizer import Visualizer

    image = utils.read_image(record["file_name"], format=cfg.INPUT.FORMAT)
    aug = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    resized = aug.get_transform(image).apply_image(image)
    tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
    with torch.no_grad():
        out = model([{"image": tensor, "height": image.shape[0], "width": image.shape[1]}])[0]
    inst = out["instances"].to("cpu")
    inst = inst[inst.scores >= score_thresh]
    rgb = image[:, :, ::-1] if cfg.INPUT.FORMAT == "BGR" else image
    meta = MetadataCatalog.get(split)
    pred = Visualizer(rgb, meta).draw_instance_predictions(inst).get_image()
    truth = Visualizer(rgb, meta).draw_dataset_dict(record).get_image()
    return np.concatenate([pred, truth], axis=1), len(inst), len(record.get("annotations", []))


def main(argv) -> int:
    from PIL import Image

    from rwdet.atomic import atomic_write
    from rwdet.d2.checkpoint import RwdetCheckpointer
    from rwdet.d2.datasets import register_cli_datasets
    from rwdet.d2.engine import Trainer, load_config, unverified_graphs

    args = parse_args(argv)
    register_cli_datasets(args.dataset)
    cfg = load_config(args)
    if not cfg.MODEL.WEIGHTS:
        raise UserError("MODEL.WEIGHTS is empty: pass the trained detector, e.g. MODEL.WEIGHTS "
                        "output/det/<run>/model_final.pth")  # fmt: skip
    split = args.split or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)
    if split is None:
        raise UserError("no --split given and DATASETS.TEST is empty; pass --split NAME")
    record = pick_record(split, args.index)
    torch.manual_seed(0)
    model = Trainer.build_model(cfg).eval()
    RwdetCheckpointer(model, **unverified_graphs(cfg)).load(cfg.MODEL.WEIGHTS)
    canvas, shown, annotated = draw(cfg, model, record, split, args.score_thresh)
    out = args.out or os.path.join(cfg.OUTPUT_DIR, f"boxes_{split}_{args.index}.png")
    if os.path.isdir(out):
        raise UserError(f"--out {out!r} is a directory; name the PNG to write")
    atomic_write(out, lambda f: Image.fromarray(canvas).save(f, format="PNG"))
    name = os.path.basename(record["file_name"])
    print(f"{PROG}: wrote {out}: {name} of {split}, {shown} predicted boxes "
          f"(score >= {args.score_thresh:g}) | {annotated} annotated")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, PROG))
