"""The benchmark harness runs end to end on a tiny configuration and reports ratios."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_train_step_benchmark_tiny(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py")]
        + ["--models", "resnet50", "randwire_small+recompute", "randwire_small:dnw"]
        + ["nonexistent_model"]
        + ["--batch", "2", "--size", "32", "--iters", "1", "--warmup", "0", "--rounds", "1"]
        + ["--overrides", '{"channels": 8, "nodes": 8}', "--json", str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    data = json.loads(out.read_text())
    rows = {r["model"]: r for r in data["results"]}
    # Ratios are against ResNet-50 measured in the same run, for every model that ran.
    base = rows["resnet50"]
    for name in ("randwire_small+recompute", "randwire_small:dnw"):
        row = rows[name]
        assert row["step_s"] > 0 and row["peak_bytes"] > 0
        assert row["step_ratio"] == pytest.approx(row["step_s"] / base["step_s"])
        assert row["peak_ratio"] == pytest.approx(row["peak_bytes"] / base["peak_bytes"])
    assert "not registered" in rows["nonexistent_model"]["note"]
    # The edge-choice share is reported for models that choose edges per step, and only them.
    assert "choice_share" not in rows["resnet50"]
    assert "choice_share" not in rows["randwire_small+recompute"]
    assert 0.0 < rows["randwire_small:dnw"]["choice_share"] < 1.0
    assert data["environment"]["batch"] == 2


def _tcmalloc():
    from rwdet.run.allocator import find_tcmalloc

    return find_tcmalloc()


def test_inference_mode_runs_under_the_preloaded_allocator(tmp_path):
    """--inference measures in its own process, so it re-executes itself under --preload
    (the library mapped in that process) instead of ignoring the flag."""
    lib = _tcmalloc()
    if lib is None:
        pytest.skip("tcmalloc not installed (make setup installs it)")
    out = tmp_path / "infer.json"
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"), "--inference"]
        + ["--models", "randwire_small", "--batch", "1", "--size", "32", "--iters", "1"]
        + ["--warmup", "0", "--rounds", "1", "--overrides", '{"channels": 8, "nodes": 8}']
        + ["--preload", lib, "--json", str(out)],
        check=True,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "LD_PRELOAD"},
    )
    env = json.loads(out.read_text())["environment"]
    assert env["preload"] == lib and env["preload_loaded"] is True


@pytest.mark.parametrize(
    "script, mode", [("train_step.py", []), ("train_step.py", ["--inference"]), ("det_step.py", [])]
)
def test_a_preload_that_cannot_load_is_a_usage_error(tmp_path, script, mode):
    """The dynamic loader only warns about a bad LD_PRELOAD and runs on with glibc's malloc:
    the benchmarks refuse the value instead of labelling glibc's numbers with it."""
    missing = tmp_path / "libnope.so"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", script), *mode]
    proc = subprocess.run(cmd + ["--preload", str(missing)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"--preload '{missing}': no such file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_preload_that_is_not_a_library_is_refused(tmp_path):
    from benchmarks._common import check_preloaded, exec_preloaded, preload_mapped

    not_lib = tmp_path / "notlib.so"
    not_lib.write_text("not an ELF file")
    assert preload_mapped(str(not_lib)) is False
    assert preload_mapped(sys.executable) is True  # the interpreter's own file is mapped
    # The inference mode's re-executed process finds it still unloaded: an error, not a loop.
    os.environ["RWDET_BENCH_PRELOAD_EXEC"] = "1"
    try:
        assert "was not loaded" in exec_preloaded(str(not_lib), "x.py", [])
    finally:
        del os.environ["RWDET_BENCH_PRELOAD_EXEC"]
    # A worker whose LD_PRELOAD did not load fails with the library's name (an error row).
    proc = subprocess.run(
        [sys.executable, "-c", "from benchmarks._common import check_preloaded as c; c()"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "LD_PRELOAD": str(not_lib)},
    )
    assert proc.returncode != 0 and f"--preload '{not_lib}' was not loaded" in proc.stderr
    check_preloaded()  # this process: no LD_PRELOAD, nothing to check


def test_without_proc_the_preload_is_trusted_once_set(monkeypatch, tmp_path):
    import benchmarks._common as common

    lib = str(tmp_path / "liba.so")
    monkeypatch.setattr(common, "preload_mapped", lambda path: None)
    monkeypatch.setenv("LD_PRELOAD", lib)
    assert common.exec_preloaded(lib, "x.py", []) is None  # no exec: already set
    monkeypatch.setenv("RWDET_BENCH_PRELOAD_EXEC", "1")
    monkeypatch.setenv("LD_PRELOAD", "other.so")
    assert "was not loaded" in common.exec_preloaded(lib, "x.py", [])


@pytest.mark.slow
def test_inference_mode_alternates_in_one_process_with_per_round_ratios(tmp_path):
    out = tmp_path / "infer.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"), "--inference"]
        + ["--models", "resnet50+fold", "randwire_small+fold", "resnet50", "randwire_small"]
        + ["nonexistent_model", "--batch", "2", "--size", "32", "--iters", "1"]
        + ["--warmup", "0", "--rounds", "2", "--overrides", '{"channels": 8, "nodes": 8}']
        + ["--json", str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    data = json.loads(out.read_text())
    rows = {r["model"]: r for r in data["results"]}
    rounds = data["rounds"]
    assert len(rounds) == 2 and data["environment"]["mode"] == "inference"
    # A folded model is compared with the folded ResNet-50, an unfolded one with the plain one,
    # each within the same round.
    for name, base in (("randwire_small+fold", "resnet50+fold"), ("randwire_small", "resnet50")):
        row = rows[name]
        assert row["baseline"] == base
        ratios = sorted(r[name] / r[base] for r in rounds)
        assert row["infer_ratio_min"] == pytest.approx(ratios[0])
        assert row["infer_ratio_max"] == pytest.approx(ratios[-1])
        assert row["infer_ratio"] == pytest.approx(sum(ratios) / 2)
    assert rows["resnet50+fold"]["infer_ratio"] == 1.0
    assert "not registered" in rows["nonexistent_model"]["note"]
    assert "randwire_small+fold" in proc.stdout


@pytest.mark.slow
def test_fold_option_folds_only_the_inference_model():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "train_step", os.path.join(ROOT, "benchmarks", "train_step.py")
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = bench.build("randwire_small+fold", {"channels": 8, "nodes": 8})
    assert any(type(m).__name__ == "BatchNorm2d" for m in model.modules())
    folded = bench.for_inference(model, "randwire_small+fold")
    assert not folded.training
    assert not any(type(m).__name__ == "BatchNorm2d" for m in folded.modules())
    assert bench.for_inference(model, "randwire_small") is model
    assert bench.inference_baseline("randwire_c109+fold") == "resnet50+fold"
    with pytest.raises(ValueError, match=r"\+fuse"):
        bench.build("randwire_small+fuse", {})


def test_execution_options_set_the_stages_execution():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "train_step", os.path.join(ROOT, "benchmarks", "train_step.py")
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    small = {"channels": 8, "nodes": 8}
    for option, execution in (
        ("", "auto"),
        ("+reference", "reference"),
        ("+fused", "fused"),
        ("+rebuild", "rebuild"),
    ):
        model = bench.build("randwire_small" + option + "+fold", small)
        assert {m.execution for m in model.modules() if hasattr(m, "execution")} == {execution}
    with pytest.raises(ValueError, match=r"\+reference"):  # the old name, refused
        bench.build("randwire_small+unfused", small)
    with pytest.raises(ValueError, match="two executions"):
        bench.build("randwire_small+fused+recompute", small)
    # A torchvision baseline has no graph stages: an execution or wiring on it is refused,
    # not ignored; pad8 applies to it as to any model of plain layers.
    for spec, what in (("resnet50+fused", r"\+fused"), ("mobilenet_v2:dnw", ":dnw")):
        with pytest.raises(ValueError, match=f"torchvision baseline without graph stages: {what}"):
            bench.build(spec, {})
    padded = bench.build("mobilenet_v2+pad8", {})
    assert all(m.out_channels % 8 == 0 for m in padded.modules() if hasattr(m, "out_channels"))


@pytest.mark.parametrize("mode", [[], ["--inference"]])
def test_a_bad_model_spec_is_a_usage_error_before_anything_runs(mode):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"), *mode]
        + ["--models", "resnet50", "randwire_small+fuse"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--models randwire_small+fuse: model option +fuse is not known" in proc.stderr
    assert "round 1/" not in proc.stderr  # no worker started


def test_det_step_refuses_an_unknown_model_before_anything_runs():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "det_step.py"), "--models", "r50fpn"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--models r50fpn: neither one of ['r50_fpn'," in proc.stderr


def test_det_step_finds_a_users_config_in_their_folder_then_the_repositorys(monkeypatch, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("det_step", f"{ROOT}/benchmarks/det_step.py")
    det = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(det)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("MODEL: {}\n")
    assert det.config_path("mine.yaml") == str(tmp_path / "mine.yaml")
    repo = "configs/frcnn_r50_baseline.yaml"
    assert det.config_path(repo) == os.path.join(ROOT, repo)
    assert det.config_path("r50_fpn") == os.path.join(ROOT, det.MODELS["r50_fpn"][0])


def test_edge_choice_counts_learned_wirings_only():
    import importlib.util

    from rwdet.models import build_model

    spec = importlib.util.spec_from_file_location(
        "train_step", os.path.join(ROOT, "benchmarks", "train_step.py")
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def choosers(model):
        return [type(m).__name__ for m in model.modules() if bench.chooses_per_step(m)]

    assert choosers(build_model("mobilenetv1_dnw_x0225", wiring="rg")) == []
    assert set(choosers(build_model("mobilenetv1_dnw_x0225"))) == {"NeuralGraph"}
    assert set(choosers(build_model("resnet50_popup"))) == {"PopupConv2d", "PopupLinear"}
    small = build_model("randwire_small", wiring="dnw", channels=8, nodes=8)
    assert set(choosers(small)) == {"DNWGates"}
    assert choosers(build_model("randwire_small", channels=8, nodes=8)) == []


@pytest.mark.slow
def test_det_step_benchmark_tiny(tmp_path):
    out = tmp_path / "det.json"
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "det_step.py")]
        + ["--models", "r50_fpn", "randwire_c109", "--batch", "1", "--size", "64", "96"]
        + ["--iters", "1", "--warmup", "0", "--rounds", "1", "--threads", "1"]
        + ["--json", str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    data = json.loads(out.read_text())
    rows = {r["model"]: r for r in data["results"]}
    assert list(rows) == ["r50_fpn", "randwire_c109"]
    base, rw = rows["r50_fpn"], rows["randwire_c109"]
    for row in (base, rw):
        assert row["step_s"] > 0 and row["peak_bytes"] > 0 and row["infer_img_s"] > 0
    # Two different detectors: the RandWire row is not the baseline's copy.
    assert rw["params"] != base["params"]
    # Ratios are the model's number over the R50-FPN row's, not 1 for every row.
    assert rw["step_ratio"] == pytest.approx(rw["step_s"] / base["step_s"])
    assert rw["peak_ratio"] == pytest.approx(rw["peak_bytes"] / base["peak_bytes"])
    assert rw["infer_ratio"] == pytest.approx(rw["infer_img_s"] / base["infer_img_s"])
    assert base["step_ratio"] == base["peak_ratio"] == 1.0
    env = data["environment"]
    assert env["batch"] == 1 and env["size"] == [64, 96] and env["threads"] == 1
    assert env["baseline"] == "r50_fpn" and env["torch"] and env["detectron2"]


GPU_CHECK_STEPS = (
    "pytest_gpu",
    "train_step",
    "pad_step",
    "det_step",
    "decode",
    "train_cls",
    "train_net",
)


@pytest.mark.slow
def test_gpu_check_dry_run_without_cuda(tmp_path):
    out = tmp_path / "gpu"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PY=sys.executable)
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], proc.stdout
    assert "every step would run" in lines[0]
    report = json.loads((out / "report.json").read_text())
    assert [s["step"] for s in report["steps"]] == list(GPU_CHECK_STEPS)
    assert all(s["status"] == "dry-run ok" for s in report["steps"]), report["steps"]
    md = (out / "report.md").read_text()
    for name in GPU_CHECK_STEPS:
        assert f"| {name} | dry-run ok |" in md
    # The dry run really ran each check: pytest collected gpu tests, the configs loaded.
    assert re.search(
        r"\b[1-9]\d*(/\d+)? tests? collected", (out / "logs" / "pytest_gpu.log").read_text()
    )
    assert sum(s["timeout_s"] for s in report["steps"]) < 8 * 60
    pad_log = (out / "logs" / "pad_step.log").read_text()
    assert "randwire_c109+pad8 built: True" in pad_log
    det_log = (out / "logs" / "det_step.log").read_text()
    assert all(f"{m} config loads" in det_log for m in ("r50_fpn", "r101_fpn", "randwire_c154"))


def test_channels_last_option_sets_one_models_layout():
    """Layouts side by side in one run: ``+channels_last`` for one model, ``--channels-last``
    for all."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location(
        "train_step", os.path.join(ROOT, "benchmarks", "train_step.py")
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cl, nchw = torch.channels_last, torch.contiguous_format
    assert bench.memory_format("randwire_c109+channels_last", False) == cl
    assert bench.memory_format("randwire_c109+fold+channels_last", False) == cl
    assert bench.memory_format("randwire_c109", False) == nchw
    assert bench.memory_format("randwire_c109", True) == cl
    assert bench.build("randwire_small+channels_last", {"channels": 8, "nodes": 8}) is not None
