"""Adversarial detection inputs (issue 13): tampered weights graphs, broken COCO datasets,
debris of killed checkpoint saves. Each case once let a run start, or fail hours in."""

import contextlib
import json
import logging
import os
import shutil

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.modeling import build_model as build_detector
from test_d2_convert import det_cfg

import rwdet.d2  # noqa: F401  (registers the backbones)
from rwdet.d2 import RwdetCheckpointer, treecrowns
from rwdet.d2.checkpoint import resume_checkpoint_file
from rwdet.d2.convert import convert_rwdet_checkpoint
from rwdet.d2.datasets import check_datasets
from rwdet.d2.spec import resolve_backbone_spec
from rwdet.d2.weights import BACKBONE_PREFIX, META_KEY, load_weights_file, save_d2_weights
from rwdet.graphs import graphs_to_dict
from rwdet.models import build_model, get_graphs
from rwdet.run.errors import UserError

TINY = {"channels": 8, "nodes": 5, "gen": "ws", "gen_params": {"k": 2, "p": 0.5}, "seed": 1}
ALLOW = ("MODEL.RWDET.ALLOW_UNVERIFIED_GRAPHS", True)


@contextlib.contextmanager
def rwdet_log(caplog):
    """Capture the "rwdet" loggers even after detectron2's setup_logger stopped their
    propagation (an earlier train_net test in the same session does that)."""
    lg = logging.getLogger("rwdet")
    saved = lg.level, lg.propagate
    lg.addHandler(caplog.handler)
    lg.setLevel(logging.INFO)
    lg.propagate = False
    try:
        yield
    finally:
        lg.removeHandler(caplog.handler)
        lg.setLevel(saved[0])
        lg.propagate = saved[1]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A RandWire classification checkpoint converted as tools/convert_cls_to_d2.py does."""
    model = build_model("randwire_small", num_classes=10, **TINY)
    ckpt = {
        "model": model.state_dict(),
        "model_spec": model.rwdet_spec,
        "graphs": graphs_to_dict(get_graphs(model)),
    }
    path = str(tmp_path_factory.mktemp("weights") / "det.pkl")
    save_d2_weights(path, convert_rwdet_checkpoint(ckpt))
    return path


def tampered(src, dst, edit):
    """A copy of weights file ``src`` whose rwdet metadata ``edit`` changed."""
    data = load_weights_file(src) if src.endswith(".pkl") else torch.load(src, weights_only=True)
    edit(data[META_KEY])
    if dst.endswith(".pkl"):
        save_d2_weights(dst, data)
    else:
        torch.save(data, dst)
    return dst


def rewire(meta):
    """Move one edge's source (1->4 becomes 2->4): in-degrees, hence tensor shapes, unchanged."""
    edges = meta["graphs"]["graphs"]["conv3"]["edges"]
    assert [1, 4] in edges and [2, 4] not in edges
    edges[edges.index([1, 4])] = [2, 4]


def test_weights_without_fingerprint_refused_unless_allowed(tmp_path, converted):
    path = tampered(converted, str(tmp_path / "nofp.pkl"), lambda m: m.pop("graphs_fingerprint"))
    with pytest.raises(UserError) as e:
        resolve_backbone_spec(det_cfg(path))
    for part in ("nofp.pkl", "MODEL.RWDET.ALLOW_UNVERIFIED_GRAPHS", "tools/convert_cls_to_d2.py"):
        assert part in str(e.value)
    # Asked for explicitly: the file's edge lists are used and its tensors load.
    det = build_detector(det_cfg(path, *ALLOW))
    assert (
        graphs_to_dict(get_graphs(det.backbone.bottom_up.model))
        == (load_weights_file(path)[META_KEY]["graphs"])
    )
    with pytest.raises(UserError, match="ALLOW_UNVERIFIED_GRAPHS"):
        RwdetCheckpointer(det).load(path)
    RwdetCheckpointer(det, allow_unverified_graphs=True).load(path)


def test_weights_without_any_graph_record_refused_unless_allowed(tmp_path, converted):
    def strip(meta):
        meta.pop("graphs_fingerprint")
        meta.pop("graphs")

    path = tampered(converted, str(tmp_path / "nographs.pkl"), strip)
    with pytest.raises(UserError, match="records no graphs.*ALLOW_UNVERIFIED_GRAPHS"):
        resolve_backbone_spec(det_cfg(path))
    spec = resolve_backbone_spec(det_cfg(path, *ALLOW))
    assert spec.graph_source == "generator"


def test_weights_with_edited_edges_refused(tmp_path, converted):
    path = tampered(converted, str(tmp_path / "edited.pkl"), rewire)
    with pytest.raises(UserError, match="edited.pkl.*graphs were changed after it was written"):
        resolve_backbone_spec(det_cfg(path))
    with pytest.raises(UserError, match="graphs were changed"):  # the key does not excuse it
        resolve_backbone_spec(det_cfg(path, *ALLOW))


def test_resume_checkpoint_graphs_are_verified(tmp_path, converted):
    """model_*.pth in OUTPUT_DIR: edited edges, a lost fingerprint, no record at all."""
    det = build_detector(det_cfg(converted))
    run = tmp_path / "run"
    RwdetCheckpointer(det, save_dir=str(run)).save("model_0000009", iteration=9)
    good = str(run / "model_0000009.pth")
    edited = tampered(good, str(tmp_path / "edited.pth"), rewire)
    with pytest.raises(UserError, match="edited.pth.*graphs were changed"):
        RwdetCheckpointer(det).load(edited)
    nofp = tampered(good, str(tmp_path / "nofp.pth"), lambda m: m.pop("graphs_fingerprint"))
    with pytest.raises(UserError, match="without their fingerprint.*ALLOW_UNVERIFIED_GRAPHS"):
        RwdetCheckpointer(det).load(nofp)
    bare = str(tmp_path / "bare.pth")
    torch.save({"model": det.state_dict(), "iteration": 9}, bare)
    with pytest.raises(UserError, match="records no graphs.*convert_cls_to_d2.py"):
        RwdetCheckpointer(det).load(bare)
    RwdetCheckpointer(det, allow_unverified_graphs=True).load(bare)
    RwdetCheckpointer(det).load(good)


def test_weights_of_models_without_graphs_still_load(tmp_path):
    """ResNet-popup and DNW models have no graphs: nothing to record, nothing refused."""
    any_fpn = ("MODEL.BACKBONE.NAME", "build_rwdet_fpn_backbone")
    det = build_detector(det_cfg("", "MODEL.RWDET.NAME", "mobilenetv1_dnw_x0225", *any_fpn))
    RwdetCheckpointer(det, save_dir=str(tmp_path)).save("model_final")
    path = str(tmp_path / "model_final.pth")
    assert load_weights_file(path)[META_KEY]["graphs"] is None
    resolve_backbone_spec(det_cfg(path, *any_fpn))
    RwdetCheckpointer(det).load(path)
    bare = str(tmp_path / "bare.pth")
    torch.save({"model": det.state_dict()}, bare)
    resolve_backbone_spec(det_cfg(bare, "MODEL.RWDET.NAME", "mobilenetv1_dnw_x0225", *any_fpn))
    RwdetCheckpointer(det).load(bare)
    # A converted ResNet-popup file (its meta records graphs: None) resolves as before.
    popup = {"name": "resnet50_popup", "kwargs": {"stem": "imagenet"}}
    meta = {"model_spec": popup, "graphs": None, "graphs_fingerprint": None}
    save_d2_weights(
        str(tmp_path / "popup.pkl"),
        {"model": {BACKBONE_PREFIX + "conv1.weight": torch.zeros(1).numpy()}, META_KEY: meta},
    )
    assert resolve_backbone_spec(det_cfg(str(tmp_path / "popup.pkl"))).name == "resnet50_popup"
    # ... while the same kind of file for a RandWire backbone is refused.
    rw = build_detector(det_cfg("", "MODEL.RWDET.NAME", "randwire_small"))
    torch.save({"model": rw.state_dict()}, bare)
    with pytest.raises(UserError, match="records no graphs"):
        resolve_backbone_spec(det_cfg(bare, "MODEL.RWDET.NAME", "randwire_small"))


# ------------------------------------------------------------------ COCO-format datasets


@pytest.fixture
def coco(tmp_path):
    """Three real tree-crown photos with their boxes, registered as a COCO-format dataset."""
    src = treecrowns.deepforest_data_dir()
    root = tmp_path / "images"
    root.mkdir()
    images, anns = [], []
    for i, stem in enumerate(("OSBS_029", "SOAP_031", "SOAP_061")):
        shutil.copy(os.path.join(src, f"{stem}.png"), root / f"{stem}.png")
        images.append({"id": i + 1, "file_name": f"{stem}.png", "width": 400, "height": 400})
    for x0, y0, x1, y1 in treecrowns.read_voc(os.path.join(src, "OSBS_029.xml"))[1][:6]:
        box = [x0, y0, x1 - x0, y1 - y0]
        anns.append({"id": len(anns) + 1, "image_id": 1, "bbox": box, "category_id": 1})
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "tree"}]}
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(data))
    name = f"adv_coco_{tmp_path.name}"
    register_coco_instances(name, {}, str(ann_file), str(root))
    yield name, ann_file, root, data
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_malformed_json_names_the_file_and_position(coco):
    name, ann_file, _, data = coco
    ann_file.write_text(json.dumps(data)[:-40])
    with pytest.raises(UserError) as e:
        check_datasets(get_cfg(), [name])
    msg = str(e.value)
    assert str(ann_file) in msg and "not valid JSON" in msg and "line 1 column" in msg
    assert "\n" not in msg


def test_missing_images_are_listed_at_start(coco):
    name, _, root, _ = coco
    (root / "SOAP_031.png").unlink()
    (root / "SOAP_061.png").unlink()
    with pytest.raises(UserError, match=r"2 of 3 images .* missing .*SOAP_031\.png, SOAP_061\.png"):
        check_datasets(get_cfg(), [name])


def test_invalid_and_outside_boxes_are_counted(coco, caplog):
    name, ann_file, _, data = coco
    with rwdet_log(caplog):
        check_datasets(get_cfg(), [name])  # the real boxes: nothing to report
    assert "boxes" not in caplog.text
    anns = data["annotations"]
    anns[0]["bbox"][2] = 0  # zero width
    anns[1]["bbox"][3] = -5  # negative height
    anns[2]["bbox"] = [390, 10, 30, 30]  # past the right edge
    anns[3]["bbox"] = [-4, 10, 30, 30]  # left of the image
    ann_file.write_text(json.dumps(data))
    with rwdet_log(caplog):
        check_datasets(get_cfg(), [name])
    lines = [r.getMessage() for r in caplog.records if "boxes" in r.getMessage()]
    assert len(lines) == 1
    assert "2 boxes with zero or negative width/height are dropped" in lines[0]
    assert "2 boxes extending outside their image are clipped" in lines[0]
    anns[4]["bbox"] = [1, 2, 3]
    ann_file.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"1 annotations .* no valid 'bbox'.*annotations\[4\]"):
        check_datasets(get_cfg(), [name])


# ------------------------------------------------------------------ checkpoints in OUTPUT_DIR


def save_state(path, iteration, value):
    state = {"weight": torch.full((2, 2), float(value))}
    torch.save({"model": state, "iteration": iteration}, path)


def test_stale_temp_files_of_killed_saves_are_removed(tmp_path):
    kept = ["model_0000999.pth", "last_checkpoint", "metrics.json", ".config.yaml1x.tmp"]
    stale = [".model_0000999.pthk3j_a.tmp", ".model_final.pthzz.tmp", ".last_checkpointq1.tmp"]
    for f in kept + stale:
        (tmp_path / f).write_bytes(b"x")
    ckp = RwdetCheckpointer(torch.nn.Linear(2, 2), save_dir=str(tmp_path))
    assert sorted(ckp.remove_stale_temp_files()) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)


@pytest.mark.parametrize("tag", [None, "model_0000004.pth", "gone.pth"])
def test_resume_falls_back_to_the_newest_complete_checkpoint(tmp_path, tag, caplog):
    save_state(tmp_path / "model_0000004.pth", 4, 4)
    save_state(tmp_path / "model_0000009.pth", 9, 9)
    (tmp_path / "model_0000014.pth").write_bytes(b"PK\x03\x04 torn")  # not loadable: skipped
    if tag:
        (tmp_path / "last_checkpoint").write_text(tag)
    model = torch.nn.Linear(2, 2, bias=False)
    ckp = RwdetCheckpointer(model, save_dir=str(tmp_path))
    with rwdet_log(caplog):
        assert ckp.has_checkpoint()
        ckp.resume_or_load("", resume=True)
    assert torch.equal(model.weight, torch.full((2, 2), 9.0))
    lines = [r.getMessage() for r in caplog.records if "resuming from" in r.getMessage()]
    assert len(lines) == 1 and "model_0000009.pth (iteration 9)" in lines[0]


def test_resume_keeps_an_up_to_date_tag(tmp_path, caplog):
    save_state(tmp_path / "model_0000004.pth", 4, 4)
    save_state(tmp_path / "model_final.pth", 9, 9)
    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    with rwdet_log(caplog):
        assert resume_checkpoint_file(str(tmp_path)) == str(tmp_path / "model_final.pth")
    assert "resuming from" not in caplog.text
    # A final model whose tag was never written is found by the iteration inside it.
    (tmp_path / "last_checkpoint").write_text("model_0000004.pth")
    assert resume_checkpoint_file(str(tmp_path)) == str(tmp_path / "model_final.pth")
    assert resume_checkpoint_file(str(tmp_path / "nothing")) is None
