"""Seeds and backend markers.

Markers: `gpu` tests skip without a CUDA device; `triton` tests skip unless Triton can run
(a CUDA device, or TRITON_INTERPRET=1 for the interpreter on CPU tensors).
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/harness.py

from harness import HAS_GPU, HAS_TRITON, TRITON_INTERPRET  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    no_triton = pytest.mark.skip(
        reason="needs Triton with a CUDA GPU, or TRITON_INTERPRET=1 for the interpreter"
        if HAS_TRITON else "needs the triton package (not installed)"
    )
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(no_gpu)
        if "triton" in item.keywords and not (HAS_TRITON and (HAS_GPU or TRITON_INTERPRET)):
            item.add_marker(no_triton)


