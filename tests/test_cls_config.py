"""Classification config: commented defaults, recipes, flags, dotted overrides, bad values."""

import ast
import copy
import importlib.util
import os

import pytest
import yaml

from classification import config as C
from rwdet.graphs import GENERATORS
from rwdet.models import list_models
from rwdet.run.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "configs", "cls")


def load_tool():
    spec = importlib.util.spec_from_file_location(
        "train_cls", os.path.join(ROOT, "tools", "train_cls.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cli(*argv):
    tool = load_tool()
    args = tool.parse_args(list(argv))
    return C.resolve(args.config, tool.flags_from_args(args), args.opts)


def test_every_default_key_has_a_comment():
    """Each key of DEFAULTS is preceded by a comment line in classification/config.py."""
    source = open(C.__file__).read()
    lines = source.splitlines()
    tree = ast.parse(source)
    defaults = next(
        n.value
        for n in tree.body
        if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "DEFAULTS"
    )
    missing = []

    def walk(node):
        for key, value in zip(node.keys, node.values):
            prev = lines[key.lineno - 2].strip()
            if isinstance(value, ast.Dict) and value.keys:
                walk(value)
            elif not prev.startswith("#"):
                missing.append(key.value)

    walk(defaults)
    assert not missing, f"config keys without a comment: {missing}"


def test_fashion_mnist_recipe_equals_the_builtin_profile():
    with open(os.path.join(RECIPES, "fashion_mnist.yaml")) as f:
        assert yaml.safe_load(f) == C.FASHION_MNIST_PROFILE
    # ... so the default run and the recipe resolve to the same config.
    default = C.resolve()
    recipe = C.resolve(os.path.join(RECIPES, "fashion_mnist.yaml"))
    assert default == recipe
    assert default["data"]["name"] == "fashion_mnist"
    assert default["output_dir"] == os.path.join("output", "cls", default["name"])


def test_demo_command_config():
    cfg = cli("--gen", "ws")
    assert cfg["model"]["gen"] == "ws" and cfg["model"]["kwargs"]["stem"] == "small"
    assert cfg["data"]["name"] == "fashion_mnist" and cfg["data"]["train_size"] == 28
    assert cfg["name"] == "fashion_mnist_randwire_small_ws_c16_n8_headchannels-256_stem-small_seed1"


def test_runs_of_different_models_or_data_never_share_a_default_folder():
    """Issue 14: the default folder names what sets a run apart, so a second command with
    another width, node count, wiring, model keyword or dataset does not resume the first."""
    base = ("--gen", "ws")
    variants = [
        base,
        (*base, "--channels", "32"),
        (*base, "--nodes", "12"),
        (*base, "--wiring", "dnw"),
        (*base, "--node-op", "conv"),
        (*base, "--k", "6"),
        (*base, "--seed", "2"),
        (*base, "model.kwargs.head_channels=128"),
        ("--gen", "er"),
        ("--data", "/data/a/imagenet-100", "--gen", "ws"),
        ("--data", "/data/b/imagenet-1k", "--gen", "ws"),
    ]
    names = [cli(*v)["name"] for v in variants]
    assert len(set(names)) == len(names), names
    assert all("/" not in n and " " not in n and len(n) <= 120 for n in names)
    same = cli(*base, "--epochs", "5", "optim.lr=0.05")["name"]  # training settings: same run
    assert same == names[0]
    long = cli(*base, "model.kwargs.x_" + "a" * 150 + "=1")["name"]
    assert len(long) <= 120 and long != cli(*base, "model.kwargs.x_" + "a" * 149 + "=1")["name"]


@pytest.mark.parametrize(
    "recipe,epochs,wd,ref",
    [
        ("randwire_small.yaml", 250, 5e-5, 256),
        ("randwire_c109.yaml", 100, 1e-5, 256),
        ("randwire_c154.yaml", 100, 1e-5, 256),
        ("mobilenetv1_dnw.yaml", 250, 5e-5, 512),
        ("popup_resnet50.yaml", 100, 3.0517578125e-5, 256),
        ("resnet50.yaml", 100, 1e-4, 256),
    ],
)
def test_paper_recipes(recipe, epochs, wd, ref):
    path = os.path.join(RECIPES, recipe)
    with pytest.raises(ValueError, match="--data ROOT"):
        C.resolve(path)  # ImageNet recipes need a data root
    cfg = C.resolve(path, {"data": {"root": "/data/imagenet"}})
    assert cfg["schedule"]["epochs"] == epochs
    assert cfg["optim"]["weight_decay"] == pytest.approx(wd)
    assert cfg["optim"]["reference_batch"] == ref
    assert cfg["data"]["name"] == "imagenet" and cfg["data"]["train_size"] == 224
    assert cfg["model"]["name"] in list_models()
    if recipe.startswith("randwire_c"):
        kw = cfg["model"]["kwargs"]
        assert kw == {"dropout": 0.2, "edge_drop": 0.1}


@pytest.mark.slow
def test_recipe_models_build_with_their_keywords():
    """The non-RandWire recipes pass only keywords their models accept (tiny inputs)."""
    from classification.trainer import build, model_spec

    for recipe in ("mobilenetv1_dnw.yaml", "popup_resnet50.yaml", "resnet50.yaml"):
        cfg = C.resolve(os.path.join(RECIPES, recipe), {"data": {"root": "/x"}})
        spec = model_spec(cfg, num_classes=10, in_channels=3)
        model = build(spec)
        assert model.rwdet_spec == spec


def test_flags_map_to_model_keywords():
    cfg = cli(
        "--data", "/d", "--gen", "ws", "--k", "6", "--p", "0.5", "--seed", "3",
        "--nodes", "12", "--channels", "20", "--wiring", "static", "--epochs", "7",
        "--batch-size", "64", "--lr", "0.2", "--amp", "bf16", "--channels-last",
        "--ema", "--test-size", "320", "optim.clip_grad=5", "train.sync_bn=true",
    )  # fmt: skip
    m = cfg["model"]
    assert (m["gen"], m["gen_params"], m["seed"], m["nodes"], m["channels"]) == (
        "ws", {"k": 6, "p": 0.5}, 3, 12, 20,
    )  # fmt: skip
    assert cfg["schedule"]["epochs"] == 7 and cfg["train"]["batch_size"] == 64
    assert cfg["optim"]["lr"] == 0.2 and cfg["optim"]["clip_grad"] == 5
    assert cfg["train"]["amp"] == "bf16" and cfg["train"]["channels_last"] and cfg["train"]["ema"]
    assert cfg["data"]["test_size"] == 320 and cfg["data"]["test_resize"] is None
    assert cfg["train"]["sync_bn"] is True
    assert cfg["name"] == "imagenet-d_randwire_small_ws-k6-p0.5_c20_n12_seed3"


def test_another_generator_drops_the_recipes_parameters():
    cfg = cli(
        "--config", os.path.join(RECIPES, "randwire_small.yaml"), "--data", "/d", "--gen", "er"
    )
    assert cfg["model"]["gen"] == "er" and cfg["model"]["gen_params"] == {}
    cfg = cli(
        "--config", os.path.join(RECIPES, "randwire_small.yaml"), "--data", "/d", "--gen", "ba",
        "--m", "3",
    )  # fmt: skip
    assert cfg["model"]["gen_params"] == {"m": 3}


def test_overrides_inside_free_form_sections_keep_the_other_keys():
    c109 = os.path.join(RECIPES, "randwire_c109.yaml")
    cfg = cli("--config", c109, "--data", "/d", "model.kwargs.dropout=0.3")
    assert cfg["model"]["kwargs"] == {"dropout": 0.3, "edge_drop": 0.1}
    cfg = cli("--config", c109, "--data", "/d", "model.gen_params.p=0.5")
    assert cfg["model"]["gen_params"] == {"k": 4, "p": 0.5}
    cfg = cli("--config", c109, "--data", "/d", "model.kwargs={dropout: 0.3}")
    assert cfg["model"]["kwargs"] == {"dropout": 0.3}  # a whole mapping replaces the section
    # Another generator drops the recipe's k and p, never what the command line gave, in
    # whatever order.
    for argv in (
        ["model.gen=ba", "model.gen_params.m=3"],
        ["model.gen_params.m=3", "model.gen=ba"],
        ["--m", "3", "model.gen=ba"],
    ):
        cfg = cli("--config", c109, "--data", "/d", *argv)
        assert cfg["model"]["gen"] == "ba" and cfg["model"]["gen_params"] == {"m": 3}, argv


def test_resume_flags():
    assert cli()["train"]["resume"] is True
    assert cli("--no-resume")["train"]["resume"] is False
    assert cli("--resume", "x.pth")["train"]["resume"] == "x.pth"


@pytest.mark.parametrize(
    "argv,match",
    [
        (["optim.lrr=0.1"], "unknown config key 'optim.lrr'"),
        (["optim=3"], "is a section"),
        (["optim.lr"], "key=value"),
        (["train.amp=fp8"], "train.amp='fp8'"),
        (["schedule.epochs=0"], "schedule.epochs=0: expected an integer >= 1"),
        (["train.eval_period=0"], "train.eval_period=0: expected an integer >= 1"),
        (["train.log_period=0"], "train.log_period=0: expected an integer >= 1"),
        (["train.checkpoint_period=-1"], r"train.checkpoint_period=-1: expected an integer >= 0"),
        (["schedule.warmup_epochs=-1"], r"schedule.warmup_epochs=-1: expected a number >= 0"),
        (["data.name=cifar"], "data.name='cifar'"),
        (["--eval-only"], "needs --weights"),
    ],
)
def test_bad_values_are_clear_errors(argv, match):
    with pytest.raises(UserError, match=match):
        cli(*argv)


def test_every_key_has_a_rule_and_the_choices_match_the_code():
    """SCHEMA covers DEFAULTS exactly; its choices are the ones the flags and generators offer."""
    assert set(C.SCHEMA) == {path for path, _ in C._leaves(C.DEFAULTS)}
    assert set(C.SCHEMA["model.gen"].choices) == set(GENERATORS)
    actions = load_tool().build_parser()._actions
    flags = {a.option_strings[0]: a.choices for a in actions if a.option_strings}
    for flag, key in (("--gen", "model.gen"), ("--node-op", "model.node_op"),
                      ("--amp", "train.amp"), ("--device", "device")):  # fmt: skip
        assert set(flags[flag]) == set(C.SCHEMA[key].choices), flag
    # Every default passes its own rule, and so does every example the error messages show.
    assert C.check(copy.deepcopy(C.DEFAULTS)) == C.DEFAULTS
    for path, rule in C.SCHEMA.items():
        if rule.kind is not dict:
            assert C._normalised(rule.example, rule) is not C._MISSING, path


def test_missing_config_file_lists_recipes(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(UserError, match="randwire_small.yaml"):
        C.resolve("configs/cls/nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        C.resolve(str(bad))


def test_resolved_config_round_trips_through_yaml():
    cfg = cli("--gen", "ba", "--m", "4")
    assert yaml.safe_load(C.to_yaml(cfg)) == cfg


def test_another_model_drops_the_demo_models_keywords():
    """--model conv4 on the embedded data: RandWire's generator, width, nodes and stem from the
    Fashion-MNIST profile are not passed to Conv4; the input side is (its FC depends on it)."""
    from classification.trainer import model_spec

    cfg = cli("--model", "conv4", "--wiring", "popup", "model.kwargs.k=0.3")
    assert cfg["model"]["gen"] is None and cfg["model"]["channels"] is None
    assert cfg["model"]["kwargs"] == {"k": 0.3}
    spec = model_spec(cfg, num_classes=10, in_channels=1)
    assert spec["kwargs"] == {"wiring": "popup", "k": 0.3, "num_classes": 10, "in_channels": 1,
                              "input_size": 28}  # fmt: skip
    assert cli("model.name=conv6")["model"]["kwargs"] == {}
    assert cli("--model", "randwire_small")["model"]["channels"] == 16  # same model: kept
    odd = cli("--model", "conv2", "--data", "/d", "--test-size", "40", "data.train_size=32")
    with pytest.raises(UserError, match="built for one input size"):
        model_spec(odd, num_classes=10, in_channels=3)


def test_milestones_beyond_the_epochs_suggest_ones_that_fit():
    """A recipe with step milestones (DNW's 80/120 of 160) and --epochs 2: the one-line error
    names milestones that fit, and they are accepted."""
    recipe = os.path.join(RECIPES, "neuralgraph_static.yaml")
    with pytest.raises(UserError, match=r"schedule.milestones=\[1, 1.5\]") as e:
        cli("--config", recipe, "--epochs", "2")
    assert "\n" not in str(e.value)
    cfg = cli("--config", recipe, "--epochs", "2", "schedule.milestones=[1, 1.5]")
    assert cfg["schedule"]["milestones"] == [1, 1.5]
