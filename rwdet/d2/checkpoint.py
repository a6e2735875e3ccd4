"""``RwdetCheckpointer``: detectron2's checkpointer made safe, atomic and graph-aware.

- Loading never runs code from a file: pickles go through an allow-list unpickler and
  ``.pth`` files through ``torch.load(weights_only=True)``.
- Saving writes a temporary file and renames it, so a run killed mid-save keeps the previous
  checkpoint, and embeds the backbone's spec and graphs so that ``--eval-only`` and resuming
  rebuild exactly the trained network.
- Loading checks the file's graphs against the built backbone's, refuses backbone tensors of
  the wrong shape (weights of another architecture), and reports the backbone's missing and
  unexpected keys explicitly, also when there are none.
"""

from __future__ import annotations

import os

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch.nn.parallel import DistributedDataParallel

from rwdet.atomic import atomic_write
from rwdet.d2.weights import BACKBONE_PREFIX, META_KEY, safe_load_pickle
from rwdet.graphs import graphs_fingerprint, graphs_to_dict


def find_rwdet_backbone(model):
    from rwdet.d2.backbone import RwdetBackbone

    if isinstance(model, DistributedDataParallel):
        model = model.module
    for m in model.modules():
        if isinstance(m, RwdetBackbone):
            return m
    return None


def backbone_meta(model) -> dict | None:
    bb = find_rwdet_backbone(model)
    if bb is None:
        return None
    graphs = getattr(bb.model, "rwdet_graphs", {})
    return {
        "model_spec": bb.model.rwdet_spec,
        "graphs": graphs_to_dict(graphs) if graphs else None,
        "graphs_fingerprint": graphs_fingerprint(graphs) if graphs else None,
    }


def _atomic_torch_save(data, path: str) -> None:
    atomic_write(path, lambda f: torch.save(data, f))


class RwdetCheckpointer(DetectionCheckpointer):
    def _load_file(self, filename):
        if filename.endswith(".pkl"):
            data = safe_load_pickle(filename)
            if "model" in data and "__author__" in data:
                self.logger.info("Reading a file from '{}'".format(data["__author__"]))
                return data
            # Caffe2 / Detectron1 model zoo layout, as detectron2 reads it.
            if "blobs" in data:
                data = data["blobs"]
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        if filename.endswith(".pyth"):
            data = torch.load(filename, map_location="cpu", weights_only=True)
            state = {
                k: v
                for k, v in data["model_state"].items()
                if not k.endswith("num_batches_tracked")
            }
            return {"model": state, "__author__": "pycls", "matching_heuristics": True}
        return super()._load_file(filename)

    def _torch_load(self, f):
        return torch.load(f, map_location="cpu", weights_only=True)

    def _load_model(self, checkpoint):
        bb = find_rwdet_backbone(self.model)
        meta = checkpoint.get(META_KEY) if isinstance(checkpoint.get(META_KEY), dict) else None
        if bb is not None and meta is not None:
            self._check_same_network(bb, meta)
        file_keys = list(checkpoint["model"])
        incompatible = super()._load_model(checkpoint)
        if bb is not None:
            self._report_backbone(file_keys, incompatible)
        return incompatible

    def _check_same_network(self, bb, meta: dict) -> None:
        spec = meta.get("model_spec") or {}
        if spec.get("name") and spec["name"] != bb.model.rwdet_spec["name"]:
            raise ValueError(
                f"the weights are for model {spec['name']!r} but the backbone is "
                f"{bb.model.rwdet_spec['name']!r} (weights of another architecture)"
            )
        graphs = getattr(bb.model, "rwdet_graphs", {})
        want = meta.get("graphs_fingerprint")
        if want and graphs and graphs_fingerprint(graphs) != want:
            raise ValueError(
                f"the weights were trained with graphs {want} but the backbone was built with "
                f"graphs {graphs_fingerprint(graphs)}; rebuild from the weights' graphs "
                "(unset MODEL.RWDET.GEN/SEED/GRAPH_FILE) or use weights of these graphs"
            )

    def _report_backbone(self, file_keys, incompatible) -> None:
        def ours(keys):
            return sorted(k for k in keys if k.startswith(BACKBONE_PREFIX))

        loaded = ours(file_keys)
        bad_shapes = [s for s in incompatible.incorrect_shapes if s[0].startswith(BACKBONE_PREFIX)]
        if bad_shapes:
            k, got, want = bad_shapes[0]
            raise ValueError(
                f"{len(bad_shapes)} backbone tensors have the wrong shape, e.g. {k}: file "
                f"{tuple(got)} vs model {tuple(want)}; the weights belong to another "
                "architecture (check MODEL.RWDET.NAME/CHANNELS/NODES against the weights)"
            )
        if file_keys and not loaded:
            raise ValueError(
                "the weights file has no tensors for the rwdet backbone (no key starts with "
                f"{BACKBONE_PREFIX!r}); it belongs to another architecture. Convert an rwdet "
                "classification checkpoint with tools/convert_cls_to_d2.py"
            )
        missing = ours(incompatible.missing_keys)
        unexpected = ours(incompatible.unexpected_keys)
        self.logger.info(
            "rwdet backbone: %d tensors in the file; missing keys: %s; unexpected keys: %s",
            len(loaded),
            missing or "none",
            unexpected or "none",
        )

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        meta = backbone_meta(self.model)
        if meta is not None:
            data[META_KEY] = meta
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        _atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(path, lambda f: f.write(last_filename_basename), mode="w")
