"""A dataset of the user's own from the command line: `tools/train_net.py --dataset NAME JSON
IMAGE_ROOT` (issue 14, point 4), fine-tuning a converted checkpoint on a tiny COCO-format set cut
from the real tree-crown photos that ship with deepforest, and the user errors around it."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_adversarial_d2_cli import train_net
from test_d2_train import TRAIN_NET

from rwdet.analysis.graph_stats import graphs_from_checkpoint
from rwdet.d2 import treecrowns
from rwdet.d2.convert import convert_rwdet_checkpoint
from rwdet.d2.weights import save_d2_weights
from rwdet.graphs import graphs_fingerprint, graphs_to_dict
from rwdet.models import build_model, get_graphs

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "configs" / "Base-RandWire-FPN.yaml"
TILE = 200  # each 400x400 photo gives 4 tiles
CLS_KWARGS = {"channels": 8, "nodes": 5, "num_classes": 10, "seed": 2}


def make_tree_coco(root: Path) -> dict[str, Path]:
    """COCO-format train/val json files over 200 px tiles of the two 400 px deepforest photos
    (OSBS_029, SOAP_061): 3 tiles of each to train, 1 of each to validate; one category."""
    data_dir = treecrowns.deepforest_data_dir()
    (root / "images").mkdir(parents=True)
    splits = {"train": ([], []), "val": ([], [])}
    for stem in treecrowns.SMALL:
        _, boxes = treecrowns.read_voc(os.path.join(data_dir, stem + ".xml"))
        with Image.open(os.path.join(data_dir, stem + ".png")) as photo:
            photo = photo.convert("RGB")
            for k, (x0, y0) in enumerate([(0, 0), (TILE, 0), (0, TILE), (TILE, TILE)]):
                images, anns = splits["val" if k == 3 else "train"]
                win = (x0, y0, x0 + TILE, y0 + TILE)
                name = f"{stem}_{k}.jpg"
                photo.crop(win).save(root / "images" / name, quality=95)
                image_id = len(images) + 1
                images.append({"id": image_id, "file_name": name, "width": TILE, "height": TILE})
                for bx0, by0, bx1, by1 in treecrowns._clip(boxes, *win):
                    anns.append(
                        {
                            "id": len(anns) + 1,
                            "image_id": image_id,
                            "category_id": 1,
                            "bbox": [bx0, by0, bx1 - bx0, by1 - by0],
                            "area": (bx1 - bx0) * (by1 - by0),
                            "iscrowd": 0,
                        }
                    )
    paths = {}
    for split, (images, anns) in splits.items():
        assert images and anns
        paths[split] = root / f"{split}.json"
        paths[split].write_text(
            json.dumps(
                {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "tree"}]}
            )
        )
    return paths


def convert_cls_checkpoint(path: Path) -> dict:
    """A randwire_small classification checkpoint, converted as tools/convert_cls_to_d2.py does;
    returns the converted dict (saved to ``path``)."""
    model = build_model("randwire_small", **CLS_KWARGS)
    ckpt = {
        "model": model.state_dict(),
        "model_spec": model.rwdet_spec,
        "graphs": graphs_to_dict(get_graphs(model)),
        "graphs_fingerprint": graphs_fingerprint(get_graphs(model)),
    }
    data = convert_rwdet_checkpoint(ckpt)
    save_d2_weights(str(path), data)
    return data


def write_config(path: Path, output_dir: Path, weights: Path) -> None:
    """Small and fast; the backbone's architecture and graphs come from the weights."""
    path.write_text(
        f"""_BASE_: "{BASE}"
MODEL:
  DEVICE: "cpu"
  WEIGHTS: "{weights}"
  BACKBONE:
    FREEZE_AT: 0
  RWDET:
    NORM: "BN"
  FPN:
    OUT_CHANNELS: 16
  ANCHOR_GENERATOR:
    SIZES: [[16], [32], [64], [128], [256]]
  RPN:
    PRE_NMS_TOPK_TRAIN: 200
    PRE_NMS_TOPK_TEST: 200
    POST_NMS_TOPK_TRAIN: 50
    POST_NMS_TOPK_TEST: 50
  ROI_HEADS:
    BATCH_SIZE_PER_IMAGE: 32
    SCORE_THRESH_TEST: 0.0
  ROI_BOX_HEAD:
    FC_DIM: 32
SOLVER:
  IMS_PER_BATCH: 2
  BASE_LR: 0.01
  MAX_ITER: 3
  STEPS: (100,)
  WARMUP_ITERS: 1
  CHECKPOINT_PERIOD: 1000
  REFERENCE_WORLD_SIZE: 0
INPUT:
  MIN_SIZE_TRAIN: (128,)
  MAX_SIZE_TRAIN: 160
  MIN_SIZE_TEST: 128
  MAX_SIZE_TEST: 160
DATALOADER:
  NUM_WORKERS: 0
TEST:
  DETECTIONS_PER_IMAGE: 20
OUTPUT_DIR: "{output_dir}"
"""
    )


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("custom")
    paths = make_tree_coco(root / "trees")
    weights = root / "randwire_small.pkl"
    converted = convert_cls_checkpoint(weights)
    cfg = root / "trees.yaml"
    write_config(cfg, root / "out", weights)
    return {"root": root, **paths, "images": root / "trees" / "images", "cfg": cfg,
            "weights": weights, "converted": converted}  # fmt: skip


def dataset_args(s, train="trees_train", val="trees_val"):
    return ["--dataset", train, str(s["train"]), str(s["images"])] + [
        "--dataset",
        val,
        str(s["val"]),
        str(s["images"]),
    ]


def use(train="trees_train", val="trees_val"):
    return ["DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", f"('{val}',)"]


def run_tool(args, cwd, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DETECTRON2_DATASETS": str(cwd)}
    return subprocess.run(
        [sys.executable, TRAIN_NET, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_fine_tune_on_a_registered_dataset(setup_dir):
    s = setup_dir
    proc = run_tool(
        ["--config-file", str(s["cfg"]), *dataset_args(s), *use()]
        + ["MODEL.ROI_HEADS.NUM_CLASSES", "1", "SEED", "0"],
        s["root"],
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert f"dataset 'trees_train' (--dataset): {s['train']}" in out
    # Fine-tuning: every backbone tensor of the converted file is loaded.
    assert "missing keys: none; unexpected keys: none" in out
    # Evaluated on the registered val set (COCOEvaluator reads its json).
    m = re.findall(r"\[rwdet\] trees_val bbox: AP (\S+)  AP50 (\S+)", out)
    assert m and all(0.0 <= float(v) <= 100.0 for v in m[-1]), out[-3000:]
    final = s["root"] / "out" / "model_final.pth"
    assert torch.load(final, weights_only=True)["iteration"] == 2
    results = s["root"] / "out" / "inference" / "trees_val" / "coco_instances_results.json"
    assert {d["image_id"] for d in json.loads(results.read_text())} <= {1, 2}
    # The checkpoint train_net wrote carries the graphs: analyze.py graph reads them.
    graphs = graphs_from_checkpoint(str(final))
    assert graphs_fingerprint(graphs) == s["converted"]["rwdet"]["graphs_fingerprint"]


@pytest.mark.slow
def test_num_classes_mismatch_is_one_line_in_every_worker(setup_dir):
    """Two spawned workers (gloo): each registers the --dataset sets itself (otherwise: 'not
    registered'), and NUM_CLASSES 80 against a one-category json is one line with the fix."""
    s = setup_dir
    proc = run_tool(
        ["--config-file", str(s["cfg"]), "--num-gpus", "2", "--dist-url", "auto"]
        + [*dataset_args(s), *use(), "OUTPUT_DIR", str(s["root"] / "out_nc")],
        s["root"],
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    err = {line for line in proc.stderr.splitlines() if line.startswith("train_net.py: error:")}
    assert len(err) == 1, proc.stderr[-3000:]
    (line,) = err
    assert "'trees_train' has 1 categories" in line
    assert "set MODEL.ROI_HEADS.NUM_CLASSES 1" in line


@pytest.mark.parametrize(
    "values, words",
    [
        (["mine"], ["--dataset takes 3 values", "NAME JSON IMAGE_ROOT"]),
        (["mine", "{train}"], ["--dataset takes 3 values"]),
        (["coco_2017_val", "{train}", "{images}"], ["'coco_2017_val'", "already registered"]),
        (["treecrowns_val", "{train}", "{images}"], ["'treecrowns_val'", "already registered"]),
        (["mine", "{root}/nope.json", "{images}"], ["nope.json", "does not exist"]),
        (["mine", "{train}", "{root}/no_images"], ["no_images", "does not exist"]),
        (["mine", "{train}", "SOLVER.MAX_ITER"], ["config key", "fewer than 3 values"]),
    ],
)
def test_dataset_flag_errors_are_one_line(values, words, setup_dir, capsys):
    s = setup_dir
    fill = {"train": s["train"], "images": s["images"], "root": s["root"]}
    argv = ["--config-file", str(s["cfg"]), "--dataset", *[v.format(**fill) for v in values]]
    code, err = train_net(argv, capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("train_net.py: error: ")
    for w in words:
        assert w in err[0], err[0]


def test_same_name_twice_is_refused_and_a_rerun_re_registers(setup_dir, capsys):
    from detectron2.data import MetadataCatalog

    from rwdet.d2.datasets import register_cli_datasets

    s = setup_dir
    code, err = train_net(
        ["--config-file", str(s["cfg"])] + dataset_args(s, "twice", "twice"), capsys
    )
    assert code == 2 and len(err) == 1 and "'twice' is given twice" in err[0], err
    # The CLI owns the names it registered: a second run in this process may point them at
    # other files; the same files again are a no-op.
    register_cli_datasets([("cli_rerun", s["train"], s["images"])])
    register_cli_datasets([("cli_rerun", s["train"], s["images"])])
    register_cli_datasets([("cli_rerun", s["val"], s["images"])])
    assert MetadataCatalog.get("cli_rerun").json_file == str(s["val"])
