"""Test configuration: without a GPU, kernels run through the Triton interpreter, which must be
switched on before triton is first imported."""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` (the GPU lane) need CUDA with compiled kernels: skipped under the
    interpreter or without a device. ``pytest -m gpu tests`` runs the whole lane on a GPU machine."""
    import pytest

    if os.environ.get("TRITON_INTERPRET") != "1":
        import torch

        if torch.cuda.is_available():
            return
    skip = pytest.mark.skip(reason="GPU lane: needs a CUDA device with compiled Triton kernels")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
