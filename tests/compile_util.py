"""Ahead-of-time Triton compilation for a GPU target on a machine without a GPU.

Used by tests/test_compile.py. Two halves:

* the worker (`python tests/compile_util.py --worker`): a subprocess started WITHOUT
  TRITON_INTERPRET, so `@triton.jit` yields real JITFunctions. It answers JSON-line requests on
  stdin/stdout: import a kernel module, compile one kernel for sm_XX, report the resources.
* the client (`CompileWorker`), used in the pytest process.

Why a subprocess: tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported, and
`triton.jit` then returns InterpretedFunction objects for every kernel *and* every @triton.jit
helper they call (and the interpreter patches triton.language). Rebuilding a JITFunction from
`InterpretedFunction.fn` would still see the helpers as InterpretedFunctions in the module's
globals, so the code generator cannot inline them. A fresh interpreter with the variable unset
imports the kernel modules the way a GPU process does, with no dependence on interpreter internals.

How a kernel is compiled: through the JIT's own path, `kernel.warmup(*args, grid=..., **meta)`,
with a stand-in "active driver" that reports the requested GPUTarget. warmup() binds the
arguments, specializes them (i32/i64, 16-divisibility of ints and pointers, annotations,
do_not_specialize) and calls triton.compile exactly as a launch on that GPU would, but never loads
the binary. This keeps us off ASTSource's signature/constexprs format, which changed between
Triton releases (warmup's call form did not). Pointer arguments are given as torch dtypes (the JIT
wraps them in MockTensor: a 16-byte-aligned pointer, like a fresh torch allocation).

Each compile uses a fresh Triton cache directory, so ptxas really runs and its `-v` report
(registers, stack frame, spill stores/loads) is captured. The cubin is then read back with
`cuobjdump --dump-resource-usage` (REG/STACK/SHARED/LOCAL) and `cuobjdump --dump-sass` (HGMMA,
LDL/STL), and the PTX is grepped for wgmma.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback

# Largest dynamic shared memory one block may opt into, per compute capability (bytes).
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
CARD = {80: "A100 (sm_80)", 90: "H100 (sm_90)"}


# ----------------------------------------------------------------------------------------------
# tools
# ----------------------------------------------------------------------------------------------
def _triton_bin_dir() -> str | None:
    try:
        import importlib.util

        spec = importlib.util.find_spec("triton")
    except Exception:
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "backends", "nvidia", "bin")


def find_tool(name: str) -> str | None:
    """Path of ptxas / cuobjdump: Triton's env override, then the wheel's copy, then PATH."""
    env = os.environ.get(f"TRITON_{name.upper()}_PATH")
    if env and os.access(env, os.X_OK):
        return env
    d = _triton_bin_dir()
    if d and os.access(os.path.join(d, name), os.X_OK):
        return os.path.join(d, name)
    return shutil.which(name)


def missing_tools() -> str | None:
    """A reason to skip, or None when ptxas and cuobjdump are both there and run."""
    for name in ("ptxas", "cuobjdump"):
        path = find_tool(name)
        if path is None:
            return f"{name} not found (looked in triton/backends/nvidia/bin, $TRITON_{name.upper()}_PATH, PATH)"
        try:
            subprocess.run([path, "--version"], check=True, capture_output=True, timeout=60)
        except Exception as e:  # pragma: no cover - depends on the machine
            return f"{name} at {path} does not run: {e}"
    return None


# ----------------------------------------------------------------------------------------------
# parsing compiler reports
# ----------------------------------------------------------------------------------------------
_RES_LINE = re.compile(r"Function\s+(\S+?):?\s*\n\s*(REG:.*)")


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """`cuobjdump --dump-resource-usage` -> {function: {"REG":.., "STACK":.., "SHARED":.., "LOCAL":..}}."""
    out: dict[str, dict[str, int]] = {}
    for fn, fields in _RES_LINE.findall(text):
        out[fn] = {k: int(v) for k, v in re.findall(r"([A-Z_]+(?:\[\d+\])?):(\d+)", fields)}
    return out


def parse_ptxas_log(text: str) -> dict[str, int]:
    """ptxas -v -> registers, stack frame, spill stores/loads, static smem (sums over functions)."""
    res: dict[str, int] = {}

    def grab(key: str, pattern: str) -> None:
        vals = [int(v) for v in re.findall(pattern, text)]
        if vals:
            res[key] = max(vals) if key == "registers" else sum(vals)

    grab("registers", r"Used (\d+) registers")
    grab("stack_frame", r"(\d+) bytes stack frame")
    grab("spill_stores", r"(\d+) bytes spill stores")
    grab("spill_loads", r"(\d+) bytes spill loads")
    grab("static_smem", r"(\d+) bytes smem")
    return res


# ----------------------------------------------------------------------------------------------
# worker side
# ----------------------------------------------------------------------------------------------
class _AOTDriver:
    """Stands in for triton's active driver: enough for JITFunction.warmup to pick a target.

    The device id is the compute capability, so each target gets its own per-device JIT cache.
    Nothing here can load or launch a kernel (warmup never does)."""

    def __init__(self, target):
        self.target = target

    def is_active(self):
        return True

    def get_current_device(self):
        return self.target.arch

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def _decode(value):
    """JSON value -> warmup argument: {"ptr": "bfloat16", "offset": k} -> a MockTensor whose address is k mod 16."""
    if isinstance(value, dict) and "ptr" in value:
        import torch
        from triton.runtime.jit import MockTensor

        class _Ptr(MockTensor):
            # The JIT marks a pointer 16-divisible (vectorisable) when data_ptr() % 16 == 0.
            def __init__(self, dtype, offset):
                super().__init__(dtype)
                self._offset = offset

            def data_ptr(self):
                return 1 << 20 | self._offset

        return _Ptr(getattr(torch, value["ptr"]), int(value.get("offset", 0)))
    if isinstance(value, dict) and "float" in value:
        return float(value["float"])
    return value


def _compile(req: dict) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    t0 = time.perf_counter()
    mod = importlib.import_module(req["module"])
    kernel = getattr(mod, req["kernel"])
    if not hasattr(kernel, "warmup") or type(kernel).__name__ != "JITFunction":
        raise TypeError(f"{req['module']}.{req['kernel']} is a {type(kernel).__name__}, not a JITFunction")
    arch = int(req["arch"])
    target = GPUTarget("cuda", arch, 32)
    args = {k: _decode(v) for k, v in req["args"].items()}
    missing = [n for n in kernel.arg_names if n not in args]
    extra = [n for n in args if n not in kernel.arg_names]
    if missing or extra:
        raise TypeError(
            f"{req['kernel']} takes ({', '.join(kernel.arg_names)}); the test case lacks {missing} and has extra {extra}"
        )
    opts = {"num_warps": int(req["num_warps"]), "num_stages": int(req["num_stages"])}
    opts.update(req.get("options", {}))

    previous = driver.active if driver._active is not None else None
    driver.set_active(_AOTDriver(target))
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            ck = kernel.warmup(*[args[n] for n in kernel.arg_names], grid=(1,), **opts)
    finally:
        if previous is None:
            driver._active = None
        else:
            driver.set_active(previous)
        # keep the per-"device" cache from growing across requests
        kernel.device_caches.clear() if hasattr(kernel, "device_caches") else None
    if hasattr(ck, "result"):  # async-compile futures (newer triton)
        ck = ck.result()
    compile_s = time.perf_counter() - t0

    md = ck.metadata
    md_get = (lambda k, d=None: md.get(k, d)) if isinstance(md, dict) else (lambda k, d=None: getattr(md, k, d))
    ptx = ck.asm.get("ptx", "")
    cubin = ck.asm["cubin"]
    res = {
        "name": md_get("name", req["kernel"]),
        "arch": arch,
        "num_warps": md_get("num_warps"),
        "num_stages": md_get("num_stages"),
        "shared": int(md_get("shared", 0) or 0),
        "smem_limit": SMEM_LIMIT.get(arch),
        "ptx_wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),
        "ptx_mma": len(re.findall(r"\bmma\.sync", ptx)),
        "ptx_local": bool(re.search(r"\.local\b", ptx)),
        "compile_s": round(compile_s, 2),
        "triton": triton.__version__,
    }
    res["ptxas_version"] = _ptxas_version(arch)
    res["ptxas"] = parse_ptxas_log(log.getvalue())
    res["ptxas_log"] = "\n".join(line for line in log.getvalue().splitlines() if "ptxas" in line)[-2000:]

    cuobjdump = find_tool("cuobjdump")
    with tempfile.TemporaryDirectory() as td:
        path = os.path.join(td, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        ru = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True, timeout=120)
        if ru.returncode != 0:
            raise RuntimeError(f"cuobjdump --dump-resource-usage failed: {ru.stderr.strip()}")
        usage = parse_resource_usage(ru.stdout)
        sass = subprocess.run([cuobjdump, "--dump-sass", path], capture_output=True, text=True, timeout=120)
        if sass.returncode != 0:
            raise RuntimeError(f"cuobjdump --dump-sass failed: {sass.stderr.strip()}")
    if not usage:
        raise RuntimeError(f"could not parse cuobjdump --dump-resource-usage output:\n{ru.stdout[:2000]}")
    # the kernel is the function named in metadata; fall back to the only one
    fn = usage.get(res["name"]) or next(iter(usage.values()))
    res["cuobjdump"] = fn
    res["sass_hgmma"] = len(re.findall(r"\bHGMMA\b", sass.stdout))
    res["sass_hmma"] = len(re.findall(r"\bHMMA\b", sass.stdout))
    res["sass_ldl_stl"] = len(re.findall(r"\b(?:LDL|STL)(?:\.\w+)*\b", sass.stdout))
    return res


def _ptxas_version(arch: int) -> str:
    """Release of the ptxas Triton used for this arch (triton >= 3.5 uses a newer one for sm_90+)."""
    try:
        from triton.backends.nvidia import compiler as nv

        tool = nv.get_ptxas(arch) if hasattr(nv, "get_ptxas") else None
        if tool is None:
            from triton import knobs

            tool = knobs.nvidia.ptxas
        return str(tool.version)
    except Exception:
        return "?"


def worker_main() -> int:
    """Serve JSON-line requests: one compile each, answered with {"ok": .., "result"/"error": ..}."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print(json.dumps({"ok": False, "error": "worker started with TRITON_INTERPRET set"}), flush=True)
        return 2
    out = sys.stdout
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            ans = {"ok": True, "result": _compile(req)}
        except BaseException as e:  # report everything: compile errors are the finding
            tb = traceback.format_exc()
            ans = {"ok": False, "error": f"{type(e).__name__}: {e}"[:6000], "traceback": tb[-6000:]}
        out.write(json.dumps(ans) + "\n")
        out.flush()
    return 0


# ----------------------------------------------------------------------------------------------
# client side
# ----------------------------------------------------------------------------------------------
class CompileError(RuntimeError):
    pass


class CompileWorker:
    """One long-lived worker subprocess; `compile(request)` returns the result dict or raises."""

    def __init__(self, repo_root: str, timeout_s: float = 240.0):
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        self._cache = tempfile.mkdtemp(prefix="fastsolar-aot-")
        env["TRITON_CACHE_DIR"] = self._cache  # fresh: ptxas runs and reports every time
        env["TRITON_DUMP_PTXAS_LOG"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(__file__), repo_root, env.get("PYTHONPATH")) if p)
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=repo_root,
            env=env,
        )
        self._stderr: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self._proc.stderr:
            self._stderr.append(line)
            del self._stderr[:-200]

    def compile(self, request: dict) -> dict:
        with self._lock:
            if self._proc.poll() is not None:
                raise CompileError(f"compile worker exited ({self._proc.returncode}):\n{''.join(self._stderr)[-4000:]}")
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
            answer: list[str] = []
            reader = threading.Thread(target=lambda: answer.append(self._proc.stdout.readline()), daemon=True)
            reader.start()
            reader.join(self.timeout_s)
            if not answer:
                self.close()
                raise CompileError(f"compile of {request.get('kernel')} took over {self.timeout_s:.0f} s")
            if not answer[0]:
                raise CompileError(f"compile worker died:\n{''.join(self._stderr)[-4000:]}")
        ans = json.loads(answer[0])
        if not ans["ok"]:
            raise CompileError(ans["error"] + "\n" + ans.get("traceback", ""))
        return ans["result"]

    def close(self):
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        shutil.rmtree(self._cache, ignore_errors=True)


def ptr(dtype: str, offset: int = 0) -> dict:
    """A pointer argument of the given torch dtype name (bfloat16, float16, float32, int32, ...) whose
    address is `offset` mod 16 (0: 16-byte aligned, as a fresh allocation)."""
    return {"ptr": dtype, "offset": offset}


def resource_problems(res: dict) -> list[str]:
    """Everything about one compiled kernel that should fail the check, in words."""
    probs = []
    cu, px = res["cuobjdump"], res["ptxas"]
    if cu.get("STACK", 0) > 0 or cu.get("LOCAL", 0) > 0:
        probs.append(f"local memory: cuobjdump STACK={cu.get('STACK', 0)} LOCAL={cu.get('LOCAL', 0)}")
    if px.get("spill_stores", 0) > 0 or px.get("spill_loads", 0) > 0:
        probs.append(f"register spills: ptxas {px.get('spill_stores')} B spill stores, {px.get('spill_loads')} B spill loads")
    if px.get("stack_frame", 0) > 0:
        probs.append(f"ptxas stack frame {px['stack_frame']} B")
    if res["sass_ldl_stl"]:
        probs.append(f"{res['sass_ldl_stl']} LDL/STL instructions in SASS")
    if res["smem_limit"] is not None and res["shared"] > res["smem_limit"]:
        probs.append(f"shared memory {res['shared']} B > {res['smem_limit']} B limit of sm_{res['arch']}")
    if "registers" in px and cu.get("REG") is not None and px["registers"] != cu["REG"]:
        probs.append(f"ptxas reports {px['registers']} registers but cuobjdump {cu['REG']}")
    return probs


def summary(res: dict) -> str:
    cu, px = res["cuobjdump"], res["ptxas"]
    return (
        f"{res['name']} sm_{res['arch']} w{res['num_warps']} s{res['num_stages']}: regs {cu.get('REG')} "
        f"(ptxas {px.get('registers')}), spills {px.get('spill_stores', '?')}/{px.get('spill_loads', '?')} B, "
        f"stack {cu.get('STACK')} local {cu.get('LOCAL')}, smem {res['shared']} B, "
        f"wgmma ptx {res['ptx_wgmma']} / HGMMA sass {res['sass_hgmma']}, HMMA {res['sass_hmma']}, "
        f"ptxas {res.get('ptxas_version', '?')}, {res['compile_s']} s"
    )


# ----------------------------------------------------------------------------------------------
# toy kernels that validate the harness itself (compiled by test_compile.py's harness tests)
# ----------------------------------------------------------------------------------------------
import triton  # noqa: E402  (imported late so `--help`/tool lookups above never need it)
import triton.language as tl  # noqa: E402


@triton.jit
def _toy_scale_kernel(x_ptr, y_ptr, n_cols, stride, scale, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride + cols, (x * scale).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _toy_matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * N + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.exit(worker_main())
    print(__doc__)
