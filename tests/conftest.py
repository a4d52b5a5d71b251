"""Suite-wide setup.

Without CUDA the Triton kernels run under the Triton interpreter, which must be switched on
before triton is first imported; this file is loaded by pytest before any test module.
"""
import importlib.util
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET could be set"
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # lets tests import helpers.py


@pytest.fixture(scope="session")
def serve_checkpoint(tmp_path_factory):
    """A tiny random Llama checkpoint with a sentencepiece tokenizer.model beside it, the model's vocabulary
    the tokenizer's (so every generated id decodes): what the server tests serve."""
    import hf_fixtures
    import sentencepiece as spm

    path = os.path.join(os.path.dirname(__file__), "data", "make_tokenizer.py")
    spec = importlib.util.spec_from_file_location("make_tokenizer", path)
    make_tokenizer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_tokenizer)
    d = tmp_path_factory.mktemp("serve_ckpt")
    make_tokenizer.train_tokenizer(d)
    vocab = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model")).GetPieceSize()
    hf_fixtures.save(hf_fixtures.build_hf_model(vocab_size=vocab, seed=3), d, max_shard_size="10MB")
    return d
