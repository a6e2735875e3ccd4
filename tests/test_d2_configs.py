"""The detection configs: Detectron's 1x schedule, Detectron1-comparable inputs, rwdet inputs."""

import ast
from pathlib import Path

import pytest
import yaml
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone

import rwdet.d2  # noqa: F401
from rwdet.d2 import add_rwdet_config
from rwdet.d2.safe_config import merge_config_file, read_config_chain
from rwdet.run.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
COCO = sorted(p.name for p in CONFIGS.glob("frcnn_*.yaml") if "demo" not in p.name)


def load(name):
    return load_path(str(CONFIGS / name))


def load_path(path):
    cfg = get_cfg()
    add_rwdet_config(cfg)
    merge_config_file(cfg, path)
    return cfg


def written_values(path) -> dict:
    """Every leaf key the files of ``path``'s _BASE_ chain write, the later file winning."""
    values = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif key != "_BASE_":
                values[prefix + key] = value

    for f in read_config_chain(path):
        walk(yaml.safe_load(Path(f).read_text()), "")
    return values


def plain(value):
    """A value as yacs stores it: strings such as "(60000, 80000)" literal-evaluated, lists
    and tuples alike."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    if isinstance(value, (list, tuple)):
        return tuple(plain(v) for v in value)
    return value


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_repo_configs_load_with_the_safe_loader(name):
    """Every value the file and its bases write reaches the config, the child's over the base's
    (not only that loading raised nothing)."""
    cfg, written = load(name), written_values(str(CONFIGS / name))
    assert len(written) > 10
    for key, value in written.items():
        got = cfg
        for part in key.split("."):
            got = got[part]
        assert plain(got) == plain(value), (key, got, value)


def test_detectron2_model_zoo_base_loads_with_the_safe_loader(tmp_path):
    zoo = model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml")
    (tmp_path / "mine.yaml").write_text(f'_BASE_: "{zoo}"\nSOLVER:\n  BASE_LR: 0.005\n')
    cfg = load_path(str(tmp_path / "mine.yaml"))
    # The zoo file's own _BASE_ (../Base-RCNN-FPN.yaml) is read too.
    assert cfg.MODEL.BACKBONE.NAME == "build_resnet_fpn_backbone" and cfg.MODEL.RESNETS.DEPTH == 50
    assert cfg.SOLVER.BASE_LR == 0.005 and cfg.SOLVER.STEPS == (60000, 80000)


@pytest.mark.parametrize(
    "text, says",
    [
        ("", "not a mapping"),
        ("MODEL: [unclosed\n", "not valid YAML"),
        ('_BASE_: "mine.yaml"\n', "names itself"),
        ('_BASE_: ["missing.yaml"]\n', "does not exist"),
        ("MODEL:\n  NOPE: 1\n", "MODEL.NOPE"),
        ("SOLVER:\n  BASE_LR: fast\n", "SOLVER.BASE_LR"),
    ],
)
def test_bad_config_files_are_one_line_user_errors(tmp_path, text, says):
    (tmp_path / "mine.yaml").write_text(text)
    with pytest.raises(UserError, match=says) as e:
        load_path(str(tmp_path / "mine.yaml"))
    assert "mine.yaml" in str(e.value) and "\n" not in str(e.value)


def test_the_issue_configs_exist():
    for name in (
        "frcnn_randwire_c109.yaml",
        "frcnn_randwire_c154.yaml",
        "frcnn_r50_baseline.yaml",
        "frcnn_randwire_demo.yaml",
    ):
        assert (CONFIGS / name).is_file(), name
    assert any("dnw" in n for n in COCO) and any("popup" in n for n in COCO)


@pytest.mark.parametrize("name", COCO)
def test_coco_configs_are_detectron_1x(name):
    cfg = load(name)
    s = cfg.SOLVER
    assert (s.MAX_ITER, tuple(s.STEPS), s.BASE_LR, s.IMS_PER_BATCH) == (
        90000,
        (60000, 80000),
        0.02,
        16,
    )
    assert s.REFERENCE_WORLD_SIZE == 8 and s.WARMUP_ITERS > 0
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (800,) and cfg.INPUT.MAX_SIZE_TRAIN == 1333
    assert cfg.MODEL.RPN.SMOOTH_L1_BETA == pytest.approx(0.1111)
    assert cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE == "ROIAlign"
    assert cfg.INPUT.FORMAT == "RGB"
    assert cfg.MODEL.PIXEL_MEAN == [123.675, 116.28, 103.53]
    assert cfg.MODEL.PIXEL_STD == [58.395, 57.12, 57.375]
    assert tuple(cfg.DATASETS.TRAIN) == ("coco_2017_train",)
    assert tuple(cfg.DATASETS.TEST) == ("coco_2017_val",)
    assert cfg.MODEL.BACKBONE.NAME in BACKBONE_REGISTRY
    assert not cfg.MODEL.MASK_ON and cfg.MODEL.ROI_HEADS.NUM_CLASSES == 80
    if cfg.MODEL.BACKBONE.NAME != "build_resnet_fpn_backbone":
        assert cfg.MODEL.RWDET.NAME, name
        assert cfg.MODEL.RWDET.NORM == "FrozenBN"


@pytest.mark.slow
def test_randwire_c109_config_builds_the_paper_backbone():
    cfg = load("frcnn_randwire_c109.yaml")
    cfg.MODEL.WEIGHTS = ""  # architecture only; no converted ImageNet weights here
    bb = build_backbone(cfg)
    model = bb.bottom_up.model
    assert model.stage_channels == {
        "conv1": 54,
        "conv2": 109,
        "conv3": 218,
        "conv4": 436,
        "conv5": 872,
    }
    assert [len(model.get_submodule(s).nodes) for s in ("conv2", "conv3", "conv4", "conv5")] == [
        16,
        32,
        32,
        32,
    ]
    n = sum(p.numel() for p in bb.bottom_up.parameters())
    assert 25e6 < n < 35e6  # Table 3: 31.9M with the classifier (1280-d head + FC)
