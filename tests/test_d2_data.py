"""Detection data: the deepforest tree-crown conversion and the dataset checks."""

import importlib.util
import json

import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

import rwdet.d2  # noqa: F401  (registers treecrowns_train / treecrowns_val)
from rwdet.d2 import treecrowns
from rwdet.d2.datasets import check_datasets


@pytest.fixture(scope="module")
def crowns(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("treecrowns"))
    return treecrowns.prepare(root)


def _load(root, split):
    with open(treecrowns.json_path(root, split)) as f:
        return json.load(f)


@pytest.mark.slow  # the conversion (module fixture) decodes a 15 MB photo: ~5 s
def test_voc_boxes_become_tiled_coco_splits(crowns):
    data_dir = treecrowns.deepforest_data_dir()
    total = sum(
        len(treecrowns.read_voc(f"{data_dir}/{s}.xml")[1])
        for s in treecrowns.LARGE + treecrowns.SMALL
    )
    assert total == 574 + 279 + 61 + 37
    n_boxes = 0
    for split in ("train", "val"):
        d = _load(crowns, split)
        assert d["categories"] == [{"id": 1, "name": "tree"}]
        assert len({im["id"] for im in d["images"]}) == len(d["images"])
        sizes = {im["id"]: (im["width"], im["height"]) for im in d["images"]}
        for im in d["images"]:
            with Image.open(f"{crowns}/{split}/{im['file_name']}") as tile:
                assert tile.size == (im["width"], im["height"])
            assert 300 <= im["width"] <= 420 and 300 <= im["height"] <= 420
        for a in d["annotations"]:
            x, y, w, h = a["bbox"]
            tw, th = sizes[a["image_id"]]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= tw and y + h <= th
        n_boxes += len(d["annotations"])
    # Only boxes cut by a tile border with less than half visible are dropped.
    assert 0.97 * total <= n_boxes <= total + 100
    assert len(_load(crowns, "val")["images"]) == 9
    assert len(_load(crowns, "train")["images"]) == 38


def test_train_and_val_share_no_pixels():
    data_dir = treecrowns.deepforest_data_dir()
    plan = treecrowns.plan(data_dir)
    val = [(src, win) for _, src, win, _ in plan["val"]]
    for _, src, (x0, y0, x1, y1), _ in plan["train"]:
        for vsrc, (vx0, vy0, vx1, vy1) in val:
            if src == vsrc:
                assert min(x1, vx1) <= max(x0, vx0) or min(y1, vy1) <= max(y0, vy0)


@pytest.mark.slow
def test_registered_splits_load(crowns):
    assert "treecrowns_train" in DatasetCatalog.list()
    assert MetadataCatalog.get("treecrowns_val").thing_classes == ["tree"]
    treecrowns.register_treecrowns(crowns, prefix="tc_test")
    treecrowns.register_treecrowns(crowns, prefix="tc_test")  # again: a no-op, not an error
    check_datasets(get_cfg(), ["tc_test_train", "tc_test_val"])
    dicts = DatasetCatalog.get("tc_test_val")
    assert len(dicts) == 9
    assert sum(len(d["annotations"]) for d in dicts) == len(_load(crowns, "val")["annotations"])
    assert all(a["category_id"] == 0 for d in dicts for a in d["annotations"])


def test_missing_deepforest_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps deepforest==2.1.0"):
        treecrowns.deepforest_data_dir()


def test_missing_coco_says_where_and_how(tmp_path, monkeypatch):
    # detectron2 registers coco_2017_* under $DETECTRON2_DATASETS (default ./datasets).
    monkeypatch.chdir(tmp_path)
    cfg = get_cfg()
    with pytest.raises(FileNotFoundError) as e:
        check_datasets(cfg, ["coco_2017_train"])
    msg = str(e.value)
    for part in (
        "coco_2017_train",
        "instances_train2017.json",
        "train2017/*.jpg",
        "DETECTRON2_DATASETS",
    ):
        assert part in msg


def test_unregistered_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="dataset 'coco_2077_train' is not registered"):
        check_datasets(get_cfg(), ["coco_2077_train"])


def test_a_users_own_tree_dataset_is_left_alone(tmp_path):
    """Only the registered demo data is prepared, not every dataset with a "tree" class."""
    from detectron2.data.datasets import register_coco_instances

    (tmp_path / "train").mkdir()
    ann = tmp_path / "instances_train.json"
    mine = {"info": {"description": "MY OWN LABELS"}, "images": [], "annotations": []}
    ann.write_text(json.dumps({**mine, "categories": [{"id": 1, "name": "tree"}]}))
    register_coco_instances("mytrees_train_test", {}, str(ann), str(tmp_path / "train"))
    MetadataCatalog.get("mytrees_train_test").set(thing_classes=["tree"])
    try:
        check_datasets(get_cfg(), ["mytrees_train_test"])
        assert json.loads(ann.read_text())["info"] == mine["info"]
        assert list((tmp_path / "train").iterdir()) == []
    finally:
        DatasetCatalog.remove("mytrees_train_test")
        MetadataCatalog.remove("mytrees_train_test")


@pytest.mark.slow
def test_ranks_preparing_at_once_all_succeed(tmp_path):
    """Every rank of a fresh run may convert the demo data at the same time."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=treecrowns.prepare, args=(str(tmp_path),)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert treecrowns.is_prepared(str(tmp_path))
    assert not [f for f in (tmp_path / "train").iterdir() if f.suffix != ".png"]
