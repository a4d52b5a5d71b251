"""Shared test helpers: the one `assert_close`, the test device, and seeded random inputs."""
from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from fastsolar import quant

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"

log = logging.getLogger("tests")

# Seeds that unseeded randn() calls drew, most recent last: a failure can be replayed with
# randn(..., seed=s). Logged at INFO (`pytest -o log_cli=true -o log_cli_level=INFO` shows them)
# and quoted in assert_close's failure message.
recent_seeds: collections.deque[int] = collections.deque(maxlen=16)

# One unit in the last place at 1.0, per dtype: a product rounded once to its output dtype (a GEMV/GEMM with fp32
# accumulation) may land an ulp away from a torch baseline that happened to round the other way, which
# `rtol=ULP[dtype]` allows on top of the baseline rule.
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}

# Absolute slack added on top of the measured torch error, per dtype.
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}


def _describe(actual: torch.Tensor, expected: torch.Tensor, bad: torch.Tensor, limit: int = 5) -> str:
    diff = (actual.double() - expected.double()).abs()
    rel = diff / expected.double().abs().clamp_min(1e-12)
    finite = torch.isfinite(diff)
    lines = [
        f"max abs err {diff[finite].max().item() if finite.any() else float('nan'):.3e}, "
        f"max rel err {rel[finite].max().item() if finite.any() else float('nan'):.3e}, "
        f"{int(bad.sum())} of {bad.numel()} elements out of tolerance, "
        f"{int((~torch.isfinite(actual)).sum())} non-finite in actual, "
        f"{int((~torch.isfinite(expected)).sum())} non-finite in expected",
    ]
    for idx in bad.nonzero()[:limit].tolist():
        i = tuple(idx)
        lines.append(f"  at {i}: actual {actual[i].item()!r} expected {expected[i].item()!r}")
    return "\n".join(lines)


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    atol: float | None = None,
    rtol: float = 0.0,
    baseline: torch.Tensor | None = None,
    factor: float = 2.0,
    msg: str = "",
) -> None:
    """Check `actual` against a high-precision `expected`.

    With `baseline` (the same op written in torch at actual's dtype) the allowed error of every
    element is `factor * max|baseline - expected| + atol`: a kernel may be at most about twice as
    wrong as torch itself. Without it, the allowed error is `atol + rtol * |expected|`.
    Tolerances apply only where `expected` is finite: where it is NaN or +-Inf, `actual` must hold
    the same non-finite value, and NaN or Inf in `actual` never passes anywhere else.
    `atol` defaults to the per-dtype slack in ATOL for actual's dtype.
    """
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if atol is None:
        atol = ATOL.get(actual.dtype, 0.0)
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    finite_e = torch.isfinite(e)
    # Tolerances exist only where expected is finite: rtol * |inf| would accept anything there.
    tol = torch.where(finite_e, atol + rtol * e.abs(), 0.0)
    if baseline is not None:
        b = baseline.detach().double().cpu()
        base_err = (b - e).abs()
        base_err = base_err[torch.isfinite(base_err)]
        tol = tol + factor * (base_err.max() if base_err.numel() else 0.0)
    same_nonfinite = (~torch.isfinite(e)) & ((a == e) | (a.isnan() & e.isnan()))
    ok = (finite_e & ((a - e).abs() <= tol)) | same_nonfinite
    if not bool(ok.all()):
        extra = ""
        if baseline is not None:
            extra = f"\n  torch baseline max abs err {float(factor and (tol.max() - atol) / factor):.3e} (allowed x{factor} + atol {atol:g})"
        if recent_seeds:
            extra += f"\n  recent unseeded randn seeds (oldest first): {list(recent_seeds)}"
        raise AssertionError(f"{msg} tensors not close:\n{_describe(a, e, ~ok)}{extra}")


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int | None = None, scale: float = 1.0) -> torch.Tensor:
    """Fresh normal random data on the test device (never zeros). Without `seed` a fresh one is drawn
    from OS entropy and recorded in `recent_seeds` (and logged), so any draw can be reproduced."""
    g = torch.Generator(device="cpu")
    if seed is None:
        seed = g.seed()  # non-deterministic, and the seed the generator now uses
        recent_seeds.append(seed)
        log.info("randn%s: unseeded draw used seed=%d", shape, seed)
    else:
        g.manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float32) * scale).to(dtype=dtype, device=DEVICE)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill a float tensor with NaN so that any element a kernel fails to write is caught."""
    return t.fill_(float("nan"))


def left_pad(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers-style left padding of 1-D token rows: (ids, attention_mask), int64 on the test device."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros(len(rows), width, dtype=torch.int64)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r):] = r.to(torch.int64)
            mask[i, width - len(r):] = 1
    return ids.to(DEVICE), mask.to(DEVICE)


def channel_weights(n: int, k: int, seed: int | None = None) -> torch.Tensor:
    """A weight [n, k] whose rows have very different magnitudes (log-normal row scales), as trained weights
    have: a per-channel scale matters, and a kernel that applies the wrong row's scale fails."""
    g = torch.Generator().manual_seed(seed if seed is not None else 0)
    rows = torch.exp(1.5 * torch.randn(n, 1, generator=g))
    return (randn(n, k, seed=seed) * rows.to(DEVICE) * 0.05).to(DEVICE)


def quantized_weights(n: int, k: int, mode: str, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """channel_weights(n, k, seed) quantised per output channel by fastsolar.quant: (w_q, scale)."""
    return quant.quantize_weight(channel_weights(n, k, seed), mode)


def int4_weights(
    n: int, k: int, group_size: int, *, scale_dtype: torch.dtype = torch.float16, symmetric: bool = False,
    seed: int | None = None,
) -> dict:
    """A packed int4 weight (kernels/_int4.py) of shape [n, k]: {"weight", "scale", "zeros", "group_size"}, the
    keyword arguments of gemv / gemv_ref. Random nibbles, zero points 8 (symmetric) or random 0..15 per group, and
    group scales log-normal around k**-0.5 / 8 so that rows and groups differ in size as trained weights do."""
    from fastsolar.kernels._int4 import int4_groups, pack_int4

    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ()).item()))
    groups = int4_groups(k, group_size)
    q = torch.randint(0, 16, (n, k), generator=g)
    zeros = torch.full((n, groups), 8) if symmetric else torch.randint(0, 16, (n, groups), generator=g)
    scale = torch.exp(0.7 * torch.randn(n, groups, generator=g)) * (k ** -0.5 / 8)
    return {"weight": pack_int4(q).to(DEVICE), "scale": scale.to(dtype=scale_dtype, device=DEVICE),
            "zeros": zeros.to(dtype=torch.uint8, device=DEVICE), "group_size": group_size}


# The float dtypes every kernel takes, with their test ids (elementwise kernels run all three everywhere).
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOAT_IDS = ["fp32", "fp16", "bf16"]

# Parameters of the kernel tests that run tl.dot (prefill and decode attention): bf16 on CUDA only, and shapes
# too large for the interpreter on CUDA only.
BF16_DOT_GPU = pytest.mark.gpu("bf16 tl.dot gives garbage under the Triton interpreter; bf16 is checked on CUDA only")
LARGE_GPU = pytest.mark.gpu("large shape: too slow for the Triton interpreter")
DOT_DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float16, id="float16"),
              pytest.param(torch.bfloat16, marks=BF16_DOT_GPU, id="bfloat16")]


def case(*args: object, gpu: bool = False, id: str | None = None):  # noqa: A002 - pytest's name
    """One parametrize case; `gpu=True` marks it CUDA-only (LARGE_GPU)."""
    return pytest.param(*args, marks=[LARGE_GPU] if gpu else [], id=id)


def slowed(model) -> dict:
    """Make `model.decode` sleep `delay["s"]` seconds (0 at first) before each step, so that a server test can hold
    requests in flight and make them share decode steps; returns that `delay` dict."""
    delay = {"s": 0.0}
    decode = model.decode

    def slow_decode(*args, **kwargs):
        if delay["s"]:
            time.sleep(delay["s"])
        return decode(*args, **kwargs)

    model.decode = slow_decode
    return delay


@contextlib.contextmanager
def running_server(app, wait_s: float) -> Iterator[str]:
    """`app` (fastsolar.serve.api.create_app's) served by uvicorn on a free port of 127.0.0.1 in a daemon thread:
    yields its base URL once it accepts requests; afterwards it is stopped, within `wait_s`."""
    from fastsolar.serve.server import address, make_server

    server, sock = make_server(app, "127.0.0.1", 0, shutdown_timeout=5)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + wait_s
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.started, "the server did not start"
        yield address(sock)
    finally:
        server.should_exit = True
        thread.join(wait_s)
    assert not thread.is_alive(), "the server did not shut down"


def joined(decode, prompt: list[int], new: list[int]) -> str:
    """A completion's text as transformers' full decode and vLLM give it: decode(prompt + new) minus decode(prompt),
    `decode` skipping special tokens (checked to be a difference of a prefix)."""
    whole, head = decode(list(prompt) + list(new)), decode(list(prompt))
    assert whole.startswith(head), (whole, head)
    return whole[len(head):]
