#!/usr/bin/env python
"""Faster R-CNN + FPN with rwdet backbones (Detectron2's train_net form).

    python tools/train_net.py --config-file configs/frcnn_randwire_c109.yaml --num-gpus 8
    python tools/train_net.py --config-file configs/frcnn_randwire_c109.yaml --num-gpus 1 \
        SOLVER.AMP.ENABLED True          # REFERENCE_WORLD_SIZE rescales batch/LR/schedule
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/.../model_final.pth

Multi-node: add --num-machines N --machine-rank R --dist-url tcp://HOST:PORT on every machine.
A run resumes automatically from the last checkpoint in OUTPUT_DIR (--no-auto-resume: don't).
"""

from detectron2.engine import default_argument_parser, launch

import rwdet.d2  # noqa: F401  (registers the rwdet backbones and demo datasets)
from rwdet.d2.engine import main


def parse_args(argv=None):
    parser = default_argument_parser()
    parser.add_argument(
        "--no-auto-resume",
        action="store_true",
        help="start from MODEL.WEIGHTS even if OUTPUT_DIR holds a checkpoint",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
