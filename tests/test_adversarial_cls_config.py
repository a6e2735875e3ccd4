"""Adversarial config values for train_cls.py: typed overrides, one-line errors, exit code 2.

The cases of rwdet issue #13 ("Overrides"): YAML 1.1 read ``1e6`` and ``1e-4`` as strings, and
non-numbers, ``seed=abc`` or lists where a scalar belongs ended in tracebacks from the trainer.
"""

import os
import subprocess
import sys

import pytest
from test_cls_config import ROOT, cli, load_tool

from classification import config as C
from rwdet.run.errors import UserError

TOOL = os.path.join(ROOT, "tools", "train_cls.py")


def run_main(argv, tmp_path, capsys):
    """``train_cls.py main(argv)`` in-process, with nothing to train on and nowhere shared to
    write: only a config error can end it with the expected message."""
    argv = [
        *argv,
        "--output-dir",
        str(tmp_path / "out"),
        "data.fashion_mnist_dir",
        f"{tmp_path}/no",
    ]
    code = load_tool().main(argv)
    return code, capsys.readouterr().err


def test_scientific_notation_parses_as_numbers():
    cfg = cli("optim.lr", "1e6", "optim.weight_decay", "1e-4", "optim.clip_grad", "5E-5")
    assert cfg["optim"]["lr"] == 1e6 and cfg["optim"]["weight_decay"] == 1e-4
    assert cfg["optim"]["clip_grad"] == 5e-5
    assert all(isinstance(cfg["optim"][k], float) for k in ("lr", "weight_decay", "clip_grad"))
    # An integer key takes an integral number in any spelling, as an int.
    cfg = cli("schedule.epochs", "1e1", "data.train_subset", "2.0E3", "model.gen_params.p", "-1e-3")
    assert cfg["schedule"]["epochs"] == 10 and isinstance(cfg["schedule"]["epochs"], int)
    assert cfg["data"]["train_subset"] == 2000 and isinstance(cfg["data"]["train_subset"], int)
    assert cfg["model"]["gen_params"]["p"] == -1e-3  # generator parameters: numbers, unranged


def test_yaml_1_1_words_stay_words_and_numbers_stay_numbers(tmp_path):
    """``off`` is a string (not False) and ``1e-4`` a number, on the command line and in a
    recipe; a run name or path is taken as typed."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: {amp: off}\noptim: {lr: 1e-1, weight_decay: 1e-4}\n")
    cfg = C.resolve(str(recipe), {"data": {"root": "/d"}})
    assert cfg["train"]["amp"] == "off" and cfg["optim"]["lr"] == 0.1
    assert cfg["optim"]["weight_decay"] == 1e-4
    cfg = cli("train.amp", "off", "name", "2024", "data.root", "/data/1e5", "model.wiring", "no")
    assert cfg["train"]["amp"] == "off" and cfg["name"] == "2024"
    assert cfg["data"]["root"] == "/data/1e5" and cfg["model"]["wiring"] == "no"


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["optim.lr", "abc"],
            "config key optim.lr='abc': expected a number > 0 and < 3.4e38 (e.g. optim.lr 0.1)",
        ),
        (["seed", "abc"], "config key seed='abc': expected an integer (e.g. seed 0)"),
        (["train.batch_size", "[1,2]"], "key train.batch_size=[1, 2]: expected an integer >= 1"),
        (["optim.momentum", "2"], "config key optim.momentum=2: expected a number in [0, 1)"),
        (["train.ema", "maybe"], "config key train.ema='maybe': expected true or false"),
        (["train.ema", "yes"], "config key train.ema='yes': expected true or false"),
        (["optim.lr", "1e6x"], "config key optim.lr='1e6x': expected a number > 0"),
        (["optim.lr", "-1e-3"], "config key optim.lr=-0.001: expected a number > 0"),
        (["optim.lr", ".nan"], "config key optim.lr=nan: expected a number > 0"),
        (["optim.weight_decay", "-1e-4"], "optim.weight_decay=-0.0001: expected a number >= 0"),
        (["optim.label_smoothing", "1"], "optim.label_smoothing=1: expected a number in [0, 1)"),
        (["optim.clip_grad", "0"], "optim.clip_grad=0: expected a number > 0 or null"),
        (["schedule.epochs", "2.5"], "schedule.epochs=2.5: expected an integer >= 1"),
        (["schedule.warmup_factor", "2"], "warmup_factor=2: expected a number in (0, 1] or null"),
        (["train.ema_decay", "1"], "train.ema_decay=1: expected a number in (0, 1)"),
        (["data.workers", "-1"], "data.workers=-1: expected an integer >= 0"),
        (["data.train_size", "0"], "data.train_size=0: expected an integer >= 1"),
        (["threads", "0"], "threads=0: expected an integer >= 1 or null (e.g. threads 4)"),
        (["train.resume", "3"], "train.resume=3: expected true, false or a checkpoint path"),
        (["device", "tpu"], "device='tpu': expected one of 'auto', 'cpu', 'cuda'"),
        (["model.gen_params.p", "abc"], "config key model.gen_params.p='abc': expected a number"),
        (["model.gen_params", "[4]"], "config key model.gen_params=[4]: expected a mapping"),
        (["optim", "{lr: x}"], "config key optim.lr='x': expected a number > 0"),
        (["--epochs", "abc"], "argument --epochs: invalid int value: 'abc'"),
    ],
)
def test_bad_override_is_one_line_naming_key_and_value(argv, message, tmp_path, capsys):
    code, err = run_main(argv, tmp_path, capsys)
    assert code == 2, err
    assert err.startswith("train_cls.py: error: ") and err.count("\n") == 1
    assert message in err and "Traceback" not in err, err


def test_bad_value_in_a_recipe_names_key_value_and_file(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("optim:\n  lr: abc\n")
    code, err = run_main(["--config", str(recipe), "--data", str(tmp_path)], tmp_path, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"config key optim.lr='abc' in {recipe}: expected a number > 0" in err
    # The same key fixed on the command line wins over the recipe: no error from it.
    cfg = cli("--config", str(recipe), "--data", str(tmp_path), "optim.lr", "1e-2")
    assert cfg["optim"]["lr"] == 0.01


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="config key optim.lr='abc'"):
        load_tool().main(["optim.lr", "abc", "--debug", "--output-dir", str(tmp_path)])
    monkeypatch.setenv("RWDET_DEBUG", "1")
    with pytest.raises(UserError, match="config key seed='abc'"):
        load_tool().main(["seed", "abc", "--output-dir", str(tmp_path)])


def test_real_cli_exit_code_and_debug_traceback(tmp_path):
    """The script itself (not only main): exit code 2 and one line; RWDET_DEBUG=1: traceback."""
    env = {k: v for k, v in os.environ.items() if k != "RWDET_DEBUG"}
    argv = [sys.executable, TOOL, "optim.lr", "abc", "--output-dir", str(tmp_path)]
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 2, p.stderr
    message = "config key optim.lr='abc': expected a number > 0 and < 3.4e38 (e.g. optim.lr 0.1)"
    assert p.stderr == f"train_cls.py: error: {message}\n"
    p = subprocess.run(
        argv, capture_output=True, text=True, env={**env, "RWDET_DEBUG": "1"}, timeout=60
    )
    assert p.returncode != 0 and "Traceback" in p.stderr and "UserError" in p.stderr
    assert not os.listdir(tmp_path)  # a refused config writes nothing


def test_a_value_that_looks_like_code_is_never_run(tmp_path):
    """Override values go through the safe YAML loader only (never eval, literal_eval or
    yaml.unsafe_load): code stays a string where a string is asked for, is refused where a
    number is, and a python tag is refused outright; the marker file is never written."""
    marker = tmp_path / "ran"
    code = f"__import__('os').system('touch {marker}')"
    assert cli("name", code)["name"] == code
    with pytest.raises(UserError, match=r"config key optim.lr=.*__import__.*: expected a number"):
        cli("optim.lr", code)
    tag = f"!!python/object/apply:os.system ['touch {marker}']"
    for argv in (["name", tag], ["model.kwargs", f"{{x: {tag}}}"], [f"train.resume={tag}"]):
        with pytest.raises(UserError, match="cannot parse the value") as e:
            cli(*argv)
        assert "\n" not in str(e.value)
    assert not marker.exists()


def test_override_keys_must_be_dotted_names():
    """A value-shaped token in a key's place (a shifted pair) is named, not looked up."""
    with pytest.raises(UserError, match=r"override key '\[1\]' is not a dotted config key"):
        cli("[1]", "schedule.milestones")
