#!/usr/bin/env python
"""Faster R-CNN + FPN with rwdet backbones (Detectron2's train_net form).

    python tools/train_net.py --config-file configs/frcnn_randwire_c109.yaml --num-gpus 8
    python tools/train_net.py --config-file configs/frcnn_randwire_c109.yaml --num-gpus 1 \
        SOLVER.AMP.ENABLED True          # REFERENCE_WORLD_SIZE rescales batch/LR/schedule
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/.../model_final.pth
    python tools/train_net.py --config-file ... --dataset mine_train train.json images/ \
        --dataset mine_val val.json images/ DATASETS.TRAIN "('mine_train',)" \
        DATASETS.TEST "('mine_val',)" MODEL.ROI_HEADS.NUM_CLASSES 3   # your COCO-format data

Multi-node: add --num-machines N --machine-rank R --dist-url tcp://HOST:PORT on every machine.
A run resumes automatically from the last checkpoint in OUTPUT_DIR (--no-auto-resume: don't).
SIGTERM/SIGINT save a checkpoint after the current iteration and exit 143/130; running the same
command again continues. A user error ends with one line and exit code 2 (--debug or
RWDET_DEBUG=1: the traceback).
"""

import sys

if __name__ == "__main__":  # before torch loads: the allocator is chosen at process start
    from rwdet.run.allocator import use_preferred_allocator

    use_preferred_allocator()

from detectron2.engine import default_argument_parser, launch  # noqa: E402
from detectron2.utils import comm
from torch.multiprocessing import ProcessExitedException

import rwdet.d2  # noqa: F401  (registers the rwdet backbones and demo datasets)
from rwdet.d2.engine import check_request, main
from rwdet.d2.hooks import forward_stop_to_workers
from rwdet.run.errors import UserError, run_cli
from rwdet.run.stop import EXIT_STOPPED, StopRequested

PROG = "train_net.py"
# Exit codes of a worker that already printed its own one-line message (see ``worker_main``).
QUIET_EXITS = {2, *EXIT_STOPPED.values()}


def parse_args(argv=None):
    parser = default_argument_parser()
    parser.add_argument(
        "--no-auto-resume",
        action="store_true",
        help="start from MODEL.WEIGHTS even if OUTPUT_DIR holds a checkpoint",
    )
    parser.add_argument(
        "--dataset",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format dataset under NAME (repeatable; before the KEY VALUE "
        "overrides), then name it in DATASETS.TRAIN/TEST",
    )
    usage_error = parser.error

    def error(message):
        # A wrong count of --dataset values is one line, like every rwdet user error.
        if message.startswith("argument --dataset"):
            raise UserError(
                "--dataset takes 3 values, NAME JSON IMAGE_ROOT (e.g. --dataset mine_train "
                f"annotations/train.json images/), before the KEY VALUE overrides ({message})"
            )
        usage_error(message)

    parser.error = error
    return parser.parse_args(argv)


def worker_main(args):
    """``main`` in a process that ``launch`` spawned (``--num-gpus`` > 1): no ``run_cli`` is
    on this process's stack, so the worker prints its one line itself and exits with the code,
    which the launcher then reports as its own instead of the worker's traceback. (A spawned
    worker's ``sys.argv`` is the launcher's, so ``--debug`` reaches it.)"""

    def body(_argv):
        try:
            main(args)  # returns the evaluation results, not an exit code
        except StopRequested as e:
            if comm.get_rank() != 0:  # rank 0 says it for all
                sys.exit(e.exit_code)
            raise

    code = run_cli(body, PROG)
    if code:
        sys.exit(code)


def cli(argv=None) -> int | None:
    args = parse_args(argv)
    print("Command Line Args:", args)
    if args.num_gpus * args.num_machines == 1:
        main(args)
        return None
    check_request(args)
    try:
        with forward_stop_to_workers():
            launch(
                worker_main,
                args.num_gpus,
                num_machines=args.num_machines,
                machine_rank=args.machine_rank,
                dist_url=args.dist_url,
                args=(args,),
            )
    except ProcessExitedException as e:
        if e.exit_code in QUIET_EXITS:
            return e.exit_code
        raise


if __name__ == "__main__":
    sys.exit(run_cli(cli, PROG))
