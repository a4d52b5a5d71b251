"""Suite-wide setup: the Triton interpreter on a CPU, the test markers, and an environment guard.

Without CUDA the Triton kernels run under the Triton interpreter, which must be switched on before
triton is first imported; this file is loaded by pytest before any test module.

Markers (registered in pyproject.toml). Every test file follows this convention, new ones too:

- `@pytest.mark.gpu`: the test needs CUDA (graph capture, bf16 `tl.dot`, shapes too large for the
  interpreter, host-sync detection, ...). Never a `skipif(not torch.cuda.is_available())`: this file skips
  gpu tests without CUDA, with the reason given as the marker's argument, `@pytest.mark.gpu("why")`, or a
  default one. `pytest -m gpu` selects exactly the CUDA-only tests (bench/gpu_check.sh runs them first).
- `pytestmark = pytest.mark.cpu_only` (a whole file) or `@pytest.mark.cpu_only`: the test exercises no
  device code, so a GPU adds nothing (tokenizer, loader, config, CLI, ahead-of-time compile, CPU benchmark
  runs, ...). It still runs everywhere by default; bench/gpu_check.sh deselects it (`-m "not cpu_only"`) to
  spend the lent GPU's minutes on what only a GPU can check.
- Neither: the test runs on the test device (`helpers.DEVICE`): compiled kernels on CUDA, the interpreter
  on a CPU. Such tests build their tensors and models on `helpers.DEVICE`.

Shared helpers: helpers.py (`assert_close`, `randn`, `DEVICE`) and hf_fixtures.py (small random transformers
checkpoints; `real_tokenizer_path()`, the real Mistral-7B / SOLAR tokenizer.model from the mistral-common package).

Guard: Triton's interpreter up to 3.6 cannot run loop kernels with numpy >= 2.4 (fastsolar.versions). In that
environment such tests are reported as skipped with the reason, instead of failing with numpy's
"only 0-dimensional arrays can be converted to Python scalars"; any other failure still fails.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET could be set"
    os.environ.setdefault("TRITON_INTERPRET", "1")
# transformers >= 5.25 swaps in Hugging Face Hub kernels in from_pretrained by default (a download, and not
# the reference); the suite compares against transformers' own torch code.
os.environ.setdefault("USE_HUB_KERNELS", "0")

sys.path.insert(0, os.path.dirname(__file__))  # lets tests import helpers.py

from fastsolar import versions  # noqa: E402

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
_INTERPRETER_CONFLICT = versions.interpreter_numpy_conflict() if INTERPRETER else None
GPU_SKIP_REASON = "CUDA-only test (@pytest.mark.gpu) and no CUDA device here"


def pytest_report_header(config: pytest.Config) -> list[str]:
    found = {name: versions.installed_version(name) for name in ("torch", "triton", "numpy", "transformers")}
    lines = [
        "fastsolar: " + ", ".join(f"{k} {v}" for k, v in found.items()),
        "fastsolar: " + ("CUDA: " + torch.cuda.get_device_name(0) if CUDA else "no CUDA: kernels run under the Triton "
                         "interpreter, @pytest.mark.gpu tests skip"),
    ]
    if _INTERPRETER_CONFLICT:
        lines.append(f"fastsolar: WARNING {_INTERPRETER_CONFLICT}; tests hitting it are reported as skipped")
    return lines


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--graphs-first", action="store_true",
                     help="run tests whose id mentions CUDA graphs first (bench/gpu_check.sh: the riskiest first)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not CUDA:
        for item in items:
            marker = item.get_closest_marker("gpu")
            if marker is not None:
                why = marker.args[0] if marker.args else marker.kwargs.get("reason")
                item.add_marker(pytest.mark.skip(reason=f"{GPU_SKIP_REASON}: {why}" if why else GPU_SKIP_REASON))
    if config.getoption("--graphs-first"):
        items.sort(key=lambda item: "graph" not in item.nodeid.lower())  # stable: the rest keep their order


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    if _INTERPRETER_CONFLICT is None or call.excinfo is None:
        return
    report = outcome.get_result()
    if report.failed and _caused_by_interpreter_conflict(call.excinfo.value):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {_INTERPRETER_CONFLICT}")


def _caused_by_interpreter_conflict(exc: BaseException | None) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if versions.INTERPRETER_NUMPY_ERROR in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


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


@pytest.fixture(autouse=True)
def _sys_path_unchanged():
    """Every test leaves sys.path as it found it: a folder left on it decides what later tests import (bench/ on it
    once made every later `import kernels` find bench/kernels.py instead of the Hugging Face package)."""
    before = list(sys.path)
    yield
    assert sys.path == before, f"the test left sys.path changed: {[p for p in sys.path if p not in before]} added"


@pytest.fixture
def bench_script():
    """Loads a bench/ script as the module `bench_<name>`, with bench/ first on sys.path as `python bench/x.py` has it
    (the scripts import their siblings: common, engines, load); afterwards sys.path and sys.modules are as they were."""
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    path, modules = list(sys.path), set(sys.modules)
    sys.path.insert(0, bench)

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(bench, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module

    yield load
    sys.path[:] = path
    for name in set(sys.modules) - modules:
        if name.startswith("bench_") or os.path.dirname(getattr(sys.modules[name], "__file__", None) or "") == bench:
            del sys.modules[name]


@pytest.fixture
def one_gpu(monkeypatch):
    """As on a machine with exactly one visible GPU, cuda:0, for code that checks devices without using them."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
