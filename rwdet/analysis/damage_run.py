"""``tools/analyze.py damage``: a trained checkpoint, its validation data, every removal."""

from __future__ import annotations

import copy
import os

import torch

from rwdet.analysis.damage import damage_study, plot_damage, save_json
from rwdet.checkpoint_io import RWDET_KEYS, checked_graphs, load_rwdet_checkpoint
from rwdet.run.errors import UserError


def run_damage(weights: str, data: str | None, out: str, max_images: int | None, limit, kinds):
    from classification import trainer
    from classification.data import build_datasets
    from classification.distributed import init_distributed

    ckpt = load_rwdet_checkpoint(weights, required=(*RWDET_KEYS, "config"))
    graphs = checked_graphs(ckpt, repr(weights), spec=ckpt["model_spec"])
    cfg = copy.deepcopy(ckpt["config"])
    if data:
        cfg["data"]["name"], cfg["data"]["root"] = "imagenet", data
    _, val_set, _, _ = build_datasets(cfg, train=False, classes=ckpt.get("classes"))
    if max_images:
        val_set = torch.utils.data.Subset(val_set, range(min(max_images, len(val_set))))
    model = trainer.build(ckpt["model_spec"], graphs)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"{weights!r}: its weights do not fit its own model_spec ({e})") from None
    d = init_distributed("cpu" if not torch.cuda.is_available() else "auto")
    model.to(d.device)
    loader = trainer.eval_loader(val_set, cfg, d)

    def evaluate(m):
        return trainer.evaluate(m, loader, d, cfg, desc="damage")["top1"]

    study = damage_study(model, evaluate, kinds=kinds, limit=limit)
    study.update({"weights": weights, "images": len(val_set)})
    os.makedirs(out, exist_ok=True)
    save_json(study, os.path.join(out, "damage.json"))
    plot_damage(study, os.path.join(out, "damage.png"))
    return study
