"""No file of the project is taken for another distribution's top-level module, however the project is run.

The repo has a top-level kernels/ folder (the Triton sources, installed as `fastsolar.kernels`), and `kernels` is
also the top-level name of Hugging Face's `kernels` distribution, which transformers >= 5.25 requires and imports.
`python -c` or a REPL in the repo root puts the root first on sys.path, and `python bench/x.py` puts bench/ first:
whatever those folders hold by another distribution's name shadows it there.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.cpu_only

# A transformers Llama model built and run: transformers imports the Hub `kernels` package while it builds one.
BUILD_LLAMA = textwrap.dedent("""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96)
    logits = LlamaForCausalLM(config)(torch.arange(5)[None]).logits
    import kernels
    print(kernels.__file__, tuple(logits.shape))
""")


def _python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env={**environ, **env}, capture_output=True,
                          text=True, timeout=300)


def _hub_kernels() -> Path:
    """The Hub package's __init__.py, or a skip where it is not installed."""
    try:
        return Path(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")).resolve()
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's `kernels` distribution is not installed (transformers >= 5.25 brings it)")


@pytest.mark.parametrize("where", [".", "bench"], ids=["repo-root", "bench"])
def test_transformers_builds_llama_with_the_hub_kernels_package_from(where):
    hub = _hub_kernels()
    done = _python(BUILD_LLAMA, ROOT / where)
    assert done.returncode == 0, done.stderr[-3000:]
    found, shape = done.stdout.split(" ", 1)
    assert Path(found).resolve() == hub
    assert shape.strip() == "(1, 5, 96)"


def test_bench_runs_the_transformers_engine_with_the_hub_kernels_package(tmp_path):
    _hub_kernels()
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "bench" / "run.py"), "--preset", "tiny", "--engines", "hf-eager",
           "--batch-sizes", "1", "--new-tokens", "2", "--prompt-len", "4", "--repeats", "1", "--json", str(out)]
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    done = subprocess.run(cmd, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    engine = json.loads(out.read_text())["engines"]["hf-eager"]
    assert engine["status"] == "ok", engine


def test_bare_kernels_import_in_the_repo_root_reaches_the_distribution_of_that_name(tmp_path):
    """Whatever package named `kernels` the rest of sys.path holds is the one a bare import gives, not our folder
    (and triton stays unimported): a stand-in on PYTHONPATH, so this holds with or without the Hub package."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("STAND_IN = True\nfrom . import sub\n")
    (tmp_path / "kernels" / "sub.py").write_text("VALUE = 7\n")
    code = ("import sys, kernels; print(kernels.STAND_IN, kernels.sub.VALUE, kernels.__file__, "
            "'triton' in sys.modules)")
    done = _python(code, ROOT, PYTHONPATH=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", "7", str(tmp_path / "kernels" / "__init__.py"), "False"]


# sys.path without the entries that hold a `kernels` other than ours: as on a machine without the Hub package.
WITHOUT_HUB_KERNELS = textwrap.dedent("""
    import os, sys
    sys.path[:] = [p for p in sys.path if not p or not os.path.exists(os.path.join(p, "kernels"))
                   or os.path.abspath(p) == os.getcwd()]
""")


def test_bare_kernels_import_in_the_repo_root_without_that_distribution_is_an_empty_namespace():
    """As a folder without __init__.py would be: nothing exported, no __file__, no version, triton unimported."""
    code = WITHOUT_HUB_KERNELS + textwrap.dedent("""
        import kernels
        public = [n for n in vars(kernels) if not n.startswith("_")]
        print(public, getattr(kernels, "__file__", None), hasattr(kernels, "__version__"), "triton" in sys.modules)
    """)
    done = _python(code, ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[0] == "[] None False False"


def test_transformers_probe_in_the_repo_root_without_that_distribution_says_not_installed():
    """transformers < 5.25 (which does not require the Hub package) imports `kernels` when find_spec finds our folder:
    it must then read "not installed", not fail."""
    try:
        importlib.metadata.version("kernels")
        pytest.skip("the Hub `kernels` package is installed (transformers >= 5.25 requires it and cannot run without)")
    except importlib.metadata.PackageNotFoundError:
        pass
    code = WITHOUT_HUB_KERNELS + textwrap.dedent("""
        from transformers.utils.import_utils import is_kernels_available
        from transformers import LlamaConfig
        print(is_kernels_available(), LlamaConfig.__name__)
    """)
    done = _python(code, ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["False", "LlamaConfig"]


def test_no_script_or_test_module_takes_an_installed_distributions_name():
    """bench/ and tests/ go first on sys.path when their scripts run: none of their modules may be named like a
    top-level module of an installed distribution (kernels/ in the root is handled by its __init__, above)."""
    taken = importlib.metadata.packages_distributions()
    ours = {p.stem: p for folder in ("bench", "tests") for p in (ROOT / folder).glob("*.py")}
    ours.update({p.name: p for p in ROOT.iterdir() if (p / "__init__.py").exists() and p.name != "kernels"})
    clashes = {name: (str(path.relative_to(ROOT)), taken[name]) for name, path in ours.items()
               if name in taken and name != "fastsolar"}
    assert not clashes, f"these files take the names of installed distributions' modules: {clashes}"
