"""Suite-wide setup.

Without CUDA the Triton kernels run under the Triton interpreter, which must be switched on
before triton is first imported; this file is loaded by pytest before any test module.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET could be set"
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # lets tests import helpers.py
