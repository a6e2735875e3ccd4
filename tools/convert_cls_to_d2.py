#!/usr/bin/env python
"""Convert an rwdet classification checkpoint into Detectron2 backbone weights (.pkl).

    python tools/convert_cls_to_d2.py output/cls/randwire_c109/best.pth randwire_c109.pkl
    python tools/train_net.py --config-file configs/frcnn_randwire_c109.yaml \
        MODEL.WEIGHTS randwire_c109.pkl

The file holds numpy arrays under the exact detection-model keys (classifier dropped), the
model spec and the stage graphs, so the detection backbone rebuilds exactly these graphs.
A torchvision-layout ResNet state dict converts to detectron2's ResNet (--to d2-resnet), for
configs/frcnn_r50_baseline.yaml.
"""

import argparse
import os
import sys

from rwdet.checkpoint_io import load_torch_file
from rwdet.d2.convert import (
    convert_rwdet_checkpoint,
    looks_like_torchvision_resnet,
    torchvision_resnet_to_d2,
)
from rwdet.d2.weights import META_KEY, save_d2_weights
from rwdet.run.errors import UserError, run_cli

PROG = "convert_cls_to_d2.py"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", help="classification checkpoint (.pth, torch.save'd dict)")
    p.add_argument("output", help="detectron2 weights file to write (.pkl)")
    p.add_argument("--ema", action="store_true", help="convert the EMA weights")
    p.add_argument(
        "--to",
        choices=("auto", "rwdet", "d2-resnet"),
        default="auto",
        help="rwdet: rwdet backbone (checkpoints with a model_spec); d2-resnet: detectron2's "
        "ResNet from a torchvision-layout ResNet; auto: by the checkpoint's content",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p.parse_args(argv)


def check_output(path: str, overwrite: bool) -> None:
    """Refuse an output that cannot or should not be written before the (slow) conversion."""
    if not path.endswith(".pkl"):
        raise UserError(
            f"output {path!r} must end in .pkl (detectron2 reads it as numpy); rename it"
        )
    if os.path.isdir(path):
        raise UserError(f"output {path!r} is a directory; name a .pkl file to write")
    if os.path.exists(path) and not overwrite:
        raise UserError(
            f"output {path!r} already exists; pass --overwrite to replace it, or choose "
            "another name"
        )
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder):  # the first existing ancestor is where folders get made
        if os.path.exists(folder):
            raise UserError(
                f"output {path!r}: {folder!r} is a file, not a folder; choose another path"
            )
        folder = os.path.dirname(folder)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(
            f"output {path!r}: folder {folder!r} is not writable; choose a writable path"
        )


def convert(args) -> dict:
    ckpt = load_torch_file(args.checkpoint)
    to = args.to
    if to == "auto":
        to = "rwdet" if isinstance(ckpt, dict) and "model_spec" in ckpt else "d2-resnet"
    try:
        if to == "rwdet":
            return convert_rwdet_checkpoint(ckpt, use_ema=args.ema, where=repr(args.checkpoint))
        state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else ckpt
        if not isinstance(state, dict) or not looks_like_torchvision_resnet(state):
            raise UserError(
                f"{args.checkpoint!r}: not an rwdet classification checkpoint (no 'model_spec') "
                "and not a torchvision-layout ResNet state dict; pass a checkpoint written by "
                "tools/train_cls.py"
            )
        return torchvision_resnet_to_d2(state)
    except UserError:
        raise
    except ValueError as e:  # the conversion's own checks: name the file they are about
        raise UserError(f"{args.checkpoint!r}: {e}") from e


def main(argv=None) -> int:
    args = parse_args(argv)
    check_output(args.output, args.overwrite)
    data = convert(args)
    save_d2_weights(args.output, data)
    meta = data[META_KEY]
    spec = meta.get("model_spec") or {"name": "detectron2 ResNet"}
    print(f"wrote {args.output}: {len(data['model'])} backbone tensors of {spec['name']}")
    for note in meta.get("adaptations") or []:
        print(f"  adapted: {note}")
    if meta.get("dropped_modules"):
        print(f"  dropped classifier modules: {meta['dropped_modules']}")
    if meta.get("graphs_fingerprint"):
        print(f"  graphs fingerprint: {meta['graphs_fingerprint']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, PROG))
