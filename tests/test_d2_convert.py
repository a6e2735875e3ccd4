"""Classification -> detection transfer: converter round trip, graphs, architecture checks."""

import logging
import os
import pickle
import runpy
from pathlib import Path

import pytest
import torch
import torchvision
from detectron2.config import get_cfg
from detectron2.modeling import build_model as build_detector
from torch import nn

import rwdet.d2  # noqa: F401
from rwdet.d2 import RwdetCheckpointer, add_rwdet_config
from rwdet.d2.convert import input_conv
from rwdet.d2.weights import BACKBONE_PREFIX, META_KEY, load_weights_file, safe_load_pickle
from rwdet.graphs import graphs_from_dict, graphs_to_dict, save_graphs
from rwdet.models import build_model, get_graphs, stage_outputs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
convert_main = runpy.run_path(str(ROOT / "tools" / "convert_cls_to_d2.py"))["main"]
TINY = {"channels": 8, "nodes": 5, "gen": "ws", "gen_params": {"k": 2, "p": 0.5}, "seed": 1}


def make_checkpoint(path, name="randwire_small", **kwargs):
    """A classification checkpoint in the trainer's contract format, with non-trivial BN."""
    torch.manual_seed(0)
    model = build_model(name, **{**TINY, "num_classes": 10, **kwargs})
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
    ckpt = contract_checkpoint(model)
    torch.save(ckpt, path)
    return model.eval(), ckpt


def contract_checkpoint(model):
    """``model`` in the classification trainer's checkpoint format."""
    graphs = get_graphs(model)
    return {
        "model": model.state_dict(),
        "model_spec": model.rwdet_spec,
        "graphs": graphs_to_dict(graphs) if graphs else None,
        "ema": None,
        "epoch": 3,
        "iteration": 30,
        "config": {},
        "metrics": {"top1": 50.0},
    }


def convert(tmp_path, ckpt_path, name="det.pkl"):
    out = str(tmp_path / name)
    convert_main([str(ckpt_path), out])
    return out


def det_cfg(weights, *opts):
    cfg = get_cfg()
    add_rwdet_config(cfg)
    cfg.merge_from_file(str(CONFIGS / "Base-RandWire-FPN.yaml"))
    cfg.merge_from_list(
        ["MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu", "MODEL.FPN.OUT_CHANNELS", 16] + list(opts)
    )
    return cfg


def load_detector(cfg):
    """Build the detector and load MODEL.WEIGHTS; returns (model, incompatible keys)."""
    model = build_detector(cfg)
    ckp = RwdetCheckpointer(model)
    ckp._parsed_url_during_load = None
    incompatible = ckp._load_model(ckp._load_file(cfg.MODEL.WEIGHTS))
    return model.eval(), incompatible


def backbone_keys(keys):
    return [k for k in keys if k.startswith(BACKBONE_PREFIX)]


@pytest.mark.parametrize("wiring", ["static", "popup"])
def test_round_trip_identical_features(tmp_path, wiring, caplog):
    cls_model, _ = make_checkpoint(tmp_path / "cls.pth", wiring=wiring)
    weights = convert(tmp_path, tmp_path / "cls.pth")
    data = load_weights_file(weights)
    assert data["__author__"] and data["matching_heuristics"] is False
    assert all(k.startswith(BACKBONE_PREFIX) for k in data["model"])
    assert not any(k.split(".")[3] in ("head", "fc", "dropout") for k in data["model"])
    cfg = det_cfg(weights, "MODEL.BACKBONE.FREEZE_AT", 0)
    with caplog.at_level(logging.INFO):
        det, incompatible = load_detector(cfg)
    assert backbone_keys(incompatible.missing_keys) == []
    assert backbone_keys(incompatible.unexpected_keys) == []
    assert "missing keys: none; unexpected keys: none" in caplog.text
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = stage_outputs(cls_model, x)
        got = det.backbone.bottom_up(x)
    for k in ("conv2", "conv3", "conv4", "conv5"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("wiring", ["static", "popup"])
def test_grey_small_stem_checkpoint_transfers_exactly(tmp_path, wiring):
    # The demo case: 1-channel Fashion-MNIST model with the 28 px stem.
    cls_model, ckpt = make_checkpoint(
        tmp_path / "cls.pth", in_channels=1, stem="small", wiring=wiring
    )
    weights = convert(tmp_path, tmp_path / "cls.pth")
    meta = load_weights_file(weights)["rwdet"]
    assert meta["model_spec"]["kwargs"]["in_channels"] == 3
    assert meta["model_spec"]["kwargs"]["stem"] == "imagenet"
    assert len(meta["adaptations"]) == 2
    det, incompatible = load_detector(det_cfg(weights))
    assert backbone_keys(incompatible.missing_keys + incompatible.unexpected_keys) == []
    strides = {k: s.stride for k, s in det.backbone.bottom_up.output_shape().items()}
    assert strides == {"conv2": 4, "conv3": 8, "conv4": 16, "conv5": 32}
    if wiring == "popup":
        return  # replicated scores: the top-k rounding over 3x entries may differ by one
    # The same weights in a 1-channel model with the ImageNet stem: on a grey RGB image the
    # adapted detection backbone computes exactly what the classification weights compute.
    ref = build_model(
        "randwire_small",
        graphs=graphs_from_dict(ckpt["graphs"]),
        **{**ckpt["model_spec"]["kwargs"], "stem": "imagenet"},
    )
    ref.load_state_dict(ckpt["model"])
    ref.eval()
    grey = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        want = stage_outputs(ref, grey)
        got = det.backbone.bottom_up(grey.expand(1, 3, 64, 64))
    for k in ("conv2", "conv3", "conv4", "conv5"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
    assert input_conv(ref, 1)[0] == "conv1.0"


def test_graphs_come_from_the_weights_and_mismatches_are_errors(tmp_path):
    cls_model, _ = make_checkpoint(tmp_path / "cls.pth", seed=3)
    weights = convert(tmp_path, tmp_path / "cls.pth")
    want = get_graphs(cls_model)
    # No generator keys in the config: the weights' graphs are rebuilt exactly.
    det = build_detector(det_cfg(weights))
    assert get_graphs(det.backbone.bottom_up.model) == want
    # The config names the same generator and seed: fine.
    build_detector(det_cfg(weights, "MODEL.RWDET.GEN", "ws", "MODEL.RWDET.SEED", 3))
    # Another seed would give other graphs: a clear error, not a silent random init.
    with pytest.raises(ValueError, match="differ from the weights file's graphs"):
        build_detector(det_cfg(weights, "MODEL.RWDET.SEED", 4))
    # A graph file must agree with the weights' graphs.
    same, other = str(tmp_path / "same.json"), str(tmp_path / "other.json")
    save_graphs(same, want)
    other_model = build_model("randwire_small", **{**TINY, "seed": 4})
    save_graphs(other, get_graphs(other_model))
    build_detector(det_cfg(weights, "MODEL.RWDET.GRAPH_FILE", same))
    with pytest.raises(ValueError, match="GRAPH_FILE=.* differs from the graphs embedded"):
        build_detector(det_cfg(weights, "MODEL.RWDET.GRAPH_FILE", other))


def test_generator_parameters_are_checked_against_the_weights_generator(tmp_path):
    """MODEL.RWDET.M with BA weights and no MODEL.RWDET.GEN: BA's parameter, accepted."""
    make_checkpoint(tmp_path / "cls.pth", gen="ba", gen_params={"m": 2}, seed=3)
    weights = convert(tmp_path, tmp_path / "cls.pth")
    build_detector(det_cfg(weights, "MODEL.RWDET.M", 2))
    with pytest.raises(ValueError, match="differ from the weights file's graphs"):
        build_detector(det_cfg(weights, "MODEL.RWDET.M", 1))
    with pytest.raises(ValueError, match="MODEL.RWDET.K set but generator 'ba' takes only"):
        build_detector(det_cfg(weights, "MODEL.RWDET.K", 4))


def test_graph_file_without_weights(tmp_path):
    model = build_model("randwire_small", **{**TINY, "seed": 7})
    path = str(tmp_path / "g.json")
    save_graphs(path, get_graphs(model))
    cfg = det_cfg("", "MODEL.RWDET.NAME", "randwire_small", "MODEL.RWDET.GRAPH_FILE", path)
    cfg.MODEL.RWDET.CHANNELS, cfg.MODEL.RWDET.NODES = 8, 5
    det = build_detector(cfg)
    assert get_graphs(det.backbone.bottom_up.model) == get_graphs(model)


def test_weights_of_another_architecture_are_errors(tmp_path):
    make_checkpoint(tmp_path / "cls.pth")
    weights = convert(tmp_path, tmp_path / "cls.pth")
    with pytest.raises(ValueError, match="another architecture"):
        build_detector(det_cfg(weights, "MODEL.RWDET.CHANNELS", 16))
    with pytest.raises(ValueError, match="another architecture"):
        build_detector(det_cfg(weights, "MODEL.RWDET.NAME", "randwire_c109"))
    # A detection checkpoint of a wider backbone loaded into this one: refused, not skipped.
    wide = det_cfg("", "MODEL.RWDET.NAME", "randwire_small", "MODEL.RWDET.CHANNELS", 16)
    wide.MODEL.RWDET.NODES = 5
    wide_path = str(tmp_path / "wide.pth")
    torch.save({"model": build_detector(wide).state_dict()}, wide_path)
    det = build_detector(det_cfg(weights))
    with pytest.raises(ValueError, match="wrong shape"):
        RwdetCheckpointer(det).load(wide_path)
    # Weights with no rwdet backbone tensors at all.
    alien = str(tmp_path / "alien.pth")
    torch.save({"model": {"backbone.bottom_up.res2.0.conv1.weight": torch.zeros(1)}}, alien)
    with pytest.raises(ValueError, match="no tensors for the rwdet backbone"):
        RwdetCheckpointer(det).load(alien)


def test_checkpoint_graphs_are_checked_at_load(tmp_path):
    make_checkpoint(tmp_path / "cls.pth", seed=1)
    weights = convert(tmp_path, tmp_path / "cls.pth")
    det = build_detector(det_cfg(weights))
    ckp = RwdetCheckpointer(det, save_dir=str(tmp_path / "run"))
    os.makedirs(tmp_path / "run")
    ckp.save("model_final")
    saved = torch.load(tmp_path / "run" / "model_final.pth", weights_only=True)
    assert (
        saved["rwdet"]["graphs_fingerprint"]
        == load_weights_file(weights)["rwdet"]["graphs_fingerprint"]
    )
    assert (tmp_path / "run" / "last_checkpoint").read_text() == "model_final.pth"
    # A backbone built with other graphs refuses these weights.
    other_cfg = det_cfg("", "MODEL.RWDET.NAME", "randwire_small", "MODEL.RWDET.SEED", 5)
    other_cfg.MODEL.RWDET.EXTRA_KWARGS = type(other_cfg)(
        {"channels": 8, "nodes": 5, "gen": "ws", "gen_params": {"k": 2, "p": 0.5}}
    )
    other = build_detector(other_cfg)
    with pytest.raises(ValueError, match="trained with graphs"):
        RwdetCheckpointer(other).load(str(tmp_path / "run" / "model_final.pth"))


def test_weights_pickles_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {}, "__author__": "x", "x": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle"):
        safe_load_pickle(str(path))


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="convert a classification checkpoint"):
        build_detector(det_cfg(str(tmp_path / "nope.pkl")))


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="not an rwdet classification checkpoint"):
        convert_main([str(tmp_path / "x.pth"), str(tmp_path / "x.pkl")])


def test_torchvision_resnet_converts_to_detectron2_resnet(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    torch.save(tv.state_dict(), tmp_path / "r18.pth")
    weights = convert(tmp_path, tmp_path / "r18.pth", "r18.pkl")
    cfg = get_cfg()
    add_rwdet_config(cfg)
    cfg.merge_from_file(str(CONFIGS / "frcnn_r50_baseline.yaml"))
    cfg.merge_from_list(
        ["MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", 18]
        + ["MODEL.RESNETS.RES2_OUT_CHANNELS", 64, "MODEL.BACKBONE.FREEZE_AT", 0]
    )
    det, incompatible = load_detector(cfg)
    ours = [k for k in incompatible.missing_keys if k.startswith("backbone.bottom_up.")]
    assert ours == [] and incompatible.unexpected_keys == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got = det.backbone.bottom_up(x)
        h = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        for i, layer in enumerate([tv.layer1, tv.layer2, tv.layer3, tv.layer4]):
            h = layer(h)
            torch.testing.assert_close(got[f"res{i + 2}"], h, rtol=1e-4, atol=1e-5)


def test_small_stem_mobilenet_converts():
    """MobileNet-DNW's CIFAR stem differs from its ImageNet stem in stride only."""
    from rwdet.d2.convert import convert_rwdet_checkpoint

    ckpt = contract_checkpoint(build_model("mobilenetv1_dnw_x0225", stem="small", num_classes=10))
    meta = convert_rwdet_checkpoint(ckpt)[META_KEY]
    assert meta["model_spec"]["kwargs"]["stem"] == "imagenet"
    assert any("stem 'small' -> 'imagenet'" in n for n in meta["adaptations"])


def test_small_stem_resnet_is_refused_with_the_reason():
    """A ResNet's small stem (3x3 conv) has other parameters than its ImageNet stem (7x7)."""
    from rwdet.d2.convert import convert_rwdet_checkpoint

    ckpt = contract_checkpoint(build_model("resnet50_popup", stem="small", num_classes=10))
    with pytest.raises(ValueError, match=r"stem='small' cannot be converted.*conv1\.weight"):
        convert_rwdet_checkpoint(ckpt)
