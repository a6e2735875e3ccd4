"""End-to-end classification runs on a tiny ImageNet-layout set (CPU).

Single process in-process, 2-process DDP via torchrun (gloo), SIGKILL + resume exactness, NaN
stop, evaluation-only, clear errors for bad input, and a CUDA + bf16 run when a GPU is present.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from test_cls_config import load_tool
from test_cls_data import make_fashion_mnist, make_image_folder

from classification import trainer
from classification.checkpoint import CheckpointMismatchError, load_checkpoint
from classification.config import resolve
from classification.distributed import check_same_on_all_ranks
from rwdet.graphs import graphs_fingerprint, graphs_from_dict
from rwdet.models import build_model, get_graphs
from rwdet.run.allocator import find_tcmalloc
from rwdet.run.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "train_cls.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
CHANCE = 100.0 / 3


def tiny_args(data, out, epochs=3, extra=()):
    """A tiny RandWire (C=8, N=6, 32 px images): 13 iterations per epoch."""
    return [
        "--data", data, "--gen", "ws", "--seed", "1", "--channels", "8", "--nodes", "6",
        "model.kwargs", "{stem: small, head_channels: 32}", "data.train_size", "32",
        "data.test_size", "32", "data.test_resize", "32", "data.workers", "0",
        "--epochs", str(epochs), "--batch-size", "8", "--lr", "0.05",
        "optim.reference_batch", "8", "--warmup-epochs", "0", "train.log_period", "2",
        "train.precise_bn", "64", "--output-dir", out, *extra,
    ]  # fmt: skip


def tiny_cfg(*argv):
    tool = load_tool()
    args = tool.parse_args(list(argv))
    return resolve(args.config, tool.flags_from_args(args), args.opts)


def records(out, kind):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("imagenet_layout"))
    # 3 x 34 good + 2 bad = 104 training files = 13 full batches of 8 (no file is dropped, so
    # both bad files are met every epoch); 18 good + 1 broken val files.
    return root, make_image_folder(root, train_per_class=34)


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    data, n_val = dataset
    out = str(tmp_path_factory.mktemp("run"))
    cfg = tiny_cfg(*tiny_args(data, out, epochs=4, extra=["--ema"]))
    return cfg, trainer.main(cfg), n_val


@pytest.mark.slow
def test_single_process_training_learns(trained):
    cfg, result, n_val = trained
    out = cfg["output_dir"]
    assert result["top1"] > CHANCE + 30, result
    assert result["count"] == n_val and result["skipped"] == 1  # the broken val file
    train = records(out, "train")
    assert train[-1]["loss"] < train[0]["loss"]
    assert {"lr", "img_per_s", "data_time_ms", "peak_mem_mb", "top1", "top5"} <= set(train[0])
    evals = records(out, "eval")
    assert len(evals) == 4 and all(e["count"] == n_val for e in evals)
    assert evals[-1]["skipped_train_images"] == 2 * 4  # corrupt + truncated, every epoch
    assert "ema_top1" in evals[-1]
    model_rec = records(out, "model")[0]
    assert model_rec["params"] > 0 and model_rec["flops"] > 0
    with open(os.path.join(out, "config.yaml")) as f:
        assert yaml.safe_load(f) == cfg
    assert any(name.startswith("events") for name in os.listdir(os.path.join(out, "tb")))
    assert "precise BN" in open(os.path.join(out, "log.txt")).read()


@pytest.mark.slow
def test_checkpoint_contract_rebuilds_the_model(trained):
    cfg, _, _ = trained
    out = cfg["output_dir"]
    ckpt = load_checkpoint(os.path.join(out, "last.pth"))
    for key in ("model", "model_spec", "graphs", "ema", "optimizer", "scheduler", "scaler"):
        assert key in ckpt
    for key in ("epoch", "iteration", "rng", "config", "metrics"):
        assert key in ckpt
    assert ckpt["epoch"] == 4 and ckpt["iteration"] == 4 * 13
    assert not any(k.startswith("module.") for k in ckpt["model"])
    spec = ckpt["model_spec"]
    graphs = graphs_from_dict(ckpt["graphs"])
    model = build_model(spec["name"], graphs=graphs, **spec["kwargs"])
    model.load_state_dict(ckpt["model"])  # strict
    assert graphs_fingerprint(get_graphs(model)) == graphs_fingerprint(graphs)
    best = load_checkpoint(os.path.join(out, "best.pth"))
    assert best["metrics"]["best_top1"] == max(e["top1"] for e in records(out, "eval"))


@pytest.mark.slow
def test_eval_only_matches_training_eval(trained, dataset, tmp_path):
    cfg, result, n_val = trained
    data, _ = dataset
    weights = os.path.join(cfg["output_dir"], "last.pth")
    args = tiny_args(data, str(tmp_path), extra=["--eval-only", "--weights", weights])
    r = trainer.main(tiny_cfg(*args))
    assert r["top1"] == pytest.approx(result["top1"]) and r["count"] == n_val
    r = trainer.main(tiny_cfg(*args, "data.test_size", "40", "--eval-ema"))
    assert r["count"] == n_val and r["test_size"] == 40 and r["which"] == "ema"
    with pytest.raises(CheckpointMismatchError, match="channels: checkpoint 8, requested 16"):
        trainer.main(tiny_cfg(*args, "--channels", "16"))
    with pytest.raises(CheckpointMismatchError, match="graph fingerprint"):
        trainer.main(tiny_cfg(*args, "--seed", "2"))


@pytest.mark.slow
def test_auto_resume_of_a_finished_run_only_evaluates(trained):
    """Nothing is retrained: the checkpoints and the train/eval records stay as they were (an
    equal top-1 alone would also pass a silent retrain from the restored weights)."""
    cfg, result, _ = trained
    out = cfg["output_dir"]
    saved = {n: open(os.path.join(out, n), "rb").read() for n in ("last.pth", "best.pth")}
    before = {kind: records(out, kind) for kind in ("train", "eval")}
    log_before = len(open(os.path.join(out, "log.txt")).read())
    r = trainer.main(cfg)
    assert r["top1"] == pytest.approx(result["top1"])
    assert {n: open(os.path.join(out, n), "rb").read() for n in saved} == saved
    assert {kind: records(out, kind) for kind in before} == before
    log = open(os.path.join(out, "log.txt")).read()[log_before:]
    assert "training already finished at iteration 52; evaluating" in log
    assert " iter " not in log and "precise BN" not in log, log  # no step, no BN recompute
    assert not os.path.exists(os.path.join(out, "previous"))


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(trained, dataset, tmp_path):
    cfg, _, _ = trained
    data, _ = dataset
    out = str(tmp_path / "run")
    shutil.copytree(cfg["output_dir"], out)
    before = open(os.path.join(out, "last.pth"), "rb").read()
    # Resume the finished 4-epoch run for a 5th epoch with an lr of 3e38 (an infinite one is
    # refused as a bad value): the first update sends the weights towards 1e38 (still finite),
    # which must stop the run before anything is saved.
    args = tiny_args(data, out, epochs=5, extra=["--ema", "--lr", "3e38"])
    with pytest.raises(FloatingPointError, match="iteration 53: a weight.*last good checkpoint"):
        trainer.main(tiny_cfg(*args, "train.checkpoint_period", "1"))
    assert open(os.path.join(out, "last.pth"), "rb").read() == before


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(dataset, tmp_path):
    """A run killed mid-epoch and resumed ends with exactly the weights of an uninterrupted
    run. Edge drop, dropout and EMA are on, and data loads in a worker process, so the RNG
    streams, the sampler position and the worker seeding all have to be restored."""
    data, _ = dataset
    extra = [
        "model.kwargs", "{stem: small, head_channels: 32, edge_drop: 0.3, dropout: 0.2}",
        "data.workers", "1", "train.checkpoint_period", "3", "train.eval_period", "3", "--ema",
    ]  # fmt: skip
    ref_out, cut_out = str(tmp_path / "ref"), str(tmp_path / "cut")
    ref = subprocess.Popen(
        [sys.executable, TOOL, *tiny_args(data, ref_out, extra=extra)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    cut_cmd = [sys.executable, TOOL, *tiny_args(data, cut_out, extra=extra)]
    victim = subprocess.Popen(
        cut_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV
    )
    seen = []
    for line in victim.stdout:
        seen.append(line)
        if "epoch 2/3 iter 7/13" in line:
            victim.send_signal(signal.SIGKILL)
            break
    victim.wait(timeout=120)
    assert victim.returncode == -signal.SIGKILL, "".join(seen[-20:])
    killed_at = load_checkpoint(os.path.join(cut_out, "last.pth"))["iteration"]
    assert 13 < killed_at < 26 and killed_at % 13, killed_at  # mid-way through epoch 2
    resumed = subprocess.run(cut_cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"iteration {killed_at}" in resumed.stdout
    assert ref.wait(timeout=300) == 0
    a = load_checkpoint(os.path.join(ref_out, "last.pth"))
    b = load_checkpoint(os.path.join(cut_out, "last.pth"))
    assert a["iteration"] == b["iteration"] == 39
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"


@pytest.mark.slow
def test_two_process_ddp_with_torchrun(dataset, tmp_path):
    data, n_val = dataset
    out = str(tmp_path / "ddp")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        TOOL, *tiny_args(data, out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(2 processes, cpu, memory allocator " in proc.stdout
    if find_tcmalloc() and "LD_PRELOAD" not in ENV:  # torchrun's workers re-exec under it too
        assert "memory allocator libtcmalloc" in proc.stdout
    assert proc.stdout.count("final top-1") == 1  # only rank 0 reports
    evals = records(out, "eval")
    assert len(evals) == 3  # one writer: no duplicated records
    # 19 val files (18 good + 1 broken) split 10/9 over the ranks: each good image is counted
    # exactly once (no padding duplicates) and the broken one is skipped once.
    assert all(e["count"] == n_val and e["skipped"] == 1 for e in evals)
    assert evals[-1]["top1"] > CHANCE + 20
    # The 2 bad training files are met once per epoch, on whichever rank: counted over ranks.
    assert [e["skipped_train_images"] for e in evals] == [2, 4, 6]
    train = records(out, "train")
    assert [r["skipped_images"] for r in train if r["epoch"] in (1, 2, 3)] == [2, 2, 2]
    assert train[-1]["loss"] < train[0]["loss"]
    ckpt = load_checkpoint(os.path.join(out, "last.pth"))
    assert len(ckpt["rng"]) == 2 and ckpt["sampler"]["world"] == 2


def _mismatch_worker(rank, store, results):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        check_same_on_all_ranks(f"fingerprint-{rank}", "graph fingerprint")
        msg = "no error"
    except UserError as e:  # a user's mistake: one line from the tools, not a traceback
        msg = str(e)
    try:  # the trainer's resume-point check, with its own advice
        check_same_on_all_ranks(f"iteration {rank * 7}", "resume point", "share the folder")
        msg += "\nno error"
    except UserError as e:
        msg += "\n" + str(e)
    finally:
        dist.destroy_process_group()
    with open(f"{results}.{rank}", "w") as f:
        f.write(msg)


@pytest.mark.slow
def test_graph_fingerprint_mismatch_fails_on_every_rank(tmp_path):
    results = str(tmp_path / "result")
    # fork: the children share the parent's imports, so this takes a second, not a minute.
    mp.start_processes(
        _mismatch_worker, args=(str(tmp_path / "store"), results), nprocs=2, start_method="fork"
    )
    for rank in range(2):
        msg = open(f"{results}.{rank}").read()
        assert "graph fingerprint differs across ranks" in msg and "rank 1: fingerprint-1" in msg
        resume = "resume point differs across ranks (rank 0: iteration 0, rank 1: iteration 7)"
        assert resume in msg and msg.endswith("; share the folder")


@pytest.mark.parametrize(
    "setup,argv,match",
    [
        ("none", ["--data", "{tmp}/missing"], "does not exist"),
        ("no_val", ["--data", "{tmp}/d"], "no val split"),
        ("empty_class", ["--data", "{tmp}/d"], "contains no images"),
        ("none", ["data.fashion_mnist_dir", "{tmp}"], "apt-get install dataset-fashion-mnist"),
        ("none", ["--model", "nope"], "model='nope' is not registered"),
        ("none", ["--gen", "ws", "--m", "3"], "unknown parameter"),
    ],
)
def test_bad_input_gives_a_clear_error(setup, argv, match, tmp_path, capsys):
    d = tmp_path / "d"
    if setup != "none":
        make_image_folder(str(d), classes=2, train_per_class=2, val_per_class=1, bad=False)
    if setup == "no_val":
        shutil.rmtree(d / "val")
    if setup == "empty_class":
        (d / "train" / "class9").mkdir()
    if "nope" in argv or "--m" in argv:
        make_fashion_mnist(str(tmp_path / "fm"))
        argv = [*argv, "data.fashion_mnist_dir", f"{tmp_path}/fm"]
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    out = str(tmp_path / "out")
    code = load_tool().main([*argv, "--output-dir", out, "train.complexity", "false"])
    err = capsys.readouterr().err
    assert code == 2 and match in err, err


@pytest.mark.gpu
def test_cuda_bf16_training(dataset, tmp_path):
    data, n_val = dataset
    args = tiny_args(data, str(tmp_path), extra=["--device", "cuda", "--amp", "bf16"])
    result = trainer.main(tiny_cfg(*args, "--channels-last"))
    # The CPU run of these 3 epochs reaches 100%: a bf16 pipeline that learns nothing sits at
    # chance (33%), one that learns a class or two at 67% at most.
    assert result["count"] == n_val and result["top1"] > CHANCE + 40, result
    assert records(str(tmp_path), "train")[-1]["peak_mem_mb"] > 0
