"""Test configuration: without a GPU, kernels run through the Triton interpreter, which must be
switched on before triton is first imported."""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
