"""Ahead-of-time compile check of every Triton kernel for A100 (sm_80) and H100 (sm_90), no GPU needed.

For each op at SOLAR's shapes (hidden 4096, 32/8 heads, head_dim 128, intermediate 14336), each
target and each of bf16/fp16, the op's launcher is called once with tensors laid out as the model
lays them out (q/k/v as views of the fused qkv projection, gate/up as halves of gate_up), with its
Triton kernels swapped for recorders and its `*_launch_config` functions told the target's compute
capability and SM count (A100: 8.0, 108 SMs; H100: 9.0, 132 SMs). That captures exactly the
arguments, constexprs, warps and stages a launch on that GPU would use; every launch must use what
a launch-config function returned (see docs/ARCHITECTURE.md). Each captured kernel is then
compiled for the target by a worker subprocess (compile_util.py says why a subprocess, and how).
A compile fails the test on:

* a compile error (frontend, LLVM or ptxas);
* register spills or local memory: ptxas' spill stores/loads and stack frame, cuobjdump's
  STACK/LOCAL, and LDL/STL in the SASS must all be 0;
* dynamic shared memory (`metadata.shared`) above the card's opt-in limit:
  166912 B on A100 (sm_80), 232448 B on H100 (sm_90);
* prefill attention on sm_90 without Hopper matrix instructions (`wgmma` in the PTX and
  `HGMMA` in the SASS).

The weight-only quantised matmul is compiled for int8 weights on both targets and for FP8 (e4m3) weights
on sm_90 only: FP8 needs sm_89+, and fastsolar.model.quant refuses it on an A100. Packed int4 weights (group 128)
take both the decode GEMV and the prefill GEMM on both targets.

Set FASTSOLAR_COMPILE_REPORT=path to get a markdown table of every compile's numbers.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import re
from typing import Callable

import compile_util as cu
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = (80, 90)
NUM_SMS = {80: 108, 90: 132}  # A100 SXM, H100 SXM
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# SOLAR-10.7B
HIDDEN, N_HEADS, N_KV, HEAD_DIM, INTER = 4096, 32, 8, 128, 14336
EPS, THETA = 1e-5, 10000.0

_SKIP = cu.missing_tools()
pytestmark = [
    pytest.mark.skipif(_SKIP is not None, reason=f"AOT compile check needs the CUDA tools: {_SKIP}"),
    pytest.mark.cpu_only,  # compiles ahead of time, runs nothing on a device: bench/gpu_check.sh deselects it
]

_HOST = "cuda" if torch.cuda.is_available() else "cpu"
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


# ----------------------------------------------------------------------------------------------
# capturing what a launcher launches
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Launch:
    kernel: str  # attribute name in the module
    arg_names: list[str]
    args: dict  # name -> python value / torch.Tensor
    meta: dict  # num_warps, num_stages (and any other launch option)


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kw)` records instead of running."""

    def __init__(self, name: str, kernel, sink: list):
        self.name, self.kernel, self.sink = name, kernel, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            names = list(self.kernel.arg_names)
            meta = {k: kwargs.pop(k) for k in list(kwargs) if k not in names}
            # JITFunction and InterpretedFunction both keep the Python function as .fn
            bound = inspect.signature(self.kernel.fn).bind(*args, **kwargs)
            bound.apply_defaults()
            self.sink.append(Launch(self.name, names, dict(bound.arguments), meta))

        return launch


def capture(module, call: Callable[[], object], arch: int) -> tuple[list[Launch], list[dict]]:
    """Run `call()` with every Triton kernel of `module` replaced by a recorder, and every
    `*_launch_config` function answering for the target GPU: its `capability` / `num_sms`
    arguments, if it has them, are replaced by the target's. Returns the launches and the configs
    the launch-config functions returned."""
    sink: list[Launch] = []
    configs: list[dict] = []
    kernels = {n: v for n, v in vars(module).items() if hasattr(v, "arg_names") and hasattr(v, "__getitem__")}
    with pytest.MonkeyPatch.context() as mp:
        for name, k in kernels.items():
            mp.setattr(module, name, _Recorder(name, k, sink))
        for name, fn in list(vars(module).items()):
            if name.endswith("_launch_config") and callable(fn):
                mp.setattr(module, name, _for_target(fn, arch, configs))
        call()
    return sink, configs


def _for_target(fn, arch: int, configs: list):
    sig = inspect.signature(fn)

    def wrapped(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        if "capability" in bound.arguments:
            bound.arguments["capability"] = divmod(arch, 10)
        if "num_sms" in bound.arguments:
            bound.arguments["num_sms"] = NUM_SMS[arch]
        cfg = fn(*bound.args, **bound.kwargs)
        configs.append(dict(cfg))
        return cfg

    return wrapped


def _encode(value):
    if isinstance(value, torch.Tensor):
        return cu.ptr(str(value.dtype).replace("torch.", ""), value.data_ptr() % 16)
    if isinstance(value, float):
        return {"float": value}
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    raise TypeError(f"cannot encode kernel argument {value!r} of type {type(value).__name__}")


# ----------------------------------------------------------------------------------------------
# the cases: SOLAR shapes, inputs laid out as fastsolar/model.py lays them out
# ----------------------------------------------------------------------------------------------
def _t(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device=_HOST)  # never run: contents do not matter


def _qkv(b, s, dtype):
    qkv = _t(b, s, N_HEADS + 2 * N_KV, HEAD_DIM, dtype=dtype)
    return qkv.split([N_HEADS, N_KV, N_KV], dim=2)


def _run_rms_norm(K, dtype):
    K.rms_norm(_t(16, HIDDEN, dtype=dtype), _t(HIDDEN, dtype=dtype), EPS)


def _run_add_rms_norm(K, dtype):
    K.add_rms_norm(_t(16, HIDDEN, dtype=dtype), _t(16, HIDDEN, dtype=dtype), _t(HIDDEN, dtype=dtype), EPS)


def _run_swiglu_fused(K, dtype):  # prefill: gate/up are the two halves of the gate_up projection
    gate, up = _t(16, 2 * INTER, dtype=dtype).split(INTER, dim=-1)
    K.swiglu(gate, up)


def _run_swiglu_flat(K, dtype):  # decode (one row) or contiguous inputs
    K.swiglu(_t(1, INTER, dtype=dtype), _t(1, INTER, dtype=dtype))


def _run_rotary(K, dtype):
    q, k, _ = _qkv(1, 512, dtype)
    pos = torch.arange(512, device=_HOST, dtype=torch.int64)[None]
    K.apply_rotary(q, k, pos, THETA)


def _run_rotary_cache(batch, seq, mapped):
    def run(K, dtype):
        q, k, v = _qkv(batch, seq, dtype)
        kc, vc = _t(16, 4096, N_KV, HEAD_DIM, dtype=dtype), _t(16, 4096, N_KV, HEAD_DIM, dtype=dtype)
        pos = torch.zeros(batch, seq, device=_HOST, dtype=torch.int64)
        rows = torch.arange(batch, device=_HOST) if mapped else None
        K.rotary_cache_write(q, k, v, pos, THETA, kc, vc, rows=rows)

    return run


def _run_attention(K, dtype):
    _, _, v = _qkv(1, 4096, dtype)  # q, k come out of apply_rotary contiguous; v is a qkv view
    q, k = _t(1, 4096, N_HEADS, HEAD_DIM, dtype=dtype), _t(1, 4096, N_KV, HEAD_DIM, dtype=dtype)
    K.attention(q, k, v, causal=True)


def _run_decode(batch, mapped=False):
    def run(K, dtype):
        max_seq = 4096
        q = _t(batch, N_HEADS, HEAD_DIM, dtype=dtype)
        cache_rows = 16 if mapped else batch
        kc, vc = (_t(cache_rows, max_seq, N_KV, HEAD_DIM, dtype=dtype) for _ in range(2))
        seqlens = torch.full((batch,), max_seq, dtype=torch.int32, device=_HOST)
        K.decode_attention(q, kc, vc, seqlens, rows=torch.arange(batch, device=_HOST) if mapped else None)

    return run


def _run_gemv(m, n, k, prologue="plain", residual=False, wdtype=None):
    def run(K, dtype):
        wdt = wdtype or dtype
        kw = {}
        if prologue == "norm":
            kw.update(norm_weight=_t(k, dtype=dtype), eps=EPS)
        elif prologue == "swiglu":
            kw["swiglu"] = True
        if residual:
            kw["residual"] = _t(m, 1, n, dtype=dtype)
        if wdt in (torch.int8, torch.float8_e4m3fn):
            kw["scale"] = _t(n, dtype=torch.float32)
        x = _t(m, 1, 2 * k if prologue == "swiglu" else k, dtype=dtype)
        if wdt == "int4":  # packed int4, group 128, fp16 scales (GPTQ's and AWQ's)
            kw.update(scale=_t(n, k // 128, dtype=torch.float16), zeros=_t(n, k // 128, dtype=torch.uint8),
                      group_size=128)
            K.gemv(x, _t(n, k // 8, dtype=torch.int32), **kw)
        else:
            K.gemv(x, _t(n, k, dtype=wdt), **kw)

    return run


def _run_quant(rows, n, k, weight_dtype):
    def run(K, dtype):  # a prefill's product: x [rows, k] activations (rows > 8), weight [n, k] quantised
        if weight_dtype == "int4":  # packed, group 128, fp16 scales
            K.quant_matmul(_t(rows, k, dtype=dtype), _t(n, k // 8, dtype=torch.int32),
                           _t(n, k // 128, dtype=torch.float16), zeros=_t(n, k // 128, dtype=torch.uint8),
                           group_size=128)
        else:
            K.quant_matmul(_t(rows, k, dtype=dtype), _t(n, k, dtype=weight_dtype), _t(n, dtype=torch.float32))

    return run


QKV = (N_HEADS + 2 * N_KV) * HEAD_DIM
BF16_ONLY = ("bf16",)  # variants whose fp16 build is the same code: one dtype keeps the check fast


def _run_attention_rows(K, dtype):  # prefill reading its keys out of mapped cache rows
    q = _t(2, 2048, N_HEADS, HEAD_DIM, dtype=dtype)
    kc, vc = _t(8, 4096, N_KV, HEAD_DIM, dtype=dtype), _t(8, 4096, N_KV, HEAD_DIM, dtype=dtype)
    K.attention(q, kc[:, :2048], vc[:, :2048], causal=True, rows=torch.tensor([5, 2], device=_HOST))


@dataclasses.dataclass
class Case:
    op: str
    module: str  # under fastsolar.kernels
    run: Callable  # (module, dtype) -> None: calls the launcher once
    wgmma_on_90: bool = False
    dtypes: tuple[str, ...] = tuple(DTYPES)  # one is enough where fp16 and bf16 compile to the same code
    min_arch: int = 0  # older targets are not compiled for (the op is refused there)


CASES = [
    Case("rms_norm", "rms_norm", _run_rms_norm),
    Case("add_rms_norm", "rms_norm", _run_add_rms_norm),
    Case("swiglu_fused", "swiglu", _run_swiglu_fused),
    Case("swiglu_flat", "swiglu", _run_swiglu_flat),
    Case("rotary", "rotary", _run_rotary),
    Case("rotary_cache_b8_rows", "rotary", _run_rotary_cache(8, 1, True), dtypes=BF16_ONLY),
    Case("rotary_cache_prefill", "rotary", _run_rotary_cache(1, 512, False), dtypes=BF16_ONLY),
    Case("attention", "attention", _run_attention, wgmma_on_90=True),
    Case("attention_rows", "attention", _run_attention_rows, wgmma_on_90=True, dtypes=BF16_ONLY),
    Case("decode_b1", "decode_attention", _run_decode(1)),
    Case("decode_b8", "decode_attention", _run_decode(8)),
    Case("decode_b4_rows", "decode_attention", _run_decode(4, mapped=True), dtypes=BF16_ONLY),
    # The decode GEMVs of a SOLAR layer and its head, batch 1 and 8, and 8-bit weights (issue 10's path).
    Case("gemv_qkv_norm_m1", "gemv", _run_gemv(1, QKV, HIDDEN, "norm"), dtypes=BF16_ONLY),
    Case("gemv_o_res_m1", "gemv", _run_gemv(1, HIDDEN, N_HEADS * HEAD_DIM, residual=True), dtypes=BF16_ONLY),
    Case("gemv_gate_up_norm_m1", "gemv", _run_gemv(1, 2 * INTER, HIDDEN, "norm"), dtypes=BF16_ONLY),
    Case("gemv_down_swiglu_res_m1", "gemv", _run_gemv(1, HIDDEN, INTER, "swiglu", residual=True), dtypes=BF16_ONLY),
    Case("gemv_qkv_norm_m8", "gemv", _run_gemv(8, QKV, HIDDEN, "norm"), dtypes=BF16_ONLY),
    Case("gemv_down_swiglu_res_m8", "gemv", _run_gemv(8, HIDDEN, INTER, "swiglu", residual=True), dtypes=BF16_ONLY),
    Case("gemv_gate_up_int8_m1", "gemv", _run_gemv(1, 2 * INTER, HIDDEN, "norm", wdtype=torch.int8), dtypes=BF16_ONLY),
    Case("gemv_o_fp8_res_m4", "gemv", _run_gemv(4, HIDDEN, HIDDEN, residual=True, wdtype=torch.float8_e4m3fn),
         dtypes=BF16_ONLY),
    # Packed int4 (issue 21): batch 1 and 8, every prologue.
    Case("gemv_gate_up_int4_m1", "gemv", _run_gemv(1, 2 * INTER, HIDDEN, "norm", wdtype="int4"), dtypes=BF16_ONLY),
    Case("gemv_o_int4_res_m1", "gemv", _run_gemv(1, HIDDEN, HIDDEN, residual=True, wdtype="int4"), dtypes=BF16_ONLY),
    Case("gemv_down_int4_swiglu_res_m8", "gemv", _run_gemv(8, HIDDEN, INTER, "swiglu", residual=True, wdtype="int4"),
         dtypes=BF16_ONLY),
    # The weight-only quantised GEMM of prefill (more than 8 rows; decode takes the GEMVs above): 512 tokens
    # into gate_up, 32 rows into qkv, a 12-row prefill into down (the small-M tiles). FP8 only where it runs.
    Case("quant_int8_prefill", "quant_matmul", _run_quant(512, 2 * INTER, HIDDEN, torch.int8), wgmma_on_90=True,
         dtypes=BF16_ONLY),
    Case("quant_int8_m32", "quant_matmul", _run_quant(32, QKV, HIDDEN, torch.int8), dtypes=BF16_ONLY),
    Case("quant_int8_m12", "quant_matmul", _run_quant(12, HIDDEN, INTER, torch.int8), dtypes=BF16_ONLY),
    Case("quant_fp8_prefill", "quant_matmul", _run_quant(512, 2 * INTER, HIDDEN, torch.float8_e4m3fn),
         wgmma_on_90=True, dtypes=BF16_ONLY, min_arch=89),
    Case("quant_fp8_m32", "quant_matmul", _run_quant(32, QKV, HIDDEN, torch.float8_e4m3fn), dtypes=BF16_ONLY,
         min_arch=89),
    Case("quant_fp8_m12", "quant_matmul", _run_quant(12, HIDDEN, INTER, torch.float8_e4m3fn), dtypes=BF16_ONLY,
         min_arch=89),
    Case("quant_int4_prefill", "quant_matmul", _run_quant(512, 2 * INTER, HIDDEN, "int4"), wgmma_on_90=True,
         dtypes=BF16_ONLY),
    Case("quant_int4_m32", "quant_matmul", _run_quant(32, QKV, HIDDEN, "int4"), dtypes=BF16_ONLY),
    Case("quant_int4_m12", "quant_matmul", _run_quant(12, HIDDEN, INTER, "int4"), dtypes=BF16_ONLY),
]


# ----------------------------------------------------------------------------------------------
# session state: one worker, captured launches and compile results cached
# ----------------------------------------------------------------------------------------------
_COMPILED: dict = {}
_REPORT: list[dict] = []


@pytest.fixture(scope="module")
def worker():
    w = cu.CompileWorker(REPO)
    yield w
    w.close()
    path = os.environ.get("FASTSOLAR_COMPILE_REPORT")
    if path and _REPORT:
        _write_report(path)


def _compile(worker, request: dict) -> dict:
    key = json.dumps(request, sort_keys=True)
    if key not in _COMPILED:
        try:
            _COMPILED[key] = worker.compile(request)
        except cu.CompileError as e:
            _COMPILED[key] = e
    res = _COMPILED[key]
    if isinstance(res, Exception):
        pytest.fail(f"compile of {request['kernel']} for sm_{request['arch']} failed:\n{res}", pytrace=False)
    return res


def _kernel_module(case: Case):
    return importlib.import_module(f"fastsolar.kernels.{case.module}")


def _requests(case: Case, dtype_name: str, arch: int) -> list[dict]:
    K = _kernel_module(case)
    launches, configs = capture(K, lambda: case.run(K, DTYPES[dtype_name]), arch)
    assert launches, f"{case.op}: the launcher launched no Triton kernel"
    out = []
    for ln in launches:
        # The contract: every launch uses exactly what one of the module's *_launch_config returned.
        def used(cfg):
            return all(ln.meta.get(k, ln.args.get(k)) == v for k, v in cfg.items()
                       if k in _LAUNCH_OPTIONS or k in ln.args)
        assert configs and any(used(c) for c in configs), (
            f"{case.op}: {ln.kernel} was launched with "
            f"{ {k: v for k, v in {**ln.args, **ln.meta}.items() if not isinstance(v, torch.Tensor)} } "
            f"which matches none of the launch configs {configs}")
        meta = dict(ln.meta)
        out.append({
            "module": K.__name__, "kernel": ln.kernel, "arch": arch,
            "num_warps": meta.pop("num_warps", 4), "num_stages": meta.pop("num_stages", 3),
            "options": meta,
            "args": {n: _encode(ln.args[n]) for n in ln.arg_names},
        })
    return out


def _constexprs(req):
    return {k: v for k, v in req["args"].items() if k.isupper() and not isinstance(v, dict)}


def _record(case, dtype_name, req, res, problems):
    cfg = _constexprs(req)
    _REPORT.append({"op": case.op, "dtype": dtype_name, "arch": req["arch"], "kernel": res["name"],
                    "config": cfg, "num_warps": res["num_warps"], "num_stages": res["num_stages"],
                    "regs": res["cuobjdump"].get("REG"), "ptxas_regs": res["ptxas"].get("registers"),
                    "spill_st": res["ptxas"].get("spill_stores"), "spill_ld": res["ptxas"].get("spill_loads"),
                    "stack": res["cuobjdump"].get("STACK"), "local": res["cuobjdump"].get("LOCAL"),
                    "smem": res["shared"], "wgmma": res["ptx_wgmma"], "hgmma": res["sass_hgmma"],
                    "hmma": res["sass_hmma"], "ptxas": res.get("ptxas_version"), "compile_s": res["compile_s"], "problems": problems})


def _write_report(path):
    cols = ["op", "dtype", "arch", "kernel", "config", "num_warps", "num_stages", "regs", "spill_st", "spill_ld",
            "stack", "local", "smem", "wgmma", "hgmma", "hmma", "ptxas", "compile_s", "problems"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in _REPORT:
        lines.append("| " + " | ".join(str(r[c]) if r[c] != [] else "" for c in cols) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------
# the harness checks itself on toy kernels (compile_util.py) before the real ones
# ----------------------------------------------------------------------------------------------
def _toy(kernel, arch, warps, stages, **args):
    return {"module": "compile_util", "kernel": kernel, "arch": arch, "num_warps": warps, "num_stages": stages,
            "options": {}, "args": args}


def _toy_scale(arch, block, warps):
    return _toy("_toy_scale_kernel", arch, warps, 1, x_ptr=cu.ptr("bfloat16"), y_ptr=cu.ptr("bfloat16"),
                n_cols=4096, stride=4096, scale={"float": 0.5}, BLOCK=block)


def _toy_matmul(arch, bm, bn, bk, warps, stages):
    return _toy("_toy_matmul_kernel", arch, warps, stages, a_ptr=cu.ptr("bfloat16"), b_ptr=cu.ptr("bfloat16"),
                c_ptr=cu.ptr("bfloat16"), M=4096, N=4096, K=4096, BM=bm, BN=bn, BK=bk)


@pytest.mark.parametrize("arch", ARCHS)
def test_harness_clean_toy(worker, arch):
    res = _compile(worker, _toy_scale(arch, 4096, 4))
    assert res["arch"] == arch and res["num_warps"] == 4
    assert cu.resource_problems(res) == [], cu.summary(res)
    assert res["cuobjdump"]["REG"] > 0 and res["ptxas"]["registers"] == res["cuobjdump"]["REG"]


def test_harness_detects_spills(worker):
    # 16384 values on one warp: 512 fp32 values a thread cannot stay in registers.
    res = _compile(worker, _toy_scale(80, 16384, 1))
    probs = " ".join(cu.resource_problems(res))
    assert "register spills" in probs and "local memory" in probs and "LDL/STL" in probs, cu.summary(res)


def test_harness_detects_smem_and_mma(worker):
    big = _compile(worker, _toy_matmul(90, 256, 128, 128, 8, 5))  # 5 stages x 96 KiB of tiles
    assert any("shared memory" in p for p in cu.resource_problems(big)), cu.summary(big)
    assert big["ptx_wgmma"] > 0 and big["sass_hgmma"] > 0, cu.summary(big)
    small = _compile(worker, _toy_matmul(80, 64, 64, 32, 4, 2))
    assert cu.resource_problems(small) == [], cu.summary(small)
    assert small["ptx_wgmma"] == 0 and small["sass_hmma"] > 0, cu.summary(small)


def test_parsers():
    ru = ("\nResource usage:\n Common:\n  GLOBAL:0\n Function _k:\n  REG:40 STACK:16 SHARED:0 LOCAL:8 "
          "CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    assert cu.parse_resource_usage(ru) == {"_k": {"REG": 40, "STACK": 16, "SHARED": 0, "LOCAL": 8, "CONSTANT[0]": 400,
                                                  "TEXTURE": 0, "SURFACE": 0, "SAMPLER": 0}}
    log = ("ptxas info    : Function properties for _k\n    24 bytes stack frame, 20 bytes spill stores, "
           "12 bytes spill loads\nptxas info    : Used 255 registers, used 1 barriers, 24 bytes cumulative stack size")
    assert cu.parse_ptxas_log(log) == {"registers": 255, "stack_frame": 24, "spill_stores": 20, "spill_loads": 12}


# ----------------------------------------------------------------------------------------------
# the real kernels
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case, dtype_name, arch", [(c, d, a) for c in CASES for d in c.dtypes for a in ARCHS
                                                     if a >= c.min_arch],
                         ids=lambda v: v.op if isinstance(v, Case) else f"sm{v}" if isinstance(v, int) else v)
def test_kernel_compiles_clean(worker, case, arch, dtype_name):
    failures = []
    for req in _requests(case, dtype_name, arch):
        res = _compile(worker, req)
        problems = cu.resource_problems(res)
        if case.wgmma_on_90 and arch == 90 and not (res["ptx_wgmma"] and res["sass_hgmma"]):
            problems.append(f"no Hopper MMA: {res['ptx_wgmma']} wgmma in PTX, {res['sass_hgmma']} HGMMA in SASS "
                            f"({res['sass_hmma']} HMMA)")
        _record(case, dtype_name, req, res, problems)
        if problems:
            cfg = _constexprs(req)
            failures.append(f"{req['kernel']} sm_{arch} {dtype_name} {cfg} num_warps={req['num_warps']} "
                            f"num_stages={req['num_stages']}: " + "; ".join(problems) + f"\n    {cu.summary(res)}")
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)


def test_every_kernel_is_covered():
    """Every kernel module has a case, and every kernel a module launches (`name[grid](...)` in its
    source) is launched by at least one case: a new kernel or launch path cannot slip past the check."""
    kdir = os.path.join(REPO, "kernels")
    modules = sorted(f[:-3] for f in os.listdir(kdir) if f.endswith(".py") and not f.startswith("_"))
    covered = {c.module for c in CASES}
    assert not set(modules) - covered, f"kernel modules without a compile case: {sorted(set(modules) - covered)}"
    launched = {}
    for case in CASES:
        K = _kernel_module(case)
        for ln in capture(K, lambda: case.run(K, torch.bfloat16), 90)[0]:
            launched.setdefault(case.module, set()).add(ln.kernel)
    for m in modules:
        K = importlib.import_module(f"fastsolar.kernels.{m}")
        jit = {n for n, v in vars(K).items() if hasattr(v, "arg_names") and hasattr(v, "__getitem__")}
        with open(os.path.join(kdir, m + ".py")) as f:
            kernels = set(re.findall(r"\b(\w+)\[[^\]\n]*\]\(", f.read())) & jit
        assert kernels <= launched.get(m, set()), (
            f"{m}: kernels {sorted(kernels - launched.get(m, set()))} are launched in the source but by no compile case")
