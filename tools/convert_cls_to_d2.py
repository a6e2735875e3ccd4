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

import torch

from rwdet.d2.convert import (
    convert_rwdet_checkpoint,
    looks_like_torchvision_resnet,
    torchvision_resnet_to_d2,
)
from rwdet.d2.weights import META_KEY, save_d2_weights


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
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not args.output.endswith(".pkl"):
        raise SystemExit(f"output {args.output!r} must end in .pkl (detectron2 reads it as numpy)")
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    to = args.to
    if to == "auto":
        to = "rwdet" if isinstance(ckpt, dict) and "model_spec" in ckpt else "d2-resnet"
    if to == "rwdet":
        data = convert_rwdet_checkpoint(ckpt, use_ema=args.ema)
    else:
        state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else ckpt
        if not looks_like_torchvision_resnet(state):
            raise SystemExit(
                f"{args.checkpoint}: not an rwdet classification checkpoint (no 'model_spec') "
                "and not a torchvision-layout ResNet state dict"
            )
        data = torchvision_resnet_to_d2(state)
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


if __name__ == "__main__":
    main()
