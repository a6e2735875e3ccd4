"""Checkpoints: atomic writes, weights_only loading, RNG round trip, mismatch errors."""

import os
import random

import numpy as np
import pytest
import torch

from classification import checkpoint as ck
from rwdet.graphs import graphs_to_dict
from rwdet.models import build_model, get_graphs

TINY = {"channels": 8, "nodes": 6, "stem": "small", "head_channels": 16, "num_classes": 3}


def tiny_ckpt(**overrides):
    kw = {**TINY, "gen": "ws", "seed": 1, **overrides}
    model = build_model("randwire_small", **kw)
    return {
        "model": model.state_dict(),
        "model_spec": model.rwdet_spec,
        "graphs": graphs_to_dict(get_graphs(model)),
        "ema": None,
        "iteration": 3,
    }


def test_atomic_save_and_weights_only_load(tmp_path):
    path = str(tmp_path / "sub" / "last.pth")
    obj = tiny_ckpt()
    ck.atomic_save(obj, path)
    assert os.listdir(tmp_path / "sub") == ["last.pth"]  # no temp file left behind
    loaded = ck.load_checkpoint(path)
    assert loaded["model_spec"] == obj["model_spec"] and loaded["iteration"] == 3
    # Rebuilding from the stored edge lists reproduces the model exactly.
    from rwdet.graphs import graphs_from_dict

    spec = loaded["model_spec"]
    model = build_model(spec["name"], graphs=graphs_from_dict(loaded["graphs"]), **spec["kwargs"])
    model.load_state_dict(loaded["model"])


def test_failed_save_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "last.pth")
    ck.atomic_save({"model": {}, "model_spec": {}, "graphs": {}, "v": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ck.atomic_save({"x": Unpicklable()}, path)
    assert ck.load_checkpoint(path)["v"] == 1
    assert os.listdir(tmp_path) == ["last.pth"]


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_unsafe_pickles_are_refused(tmp_path):
    path = str(tmp_path / "evil.pth")
    torch.save({"model": {}, "model_spec": {}, "graphs": {}, "x": Evil()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        ck.load_checkpoint(path)


def test_unreadable_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        ck.load_checkpoint(str(tmp_path / "none.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="unreadable or corrupt|weights_only"):
        ck.load_checkpoint(str(bad))
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an rwdet classification checkpoint"):
        ck.load_checkpoint(str(tmp_path / "other.pth"))


def test_spec_mismatch_errors_name_the_difference():
    ckpt = tiny_ckpt()
    spec = dict(ckpt["model_spec"])
    ck.check_model_spec(ckpt, spec, "x.pth")  # identical: fine
    other = {"name": spec["name"], "kwargs": {**spec["kwargs"], "channels": 16}}
    with pytest.raises(ck.CheckpointMismatchError, match="channels: checkpoint 8, requested 16"):
        ck.check_model_spec(ckpt, other, "x.pth")
    graph = {"name": spec["name"], "kwargs": {**spec["kwargs"], "seed": 2}}
    with pytest.raises(ck.CheckpointMismatchError, match="graph fingerprint"):
        ck.check_model_spec(ckpt, graph, "x.pth")
    arch = {"name": "randwire_c109", "kwargs": spec["kwargs"]}
    with pytest.raises(ck.CheckpointMismatchError, match="model: checkpoint 'randwire_small'"):
        ck.check_model_spec(ckpt, arch, "x.pth")


def test_eval_only_ignores_training_only_keywords():
    ckpt = tiny_ckpt(dropout=0.2, edge_drop=0.1)
    spec = {"name": "randwire_small", "kwargs": {**TINY, "gen": "ws", "seed": 1}}
    ck.check_model_spec(ckpt, spec, "x.pth", eval_only=True)
    with pytest.raises(ck.CheckpointMismatchError, match="edge_drop"):
        ck.check_model_spec(ckpt, spec, "x.pth")


def test_rng_state_round_trip_is_weights_only_safe(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    np.random.normal()  # leaves a cached gaussian in NumPy's state
    state = ck.rng_state()
    path = str(tmp_path / "rng.pth")
    ck.atomic_save({"model": {}, "model_spec": {}, "graphs": {}, "rng": [state]}, path)
    expected = (random.random(), np.random.normal(), torch.rand(2))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ck.set_rng_state(ck.load_checkpoint(path)["rng"][0])
    got = (random.random(), np.random.normal(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_latest_checkpoint(tmp_path):
    assert ck.latest_checkpoint(str(tmp_path)) is None
    (tmp_path / "last.pth").write_bytes(b"x")
    assert ck.latest_checkpoint(str(tmp_path)).endswith("last.pth")


def test_temp_files_of_killed_saves_are_removed(tmp_path):
    kept = ["last.pth", "best.pth", "notes.tmp", ".other.tmp"]
    stale = [".last.pthab12cd.tmp", ".best.pth_x9.tmp"]
    for f in kept + stale:
        (tmp_path / f).write_bytes(b"x")
    assert sorted(ck.remove_stale_temp_files(str(tmp_path))) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)
    assert ck.remove_stale_temp_files(str(tmp_path / "missing")) == []


def test_unwrap():
    model = torch.nn.Linear(2, 2)
    wrapped = type("Compiled", (torch.nn.Module,), {})()
    wrapped._orig_mod = model
    assert ck.unwrap(wrapped) is model and ck.unwrap(model) is model


# ---------------------------------------------------------------------------- training state

# The top-level keys every train_cls.py checkpoint has had (written by the trainer before the
# TrainState refactor; checked on a real last.pth of that code): runs started then resume.
OLD_KEYS = {
    "model", "model_spec", "graphs", "graphs_fingerprint", "ema", "ema_updates", "optimizer",
    "scheduler", "scaler", "epoch", "iteration", "rng", "sampler", "config", "metrics",
    "classes", "skipped_train", "guard",
}  # fmt: skip
OLD_SCHEDULER_KEYS = {"iteration", "lr", "total_iters", "warmup_iters", "warmup_factor"}


def _state(model, ipe=5, ema=True, tmp="/nonexistent"):
    from classification.divergence import DivergenceGuard
    from classification.ema import ModelEMA
    from classification.schedule import LrSchedule

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    guard_cfg = {"divergence_factor": 0, "divergence_margin": 0, "divergence_patience": 1,
                 "divergence_max_weight": 0}  # fmt: skip
    return ck.TrainState(
        optimizer=opt, scheduler=LrSchedule(opt, 0.1, 10 * ipe, 2, 0.1),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        ema=ModelEMA(model, 0.9) if ema else None, guard=DivergenceGuard(guard_cfg),
        iters_per_epoch=ipe, classes=["a", "b", "c"], last_path=os.path.join(tmp, "last.pth"),
    )  # fmt: skip


def _old_schema_checkpoint(model, opt, iteration, ipe, ema_state, ema_updates):
    """A checkpoint dict exactly as the pre-refactor ``trainer.save_checkpoint`` built it."""
    from rwdet.checkpoint_io import model_record

    return {
        **model_record(model),
        "ema": ema_state, "ema_updates": ema_updates, "optimizer": opt.state_dict(),
        "scheduler": {"iteration": iteration - 1, "lr": 0.1, "total_iters": 10 * ipe,
                      "warmup_iters": 2, "warmup_factor": 0.1},
        "scaler": None, "epoch": iteration // ipe, "iteration": iteration,
        "rng": [ck.rng_state()],
        "sampler": {"seed": 0, "epoch": iteration // ipe, "start_batch": iteration % ipe,
                    "iters_per_epoch": ipe, "world": 1},
        "config": {"seed": 0}, "metrics": {"best_top1": 40.0, "top1": 40.0, "top5": 90.0},
        "classes": ["a", "b", "c"], "skipped_train": 2, "guard": {"loss_level": 1.5},
    }  # fmt: skip


def _trained_model():
    torch.manual_seed(0)
    model = build_model("randwire_small", **TINY, gen="ws", seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()  # momentum buffers in the optimizer state
    return model, opt


def test_a_checkpoint_of_the_old_schema_resumes_exactly(tmp_path):
    model, opt = _trained_model()
    ema_state = {k: v + 1 for k, v in model.state_dict().items()}  # distinguishable
    old = _old_schema_checkpoint(model, opt, 7, 5, ema_state, 4)
    path = str(tmp_path / "last.pth")
    ck.atomic_save(old, path)
    expected_rand = torch.rand(3)  # the stream the checkpoint's rng continues
    fresh = build_model("randwire_small", **TINY, gen="ws", seed=1)
    state = _state(fresh)
    torch.manual_seed(123)
    assert state.restore(ck.load_checkpoint(path), fresh, rank=0, world=1)
    assert torch.equal(torch.rand(3), expected_rand)
    assert state.iteration == 7 and state.scheduler.iteration == 6
    assert state.skipped_train == 2 and state.metrics["best_top1"] == 40.0
    assert state.guard.state_dict() == {"loss_level": 1.5}
    assert state.ema.updates == 4
    assert all(torch.equal(v, ema_state[k]) for k, v in state.ema.state_dict().items())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())
    momentum = state.optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, opt.state_dict()["state"][0]["momentum_buffer"])


def test_new_checkpoints_keep_the_old_keys():
    model, _ = _trained_model()
    state = _state(model)
    state.iteration = 12
    obj = state.to_checkpoint(model, {"seed": 3}, [ck.rng_state()], world=1)
    assert set(obj) == OLD_KEYS
    assert set(obj["scheduler"]) == OLD_SCHEDULER_KEYS
    assert obj["sampler"] == {
        "seed": 3, "epoch": 2, "start_batch": 2, "iters_per_epoch": 5, "world": 1,
    }  # fmt: skip
    assert set(obj["ema"]) == set(model.state_dict())  # the model's keys: load_model(weights="ema")
    assert obj["ema_updates"] == 0


def test_another_world_size_restarts_the_epoch(tmp_path):
    model, opt = _trained_model()
    old = _old_schema_checkpoint(model, opt, 7, 5, None, 0)
    old["sampler"]["world"] = 2
    state = _state(model, ema=False)
    assert not state.restore(old, model, rank=0, world=1)
    assert state.iteration == 5  # the start of epoch 1, not bit-exact


def test_kept_checkpoint_says_what_a_diverged_run_leaves(tmp_path):
    model, _ = _trained_model()
    state = _state(model, ema=False, tmp=str(tmp_path))
    assert state.kept_checkpoint() == "No checkpoint was written yet"
    state.moved_to = "prev/1"
    assert "previous run's checkpoints are in prev/1" in state.kept_checkpoint()
    open(state.last_path, "wb").close()
    assert "untouched by this run" in state.kept_checkpoint()
    state.saved_iteration = 9
    assert state.kept_checkpoint().endswith("(iteration 9)")
