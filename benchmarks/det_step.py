#!/usr/bin/env python
"""Faster R-CNN + FPN: training-iteration time, peak memory and inference img/s, as ratios to
detectron2's R50-FPN.

Each model is built from its detection config (read with rwdet's safe loader) with random
weights and fed the same synthetic batch: ``--batch`` images of ``--size H W`` with a few fixed
random boxes each. One training iteration is forward + losses + backward + detectron2's SGD
step (``build_optimizer``); inference is ``model.eval()`` on the same images. Every measurement
runs in a fresh subprocess (CPU peak RSS is that model's alone; CUDA: ``max_memory_allocated``),
models alternate round by round, each number is the median over rounds.

  python benchmarks/det_step.py                                  # CPU, batch 2 at 512x640
  python benchmarks/det_step.py --device cuda --amp bf16 --json det.json
  python benchmarks/det_step.py --models r50_fpn randwire_c109 --rounds 3 --iters 5
  python benchmarks/det_step.py --preload /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4

Models: r50_fpn (configs/frcnn_r50_baseline.yaml, the baseline), r101_fpn (the same with
MODEL.RESNETS.DEPTH 101), randwire_c109, randwire_c154 (configs/frcnn_randwire_c*.yaml), or
the path of any other detection config (from the current folder, else from this repository).
``--opts KEY VALUE ...`` applies to every model.
The SGD step runs at ``--lr`` 0 by default: the same arithmetic, fixed random weights (an
untrained FrozenBN backbone at the configs' LR diverges within a few steps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._common import (  # noqa: E402
    base_environment,
    check_preloaded,
    median_rows,
    peak_bytes,
    preload_error,
    run_json_worker,
)

BASELINE = "r50_fpn"
MODELS = {
    "r50_fpn": ("configs/frcnn_r50_baseline.yaml", []),
    "r101_fpn": ("configs/frcnn_r50_baseline.yaml", ["MODEL.RESNETS.DEPTH", "101"]),
    "randwire_c109": ("configs/frcnn_randwire_c109.yaml", []),
    "randwire_c154": ("configs/frcnn_randwire_c154.yaml", []),
}
DEFAULT_MODELS = list(MODELS)
BOXES_PER_IMAGE = 8


def config_path(name: str) -> str:
    """The config file of ``name``: a key of MODELS (in this repository), or a path, taken
    from the current folder first, then from the repository (``configs/...``)."""
    path = MODELS.get(name, (name, []))[0]
    if name not in MODELS and os.path.isfile(path):
        return os.path.abspath(path)
    return path if os.path.isabs(path) else os.path.join(ROOT, path)


def model_config(name: str, device: str, opts: list[str], lr: float | None = None):
    """The detectron2 config of ``name`` (a key of MODELS or a config path), random weights;
    ``lr``: SOLVER.BASE_LR (None: the config's)."""
    from detectron2.config import get_cfg

    from rwdet.d2.config import add_rwdet_config
    from rwdet.d2.safe_config import merge_config_file, merge_config_opts

    _, extra = MODELS.get(name, (name, []))
    cfg = get_cfg()
    add_rwdet_config(cfg)
    merge_config_file(cfg, config_path(name))
    merge_config_opts(cfg, [*extra, *opts, "MODEL.WEIGHTS", "", "MODEL.DEVICE", device])
    if lr is not None:
        merge_config_opts(cfg, ["SOLVER.BASE_LR", repr(float(lr))])
    return cfg


def synthetic_batch(batch: int, h: int, w: int, num_classes: int, device):
    """``batch`` images (float 0..255, CHW) with BOXES_PER_IMAGE fixed random boxes each."""
    import torch
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(0)
    inputs = []
    for _ in range(batch):
        image = torch.rand(3, h, w, generator=g) * 255
        xy = torch.rand(BOXES_PER_IMAGE, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = (0.1 + 0.2 * torch.rand(BOXES_PER_IMAGE, 2, generator=g)) * torch.tensor([w, h])
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = torch.randint(0, num_classes, (BOXES_PER_IMAGE,), generator=g)
        inputs.append(
            {"image": image.to(device), "height": h, "width": w, "instances": inst.to(device)}
        )
    return inputs


def worker(args) -> dict:
    """One model, one process: warm-up, timed training iterations, then inference."""
    import torch
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer
    from detectron2.utils.events import EventStorage

    import rwdet.d2  # noqa: F401  (registers the rwdet backbones)

    check_preloaded()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cfg = model_config(args.worker, args.device, args.opts, args.lr)
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    h, w = args.size
    inputs = synthetic_batch(args.batch, h, w, cfg.MODEL.ROI_HEADS.NUM_CLASSES, dev)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    scaler = torch.amp.GradScaler(dev.type, enabled=args.amp == "fp16")

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step():
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            losses = model(inputs)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    model.train()
    times = []
    with EventStorage(0):  # the heads log training statistics into it
        for _ in range(args.warmup):
            step()
        sync()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.iters):
            t = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t)
    peak = peak_bytes(dev)
    model.eval()
    test_inputs = [{k: v for k, v in x.items() if k != "instances"} for x in inputs]
    infer = []
    with torch.no_grad(), torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
        for i in range(args.warmup + max(2, args.iters)):
            t = time.perf_counter()
            model(test_inputs)
            sync()
            if i >= args.warmup:
                infer.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    return {
        "model": args.worker,
        "step_s": step_s,
        "peak_bytes": peak,
        "infer_img_s": args.batch / statistics.median(infer),
        "train_img_s": args.batch / step_s,
        "params": sum(p.numel() for p in model.parameters()),
    }


def run_worker(name: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name]
    cmd += ["--device", args.device, "--batch", str(args.batch), "--amp", args.amp]
    cmd += ["--size", *map(str, args.size), "--iters", str(args.iters)]
    cmd += ["--warmup", str(args.warmup), "--threads", str(args.threads), "--lr", str(args.lr)]
    if args.opts:
        cmd += ["--opts", *args.opts]
    env = dict(os.environ)
    if args.preload:
        env["LD_PRELOAD"] = args.preload
    return run_json_worker(cmd, name, env=env, timeout=args.timeout or None)


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    keys = ("step_s", "peak_bytes", "infer_img_s", "train_img_s", "params")
    ratios = {"step_ratio": "step_s", "peak_ratio": "peak_bytes", "infer_ratio": "infer_img_s"}
    return median_rows(results, keys, BASELINE, ratios)


def environment(args) -> dict:
    import detectron2

    return {
        **base_environment(args.device, args.threads),
        "detectron2": detectron2.__version__,
        "batch": args.batch,
        "size": list(args.size),
        "iters": args.iters,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "amp": args.amp,
        "lr": args.lr,
        "opts": args.opts,
        "preload": args.preload or None,
        "baseline": BASELINE,
    }


def table(rows: list[dict]) -> str:
    nan = float("nan")
    lines = [
        f"{'model':<16}{'step s':>9}{'x R50':>7}{'peak MiB':>10}{'x R50':>7}"
        f"{'infer img/s':>13}{'x R50':>7}"
    ]
    for row in rows:
        if "step_s" not in row:
            lines.append(f"{row['model']:<16}  {row['note']}")
            continue
        lines.append(
            f"{row['model']:<16}{row['step_s']:>9.3f}{row.get('step_ratio', nan):>7.2f}"
            f"{row['peak_bytes'] / 2**20:>10.0f}{row.get('peak_ratio', nan):>7.2f}"
            f"{row['infer_img_s']:>13.2f}{row.get('infer_ratio', nan):>7.2f}"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, nargs=2, default=[512, 640], metavar=("H", "W"))
    p.add_argument("--iters", type=int, default=3, help="timed iterations per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (median taken)")
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument(
        "--lr",
        type=float,
        default=0.0,
        help="SGD learning rate (default 0: the step's arithmetic runs but the random weights\n"
        "stay fixed, so every iteration does the same work and an untrained FrozenBN\n"
        "backbone cannot diverge; the configs' 0.02 diverges in a few steps without warmup)",
    )
    p.add_argument("--timeout", type=float, default=0, help="seconds per worker (0: none)")
    p.add_argument("--opts", nargs="+", default=[], help="config KEY VALUE pairs, every model")
    p.add_argument("--preload", default="", help="allocator library LD_PRELOADed into each model")
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    error = preload_error(args.preload)
    for name in args.models:  # before any worker starts
        if not os.path.isfile(config_path(name)):
            error = error or (
                f"--models {name}: neither one of {list(MODELS)} nor a detectron2 config file"
            )
    if error:
        p.error(error)
    if BASELINE not in args.models:
        print(f"note: {BASELINE} is not in --models, so no ratios are computed", file=sys.stderr)
    results: dict[str, list[dict]] = {m: [] for m in args.models}
    for r in range(args.rounds):
        for m in args.models:
            results[m].append(run_worker(m, args))
            print(f"round {r + 1}/{args.rounds} {m}: {results[m][-1]}", file=sys.stderr)
    rows = summarize(results)
    env = environment(args)
    print(
        f"Faster R-CNN + FPN, batch {args.batch} at {args.size[0]}x{args.size[1]}, "
        f"{args.device}, amp {args.amp}, {env['threads']} threads; ratios to {BASELINE}"
    )
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
