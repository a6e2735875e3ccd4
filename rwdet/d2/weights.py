"""Detectron2 weights files that carry an rwdet backbone's spec and graphs.

A converted file is a pickle of ``{"model": {key: numpy array}, "__author__": ...,
"matching_heuristics": False, "rwdet": meta}`` (the layout of detectron2's own converted
files). Its keys already carry the exact detection-model prefix (``BACKBONE_PREFIX``), so
loading needs no name-matching heuristics and a missing or unexpected key is real. ``meta``
holds the model spec and the stage graphs as edge lists so that the detection backbone is
rebuilt with exactly the graphs the weights were trained with.

Pickles are read with an unpickler that only admits numpy arrays and plain containers, and
``.pth`` files with ``torch.load(weights_only=True)``: a weights file can never run code.
"""

from __future__ import annotations

import errno
import os
import pickle
from urllib.parse import urlparse

import numpy as np
import torch

from rwdet.atomic import atomic_write

META_KEY = "rwdet"
AUTHOR = "rwdet tools/convert_cls_to_d2.py"
# Where the classification model's parameters sit inside a detectron2 GeneralizedRCNN whose
# backbone is FPN(bottom_up=RwdetBackbone): backbone.bottom_up.model.<classification key>.
BACKBONE_PREFIX = "backbone.bottom_up.model."

# (module, name) pairs a numpy-array pickle needs; anything else is refused.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to unpickle {module}.{name}: a weights file may only hold numpy arrays "
            "and plain containers"
        )


def safe_load_pickle(path: str):
    with open(path, "rb") as f:
        return _SafeUnpickler(f, encoding="latin1").load()


def save_d2_weights(path: str, data: dict) -> None:
    """Write a weights pickle atomically (temp file in the same folder, then rename)."""
    atomic_write(path, lambda f: pickle.dump(data, f, protocol=4))


def load_weights_file(path: str) -> dict:
    """Load a ``.pkl`` (safe unpickler) or ``.pth`` (weights_only) weights file as a dict."""
    if not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, f"weights file {path!r} does not exist")
    try:
        if path.endswith(".pkl"):
            data = safe_load_pickle(path)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, pickle.UnpicklingError):
            raise
        raise ValueError(f"weights file {path!r} is unreadable or corrupt: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"weights file {path!r} does not hold a dict (got {type(data).__name__})")
    return data


def is_local_path(path: str) -> bool:
    return bool(path) and urlparse(path).scheme in ("", "file")


def read_weights_info(path: str) -> tuple[dict | None, bool]:
    """``(rwdet metadata or None, whether the file holds rwdet backbone tensors)``.

    ``(None, False)`` for no file set, a URL, or weights of another backbone. ``(None, True)``
    is a detection state dict of an rwdet backbone whose metadata was lost (saved by hand, or
    edited): its graphs cannot be checked.
    """
    if not is_local_path(path):
        return None, False
    path = urlparse(path).path if path.startswith("file:") else path
    if not os.path.isfile(path):
        raise FileNotFoundError(
            errno.ENOENT,
            f"MODEL.WEIGHTS={path!r} does not exist; convert a classification checkpoint with "
            "tools/convert_cls_to_d2.py or set MODEL.WEIGHTS to an existing file",
        )
    data = load_weights_file(path)
    meta = data.get(META_KEY)
    state = data.get("model", data)
    ours = isinstance(state, dict) and any(str(k).startswith(BACKBONE_PREFIX) for k in state)
    return (meta if isinstance(meta, dict) else None), ours


def read_meta(path: str) -> dict | None:
    """The rwdet metadata of a weights file, or None (no file set, a URL, or plain weights)."""
    return read_weights_info(path)[0]


def to_numpy_state(state: dict, prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + k: v.detach().cpu().numpy() for k, v in state.items()}
