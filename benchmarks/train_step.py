#!/usr/bin/env python
"""Training-step time, peak memory and inference throughput, as ratios to ResNet-50.

Every measurement runs in a fresh subprocess (so CPU peak RSS is that model's alone), models
alternate round by round so machine drift hits all of them alike, and each number is the median
over rounds. Ratios are taken against torchvision ResNet-50 measured in the same run.

  python benchmarks/train_step.py                       # CPU, batch 16, 224px, fp32
  python benchmarks/train_step.py --device cuda --batch 128 --amp bf16 --channels-last
  python benchmarks/train_step.py --models randwire_c109 resnet50 --rounds 3 --json out.json
  python benchmarks/train_step.py --preload /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4

Model specs: ``name[:wiring][+option...]`` with options ``reference``, ``recompute``,
``fused`` and ``rebuild`` (the stages' ``execution``, ``rwdet.nn.execution``; none: ``auto``),
``fold`` (inference runs on ``rwdet.nn.fuse_for_inference(model)``: BN folded into the convs,
gates precomputed; it works on the torchvision baselines too, whose eval mode keeps BN as a
separate op, so ``resnet50+fold`` is the fair baseline for a folded model) and
``channels_last`` (this model's weights and input in channels_last, so both layouts can be
measured side by side in one run; ``--channels-last`` sets it for every model) and ``pad8``
(``rwdet.nn.pad_channels(model, 8)``: C=109's widths 54/109/218/436 padded with zero channels
to multiples of 8, the same function, for tensor-core kernels on a GPU).

  python benchmarks/train_step.py --models resnet50 resnet50+channels_last randwire_c109 \
      randwire_c109+channels_last --rounds 3

``--inference`` measures inference img/s only, every model in this one process (built once,
then models alternate forward by forward within each round), and prints each model's ratio to
ResNet-50 with the same ``fold`` option per round: their median and range. A busy machine slows
rounds unevenly, so ratios taken within one round are the numbers to read.

  python benchmarks/train_step.py --inference --models resnet50+fold randwire_c109+fold \
      resnet50 randwire_c109 --rounds 5 --iters 3
CPU peak RSS includes what the C allocator keeps: ``--preload`` runs every model under the same
other allocator (e.g. tcmalloc, as PyTorch's CPU tuning guide suggests and rwdet's tools use on
CPU); with ``--inference`` this process re-executes itself under it. It matters for inference
too: under glibc a forward faults in its large activations afresh each time.
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
    exec_preloaded,
    median_rows,
    peak_bytes,
    preload_error,
    preload_mapped,
    run_json_worker,
)

BASELINE = "resnet50"
BASELINES = ("resnet50", "mobilenet_v2")  # torchvision models, built as torchvision builds them
EXECUTION_OPTIONS = ("reference", "recompute", "fused", "rebuild")
# Not executions: ``fold`` (inference on the folded copy), ``channels_last`` (this model's
# weights and input in channels_last, whatever ``--channels-last`` says for the others),
# ``pad8`` (``rwdet.nn.pad_channels(model, 8)``: every width a multiple of 8, same function).
LAYOUT_OPTIONS = ("fold", "channels_last", "pad8")
DEFAULT_MODELS = [
    "resnet50",
    "randwire_c109",
    "randwire_c109+reference",
    "randwire_small",
    "mobilenet_v2",
    "randwire_c154",
    "randwire_c109:dnw",
    "mobilenetv1_dnw_x0225",
    "resnet50_popup",
]


def build(spec: str, overrides: dict):
    """``name[:wiring][+option...]``; torchvision names (resnet50, mobilenet_v2) are baselines."""
    import torchvision

    from rwdet.models import build_model, list_models

    name, wiring, options, execution = parse_spec(spec)
    if name in BASELINES:
        model = getattr(torchvision.models, name)()
    elif name not in list_models():
        return None
    else:
        kwargs = dict(overrides)
        if execution:
            kwargs["execution"] = execution
        if wiring:
            kwargs["wiring"] = wiring
        model = build_model(name, **kwargs)
    if "pad8" in options:
        from rwdet.nn import pad_channels

        model = pad_channels(model, 8)
    return model


def parse_spec(spec: str):
    """``(name, wiring, options, execution)`` of a model spec, or a ``ValueError`` naming what
    is wrong: an unknown option, two executions, or an execution or wiring on a torchvision
    baseline (it has no graph stages to run them)."""
    spec, *options = spec.split("+")
    for opt in options:
        if opt not in (*EXECUTION_OPTIONS, *LAYOUT_OPTIONS):
            known = ", ".join(f"+{o}" for o in (*EXECUTION_OPTIONS, *LAYOUT_OPTIONS))
            raise ValueError(f"model option +{opt} is not known; use {known}")
    executions = [opt for opt in options if opt in EXECUTION_OPTIONS]
    if len(executions) > 1:
        raise ValueError(f"model options {executions} name two executions; give one")
    name, _, wiring = spec.partition(":")
    if name in BASELINES and (executions or wiring):
        what = f":{wiring}" if wiring else f"+{executions[0]}"
        raise ValueError(
            f"{name} is a torchvision baseline without graph stages: {what} does not apply to "
            f"it; drop it (or use a RandWire model, e.g. randwire_c109{what})"
        )
    return name, wiring, options, executions[0] if executions else None


def worker(args) -> dict:
    """One model, one process: warm-up, then timed steps; prints one JSON line."""
    import torch

    check_preloaded()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    model = build(args.worker, json.loads(args.overrides))
    if model is None:
        return {"model": args.worker, "skipped": "not registered"}
    dev = torch.device(args.device)
    model.to(dev)
    fmt = memory_format(args.worker, args.channels_last)
    model.to(memory_format=fmt)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-5)
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev).to(memory_format=fmt)
    y = torch.randint(0, 1000, (args.batch,), device=dev)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step():
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    for _ in range(args.warmup):
        step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    peak = peak_bytes(dev)
    choice = choice_seconds(model, args.iters, sync)
    model = for_inference(model, args.worker)
    infer = []
    with torch.no_grad(), torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
        model(x)  # untimed: eval mode (and a folded copy) runs kernels the steps did not build
        sync()
        for _ in range(max(3, args.iters)):
            t = time.perf_counter()
            model(x)
            sync()
            infer.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    return {
        "model": args.worker,
        "step_s": step_s,
        "peak_bytes": int(peak),
        "infer_img_s": args.batch / statistics.median(infer),
        "train_img_s": args.batch / step_s,
        **({} if choice is None else {"choice_s": choice, "choice_share": choice / step_s}),
    }


def memory_format(spec: str, channels_last: bool):
    """The layout of ``spec``'s weights and input: channels_last for ``--channels-last`` or a
    ``+channels_last`` spec, else NCHW."""
    import torch

    if channels_last or "channels_last" in spec.split("+")[1:]:
        return torch.channels_last
    return torch.contiguous_format


def folded(spec: str) -> bool:
    return "fold" in spec.split("+")[1:]


def for_inference(model, spec: str):
    """``model`` in eval mode, folded by ``fuse_for_inference`` for a ``+fold`` spec."""
    model.eval()
    if not folded(spec):
        return model
    from rwdet.nn import fuse_for_inference

    return fuse_for_inference(model)


def inference_baseline(spec: str) -> str:
    """The ResNet-50 spec a model's inference is compared with: same ``fold`` option."""
    return BASELINE + ("+fold" if folded(spec) else "")


def inference_run(args) -> dict:
    """Every model in this process; per round, each model's median forward time over
    ``iters`` (after ``warmup``) with models alternating, and its img/s ratio to its
    ``inference_baseline`` in the same round."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    dev = torch.device(args.device)
    overrides = json.loads(args.overrides)
    models = {}
    for spec in args.models:
        model = build(spec, overrides)
        if model is not None:
            fmt = memory_format(spec, args.channels_last)
            models[spec] = for_inference(model.to(dev).to(memory_format=fmt), spec)
    x0 = torch.randn(args.batch, 3, args.size, args.size, device=dev)
    inputs = {spec: x0.to(memory_format=memory_format(spec, args.channels_last)) for spec in models}
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)

    def forward(model, x) -> float:
        t = time.perf_counter()
        model(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    rounds = []
    with torch.no_grad(), torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
        for r in range(args.rounds):
            times: dict[str, list[float]] = {spec: [] for spec in models}
            for i in range(args.warmup * (r == 0) + args.iters):
                for spec, model in models.items():
                    t = forward(model, inputs[spec])
                    if i >= args.warmup * (r == 0):
                        times[spec].append(t)
            img_s = {spec: args.batch / statistics.median(ts) for spec, ts in times.items()}
            rounds.append(img_s)
            line = ", ".join(f"{k} {v:.2f} img/s" for k, v in img_s.items())
            print(f"round {r + 1}/{args.rounds}: {line}", file=sys.stderr)
    rows = []
    for spec in args.models:
        if spec not in models:
            rows.append({"model": spec, "note": "not registered"})
            continue
        row = {"model": spec, "rounds": len(rounds)}
        row["infer_img_s"] = statistics.median(r[spec] for r in rounds)
        base = inference_baseline(spec)
        if base in models:
            ratios = [r[spec] / r[base] for r in rounds]
            row.update(baseline=base, infer_ratio=statistics.median(ratios))
            row.update(infer_ratio_min=min(ratios), infer_ratio_max=max(ratios))
        rows.append(row)
    return {"rows": rows, "rounds": rounds}


def choice_seconds(model, iters: int, sync) -> float | None:
    """Median time of one step's edge choice (every top-k over magnitudes or scores), or None
    for models that choose nothing.

    Every layer or graph that picks its edges per step exposes ``kept_mask()``: the ``abs``,
    ``topk`` and scatter it runs in forward. The straight-through backward adds no choice
    work, and applying the mask (``w * mask``) is counted in the step, not here.
    """
    import torch

    choosers = [m for m in model.modules() if chooses_per_step(m)]
    if not choosers:
        return None
    times = []
    with torch.no_grad():
        for _ in range(max(3, iters)):
            t = time.perf_counter()
            for m in choosers:
                m.kept_mask()
            sync()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def chooses_per_step(module) -> bool:
    """True for modules whose edges are re-chosen every step (not fixed random wirings)."""
    return hasattr(module, "kept_mask") and getattr(module, "wiring", "dnw") == "dnw"


def run_worker(spec: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", spec]
    for flag in ("device", "batch", "size", "iters", "warmup", "amp", "threads", "overrides"):
        cmd += [f"--{flag}", str(getattr(args, flag))]
    if args.channels_last:
        cmd.append("--channels-last")
    env = dict(os.environ)
    if args.preload:
        env["LD_PRELOAD"] = args.preload
    return run_json_worker(cmd, spec, env=env)


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    keys = ("step_s", "peak_bytes", "infer_img_s", "train_img_s", "choice_share")
    ratios = {"step_ratio": "step_s", "peak_ratio": "peak_bytes"}
    return median_rows(results, keys, BASELINE, ratios)


def environment(args) -> dict:
    return {
        **base_environment(args.device, args.threads),
        "batch": args.batch,
        "size": args.size,
        "amp": args.amp,
        "channels_last": args.channels_last,
        "preload": args.preload or None,
        # --inference measures in this process, re-executed under the preload: confirm it.
        "preload_loaded": preload_mapped(args.preload) if args.preload and args.inference else None,
        "mode": "inference" if args.inference else "train_step",
        "rounds": args.rounds,
        "iters": args.iters,
        "warmup": args.warmup,
    }


def inference_table(rows: list[dict]) -> str:
    lines = [f"{'model':<24}{'infer img/s':>13}{'x base':>8}{'range':>14}  base"]
    for row in rows:
        if "infer_img_s" not in row:
            lines.append(f"{row['model']:<24}  {row['note']}")
            continue
        line = f"{row['model']:<24}{row['infer_img_s']:>13.2f}"
        if "infer_ratio" in row:
            spread = f"{row['infer_ratio_min']:.2f}-{row['infer_ratio_max']:.2f}"
            line += f"{row['infer_ratio']:>8.2f}{spread:>14}  {row['baseline']}"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--iters", type=int, default=5, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (median taken)")
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--overrides", default="{}", help="JSON kwargs for rwdet models")
    p.add_argument("--preload", default="", help="allocator library LD_PRELOADed into each model")
    p.add_argument("--inference", action="store_true", help="inference img/s only, all "
                   "models in one process, alternating (ratios per round)")  # fmt: skip
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    error = preload_error(args.preload)
    for spec in args.models:  # before any model is built or any worker starts
        try:
            parse_spec(spec)
        except ValueError as e:
            error = error or f"--models {spec}: {e}"
    if error is None and args.inference:  # measured in this process: its allocator is chosen now
        argv = sys.argv[1:] if argv is None else list(argv)
        error = exec_preloaded(args.preload, os.path.abspath(__file__), argv)
    if error:
        p.error(error)
    if args.inference:
        result = inference_run(args)
        print(
            f"inference, batch {args.batch} at {args.size}px, {args.device}, amp {args.amp}, "
            f"{'channels_last' if args.channels_last else 'NCHW'}; ratios to ResNet-50 with "
            f"the same fold option, median and range over {args.rounds} rounds"
        )
        print(inference_table(result["rows"]))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"environment": environment(args), "results": result["rows"],
                           "rounds": result["rounds"]}, f, indent=1)  # fmt: skip
        return
    results: dict[str, list[dict]] = {m: [] for m in args.models}
    for r in range(args.rounds):
        for m in args.models:
            results[m].append(run_worker(m, args))
            print(f"round {r + 1}/{args.rounds} {m}: {results[m][-1]}", file=sys.stderr)
    rows = summarize(results)
    print(
        f"{'model':<24}{'step s':>9}{'x R50':>7}{'peak MiB':>10}{'x R50':>7}{'infer img/s':>13}"
        f"{'choice %':>10}"
    )
    for row in rows:
        if "step_s" not in row:
            print(f"{row['model']:<24}  {row['note']}")
            continue
        print(
            f"{row['model']:<24}{row['step_s']:>9.3f}{row.get('step_ratio', float('nan')):>7.2f}"
            f"{row['peak_bytes'] / 2**20:>10.0f}{row.get('peak_ratio', float('nan')):>7.2f}"
            f"{row['infer_img_s']:>13.1f}"
            + (f"{100 * row['choice_share']:>10.2f}" if "choice_share" in row else "")
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(args), "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
