"""The study runner (tools/study.py): spec checking and grid expansion, skipping finished runs,
resuming an interrupted study, and the aggregation (mean ± std, table, figures) on fake runs."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from test_cls_data import make_fashion_mnist

from classification import study_runner, study_spec
from classification.study_spec import expand, resolve_spec
from rwdet.analysis.study import aggregate, markdown_table, write_outputs
from rwdet.run.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "study.py")
SPECS = os.path.join(ROOT, "configs", "studies")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def load_tool():
    spec = importlib.util.spec_from_file_location("study_tool", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SPEC = {
    "name": "toy",
    "reproduces": "a toy",
    "data": "fashion_mnist",
    "config": {"schedule": {"epochs": 3}},
    "grid": {"model": ["conv4", "conv6"], "seed": [0, 1]},
    "groups": [
        {"name": "popup", "grid": {"wiring": ["popup"], "k": [0.3, 0.5, 0.7],
                                    "init": ["signed_constant"]}},
        {"name": "dense", "baseline": True, "grid": {"wiring": ["dense"]},
         "config": {"optim": {"lr": 0.01}}},
    ],
    "figures": [{"name": "fig", "x": "k", "series": "init", "panel": "model",
                 "groups": ["popup"], "baselines": ["dense"]}],
    "presets": {"quick": {"grid": {"model": ["conv4"], "seed": [0]},
                          "groups": {"popup": {"grid": {"k": [0.5]}}},
                          "config": {"schedule": {"epochs": 1}}}},
}  # fmt: skip


def write_spec(tmp_path, spec=None, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec or SPEC))
    return str(path)


# ---------------------------------------------------------------------------- specs and grids


def test_grid_expands_to_every_combination_with_distinct_folders(tmp_path):
    runs = expand(resolve_spec(write_spec(tmp_path)), str(tmp_path / "out"))
    popup = [r for r in runs if r["group"] == "popup"]
    dense = [r for r in runs if r["group"] == "dense"]
    assert len(popup) == 2 * 2 * 3 and len(dense) == 2 * 2
    assert len({r["dir"] for r in runs}) == len(runs)
    r = next(r for r in popup if r["axes"] == {"model": "conv6", "wiring": "popup", "k": 0.7,
                                               "init": "signed_constant", "seed": 1})  # fmt: skip
    rec = r["recipe"]
    assert rec["model"] == {"name": "conv6", "wiring": "popup",
                            "kwargs": {"keep": 0.7, "init": "signed_constant"}}  # fmt: skip
    assert rec["seed"] == 1 and rec["schedule"]["epochs"] == 3 and rec["output_dir"] == r["dir"]
    assert all(d["recipe"]["optim"]["lr"] == 0.01 and d["baseline"] for d in dense)
    assert "optim" not in r["recipe"]  # the dense group's config stays its own


def test_preset_replaces_axes_and_merges_config(tmp_path):
    runs = expand(resolve_spec(write_spec(tmp_path), "quick"), str(tmp_path / "out"))
    assert [r["name"] for r in runs] == [
        "popup_conv4_k0.5_signed_constant_seed0", "dense_conv4_seed0"]  # fmt: skip
    assert all(r["recipe"]["schedule"]["epochs"] == 1 for r in runs)


def test_fixed_k_keeps_the_number_of_kept_weights(tmp_path, monkeypatch):
    """Figure 5: k at width w = k1 x weights(width 1) / weights(width w)."""
    counts = {1.0: 1000, 2.0: 4000, 0.5: 250}
    monkeypatch.setattr(study_spec, "kept_weights", lambda m, w, i, n: counts[float(w)])
    group = {"name": "fixed", "grid": {"wiring": ["popup"], "width": [1.0, 2.0], "fixed_k": [0.5]}}
    spec = dict(SPEC, groups=[group], figures=[], presets={})
    runs = expand(resolve_spec(write_spec(tmp_path, spec)), str(tmp_path / "out"))
    ks = {r["axes"]["width"]: r["recipe"]["model"]["kwargs"]["keep"] for r in runs}
    assert ks == {1.0: 0.5, 2.0: 0.125}
    spec["groups"][0]["grid"]["width"] = [0.5]
    with pytest.raises(UserError, match="needs k=2 > 1"):
        expand(resolve_spec(write_spec(tmp_path, spec)), str(tmp_path / "out"))


def _bad(**change):
    spec = json.loads(json.dumps(SPEC))
    for dotted, value in change.items():
        node = spec
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[leaf] = value
    return spec


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        (_bad(epochs=3), "epochs"),
        (_bad(grid__modle=["conv4"]), "grid.modle"),
        (_bad(groups__0__grid__k=[1.5]), "groups[0].grid.k"),
        (_bad(groups__1__config={"optim": {"lrr": 0.1}}), "optim.lrr"),
        (_bad(config={"schedule": {"epochs": 0}}), "schedule.epochs"),
        (_bad(groups__0__colour="red"), "groups[0].colour"),
        (_bad(figures__0__x="depth"), "figures[0].x"),
        (_bad(figures__0__baselines=["adam"]), "figures[0].baselines"),
        (_bad(presets__quick__grid={"k2": [1]}), "presets.quick.grid.k2"),
        (_bad(data="mnist"), "data"),
    ],
)
def test_bad_spec_is_one_line_naming_the_key(tmp_path, capsys, spec, named):
    rc = load_tool().main([write_spec(tmp_path, spec), "--list", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "error" in err and named in err, err


def test_unknown_preset_lists_the_presets(tmp_path):
    with pytest.raises(UserError, match=r"no preset 'fast'.*quick"):
        resolve_spec(write_spec(tmp_path), "fast")


@pytest.mark.parametrize("name", sorted(os.listdir(SPECS)))
def test_shipped_specs_expand(name, tmp_path):
    """Every spec in configs/studies/ and its presets pass the checks (full CIFAR grid too)."""
    path = os.path.join(SPECS, name)
    presets = [None, *(yaml.safe_load(open(path)).get("presets") or {})]
    for preset in presets:
        spec = resolve_spec(path, preset, None if preset else "cifar10:/nowhere")
        runs = expand(spec, str(tmp_path / str(preset)))
        assert runs and all(r["recipe"]["model"]["name"] for r in runs)


# ---------------------------------------------------------------------------- skip and resume


def _finish(run: dict, epochs: int, top1: float) -> None:
    os.makedirs(run["dir"], exist_ok=True)
    open(os.path.join(run["dir"], "last.pth"), "wb").close()
    with open(os.path.join(run["dir"], "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"kind": "eval", "epoch": epochs, "top1": top1, "top5": 99.0}) + "\n")


def test_finished_runs_are_skipped_and_others_started(tmp_path, monkeypatch):
    runs = expand(resolve_spec(write_spec(tmp_path), "quick"), str(tmp_path / "out"))
    _finish(runs[0], 1, 80.0)
    # A run stopped at epoch 1 of 3 is not finished, nor is a metrics line without last.pth.
    os.makedirs(runs[1]["dir"])
    started = []
    monkeypatch.setattr(
        study_runner, "command",
        lambda run: started.append(run["name"]) or [sys.executable, "-c", "pass"],
    )  # fmt: skip
    assert study_runner.run_state(runs[0]) == "done"
    assert study_runner.run_state(runs[1]) == "new"
    study_runner.Runner(runs, jobs=2, log=lambda m: None, poll=0.01).run()
    assert started == [runs[1]["name"]]
    assert os.path.isfile(os.path.join(runs[1]["dir"], study_runner.RECIPE))


def test_run_stopped_before_its_last_epoch_is_not_done(tmp_path):
    run = expand(resolve_spec(write_spec(tmp_path)), str(tmp_path / "out"))[0]
    _finish(run, 2, 50.0)  # the spec asks for 3 epochs
    assert study_runner.run_state(run) == "partial"
    assert study_runner.run_record(run)["top1"] is None


def test_failed_run_is_reported_and_others_go_on(tmp_path, monkeypatch):
    runs = expand(resolve_spec(write_spec(tmp_path), "quick"), str(tmp_path / "out"))

    def command(run):
        return [sys.executable, "-c", f"raise SystemExit({3 if 'popup' in run['name'] else 0})"]

    monkeypatch.setattr(study_runner, "command", command)
    runner = study_runner.Runner(runs, jobs=1, log=lambda m: None, poll=0.01)
    runner.run()
    assert runner.failed == [(runs[0]["name"], 3)]


TOY_CONFIG = {
    "threads": 1,
    "model": {"gen": "ws", "seed": 1, "channels": 8, "nodes": 6,
              "kwargs": {"stem": "small", "head_channels": 16}},
    "data": {"train_size": 28, "test_size": 28, "workers": 0},
    "optim": {"lr": 0.05, "reference_batch": 4},
    "schedule": {"epochs": 2, "warmup_epochs": 0},
    "train": {"batch_size": 4, "log_period": 5, "checkpoint_period": 3, "complexity": False},
    "eval": {"batch_size": 50},
}  # fmt: skip


@pytest.mark.slow
def test_interrupted_study_resumes_without_redoing_finished_runs(tmp_path):
    """Ctrl-C mid-study: the running trainer saves and stops; the rerun skips the finished
    run and resumes the interrupted one from its last.pth."""
    fm = tmp_path / "fm"
    make_fashion_mnist(str(fm), n_train=240, n_val=20)
    spec = {
        "name": "toy", "data": "fashion_mnist",
        "config": {**TOY_CONFIG, "data": {**TOY_CONFIG["data"], "fashion_mnist_dir": str(fm)}},
        "grid": {"model": ["randwire_small"], "seed": [0, 1]},
        "groups": [{"name": "rw", "grid": {}}],
        "figures": [{"name": "bars", "kind": "bar", "x": "model"}],
    }  # fmt: skip
    path, out = write_spec(tmp_path, spec), str(tmp_path / "out")
    cmd = [sys.executable, TOOL, path, "--out", out, "--jobs", "1"]
    runs = {r["axes"]["seed"]: r for r in expand(resolve_spec(path), out)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=ENV, cwd=ROOT)  # fmt: skip
    second_last = os.path.join(runs[1]["dir"], "last.pth")
    deadline = time.time() + 120
    while not os.path.exists(second_last) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    first_out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, first_out
    assert study_runner.run_state(runs[0]) == "done"
    assert study_runner.run_state(runs[1]) == "partial", first_out
    evals_before = open(os.path.join(runs[0]["dir"], "metrics.jsonl")).read()

    second = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=180)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming rw_randwire_small_seed1" in second.stdout
    assert "rw_randwire_small_seed0" not in second.stdout.split("runs, 1 finished")[1].split("|")[0]
    assert open(os.path.join(runs[0]["dir"], "metrics.jsonl")).read() == evals_before
    assert "resumed from" in open(os.path.join(runs[1]["dir"], "log.txt")).read()
    result = json.load(open(os.path.join(out, "results.json")))
    assert [r["state"] for r in result["runs"]] == ["done"] * 2
    assert result["summary"][0]["n"] == 2
    assert os.path.getsize(os.path.join(out, "bars.png")) > 1000


# ---------------------------------------------------------------------------- aggregation


def _rec(group, seed, top1, baseline=False, **axes):
    return {"group": group, "label": group, "baseline": baseline,
            "axes": {"model": "conv4", **axes, "seed": seed}, "top1": top1}  # fmt: skip


FAKE = [
    _rec("popup", 0, 70.0, k=0.3, init="signed_constant"),
    _rec("popup", 1, 74.0, k=0.3, init="signed_constant"),
    _rec("popup", 2, 72.0, k=0.3, init="signed_constant"),
    _rec("popup", 0, 80.0, k=0.5, init="signed_constant"),
    _rec("popup", 1, None, k=0.5, init="signed_constant"),  # not finished
    _rec("popup", 0, 60.0, k=0.5, init="kaiming_normal"),
    _rec("dense", 0, 85.0, baseline=True),
    _rec("dense", 1, 87.0, baseline=True),
]


def test_mean_and_sample_std_over_seeds():
    rows = {(r["group"], r["axes"].get("k"), r["axes"].get("init")): r for r in aggregate(FAKE)}
    r = rows[("popup", 0.3, "signed_constant")]
    assert r["n"] == 3 and r["mean"] == pytest.approx(72.0) and r["std"] == pytest.approx(2.0)
    half = rows[("popup", 0.5, "signed_constant")]
    assert half["n"] == 1 and half["missing"] == 1 and half["std"] == 0.0
    dense = rows[("dense", None, None)]
    assert dense["mean"] == pytest.approx(86.0) and dense["std"] == pytest.approx(math.sqrt(2))
    table = markdown_table(list(rows.values()))
    assert "| dense | conv4 |" in table and "72.00 ± 2.00" in table and "1 unfinished" in table
    assert table.index("| dense") < table.index("| popup")  # baselines first


def test_outputs_written_with_figures(tmp_path):
    figures = [
        {"name": "fig3", "kind": "line", "x": "k", "series": "init", "panel": "model",
         "groups": ["popup"], "baselines": ["dense"], "title": "k sweep"},
        {"name": "fig6", "kind": "bar", "x": "model", "series": "group", "panel": None,
         "groups": None, "baselines": ["dense"]},
        {"name": "empty", "kind": "line", "x": "width", "series": "group", "panel": None,
         "groups": ["nothing"], "baselines": []},
    ]  # fmt: skip
    written = write_outputs(FAKE, figures, str(tmp_path), {"name": "toy"})
    assert [os.path.basename(p) for p in written["figures"]] == ["fig3.png", "fig6.png"]
    for p in written["figures"]:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(p) > 5000
    data = json.load(open(tmp_path / "results.json"))
    assert len(data["runs"]) == len(FAKE) and len(data["summary"]) == 4
    assert "72.00 ± 2.00" in (tmp_path / "results.md").read_text()


def test_one_run_per_gpu_sees_only_its_gpu(tmp_path, monkeypatch):
    runs = expand(resolve_spec(write_spec(tmp_path), "quick"), str(tmp_path / "out"))
    code = "import os, sys; open(sys.argv[1], 'w').write(os.environ['CUDA_VISIBLE_DEVICES'])"
    monkeypatch.setattr(
        study_runner,
        "command",
        lambda run: [sys.executable, "-c", code, os.path.join(run["dir"], "gpu")],
    )
    runner = study_runner.Runner(runs, gpus=["3", "5"], log=lambda m: None, poll=0.01)
    assert runner.slots == 2
    runner.run()
    seen = sorted(open(os.path.join(r["dir"], "gpu")).read() for r in runs)
    assert seen == ["3", "5"]


def test_adam_baseline_is_a_trainer_choice():
    """§4.1's Adam baseline needs optim.name=adam; anything else is refused naming the key."""
    from classification.config import resolve

    assert resolve(None, None, ["optim.name", "adam"])["optim"]["name"] == "adam"
    with pytest.raises(UserError, match="optim.name"):
        resolve(None, None, ["optim.name", "rmsprop"])
