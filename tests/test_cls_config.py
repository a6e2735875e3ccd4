"""Classification config: commented CfgNode defaults, recipes, flags, KEY VALUE overrides, bad
values."""

import ast
import copy
import importlib.util
import os

import pytest
import yaml
from fvcore.common.config import CfgNode

from classification import config as C
from classification import defaults as D
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


def _assigned_keys():
    """``{dotted key: the line above its assignment}`` for every ``_C.a.b = ...`` in
    classification/defaults.py (read from the source, as a newcomer reads it)."""
    with open(D.__file__, encoding="utf-8") as f:
        source = f.read()
    lines = source.splitlines()
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            target, parts = node.targets[0], []
            while isinstance(target, ast.Attribute):
                parts.append(target.attr)
                target = target.value
            if getattr(target, "id", "") == "_C" and parts:
                found[".".join(reversed(parts))] = lines[node.lineno - 2].strip()
    return found


def test_every_default_key_has_a_comment():
    """Each key of the defaults (sections too) is one ``_C.key = value`` line in
    classification/defaults.py with a comment line above it (pycls's config.py shape), and
    that comment is what ``key_comments`` gives (and config.yaml shows)."""
    assigned = _assigned_keys()
    leaves = {path for path, _ in C._leaves(C.DEFAULTS)}
    assert leaves <= set(assigned) and set(C.SCHEMA) == leaves
    missing = [k for k, above in assigned.items() if not above.startswith("#")]
    assert not missing, f"config keys without a comment: {missing}"
    notes = D.key_comments()
    for key, above in assigned.items():
        assert notes[key].endswith(above.lstrip("#").strip()), key


def test_defaults_are_a_cfgnode_and_the_resolved_config_is_frozen():
    defaults = D.get_defaults()
    assert isinstance(defaults, CfgNode) and C.to_dict(defaults) == C.DEFAULTS
    assert defaults.model.kwargs.is_new_allowed() and not defaults.model.is_new_allowed()
    cfg = cli("--gen", "ws", "optim.lr", "0.05")
    assert isinstance(cfg, CfgNode) and cfg.is_frozen()
    assert cfg.optim.lr == cfg["optim"]["lr"] == 0.05
    with pytest.raises(AttributeError):
        cfg.optim.lr = 1.0
    # Free-form sections are plain dicts: passed to build_model and stored in checkpoints.
    assert type(cfg["model"]["kwargs"]) is dict and type(cfg["model"]["gen_params"]) is dict
    plain = C.to_dict(cfg)
    assert plain == cfg and _only_plain(plain)


def _only_plain(value) -> bool:
    if isinstance(value, dict):
        return type(value) is dict and all(_only_plain(v) for v in value.values())
    if isinstance(value, list):
        return all(_only_plain(v) for v in value)
    return value is None or type(value) in (bool, int, float, str)


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
        (*base, "model.kwargs.head_channels", "128"),
        ("--gen", "er"),
        ("--data", "/data/a/imagenet-100", "--gen", "ws"),
        ("--data", "/data/b/imagenet-1k", "--gen", "ws"),
    ]
    names = [cli(*v)["name"] for v in variants]
    assert len(set(names)) == len(names), names
    assert all("/" not in n and " " not in n and len(n) <= 120 for n in names)
    same = cli(*base, "--epochs", "5", "optim.lr", "0.05")["name"]  # training settings: same run
    assert same == names[0]
    long = cli(*base, "model.kwargs.x_" + "a" * 150, "1")["name"]
    assert len(long) <= 120 and long != cli(*base, "model.kwargs.x_" + "a" * 149, "1")["name"]


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
    from classification.builders import build, model_spec

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
        "--ema", "--test-size", "320", "optim.clip_grad", "5", "train.sync_bn", "true",
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
    cfg = cli("--config", c109, "--data", "/d", "model.kwargs.dropout", "0.3")
    assert cfg["model"]["kwargs"] == {"dropout": 0.3, "edge_drop": 0.1}
    cfg = cli("--config", c109, "--data", "/d", "model.gen_params.p", "0.5")
    assert cfg["model"]["gen_params"] == {"k": 4, "p": 0.5}
    cfg = cli("--config", c109, "--data", "/d", "model.kwargs", "{dropout: 0.3}")
    assert cfg["model"]["kwargs"] == {"dropout": 0.3}  # a whole mapping replaces the section
    # Another generator drops the recipe's k and p, never what the command line gave, in
    # whatever order.
    for argv in (
        ["model.gen", "ba", "model.gen_params.m", "3"],
        ["model.gen_params.m", "3", "model.gen", "ba"],
        ["--m", "3", "model.gen", "ba"],
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
        (["optim.lrr", "0.1"], r"unknown config key 'optim.lrr' \(did you mean 'optim.lr'\?\)"),
        (["optim", "3"], r"is a section; .* e.g. optim.name VALUE"),
        (["optim.lr"], "KEY VALUE pairs; 'optim.lr' has no value"),
        (["train.amp", "fp8"], "train.amp='fp8'"),
        (["schedule.epochs", "0"], "schedule.epochs=0: expected an integer >= 1"),
        (["train.eval_period", "0"], "train.eval_period=0: expected an integer >= 1"),
        (["train.log_period", "0"], "train.log_period=0: expected an integer >= 1"),
        (["train.checkpoint_period", "-1"], r"checkpoint_period=-1: expected an integer >= 0"),
        (["schedule.warmup_epochs", "-1"], r"schedule.warmup_epochs=-1: expected a number >= 0"),
        (["data.name", "cifar"], "data.name='cifar'"),
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
    from classification.builders import model_spec

    cfg = cli("--model", "conv4", "--wiring", "popup", "model.kwargs.keep", "0.3")
    assert cfg["model"]["gen"] is None and cfg["model"]["channels"] is None
    assert cfg["model"]["kwargs"] == {"keep": 0.3}
    spec = model_spec(cfg, num_classes=10, in_channels=1)
    assert spec["kwargs"] == {"wiring": "popup", "keep": 0.3, "num_classes": 10, "in_channels": 1,
                              "input_size": 28}  # fmt: skip
    assert cli("model.name", "conv6")["model"]["kwargs"] == {}
    assert cli("--model", "randwire_small")["model"]["channels"] == 16  # same model: kept
    odd = cli("--model", "conv2", "--data", "/d", "--test-size", "40", "data.train_size", "32")
    with pytest.raises(UserError, match="built for one input size"):
        model_spec(odd, num_classes=10, in_channels=3)


def test_milestones_beyond_the_epochs_suggest_ones_that_fit():
    """A recipe with step milestones (DNW's 80/120 of 160) and --epochs 2: the one-line error
    names milestones that fit, and they are accepted."""
    recipe = os.path.join(RECIPES, "neuralgraph_static.yaml")
    with pytest.raises(UserError, match=r"schedule.milestones '\[1, 1.5\]'") as e:
        cli("--config", recipe, "--epochs", "2")
    assert "\n" not in str(e.value)
    cfg = cli("--config", recipe, "--epochs", "2", "schedule.milestones", "[1, 1.5]")
    assert cfg["schedule"]["milestones"] == [1, 1.5]


# ---------------------------------------------------------------------------- KEY VALUE overrides


def test_key_value_pairs_after_and_between_the_flags():
    """detectron2's opts: KEY VALUE pairs, typed as YAML, in any place among the flags."""
    cfg = cli("--epochs", "3", "optim.lr", "0.05", "--data", "/d", "train.ema", "true",
              "model.kwargs.dropout", "0.1", "model.gen_params.k", "6", "--gen", "ws")  # fmt: skip
    assert cfg["schedule"]["epochs"] == 3 and cfg["optim"]["lr"] == 0.05
    assert cfg["train"]["ema"] is True and cfg["data"]["root"] == "/d"
    assert cfg["model"]["kwargs"] == {"dropout": 0.1} and cfg["model"]["gen_params"] == {"k": 6}
    # A negative number is a value, not an unknown flag (Python 3.11's argparse took -1e-3 for
    # an option).
    assert cli("model.gen_params.p", "-1e-3")["model"]["gen_params"]["p"] == -1e-3
    # A list value; a value holding "=" is a value, not an old-form override.
    cfg = cli("--config", os.path.join(RECIPES, "neuralgraph_static.yaml"), "--epochs", "160",
              "schedule.milestones", "[80,120]", "name", "a=b")  # fmt: skip
    assert cfg["schedule"]["milestones"] == [80, 120] and cfg["name"] == "a=b"


@pytest.mark.parametrize(
    "argv,key",
    [
        (["optim.lr", "0.05", "train.ema"], "train.ema"),
        (["optim.lr"], "optim.lr"),
        (["optim.lr", "train.ema", "true"], "optim.lr"),  # the key whose value became a key
    ],
)
def test_an_odd_token_count_names_the_key_without_a_value(argv, key):
    with pytest.raises(UserError, match=f"KEY VALUE pairs; '{key}' has no value") as e:
        cli(*argv)
    assert "\n" not in str(e.value)


def test_deprecated_key_value_form_still_works_and_says_so_once(capsys, monkeypatch):
    """``key=value`` gives the config ``KEY VALUE`` gives, and one stderr line that names the
    command to type instead (one line however many old items, none from ranks other than 0)."""
    old = ("optim.lr=0.05", "model.kwargs={dropout: 0.1}", "train.ema=true")
    new = ("optim.lr", "0.05", "model.kwargs", "{dropout: 0.1}", "train.ema", "true")
    assert cli("--gen", "ws", *old) == cli("--gen", "ws", *new)
    assert load_tool().main(["--gen", "ws", *old, "--print-output-dir"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.out.strip() == cli(*new)["output_dir"]
    assert captured.err == (
        "train_cls.py: note: key=value overrides are deprecated and will be removed; type KEY "
        "VALUE pairs instead: optim.lr 0.05 model.kwargs '{dropout: 0.1}' train.ema true\n"
    )
    load_tool().main(["--gen", "ws", *new, "--print-output-dir"])
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "1")
    load_tool().main(["--gen", "ws", *old, "--print-output-dir"])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("recipe", sorted(os.listdir(RECIPES)))
def test_every_recipe_loads_into_the_cfgnode(recipe):
    """Every recipe's keys are known and its values pass their rules; the result is a frozen
    CfgNode whose plain form is what the recipe says on top of the defaults."""
    path = os.path.join(RECIPES, recipe)
    cfg = C.resolve(path, {"data": {"root": "/data/imagenet"}})
    assert isinstance(cfg, CfgNode) and cfg.is_frozen()
    with open(path) as f:
        written = yaml.safe_load(f)
    for section, values in written.items():
        if isinstance(values, dict):
            for key, value in values.items():
                if f"{section}.{key}" not in ("data.name", "data.root"):  # finalize's to fill
                    assert cfg[section][key] == value, f"{section}.{key}"
        else:
            assert cfg[section] == values, section


def test_base_recipes_merge_under_the_file_that_names_them(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text(
        "optim: {lr: 0.2, momentum: 0.8}\nmodel: {kwargs: {dropout: 0.1, stem: small}}\n"
    )
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("_BASE_: ../base.yaml\noptim: {lr: 0.3}\nmodel: {kwargs: {dropout: 0.2}}\n")
    cfg = C.resolve(str(child), {"data": {"root": "/d"}})
    assert (cfg.optim.lr, cfg.optim.momentum) == (0.3, 0.8)  # a section merges key by key
    assert cfg.model.kwargs == {"dropout": 0.2}  # model keywords: the child's replace the base's
    (tmp_path / "base.yaml").write_text("_BASE_: sub/child.yaml\n")
    with pytest.raises(UserError, match="names itself in its _BASE_ chain"):
        C.resolve(str(child), {"data": {"root": "/d"}})
    (tmp_path / "base.yaml").write_text("_BASE_: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(UserError, match="not valid YAML"):
        C.resolve(str(child), {"data": {"root": "/d"}})


def test_print_config_is_the_commented_config_that_reads_back(capsys, tmp_path):
    """--print-config (and the run folder's config.yaml, the same text) shows each key's comment
    from defaults.py, and given back as --config it resolves to the same config."""
    argv = ["--gen", "ws", "name", "1e5", "train.amp", "off", "schedule.milestones", "[1]"]
    assert load_tool().main([*argv, "--print-config"]) == 0
    text = capsys.readouterr().out
    cfg = cli(*argv)
    assert text == C.to_yaml(cfg) and yaml.safe_load(text) == cfg
    assert "  # SGD learning rate at optim.reference_batch; scaled linearly with the global" in text
    path = tmp_path / "config.yaml"
    path.write_text(text)
    again = C.resolve(str(path))
    assert again == cfg and again["name"] == "1e5" and again["train"]["amp"] == "off"


@pytest.mark.slow
def test_a_real_runs_checkpoint_holds_the_config_as_plain_values(tmp_path):
    """The trainer stores ``to_dict(cfg)``: torch.load(weights_only=True) reads the checkpoint
    of a real (tiny) run, and its config equals the resolved one."""
    import torch
    from test_cls_data import make_fashion_mnist

    from classification import trainer

    make_fashion_mnist(str(tmp_path / "fm"), n_train=16, n_val=8)
    cfg = cli("--gen", "ws", "--channels", "8", "--nodes", "6", "--epochs", "1",
              "--batch-size", "8", "--output-dir", str(tmp_path / "out"),
              "data.fashion_mnist_dir", str(tmp_path / "fm"), "data.train_size", "16",
              "data.test_size", "16", "model.kwargs", "{stem: small, head_channels: 16}",
              "train.precise_bn", "0", "train.complexity", "false",
              "optim.reference_batch", "8")  # fmt: skip
    trainer.main(cfg)
    ckpt = torch.load(str(tmp_path / "out" / "last.pth"), map_location="cpu", weights_only=True)
    assert ckpt["config"] == C.to_dict(cfg) and type(ckpt["config"]) is dict
