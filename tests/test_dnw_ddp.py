"""DDP over gloo with learned wirings: no unused parameters while the chosen edges change."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from rwdet.models import build_model

MODELS = [
    ("randwire_small", dict(channels=8, nodes=8, wiring="dnw", stem="small"), 50.0),
    ("randwire_small", dict(channels=8, nodes=8, wiring="popup", stem="small"), 50.0),
    ("mobilenetv1_dnw_small_x0225", dict(node_multiplier=0.25), 2.0),
]


def _masks(model):
    return [m.kept_mask().clone() for m in model.modules() if hasattr(m, "kept_mask")]


def _worker(rank, world, init_file, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name, kw, lr in MODELS:
            torch.manual_seed(0)  # same initial model on every rank
            model = build_model(name, num_classes=10, **kw)
            start = _masks(model)
            # find_unused_parameters=False: DDP raises if any parameter misses its gradient.
            ddp = DDP(model, find_unused_parameters=False)
            opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=lr)
            gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
            for _ in range(3):
                x, y = (
                    torch.randn(4, 3, 32, 32, generator=gen),
                    torch.randint(0, 10, (4,), generator=gen),
                )
                opt.zero_grad()
                nn.functional.cross_entropy(ddp(x), y).backward()
                opt.step()
            flat = torch.cat([p.detach().flatten() for p in model.parameters()])
            gathered = [torch.zeros_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            moved = any(not torch.equal(a, b) for a, b in zip(start, _masks(model)))
            results[(rank, name, kw.get("wiring"))] = (torch.equal(gathered[0], gathered[1]), moved)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_trains_learned_wirings_without_unused_parameters(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, str(tmp_path / "store"), results), nprocs=2, join=True)
        results = dict(results)
    assert len(results) == 2 * len(MODELS)
    for key, (same_on_ranks, moved) in results.items():
        assert same_on_ranks, key  # gradients were averaged: replicas stay identical
        assert moved, key  # and the chosen edges did change during those steps
