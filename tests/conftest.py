import pytest
import torch

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly without CUDA (they still show up in the report as skipped)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
