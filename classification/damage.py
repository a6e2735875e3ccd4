"""``tools/analyze.py damage``: a trained checkpoint evaluated on its own validation data after
every removal of the graph-damage study (RandWire §4.3, Figure 5).

The study itself (``rwdet.analysis.damage``) only needs a model and an ``evaluate`` callable;
this module is the application side that supplies them from a classification run, so the
library never imports the application.
"""

from __future__ import annotations

import copy
import os

import torch

from classification import builders, trainer
from classification.data import build_datasets
from classification.distributed import init_distributed
from rwdet.analysis.damage import damage_study, plot_damage, save_json
from rwdet.models.artifact import read_model_file
from rwdet.run.errors import UserError


def run_damage(weights: str, data: str | None, out: str, max_images: int | None, limit, kinds):
    file = read_model_file(weights)
    if file.kind != "checkpoint" or not isinstance(file.record.get("config"), dict):
        raise UserError(
            f"{weights!r} is not a classification checkpoint with its config (a {file.kind} "
            "file); the damage study evaluates on the run's own validation data: pass the "
            "best.pth written by tools/train_cls.py"
        )
    cfg = copy.deepcopy(file.record["config"])
    if data:
        cfg["data"]["name"], cfg["data"]["root"] = "imagenet", data
    _, val_set, _, _ = build_datasets(cfg, train=False, classes=file.record.get("classes"))
    if max_images:
        val_set = torch.utils.data.Subset(val_set, range(min(max_images, len(val_set))))
    model = file.build(strict=True)
    d = init_distributed("cpu" if not torch.cuda.is_available() else "auto")
    model.to(d.device)
    loader = builders.eval_loader(val_set, cfg, d)

    def evaluate(m):
        return trainer.evaluate(m, loader, d, cfg, desc="damage")["top1"]

    study = damage_study(model, evaluate, kinds=kinds, limit=limit)
    study.update({"weights": weights, "images": len(val_set)})
    os.makedirs(out, exist_ok=True)
    save_json(study, os.path.join(out, "damage.json"))
    plot_damage(study, os.path.join(out, "damage.png"))
    return study
