import pytest
import torch

# Test tensors are tiny: one intra-op thread beats two (thread start-up dominates, and the
# other core stays free for the subprocesses of the DDP and CLI tests).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly without CUDA (they still show up in the report as skipped)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
