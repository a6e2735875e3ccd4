"""``RwdetCheckpointer``: detectron2's checkpointer made safe, atomic and graph-aware.

- Loading never runs code from a file: pickles go through an allow-list unpickler and
  ``.pth`` files through ``torch.load(weights_only=True)``.
- Saving writes a temporary file and renames it, so a run killed mid-save keeps the previous
  checkpoint, and embeds the backbone's spec and graphs so that ``--eval-only`` and resuming
  rebuild exactly the trained network.
- Loading checks the file's graphs (integrity: the edge lists still hash to the recorded
  fingerprint; agreement: they are the built backbone's graphs), refuses backbone tensors of
  the wrong shape (weights of another architecture), and reports the backbone's missing and
  unexpected keys explicitly, also when there are none. A file with backbone tensors but no
  record of its graphs is refused unless ``allow_unverified_graphs``
  (``MODEL.RWDET.ALLOW_UNVERIFIED_GRAPHS``).
- Resuming survives kills: temp files of killed saves are removed at the start of training,
  and when ``last_checkpoint`` is missing or names an older file than the newest complete
  ``model_*.pth`` (a kill between the model save and the tag), the newest one is resumed.
"""

from __future__ import annotations

import logging
import os
import pickle
import re

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch.nn.parallel import DistributedDataParallel

from rwdet.atomic import atomic_write, remove_stale_temp_files
from rwdet.d2.spec import UNVERIFIED_FIX
from rwdet.d2.weights import BACKBONE_PREFIX, META_KEY, safe_load_pickle
from rwdet.graphs import graphs_fingerprint, graphs_to_dict
from rwdet.models.verify import verify_graphs
from rwdet.run.errors import UserError

logger = logging.getLogger(__name__)
LAST_CHECKPOINT = "last_checkpoint"
# What ``save`` writes (detectron2's PeriodicCheckpointer names them model_0004999, model_final).
SAVED_FILES = ("model_*.pth", LAST_CHECKPOINT)
_NUMBERED = re.compile(r"model_(\d+)\.pth")


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


def saved_iteration(path: str) -> int | None:
    """The iteration a complete checkpoint file was saved at, or None if it does not load.

    Loaded with ``mmap`` (the tensors are not read), so checking many files stays cheap.
    Without an "iteration" entry: the number in the name, else -1.
    """
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # a legacy (non-zip) file cannot be mapped
            if "mmap" not in str(e):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError):
        return None
    it = data.get("iteration") if isinstance(data, dict) else None
    if isinstance(it, int):
        return it
    m = _NUMBERED.fullmatch(os.path.basename(path))
    return int(m.group(1)) if m else -1


_reported: set[tuple[str, str]] = set()  # fallbacks already logged (has_checkpoint, then load)


def resume_checkpoint_file(save_dir: str) -> str | None:
    """The checkpoint a resumed run continues from, or None.

    The newest complete file among ``model_*.pth`` and the one ``last_checkpoint`` names (it
    wins a tie): ``save`` writes the model first and the tag second, so a kill in between
    leaves a complete newer model and an old tag (or none). A fallback is logged once.
    """
    if not os.path.isdir(save_dir):
        return None
    tagged = None
    tag_path = os.path.join(save_dir, LAST_CHECKPOINT)
    if os.path.isfile(tag_path):
        with open(tag_path) as f:
            tagged = f.read().strip() or None
    names = {f for f in os.listdir(save_dir) if _NUMBERED.fullmatch(f) or f == "model_final.pth"}
    names |= {n for n in [tagged] if n and os.path.isfile(os.path.join(save_dir, n))}
    iterations = {f: saved_iteration(os.path.join(save_dir, f)) for f in names}
    complete = {f: it for f, it in iterations.items() if it is not None}
    if not complete:  # nothing loads: the tagged file, if any, fails with its own error
        return os.path.join(save_dir, tagged) if tagged in names else None
    newest = max(sorted(complete), key=lambda f: (complete[f], f == tagged))
    if newest != tagged and (save_dir, newest) not in _reported:
        _reported.add((save_dir, newest))
        logger.warning(
            "%s %s: resuming from %s (iteration %d), the newest complete checkpoint (a run "
            "killed between saving it and updating the tag)",
            tag_path,
            "is missing" if tagged is None else f"names {tagged!r}",
            newest,
            complete[newest],
        )
    return os.path.join(save_dir, newest)


class RwdetCheckpointer(DetectionCheckpointer):
    def __init__(self, model, save_dir: str = "", *, allow_unverified_graphs=False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.allow_unverified_graphs = bool(allow_unverified_graphs)
        self._loading = "the checkpoint"

    def has_checkpoint(self) -> bool:
        return resume_checkpoint_file(self.save_dir) is not None

    def get_checkpoint_file(self) -> str:
        return resume_checkpoint_file(self.save_dir) or ""

    def remove_stale_temp_files(self) -> list[str]:
        """Delete the temp files killed saves left; call at the start of training, before any
        save, in the one process that saves (other ranks do nothing)."""
        if not (self.save_dir and self.save_to_disk):
            return []
        stale = remove_stale_temp_files(self.save_dir, SAVED_FILES)
        if stale:
            self.logger.info(
                "removed %d temp files of killed saves from %s: %s",
                len(stale),
                self.save_dir,
                ", ".join(sorted(stale)),
            )
        return stale

    def _load_file(self, filename):
        self._loading = filename
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
            # After the shape checks, which name the likelier mistake (another architecture).
            self._refuse_unrecorded_graphs(bb, meta, file_keys)
        return incompatible

    def _refuse_unrecorded_graphs(self, bb, meta: dict | None, file_keys) -> None:
        recorded = meta is not None and (
            meta.get("graphs") or meta.get("graphs_fingerprint") is not None
        )
        ours = any(k.startswith(BACKBONE_PREFIX) for k in file_keys)
        if recorded or not ours or not getattr(bb.model, "rwdet_graphs", {}):
            return
        if self.allow_unverified_graphs:
            self.logger.warning("%s records no graphs: loaded unverified", self._loading)
            return
        raise UserError(
            f"{self._loading!r} holds tensors for the rwdet backbone but records no graphs "
            "(neither edge lists nor a fingerprint), so they may belong to other graphs than "
            "the backbone's; " + UNVERIFIED_FIX.format(use="them for the backbone's graphs")
        )

    def _check_same_network(self, bb, meta: dict) -> None:
        spec = meta.get("model_spec") or {}
        if spec.get("name") and spec["name"] != bb.model.rwdet_spec["name"]:
            raise ValueError(
                f"the weights are for model {spec['name']!r} but the backbone is "
                f"{bb.model.rwdet_spec['name']!r} (weights of another architecture)"
            )
        stored, fingerprint = meta.get("graphs"), meta.get("graphs_fingerprint")
        if not stored and fingerprint is None:
            return  # nothing recorded: refused after the shape checks (_load_model)
        if fingerprint is None and not self.allow_unverified_graphs:
            raise UserError(
                f"{self._loading!r} holds graph edge lists without their fingerprint, so "
                "nothing shows they are the graphs its tensors were trained with; "
                + UNVERIFIED_FIX.format(use="its unverified edge lists")
            )
        graphs = verify_graphs(stored, fingerprint, repr(self._loading))
        want = graphs_fingerprint(graphs) if graphs else None
        built = getattr(bb.model, "rwdet_graphs", {})
        have = graphs_fingerprint(built) if built else None
        if want != have:
            raise UserError(
                f"the weights were trained with graphs {want} but the backbone was built with "
                f"graphs {have}; rebuild from the weights' graphs "
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
