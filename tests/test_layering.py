"""Imports flow one way (docs/ARCHITECTURE.md, "Layers"): read from the source with `ast`, every import of a
fastsolar module, at module level or inside a function, goes to a lower layer or stays inside its own group, and
no group of modules imports itself in a cycle. `import fastsolar` and `fastsolar --help` load neither torch nor
triton."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cpu_only

ROOT = Path(__file__).resolve().parents[1]

#: Bottom to top. A module may import from its own group and from groups in lower layers, never from a group in
#: its own layer (siblings) or above. `kernels/` is imported as fastsolar.kernels.
LAYERS: list[tuple[str, ...]] = [
    ("config", "versions", "devices", "memory"),
    ("kernels",),
    ("ops",),
    ("model",),
    ("checkpoint", "decoding", "text"),
    ("hf", "parallel"),
    ("api", "serve"),
    ("pipelines",),
    ("cli",),
    ("__main__", "__init__"),
]
LAYER_OF = {group: i for i, groups in enumerate(LAYERS) for group in groups}


def _sources() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (kernels/ included)."""
    found = {}
    for base, prefix in ((ROOT / "fastsolar", "fastsolar"), (ROOT / "kernels", "fastsolar.kernels")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([prefix, *parts])] = path
    return found


def _group(module: str) -> str:
    """fastsolar.decoding.generate -> decoding; fastsolar.cli -> cli; fastsolar -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(module: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported fastsolar module, line) for every import statement in the file, wherever it is."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            # `from pkg import name` imports pkg.name when that is a module, else pkg itself.
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
        else:
            continue
        out += [(t, node.lineno) for t in targets if t == "fastsolar" or t.startswith("fastsolar.")]
    return out


def _graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, int]]]]:
    sources = _sources()
    known = set(sources)
    return sources, {m: _imports(m, p, known) for m, p in sources.items()}


def test_every_group_has_a_layer():
    groups = {_group(m) for m in _sources()}
    assert groups <= set(LAYER_OF), f"declare a layer for {sorted(groups - set(LAYER_OF))}"


def test_imports_flow_downwards():
    sources, graph = _graph()
    wrong = []
    for module, imports in graph.items():
        here = _group(module)
        for target, line in imports:
            there = _group(target)
            if there != here and LAYER_OF[there] >= LAYER_OF[here]:
                where = f"{sources[module].relative_to(ROOT)}:{line}"
                wrong.append(f"{where}: {module} ({here}, layer {LAYER_OF[here]}) imports {target} "
                             f"({there}, layer {LAYER_OF[there]})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_import_cycles():
    _, graph = _graph()
    edges = {m: sorted({t for t, _ in imports if t in graph and t != m}) for m, imports in graph.items()}
    # A package's __init__ that re-exports its own modules is not a cycle with them: drop child -> parent edges.
    edges = {m: [t for t in ts if not m.startswith(t + ".")] for m, ts in edges.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in edges[m]:
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_every_package_is_installed():
    """pyproject's explicit package list names every package of the tree: a wheel (a non-editable install)
    otherwise ships without it, which the editable installs of the tests would never show."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"fastsolar." + ".".join(p.parent.relative_to(ROOT / "fastsolar").parts) if p.parent != ROOT / "fastsolar"
             else "fastsolar" for p in (ROOT / "fastsolar").rglob("__init__.py")} | {"fastsolar.kernels"}
    assert found == listed, f"in the tree, not in pyproject: {sorted(found - listed)}; listed, absent: {sorted(listed - found)}"


def test_layering_check_sees_function_level_and_relative_imports(tmp_path):
    """The checker itself: an upward import inside a function and a relative one are both found."""
    pkg = tmp_path / "fastsolar"
    (pkg / "model").mkdir(parents=True)
    (pkg / "model" / "m.py").write_text("def f():\n    from fastsolar.decoding import g\n    from ..serve import s\n")
    known = {"fastsolar.decoding", "fastsolar.decoding.g", "fastsolar.serve", "fastsolar.serve.s"}
    found = _imports("fastsolar.model.m", pkg / "model" / "m.py", known)
    assert found == [("fastsolar.decoding.g", 2), ("fastsolar.serve.s", 3)]


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env,
                          cwd=ROOT)


def test_import_fastsolar_loads_neither_torch_nor_triton():
    r = _run("import sys, fastsolar; print(sorted(m for m in ('torch', 'triton') if m in sys.modules)); "
             "fastsolar.SolarConfig; print(sorted(m for m in ('torch', 'triton') if m in sys.modules))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["[]", "[]"], r.stdout
    r = _run("import sys, fastsolar; fastsolar.Solar; print('torch' in sys.modules)")
    assert r.returncode == 0 and r.stdout.strip() == "True", (r.stdout, r.stderr)


def test_cli_help_answers_without_torch():
    """`fastsolar --help` parses its arguments before anything imports torch (which takes seconds to load), so it
    answers at once; its time is not asserted here (speed lives in benchmarks), what makes it fast is."""
    r = _run("import sys\nfrom fastsolar.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print('LOADED', 'torch' in sys.modules, 'triton' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert "generate" in r.stdout and "serve" in r.stdout, r.stdout
    assert r.stdout.strip().splitlines()[-1] == "LOADED False False", r.stdout
