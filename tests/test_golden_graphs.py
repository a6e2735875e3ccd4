"""Golden graphs: any change to a generator, to the DAG rule or to stage seeding fails here.

``tests/data/golden_graphs.json`` pins the edge lists of ER(0.2), BA(5) and WS(4, 0.75) at
N = 32 for seeds 1-5 (the paper's generator settings and seeds), and the fingerprints of every
registered model's stage graphs at graph seed 1. The file was written by this module from the
generators as verified against the paper; a deliberate change to a generator rewrites it with

    RWDET_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden_graphs.py

and says why in its commit (checkpoints keep working: they carry their graphs as edge lists).
"""

import hashlib
import json
import os

import pytest
import torch

from rwdet.graphs import graphs_fingerprint, random_dag
from rwdet.models import build_model, list_models
from rwdet.models.verify import spec_graphs

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden_graphs.json")
GENERATORS = {"er": {"p": 0.2}, "ba": {"m": 5}, "ws": {"k": 4, "p": 0.75}}
SEEDS = (1, 2, 3, 4, 5)
RANDWIRE = ("randwire_small", "randwire_c109", "randwire_c154")


def generator_graphs() -> dict:
    return {
        f"{gen}-n32-seed{seed}": sorted(map(list, random_dag(gen, 32, seed, **params).edges))
        for gen, params in GENERATORS.items()
        for seed in SEEDS
    }


def _mask_fingerprint(model: torch.nn.Module) -> str:
    """MobileNet's random graphs are fixed masks (buffers), not GraphStages: hash their bits."""
    h = hashlib.sha256()
    for name, buf in sorted(model.named_buffers()):
        if name.endswith("mask"):
            h.update(name.encode() + bytes(buf.bool().flatten().tolist()))
    return h.hexdigest()[:16]


def model_graphs() -> dict:
    out = {}
    for name in RANDWIRE:
        for gen in GENERATORS:
            for wiring in ("static", "dnw"):
                if wiring == "dnw" and gen != "ws":
                    continue  # DNW's candidate set is the complete DAG whatever the generator
                spec = {"name": name, "kwargs": {"gen": gen, "seed": 1, "wiring": wiring}}
                out[f"{name}-{gen}-{wiring}-seed1"] = graphs_fingerprint(spec_graphs(spec))
    for name in list_models():
        if name.startswith("mobilenetv1_rg"):
            out[f"{name}-seed1"] = _mask_fingerprint(build_model(name, seed=1))
    return out


def current() -> dict:
    return {"generators": generator_graphs(), "models": model_graphs()}


def _dumps(golden: dict) -> str:
    lines = []
    for section in ("generators", "models"):
        items = sorted(golden[section].items())
        body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in items)
        lines.append(f"{json.dumps(section)}: {{\n{body}\n}}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def test_golden_graphs_are_unchanged():
    now = current()
    if os.environ.get("RWDET_UPDATE_GOLDEN") == "1":
        with open(GOLDEN, "w") as f:  # one graph per line: a change reads as a one-line diff
            f.write(_dumps(now))
        pytest.skip(f"rewrote {GOLDEN}")
    with open(GOLDEN) as f:
        golden = json.load(f)
    changed = [k for k in golden["generators"] if golden["generators"][k] != now["generators"][k]]
    assert not changed, f"generator graphs changed: {changed}"
    changed = [k for k in golden["models"] if golden["models"][k] != now["models"].get(k)]
    assert not changed, f"model stage graphs changed: {changed}"
    assert set(now["models"]) == set(golden["models"]), "models added or removed: update golden"


def test_golden_file_covers_what_the_docstring_promises():
    with open(GOLDEN) as f:
        golden = json.load(f)
    assert len(golden["generators"]) == 15
    edges = {k: len(v) for k, v in golden["generators"].items()}
    assert all(edges[f"ws-n32-seed{s}"] == 32 * 4 // 2 for s in SEEDS)  # N*K/2
    assert all(edges[f"ba-n32-seed{s}"] == 5 * (32 - 5) for s in SEEDS)  # M*(N-M)
    assert {k.split("-")[0] for k in golden["models"]} >= {*RANDWIRE, "mobilenetv1_rg_x0225"}
