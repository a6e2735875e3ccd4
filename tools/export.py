#!/usr/bin/env python
"""Export an rwdet model to TorchScript or ONNX, checked against eager on a real image.

python tools/export.py randwire_small --format torchscript --out randwire_small.pt
python tools/export.py output/cls/<run>/best.pth --format onnx --out model.onnx
python tools/export.py --config-file configs/<det>.yaml --format torchscript --out det.pt \\
    MODEL.WEIGHTS output/det/<run>/model_final.pth

MODEL_OR_CHECKPOINT is a registered model name (random weights; ``--model-kwargs`` passes
``build_model`` arguments as JSON) or a checkpoint written by ``tools/train_cls.py`` (loaded with
``weights_only=True``, its graphs checked by ``rwdet.models.verify``). A DNW or edge-popup model
is first frozen into the subnetwork it found (``rwdet.nn.export.export_subnetwork``: fixed dense
layers and fixed gates), then traced in eval mode; the aggregation and the DNW/popup ops take
their plain tensor-math path under tracing and ONNX export (``rwdet.nn.aggregate.exporting``).
Before tracing, every BatchNorm (or FrozenBN) that follows a conv is folded into it and the
aggregation weights' sigmoid is precomputed (``rwdet.nn.fuse_for_inference``); ``--no-fuse``
exports the unfused graph. Either way the check compares with the unfused eager model.

The check: the exported model (reloaded from its bytes: ``torch.jit.load``, or ONNX's reference
evaluator ``onnx.reference``) and the eager model run one real image (``--image``, by default a
deepforest tree-crown photo for 3 channels or a Fashion-MNIST test image for 1, resized to
``--input-size``); the file is written, atomically, only when
``max |exported - eager| <= 1e-4 * max |eager|`` (float32 on the CPU) for every output. The max
abs difference is printed. Nothing is written when tracing, exporting or the check fails.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from rwdet.run.errors import UserError, run_cli  # noqa: E402

PROG = "export.py"
FORMATS = ("torchscript", "onnx")
RTOL = 1e-4  # max |exported - eager| <= RTOL * max |eager|
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TREE_PHOTO = "OSBS_029.png"  # deepforest's 400x400 tree-crown photo


class ExportCheckError(RuntimeError):
    """The exported model does not reproduce the eager model's outputs (nothing is written)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through run_cli, not argparse's usage block
        raise UserError(f"{message} (see --help)")


def parse_args(argv):
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="*", help="a registered model name or an rwdet checkpoint "
                   "(.pth); with --config-file: Detectron2 config overrides (KEY VALUE ...), "
                   "e.g. MODEL.WEIGHTS model_final.pth")  # fmt: skip
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="file to write (atomically)")
    p.add_argument("--input-size", type=int, default=None, help="image side (default: "
                   "the checkpoint's data.test_size, else 224; Detectron2: 512)")  # fmt: skip
    p.add_argument("--in-chans", type=int, default=None, help="input channels (default 3, or "
                   "the checkpoint's)")  # fmt: skip
    p.add_argument("--image", default=None, help="image for the check (default: a tree-crown "
                   "photo, or a Fashion-MNIST image for 1 channel)")  # fmt: skip
    p.add_argument("--model-kwargs", default=None, help="JSON build_model keyword arguments "
                   "for a registered name, e.g. '{\"channels\": 8}'")  # fmt: skip
    p.add_argument("--config-file", default=None, help="Detectron2 config: export the detector")
    p.add_argument("--no-fuse", action="store_true", help="export without folding BatchNorm "
                   "into the convs (rwdet.nn.fuse_for_inference)")  # fmt: skip
    args = p.parse_intermixed_args(argv)
    if args.config_file is not None:
        args.opts, args.model = args.model, None
    elif len(args.model) != 1:
        raise UserError(
            "pass one registered model name or checkpoint"
            + (f", not {args.model}; config overrides (KEY VALUE) go with --config-file"
               if args.model else ", or --config-file for the Detectron2 model")
        )  # fmt: skip
    else:
        args.model, args.opts = args.model[0], []
    for flag in ("input_size", "in_chans"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} {value} is out of range; it must be >= 1")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if os.path.isdir(args.out):
        raise UserError(f"--out {args.out!r} is a directory; name the file to write")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out {args.out!r}: {out_dir!r} is not a directory")
    return args


# ---------------------------------------------------------------------------- the model


def _is_checkpoint(source: str) -> bool:
    return (
        "://" in source
        or os.path.sep in source
        or os.path.exists(source)
        or source.endswith((".pth", ".pt", ".pkl"))
    )


def load_classifier(args) -> tuple[torch.nn.Module, dict]:
    """(eval-mode model, info) from a registered name or a classification checkpoint."""
    from rwdet.models import build_model, list_models

    if not _is_checkpoint(args.model):
        if args.model not in list_models():
            raise UserError(
                f"{args.model!r} is neither a registered model nor an existing file; models: "
                f"{', '.join(list_models())}"
            )
        kwargs = {}
        if args.model_kwargs:
            try:
                kwargs = json.loads(args.model_kwargs)
            except json.JSONDecodeError as e:
                raise UserError(f"--model-kwargs is not valid JSON ({e})") from None
            if not isinstance(kwargs, dict):
                raise UserError("--model-kwargs must be a JSON object, e.g. '{\"channels\": 8}'")
        if args.in_chans is not None and args.in_chans != 3:
            kwargs["in_channels"] = args.in_chans
        try:
            model = build_model(args.model, **kwargs)
        except TypeError as e:
            raise UserError(f"{args.model}: bad --model-kwargs ({e})") from None
        in_chans = int(kwargs.get("in_channels", 3))
        return model.eval(), {"in_chans": in_chans, "size": 224, "data": None}

    from rwdet.models.artifact import read_model_file

    if args.model_kwargs:
        raise UserError("--model-kwargs is for registered names; a checkpoint has its own spec")
    path = args.model
    file = read_model_file(path)
    if file.kind == "detectron2":
        raise UserError(
            f"{path!r} is a Detectron2 weights file; export the detector with --config-file "
            f"CONFIG MODEL.WEIGHTS {path}"
        )
    model = file.build(strict=True)
    ckpt, spec = file.record, file.record["model_spec"]
    in_chans = int(spec.get("kwargs", {}).get("in_channels", 3))
    if args.in_chans is not None and args.in_chans != in_chans:
        raise UserError(f"--in-chans {args.in_chans}: {path!r} holds a {in_chans}-channel model")
    data = (ckpt.get("config") or {}).get("data") or {}
    return model.eval(), {
        "in_chans": in_chans,
        "size": int(data.get("test_size") or 224),
        "data": data.get("name"),
    }


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """The inference network to trace: a DNW/popup model's found subnetwork as fixed layers."""
    from rwdet.nn.export import export_subnetwork

    return export_subnetwork(model).eval()


# ---------------------------------------------------------------------------- the image


def _default_image(in_chans: int, data: str | None) -> tuple[str, str]:
    """(path or 'fashion-mnist', normalisation kind) of the default check image."""
    from classification.config import FASHION_MNIST_DIR as fmnist
    from classification.data import FMNIST_FILES

    stem = FMNIST_FILES["val"][0]
    has_fmnist = any(os.path.isfile(os.path.join(fmnist, stem + s)) for s in (".gz", ""))
    if (in_chans == 1 or data == "fashion_mnist") and has_fmnist:
        return "fashion-mnist", "fmnist"
    try:
        from rwdet.d2.treecrowns import deepforest_data_dir

        photo = os.path.join(deepforest_data_dir(), TREE_PHOTO)
    except (ImportError, FileNotFoundError):
        photo = None
    if photo and os.path.isfile(photo):
        return photo, "imagenet"
    if has_fmnist:
        return "fashion-mnist", "fmnist"
    raise UserError("no default check image (deepforest data or Fashion-MNIST); pass --image PATH")


def load_image(path: str | None, size: int, in_chans: int, data: str | None = None):
    """A (1, in_chans, size, size) float tensor from a real image, normalised as in training;
    and a description of it."""
    import numpy as np
    from PIL import Image

    kind = "fmnist" if data == "fashion_mnist" else "imagenet"
    if path is None:
        path, kind = _default_image(in_chans, data)
    if path == "fashion-mnist":
        from classification.config import FASHION_MNIST_DIR
        from classification.data import load_fashion_mnist

        images, _ = load_fashion_mnist(FASHION_MNIST_DIR, "val")
        img = Image.fromarray(images[0].numpy(), mode="L")
        where = "Fashion-MNIST test image 0"
    else:
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except (OSError, ValueError) as e:
            raise UserError(f"--image {path!r} is not a readable image ({e})") from None
        where = path
    side = min(img.size)  # centre square crop, then resize
    left, top = (img.size[0] - side) // 2, (img.size[1] - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
    img = img.convert("L" if in_chans == 1 else "RGB")
    a = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    a = a[None] if a.ndim == 2 else a.permute(2, 0, 1)
    if a.shape[0] != in_chans:  # 1 -> C: repeat the grey channel
        a = a[:1].expand(in_chans, -1, -1)
    if kind == "fmnist":
        from classification.data import FMNIST_MEAN, FMNIST_STD

        a = (a - FMNIST_MEAN) / FMNIST_STD
    else:
        mean = torch.tensor(IMAGENET_MEAN).repeat(in_chans)[:in_chans, None, None]
        std = torch.tensor(IMAGENET_STD).repeat(in_chans)[:in_chans, None, None]
        a = (a - mean) / std
    return a[None].contiguous(), f"{where} at {size}x{size}"


# ---------------------------------------------------------------------------- export + check


def _flat(outputs) -> list:
    import numpy as np

    if isinstance(outputs, (torch.Tensor, np.ndarray)):
        return [outputs]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    return [t for o in outputs for t in _flat(o)]


def compare(eager, exported, what: str) -> tuple[float, float, int]:
    """(max abs difference, max |eager|, number of output values) over all outputs;
    ``ExportCheckError`` beyond the tolerance."""
    import numpy as np

    a = [t.detach().float().cpu().numpy() for t in _flat(eager)]
    b = [np.asarray(t.detach().float().cpu() if isinstance(t, torch.Tensor) else t) for t in
         _flat(exported)]  # fmt: skip
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        raise ExportCheckError(
            f"{what} outputs {[y.shape for y in b]} differ in shape from eager's "
            f"{[x.shape for x in a]}; nothing written"
        )
    diff = max((float(np.abs(x - y).max()) if x.size else 0.0) for x, y in zip(a, b))
    scale = max((float(np.abs(x).max()) if x.size else 0.0) for x in a)
    if not diff <= RTOL * scale:
        raise ExportCheckError(
            f"{what} output differs from eager by {diff:.3g} > {RTOL:g} x max|eager| "
            f"({scale:.3g}); nothing written"
        )
    return diff, scale, sum(x.size for x in a)


def torchscript_bytes(model, inputs) -> tuple[bytes, object]:
    """The traced model's file bytes and its outputs on ``inputs`` after reloading them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # jit is deprecated upstream, still works
        # The detector's shape checks become constants of the trace (detectron2's own caveat:
        # a traced detector is for inputs like the example); nothing to act on here.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, inputs, check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        data = buf.getvalue()
        reloaded = torch.jit.load(io.BytesIO(data), map_location="cpu")
    with torch.no_grad():
        return data, reloaded(*inputs)


def onnx_bytes(model, inputs, tracing_exporter: bool = False) -> tuple[bytes, object]:
    """The ONNX file bytes (``torch.onnx.export``) and their outputs on ``inputs`` under
    ``onnx.reference`` (ONNX's own evaluator). Classifiers go through the dynamo exporter; the
    detector through the TorchScript-based one (``tracing_exporter``): its RPN and box heads
    branch on data, which ``torch.export`` refuses and a trace records for this input."""
    try:
        import onnx
        from onnx.reference import ReferenceEvaluator
    except ImportError:
        raise UserError("ONNX export needs onnx and onnxscript; run: make setup") from None
    for name in ("onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if tracing_exporter:
            buf = io.BytesIO()
            torch.onnx.export(model, tuple(inputs), buf, dynamo=False, opset_version=17)
            data = buf.getvalue()
        else:
            program = torch.onnx.export(model, tuple(inputs), dynamo=True, verbose=False)
            data = program.model_proto.SerializeToString()
    evaluator = ReferenceEvaluator(onnx.load_from_string(data))
    feeds = {n: t.numpy() for n, t in zip(evaluator.input_names, inputs)}
    return data, evaluator.run(None, feeds)


def export_checked(
    model, inputs, fmt: str, out: str, detector: bool = False, reference=None
) -> tuple[float, float, int]:
    """Export ``model`` (eval mode, CPU) on ``inputs``, check it against eager ``reference``
    (default: ``model`` itself; the unfused model when ``model`` is fused), then write ``out``
    atomically; returns ``compare``'s numbers."""
    from rwdet.atomic import atomic_write

    with torch.no_grad():
        eager = (model if reference is None else reference)(*inputs)
    if fmt == "torchscript":
        data, got = torchscript_bytes(model, inputs)
    else:
        data, got = onnx_bytes(model, inputs, tracing_exporter=detector)
    result = compare(eager, got, fmt)
    atomic_write(out, lambda f: f.write(data))
    return result


# ---------------------------------------------------------------------------- Detectron2


def load_detector(args):
    """(TracingAdapter around the eval-mode detector, image description): the config and
    weights are read as ``tools/train_net.py --eval-only`` reads them (safe YAML, graph
    checks); a DNW/popup backbone is frozen into its subnetwork first."""
    from detectron2.export import TracingAdapter

    import rwdet.d2  # noqa: F401  (registers the rwdet backbones)
    from rwdet.d2.checkpoint import RwdetCheckpointer
    from rwdet.d2.engine import Trainer, load_config, unverified_graphs

    if not os.path.isfile(args.config_file):
        raise UserError(f"--config-file {args.config_file!r} does not exist")
    cfg = load_config(args).clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    model = Trainer.build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        RwdetCheckpointer(model, **unverified_graphs(cfg)).load(cfg.MODEL.WEIGHTS)
    model.backbone = freeze(model.backbone)
    size = args.input_size or 512
    x, where = load_image(args.image, size, 3)
    # the detector takes 0-255 pixels in its own channel order and normalises them itself
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    pixels = ((x[0] * std + mean) * 255.0).round()
    if cfg.INPUT.FORMAT == "BGR":
        pixels = pixels.flip(0)
    inputs = [{"image": pixels}]  # tensors only; outputs are at the image's own size
    return TracingAdapter(model, inputs), where


# ---------------------------------------------------------------------------- main


def main(argv) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    if args.config_file is not None:
        model, where = load_detector(args)
        inputs = model.flattened_inputs
        what = f"Detectron2 model ({args.config_file})"
    else:
        model, info = load_classifier(args)
        model = freeze(model)
        x, where = load_image(args.image, args.input_size or info["size"], info["in_chans"],
                              info["data"])  # fmt: skip
        inputs = (x,)
        what = args.model
    eager = model
    if not args.no_fuse:
        from rwdet.nn import fuse_for_inference

        model = fuse_for_inference(model.eval())
    try:
        diff, scale, count = export_checked(
            model, inputs, args.format, args.out, args.config_file is not None, eager
        )
    except ExportCheckError as e:
        print(f"{PROG}: export check failed: {e}", file=sys.stderr, flush=True)
        return 1
    print(f"{PROG}: wrote {args.out} ({args.format}) from {what}; checked on {where}: max abs "
          f"difference to eager {diff:.3g} over {count} output values (tolerance {RTOL:g} x "
          f"max|eager| = {RTOL * scale:.3g})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, PROG))
