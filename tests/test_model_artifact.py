"""The one model artifact (``rwdet.models.artifact``): every rwdet file rebuilds the model it
was written from (weights, spec, exact graphs), through iopath URIs, safely, checked."""

import ast
import http.server
import os
import threading
from functools import partial
from pathlib import Path

import pytest
import torch
from test_d2_convert import det_cfg, load_detector, make_checkpoint

from rwdet.d2 import RwdetCheckpointer
from rwdet.graphs import graphs_fingerprint
from rwdet.models import (
    ModelSpec,
    artifact,
    build_model,
    get_graphs,
    load_model,
    read_model_file,
    save_model,
    stage_outputs,
)
from rwdet.models.verify import GraphMismatchError
from rwdet.run.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TINY = {"channels": 8, "nodes": 6, "seed": 2, "num_classes": 10}
X = torch.randn(2, 3, 32, 32)


def same_outputs(a, b, x=X):
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("randwire_small", TINY),
        ("randwire_small", {**TINY, "wiring": "popup"}),
        ("randwire_small", {**TINY, "wiring": "dnw"}),
        ("mobilenetv1_dnw_x0225", {"num_classes": 10}),
    ],
)
def test_save_and_load_round_trip(tmp_path, name, kwargs):
    old = os.umask(0o022)
    try:
        model = build_model(name, **kwargs)
        path = tmp_path / "m.pth"
        save_model(model, path, classes=[str(i) for i in range(10)])
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644  # readable by teammates, like open() gives
    loaded = load_model(path)
    assert loaded.rwdet_spec == model.rwdet_spec
    assert graphs_fingerprint(get_graphs(loaded)) == graphs_fingerprint(get_graphs(model))
    assert same_outputs(model, loaded)
    file = read_model_file(f"file://{path}")  # RFC 8089 URI through rwdet's PathManager
    assert file.kind == "checkpoint" and file.record["classes"][0] == "0"
    assert same_outputs(model, file.build())


def test_http_uri_is_downloaded_through_iopath(tmp_path, monkeypatch):
    """detectron2 users load MODEL.WEIGHTS from URLs; rwdet files load the same way (a local
    server stands in for a remote host; https goes through the same handler)."""
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    served = tmp_path / "www"
    served.mkdir()
    model = build_model("randwire_small", **TINY)
    save_model(model, served / "m.pth")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/m.pth"
        assert same_outputs(model, load_model(url))
        assert same_outputs(model, build_model("randwire_small", pretrained=url))
        with pytest.raises(UserError, match="could not be fetched"):
            load_model(url.replace("m.pth", "missing.pth"))
    finally:
        server.shutdown()
    with pytest.raises(UserError, match="no handler is registered for s3://"):
        load_model("s3://bucket/m.pth")
    with pytest.raises(UserError, match="must be local"):
        load_model("file://otherhost/m.pth")


def test_overrides_class_count_and_strictness(tmp_path):
    model = build_model("randwire_small", **TINY)
    save_model(model, tmp_path / "m.pth")
    five = load_model(tmp_path / "m.pth", num_classes=5)
    assert five(X).shape == (2, 5)
    torch.testing.assert_close(five.forward_features(X), model.forward_features(X))
    assert load_model(tmp_path / "m.pth", num_classes=0)(X).shape == (2, model.num_features)
    with pytest.raises(UserError, match="does not fit the model.*fc"):
        load_model(tmp_path / "m.pth", num_classes=5, strict=True)
    with pytest.raises(GraphMismatchError, match="pass the generator, parameters and seed"):
        load_model(tmp_path / "m.pth", seed=3)  # would generate other graphs than stored
    with pytest.raises(UserError, match="does not fit the model"):
        load_model(tmp_path / "m.pth", channels=16)
    assert load_model(tmp_path / "m.pth", drop_rate=0.5).rwdet_spec["kwargs"]["dropout"] == 0.5


def test_bare_state_dict_needs_a_spec(tmp_path):
    model = build_model("randwire_small", **TINY)
    torch.save(model.state_dict(), tmp_path / "sd.pth")
    with pytest.raises(UserError, match="bare state dict.*spec="):
        load_model(tmp_path / "sd.pth")
    spec = {"name": "randwire_small", "kwargs": model.rwdet_spec["kwargs"]}
    assert same_outputs(model, load_model(tmp_path / "sd.pth", spec=spec))
    assert same_outputs(model, load_model(tmp_path / "sd.pth", spec=ModelSpec.of(model)))
    save_model(model, tmp_path / "m.pth")
    with pytest.raises(UserError, match="carries its own model spec"):
        load_model(tmp_path / "m.pth", spec=spec)


def test_edited_graphs_and_bad_files_are_refused(tmp_path):
    model = build_model("randwire_small", **TINY)
    save_model(model, tmp_path / "m.pth")
    data = torch.load(tmp_path / "m.pth", weights_only=True)
    stage = next(iter(data["graphs"]["graphs"]))
    data["graphs"]["graphs"][stage]["edges"] = data["graphs"]["graphs"][stage]["edges"][:-1]
    torch.save(data, tmp_path / "edited.pth")
    with pytest.raises(GraphMismatchError):
        load_model(tmp_path / "edited.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(UserError, match="not a readable PyTorch file"):
        load_model(tmp_path / "text.pth")
    with pytest.raises(UserError, match="holds no EMA weights"):
        load_model(tmp_path / "m.pth", weights="ema")

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))

    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="refused"):
        load_model(tmp_path / "evil.pth")
    assert not (tmp_path / "ran").exists()


@pytest.mark.slow
def test_detectron2_files_give_the_backbone(tmp_path):
    """A converted .pkl and a Detectron2 checkpoint (the layout tools/train_net.py writes, with
    FrozenBN tensors and the detector's other modules) load as the classification network
    without classifier, with the detector backbone's exact stage outputs."""
    import runpy

    convert_main = runpy.run_path(str(ROOT / "tools" / "convert_cls_to_d2.py"))["main"]
    cls_model, _ = make_checkpoint(tmp_path / "cls.pth", stem="imagenet")
    pkl = str(tmp_path / "det.pkl")
    convert_main([str(tmp_path / "cls.pth"), pkl])
    x = torch.randn(1, 3, 64, 64)
    from_pkl = load_model(pkl).eval()
    assert from_pkl.num_classes == 0 and read_model_file(pkl).kind == "detectron2"
    with torch.no_grad():
        want = stage_outputs(cls_model, x)
        got = stage_outputs(from_pkl, x)
    for k in want:
        torch.testing.assert_close(got[k], want[k])

    det, _ = load_detector(det_cfg(pkl))
    with torch.no_grad():  # the detector's own backbone changes: a trained detector's weights
        for p in det.backbone.bottom_up.parameters():
            p.add_(0.01 * torch.randn_like(p))
        for name, buf in det.backbone.bottom_up.named_buffers():
            if name.endswith("running_mean"):
                buf.add_(0.1)
    RwdetCheckpointer(det, save_dir=str(tmp_path)).save("model_final")
    final = str(tmp_path / "model_final.pth")
    backbone = load_model(final).eval()
    with torch.no_grad():
        want = det.backbone.bottom_up(x)
        got = stage_outputs(backbone, x)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="Detectron2 file: it holds no EMA"):
        load_model(final, weights="ema")


def test_prefixes_match_the_detectron2_package():
    from rwdet.d2.weights import BACKBONE_PREFIX, META_KEY

    assert artifact.D2_BACKBONE_PREFIX == BACKBONE_PREFIX and artifact.D2_META_KEY == META_KEY


def test_the_library_never_imports_the_application():
    """rwdet/ is the library; classification/ and tools/ are applications built on it."""
    offenders = []
    for path in (ROOT / "rwdet").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [
                f"{path.relative_to(ROOT)}: {n}"
                for n in names
                if n.split(".")[0] in ("classification", "tools")
            ]
    assert offenders == []
