#!/usr/bin/env python
"""Train or evaluate an rwdet classifier.

    python tools/train_cls.py --gen ws                  # Fashion-MNIST demo (CPU, minutes)
    python tools/train_cls.py --config configs/cls/randwire_small.yaml --data /path/imagenet
    torchrun --nproc_per_node=8 tools/train_cls.py --config ... --data ...
    python tools/train_cls.py --config ... --data ... --eval-only --weights RUN/best.pth

Flags override the config file; KEY VALUE pairs after the flags override any config key, as
detectron2's opts (e.g. optim.lr 0.05 train.ema true model.kwargs.dropout 0.1; quote a value
with spaces: schedule.milestones '[80, 120]'). Every key, with its comment:
classification/defaults.py or --print-config. The old form optim.lr=0.05 still works.
A mistake is reported in one line (exit code 2); --debug or RWDET_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if __name__ == "__main__":  # before torch loads: the allocator is chosen at process start
    from rwdet.run.allocator import use_preferred_allocator

    use_preferred_allocator()

from classification.config import deprecation_note, resolve, split_overrides, to_yaml  # noqa: E402
from rwdet.models.args import GEN_PARAM_FLAGS, add_model_args  # noqa: E402
from rwdet.run.errors import UserError, run_cli  # noqa: E402

PROG = "train_cls.py"


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose mistakes are one line like every other user error."""

    def error(self, message):
        raise UserError(f"{message} (see {PROG} --help)")


# A value such as -1e-3 after a key is a value, not an unknown flag: Python 3.11's argparse
# takes only -1 and -1.5 for negative numbers, 3.13's any "-digit" (the rule used here).
_NEGATIVE_NUMBER = re.compile(r"^-\.?\d")


def parse_args(argv=None):
    return build_parser().parse_intermixed_args(argv)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p._negative_number_matcher = _NEGATIVE_NUMBER
    p.add_argument("--config", help="recipe YAML, e.g. configs/cls/randwire_small.yaml")
    add_model_args(p, default_model=None)  # --gen / --node-op choices: the live registries
    g = p.add_argument_group("data and schedule")
    g.add_argument(
        "--data",
        help="ImageNet-layout root (ROOT/train, ROOT/val), or cifar10:ROOT / cifar100:ROOT "
        "(torchvision's python batches); default: Fashion-MNIST",
    )
    g.add_argument("--workers", type=int, help="data-loading workers per process")
    g.add_argument("--gpu-decode", action="store_true", help="decode JPEGs on the GPU")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="global batch size (all processes)")
    g.add_argument("--lr", type=float, help="lr at optim.reference_batch (scaled linearly)")
    g.add_argument("--wd", type=float, help="weight decay")
    g.add_argument("--warmup-epochs", type=float)
    g.add_argument("--train-seed", type=int, help="training seed (init, data order, dropout)")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", help="default: output/cls/<name>")
    g.add_argument("--name", help="run name (default: data, model and what sets it apart)")
    g.add_argument(
        "--print-output-dir",
        action="store_true",
        help="print the output folder this command would use, and exit (for scripts)",
    )
    g.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (YAML, every key commented), and exit",
    )
    g.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="PATH",
        help="resume from PATH (default: auto-resume from <output-dir>/last.pth)",
    )
    g.add_argument(
        "--no-resume", action="store_true", help="start afresh even if a checkpoint exists"
    )
    g.add_argument("--eval-only", action="store_true", help="only evaluate --weights")
    g.add_argument(
        "--weights",
        help="checkpoint to evaluate (--eval-only) or to start training from (fine-tuning)",
    )
    g.add_argument(
        "--weights-strict",
        action="store_true",
        help="fine-tuning: every tensor must fit (default: a classifier of another shape is "
        "re-initialised)",
    )
    g.add_argument("--test-size", type=int, help="evaluation crop size (e.g. 320)")
    g.add_argument("--eval-ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    g.add_argument("--ema", action="store_true", help="keep an EMA of the weights")
    g.add_argument("--amp", choices=["bf16", "fp16", "off"], help="mixed precision (CUDA)")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across CUDA processes")
    g.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "opts",
        nargs="*",
        metavar="KEY VALUE",
        help="config overrides after the flags, e.g. optim.lr 0.05 model.kwargs.dropout 0.1",
    )
    return p


def flags_from_args(a) -> dict:
    """The command-line flags as a partial config (only the flags that were given)."""
    flags: dict = {}

    def put(path, value, force=False):
        if value is None and not force:
            return
        node = flags
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value

    gen_params = {k: getattr(a, k) for k in GEN_PARAM_FLAGS if getattr(a, k) is not None}
    for path, value in [
        ("model.name", a.model), ("model.gen", a.gen), ("model.seed", a.seed),
        ("model.wiring", a.wiring), ("model.nodes", a.nodes), ("model.channels", a.channels),
        ("model.node_op", a.node_op),
        ("model.gen_params", gen_params or None), ("data.root", a.data),
        ("data.workers", a.workers), ("data.test_size", a.test_size),
        ("schedule.epochs", a.epochs), ("schedule.warmup_epochs", a.warmup_epochs),
        ("train.batch_size", a.batch_size), ("optim.lr", a.lr), ("optim.weight_decay", a.wd),
        ("optim.clip_grad", a.clip_grad), ("seed", a.train_seed), ("output_dir", a.output_dir),
        ("name", a.name), ("train.amp", a.amp), ("device", a.device),
        ("train.resume", False if a.no_resume else a.resume), ("weights", a.weights),
    ]:  # fmt: skip
        put(path, value)
    for path, on in [
        ("eval.only", a.eval_only), ("weights_strict", a.weights_strict),
        ("eval.ema", a.eval_ema), ("train.ema", a.ema),
        ("train.channels_last", a.channels_last), ("train.compile", a.compile),
        ("train.sync_bn", a.sync_bn), ("data.gpu_decode", a.gpu_decode),
    ]:  # fmt: skip
        if on:
            put(path, True)
    if a.test_size is not None:
        put("data.test_resize", None, force=True)
    return flags


def train(argv: list[str]) -> None:
    args = parse_args(argv)
    _, old = split_overrides(args.opts)
    if old and os.environ.get("RANK", "0") == "0":  # once per run, not once per process
        print(f"{PROG}: {deprecation_note(old)}", file=sys.stderr)
    cfg = resolve(args.config, flags_from_args(args), args.opts)
    if args.print_output_dir:
        print(cfg["output_dir"])
        return
    if args.print_config:
        print(to_yaml(cfg), end="")
        return
    from classification.trainer import main as run

    run(cfg)


def main(argv=None) -> int:
    """The exit code: 0, or 2 after a one-line error (``--debug``: the traceback instead)."""
    return run_cli(train, PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
