"""Loading a user-named checkpoint file safely, with every failure as one line naming the file.

``torch.load`` on a file the user named can fail in many ways that are the user's to fix: a
folder or an empty file, a text file (``KeyError: 101``), a truncated zip, a pickle of arbitrary
objects. ``weights_only=True`` keeps code from running (and ``.pkl`` weights files go through
the allow-list unpickler of ``rwdet.d2.weights``); this module turns each failure into a
``UserError`` that names the file and says what to pass instead. Used by every reader of model
files (``rwdet.models.artifact``, the Detectron2 converter, ``tools/analyze.py``).
"""

from __future__ import annotations

import os
import pickle
import re

import torch

from rwdet.run.errors import UserError

_FIX = "pass a checkpoint written by tools/train_cls.py (e.g. output/<run>/best.pth)"
# Where a Detectron2 checkpoint or converted .pkl keeps the backbone's spec and graphs
# (``rwdet.d2.weights.META_KEY``; not imported here, that would import detectron2).
D2_META_KEY = "rwdet"
GRAPH_FILES_FIX = (
    "pass a checkpoint written by tools/train_cls.py (best.pth) or tools/train_net.py "
    "(model_final.pth), or a .pkl written by tools/convert_cls_to_d2.py"
)


def _unpickling_reason(e: Exception) -> str:
    """torch's refusal, without its advice to retry with weights_only=False (that runs code)."""
    m = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:Check the documentation|$)", str(e), re.S)
    return " ".join((m[1] if m else str(e)).split())[:200]


def _check_file(path: str, what: str, fix: str) -> None:
    if not os.path.exists(path):
        raise UserError(f"{what} {path!r} does not exist; {fix}")
    if os.path.isdir(path):
        raise UserError(f"{what} {path!r} is a directory; {fix}")
    if os.path.getsize(path) == 0:
        raise UserError(f"{what} {path!r} is empty (0 bytes, an interrupted copy?); {fix}")


def load_torch_file(path: str, what: str = "checkpoint", fix: str = _FIX):
    """``torch.load(path, weights_only=True)`` on the CPU; a ``UserError`` for a bad file."""
    _check_file(path, what, fix)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(
            f"{what} {path!r} holds objects other than tensors and plain values and is refused "
            f"(weights_only loading: {_unpickling_reason(e)}); {fix}"
        ) from None
    except OSError:
        raise  # permissions and the like: run_cli names the file and the reason
    except Exception as e:  # noqa: BLE001 - any parse failure of the file's bytes is the file's
        # torch's first sentence says what broke; the rest is advice meant for its developers
        reason = re.split(r"(?<=\.)\s", " ".join(str(e).split()))[0][:160] or "no details"
        raise UserError(
            f"{what} {path!r} is not a readable PyTorch file, truncated or corrupt "
            f"({type(e).__name__}: {reason}); {fix}"
        ) from None


def load_pickle_file(path: str, what: str = "weights file", fix: str = GRAPH_FILES_FIX):
    """A Detectron2 ``.pkl`` weights file through the allow-list unpickler (numpy arrays and
    plain containers only); a ``UserError`` for a bad file."""
    from rwdet.d2.weights import safe_load_pickle  # imports detectron2: only for .pkl files

    _check_file(path, what, fix)
    try:
        return safe_load_pickle(path)
    except pickle.UnpicklingError as e:
        if str(e).startswith("refusing"):
            raise UserError(f"{what} {path!r} is refused: {e}; {fix}") from None
        reason = f"UnpicklingError: {' '.join(str(e).split())[:160]}"
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure of the file's bytes is the file's
        reason = f"{type(e).__name__}: {' '.join(str(e).split())[:160] or 'no details'}"
    raise UserError(
        f"{what} {path!r} is not a readable pickle, truncated or corrupt ({reason}); {fix}"
    )


def load_graph_record(path: str) -> dict:
    """The dict that records a model's spec and stage graphs (keys ``graphs``,
    ``graphs_fingerprint``, ``model_spec``), from any rwdet file that carries them: a
    classification checkpoint (the checkpoint itself), a Detectron2 checkpoint written by
    ``tools/train_net.py`` or a ``.pkl`` converted by ``tools/convert_cls_to_d2.py`` (their
    ``rwdet`` entry). Loaded safely; nothing is verified here (``checked_graphs`` does)."""
    from rwdet.file_io import local_path

    local = local_path(path)
    if path.endswith(".pkl"):
        data = load_pickle_file(local)
    else:
        data = load_torch_file(local, fix=GRAPH_FILES_FIX)
    if not isinstance(data, dict):
        raise UserError(
            f"{path!r} holds a {type(data).__name__}, not an rwdet checkpoint; {GRAPH_FILES_FIX}"
        )
    if "graphs" in data:
        return data
    meta = data.get(D2_META_KEY)
    if isinstance(meta, dict):
        return meta
    raise UserError(
        f"{path!r} is not an rwdet checkpoint: it has neither a 'graphs' entry (classification) "
        f"nor an {D2_META_KEY!r} entry (Detectron2); {GRAPH_FILES_FIX}"
    )


def checked_graphs(ckpt: dict, where: str, spec: dict | None = None) -> dict:
    """The checkpoint's stage graphs after ``verify_graphs`` (fingerprint, and ``spec`` when
    given); a malformed 'graphs' entry is a ``UserError`` naming the file (``where``), not a
    ``TypeError``."""
    from rwdet.graphs import graphs_from_dict
    from rwdet.models.verify import verify_graphs

    stored = ckpt.get("graphs")
    try:
        if stored:
            graphs_from_dict(stored)
    except (TypeError, AttributeError, KeyError) as e:
        raise UserError(
            f"{where} has a malformed 'graphs' entry ({type(e).__name__}: {e}); {_FIX}"
        ) from None
    return verify_graphs(stored, ckpt.get("graphs_fingerprint"), where, spec=spec)


def model_record(model: torch.nn.Module) -> dict:
    """What every rwdet file needs to rebuild ``model`` exactly: its state dict, registry spec,
    stage graphs as edge lists and their fingerprint (checked on load by ``checked_graphs``).
    The trainer's checkpoints add the training state to this."""
    from rwdet.graphs import graphs_fingerprint, graphs_to_dict
    from rwdet.models import get_graphs

    graphs = get_graphs(model)
    return {
        "model": model.state_dict(),
        "model_spec": model.rwdet_spec,
        "graphs": graphs_to_dict(graphs),
        "graphs_fingerprint": graphs_fingerprint(graphs),
    }
