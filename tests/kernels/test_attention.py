"""Prefill and decode attention kernels against float64 truth.

Each kernel may be at most ~2x as wrong as torch at the same dtype (helpers.assert_close with
baseline=). CPU runs use the Triton interpreter with small head counts; large shapes (SOLAR's
32/8 heads, seq 1151, 4096-token caches) run only on CUDA. bf16 runs only on CUDA: bf16 tl.dot
gives garbage under the interpreter.
"""
from __future__ import annotations

import importlib
import inspect

import pytest
import torch
import torch.nn.functional as F

from fastsolar.kernels.attention import attention, attention_launch_config, attention_ref
from fastsolar.kernels.decode_attention import (
    decode_attention,
    decode_attention_launch_config,
    decode_attention_ref,
)
from fastsolar.kernels._workspace import workspace
from helpers import DEVICE, assert_close, poison, randn

# fastsolar.kernels re-exports the functions `attention` and `decode_attention`, which shadow the
# submodules of the same name as package attributes; import_module returns the module itself.
decode_mod = importlib.import_module("fastsolar.kernels.decode_attention")

BF16_GPU = pytest.mark.gpu("bf16 tl.dot gives garbage under the Triton interpreter; bf16 is checked on CUDA only")
GPU_ONLY = pytest.mark.gpu("large shape: too slow for the Triton interpreter")
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float16, id="float16"),
          pytest.param(torch.bfloat16, marks=BF16_GPU, id="bfloat16")]


def _case(*args, gpu: bool = False, id: str | None = None):  # noqa: A002 - pytest's name
    return pytest.param(*args, marks=[GPU_ONLY] if gpu else [], id=id)


# ---------------------------------------------------------------------------------------------
# prefill attention
# ---------------------------------------------------------------------------------------------

def _sdpa_or_ref(q, k, v, causal: bool, scale: float | None) -> torch.Tensor:
    """Torch at the input dtype: SDPA for half types (what a torch model would run), else the ref."""
    if q.dtype in (torch.float16, torch.bfloat16):
        sq, sk = q.shape[1], k.shape[1]
        mask = None
        if causal:
            mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        try:
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                attn_mask=mask, scale=scale, enable_gqa=True,
            )
            return o.transpose(1, 2)
        except (RuntimeError, TypeError, NotImplementedError):
            pass
    return attention_ref(q, k, v, causal=causal, scale=scale)


def _check_attention(q, k, v, *, causal: bool, scale: float | None = None, out=None, msg: str = ""):
    saved = [t.clone() for t in (q, k, v)]
    if out is None:
        out = poison(torch.empty_like(q))
    got = attention(q, k, v, causal=causal, scale=scale, out=out)
    assert got is out
    for before, after, name in zip(saved, (q, k, v), "qkv"):
        assert torch.equal(before, after), f"attention modified {name}"
    truth = attention_ref(q.double(), k.double(), v.double(), causal=causal, scale=scale)
    assert_close(got, truth, baseline=_sdpa_or_ref(q, k, v, causal, scale), msg=msg)


# (batch, seq_q, seq_k, n_heads, n_kv_heads, head_dim, causal)
ATTN_CASES = [
    _case(1, 1, 1, 2, 1, 64, True, id="s1-gqa2"),
    _case(2, 17, 17, 4, 1, 64, True, id="s17-gqa4-causal"),
    _case(1, 17, 17, 4, 4, 128, False, id="s17-mha-full"),
    _case(1, 113, 113, 2, 2, 128, False, id="s113-mha-full-d128"),
    _case(1, 217, 217, 8, 1, 64, True, id="s217-gqa8-causal"),
    _case(1, 17, 113, 4, 2, 128, True, id="q17-k113-causal"),
    _case(1, 1, 113, 4, 1, 128, True, id="q1-k113-causal"),
    _case(1, 217, 217, 2, 1, 80, False, id="s217-d80-full"),
    _case(1, 113, 113, 4, 2, 96, True, id="s113-d96-causal"),
    _case(1, 113, 113, 4, 1, 128, True, id="solar-tiny"),  # SOLAR's group of 4, d 128
    _case(2, 1151, 1151, 32, 8, 128, True, gpu=True, id="solar-s1151-causal"),
    _case(1, 1151, 1151, 32, 8, 128, False, gpu=True, id="solar-s1151-full"),
    _case(1, 217, 1151, 32, 8, 128, True, gpu=True, id="solar-q217-k1151"),
    _case(2, 1151, 1151, 8, 1, 64, True, gpu=True, id="s1151-gqa8-d64"),
    _case(1, 217, 217, 4, 2, 256, True, gpu=True, id="s217-d256"),
    _case(1, 113, 113, 4, 4, 16, False, id="s113-d16"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, seq_q, seq_k, n_heads, n_kv_heads, head_dim, causal", ATTN_CASES)
def test_attention_matches_reference(batch, seq_q, seq_k, n_heads, n_kv_heads, head_dim, causal, dtype):
    q = randn(batch, seq_q, n_heads, head_dim, dtype=dtype)
    k = randn(batch, seq_k, n_kv_heads, head_dim, dtype=dtype)
    v = randn(batch, seq_k, n_kv_heads, head_dim, dtype=dtype)
    _check_attention(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq, n_heads, n_kv_heads, head_dim", [
    _case(113, 4, 1, 128, id="tiny"),
    _case(1151, 32, 8, 128, gpu=True, id="solar"),
])
def test_attention_fused_qkv_views(seq, n_heads, n_kv_heads, head_dim, dtype):
    """q/k/v as strided views of one fused projection, output into a strided view as well."""
    batch = 2
    qkv = randn(batch, seq, (n_heads + 2 * n_kv_heads) * head_dim, dtype=dtype)
    heads = qkv.view(batch, seq, n_heads + 2 * n_kv_heads, head_dim)
    q = heads[:, :, :n_heads]
    k = heads[:, :, n_heads:n_heads + n_kv_heads]
    v = heads[:, :, n_heads + n_kv_heads:]
    assert not q.is_contiguous() and not k.is_contiguous()
    big_out = poison(torch.empty(batch, seq, n_heads + 1, head_dim, dtype=dtype, device=DEVICE))
    out = big_out[:, :, 1:]
    _check_attention(q, k, v, causal=True, out=out)
    assert big_out[:, :, 0].isnan().all(), "attention wrote outside out"


def test_attention_custom_scale():
    q = randn(1, 17, 4, 64)
    k = randn(1, 40, 2, 64)
    v = randn(1, 40, 2, 64)
    _check_attention(q, k, v, causal=True, scale=0.3)
    _check_attention(q, k, v, causal=False, scale=0.05)


def test_attention_rows_without_keys_are_zero():
    """causal with seq_q > seq_k: the first seq_q - seq_k rows see no key; they must be 0, not NaN."""
    q = randn(1, 17, 2, 64)
    k = randn(1, 5, 1, 64)
    v = randn(1, 5, 1, 64)
    got = attention(q, k, v, causal=True, out=poison(torch.empty_like(q)))
    assert torch.isfinite(got).all()
    assert (got[:, :12] == 0).all()
    assert_close(got, attention_ref(q.double(), k.double(), v.double(), causal=True),
                 baseline=attention_ref(q, k, v, causal=True))


def test_attention_launch_config_fits_hardware():
    """Static sanity for the configs the compile check builds: tiles are powers of two and the
    pipelined Q + K/V tiles fit the shared memory of sm_80 (164 KiB) and sm_90 (227 KiB)."""
    for cap, smem in (((8, 0), 164 * 1024), ((9, 0), 227 * 1024)):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for d in (16, 32, 64, 80, 96, 128, 256):
                cfg = attention_launch_config(d, dtype, cap)
                assert cfg["HEAD_DIM"] == d and cfg["BLOCK_D"] >= d
                for key in ("BLOCK_D", "BLOCK_M", "BLOCK_N"):
                    assert cfg[key] >= 16 and cfg[key] & (cfg[key] - 1) == 0, (key, cfg)
                size = dtype.itemsize
                need = size * cfg["BLOCK_D"] * (cfg["BLOCK_M"] + 2 * cfg["BLOCK_N"] * cfg["num_stages"])
                assert need <= smem, (cap, dtype, d, cfg, need)
    # sm_90: 128-key tiles, 3 stages = 224 KiB; sm_80 keeps 64-key tiles.
    assert attention_launch_config(128, torch.float16, (9, 0)) == {
        "HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}
    assert attention_launch_config(128, torch.bfloat16, (8, 0)) == {
        "HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}


# ---------------------------------------------------------------------------------------------
# decode attention
# ---------------------------------------------------------------------------------------------

def _make_cache(batch, max_seq, n_kv_heads, head_dim, dtype, seqlens: list[int]):
    k = randn(batch, max_seq, n_kv_heads, head_dim, dtype=dtype)
    v = randn(batch, max_seq, n_kv_heads, head_dim, dtype=dtype)
    for b, n in enumerate(seqlens):  # unused slots: any read of them poisons the output
        k[b, n:] = float("nan")
        v[b, n:] = float("nan")
    return k, v


def _check_decode(q, k, v, seqlens, *, scale=None, out=None, msg: str = ""):
    saved = [t.clone() for t in (q, k, v, seqlens)]
    if out is None:
        out = poison(torch.empty_like(q))
    got = decode_attention(q, k, v, seqlens, scale=scale, out=out)
    assert got is out
    for before, after, name in zip(saved, (q, k, v, seqlens), ("q", "k_cache", "v_cache", "seqlens")):
        assert torch.equal(before.nan_to_num(), after.nan_to_num()) and torch.equal(before.isnan(), after.isnan()), \
            f"decode_attention modified {name}"
    truth = decode_attention_ref(q.double(), k.double(), v.double(), seqlens, scale=scale)
    assert_close(got, truth, baseline=decode_attention_ref(q, k, v, seqlens, scale=scale), msg=msg)


# (max_seq, n_heads, n_kv_heads, head_dim, seqlens)
DECODE_CASES = [
    _case(130, 4, 1, 64, [1, 17, 113, 130], id="gqa4-d64"),
    _case(113, 2, 2, 128, [113, 1, 17, 60], id="mha-d128"),
    _case(217, 8, 1, 128, [217, 5, 100], id="gqa8-d128"),
    _case(100, 4, 2, 80, [37, 100], id="d80"),
    _case(256, 4, 1, 128, [256, 129], id="solar-tiny"),
    _case(4096, 32, 8, 128, [4096], gpu=True, id="solar-b1-full"),
    _case(4096, 32, 8, 128, [1234], gpu=True, id="solar-b1-partial"),
    _case(4096, 32, 8, 128, [1, 17, 113, 4096], gpu=True, id="solar-b4"),
    _case(1151, 32, 8, 128, [1151, 1, 600, 1000, 17, 2, 1150, 333], gpu=True, id="solar-b8"),
    _case(300, 16, 16, 256, [300, 7], id="mha-d256"),
    _case(4096, 32, 1, 128, [4096, 2049], gpu=True, id="mqa-group32"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_seq, n_heads, n_kv_heads, head_dim, seqlens", DECODE_CASES)
def test_decode_attention_matches_reference(max_seq, n_heads, n_kv_heads, head_dim, seqlens, dtype):
    batch = len(seqlens)
    q = randn(batch, n_heads, head_dim, dtype=dtype)
    k, v = _make_cache(batch, max_seq, n_kv_heads, head_dim, dtype, seqlens)
    _check_decode(q, k, v, torch.tensor(seqlens, dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES[1:])
def test_decode_attention_strided_views(dtype):
    """q as a view of a fused qkv row, caches as k/v halves of one [b, s, 2, hkv, d] buffer."""
    batch, max_seq, n_heads, n_kv_heads, head_dim = 3, 90, 4, 1, 128
    seqlens = [90, 3, 64]
    qkv = randn(batch, (n_heads + 2 * n_kv_heads) * head_dim, dtype=dtype)
    q = qkv.view(batch, n_heads + 2 * n_kv_heads, head_dim)[:, :n_heads]
    kv = randn(batch, max_seq, 2, n_kv_heads, head_dim, dtype=dtype)
    for b, n in enumerate(seqlens):
        kv[b, n:] = float("nan")
    k, v = kv[:, :, 0], kv[:, :, 1]
    assert not q.is_contiguous() and not k.is_contiguous()
    _check_decode(q, k, v, torch.tensor(seqlens, dtype=torch.int32, device=DEVICE), scale=0.07)


def test_decode_attention_zero_seqlen_row_is_finite():
    """seqlens[b] == 0 is outside the contract, but must not crash or poison the other rows; the
    row itself is documented to come out exactly 0."""
    q = randn(2, 4, 64)
    k, v = _make_cache(2, 40, 2, 64, torch.float32, [0, 40])
    seqlens = torch.tensor([0, 40], dtype=torch.int32, device=DEVICE)
    got = decode_attention(q, k, v, seqlens, out=poison(torch.empty_like(q)))
    assert torch.isfinite(got).all()
    assert (got[0] == 0).all(), "a seqlens-0 row must be exactly 0"
    truth = decode_attention_ref(q.double(), k.double(), v.double(), seqlens)
    assert_close(got[1], truth[1], baseline=decode_attention_ref(q, k, v, seqlens)[1])


def _decode_workspaces(batch, n_heads, n_kv_heads, head_dim, max_splits):
    """The preallocated workspaces decode_attention uses for this shape (kernels/_workspace.py)."""
    f32 = dict(dtype=torch.float32, device=DEVICE)
    return (workspace("decode_attention.m", (batch, n_heads, max_splits), **f32),
            workspace("decode_attention.l", (batch, n_heads, max_splits), **f32),
            workspace("decode_attention.acc", (batch, n_heads, max_splits, head_dim), **f32),
            workspace("decode_attention.counters", (batch * n_kv_heads,), dtype=torch.int32, device=DEVICE))


def test_decode_attention_one_launch_splits_by_row_length():
    """One launch; each row is split by its own length, not the cache's: in a 4096-slot cache a 100-token row
    fills 7 splits of 16 positions (fp32 tiles), a 1-token row one split that writes o directly. The partial
    workspaces are NaN-poisoned, so a split the combine reads without it being written shows; the counters
    are back to 0 after the call (the next launch, or graph replay, starts clean) and a second call over the
    same workspace gives the same result."""
    batch, max_seq, n_heads, n_kv_heads, head_dim = 2, 4096, 2, 1, 16
    lens = [100, 1]
    cfg = decode_attention_launch_config(batch, max_seq, n_heads, n_kv_heads, head_dim, torch.float32)
    assert cfg["max_splits"] == 64 and cfg["BLOCK_N"] == 16
    m_ws, l_ws, acc_ws, counters = _decode_workspaces(batch, n_heads, n_kv_heads, head_dim, cfg["max_splits"])
    for t in (m_ws, l_ws, acc_ws):
        poison(t)
    q = randn(batch, n_heads, head_dim)
    k, v = _make_cache(batch, 128, n_kv_heads, head_dim, torch.float32, lens)
    k = torch.cat([k, torch.full((batch, max_seq - 128, n_kv_heads, head_dim), float("nan"), device=DEVICE)], 1)
    v = torch.cat([v, torch.full_like(k[:, 128:], float("nan"))], 1)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    expected = decode_attention_ref(q.double(), k.double(), v.double(), seqlens)
    baseline = decode_attention_ref(q, k, v, seqlens)
    for _ in range(2):
        got = decode_attention(q, k, v, seqlens, out=poison(torch.empty_like(q)))
        assert_close(got, expected, baseline=baseline)
        assert (counters == 0).all(), "the last program must reset its counter"
    written = torch.isfinite(m_ws).sum(-1)  # [batch, heads]: splits that stored partials
    assert written[0].tolist() == [7, 7], "row 0: 100 positions = 7 blocks of 16, one split each"
    assert written[1].tolist() == [0, 0], "row 1: one split, no partials (o written directly)"


def test_decode_attention_clamps_seqlens():
    """Documented: seqlens are clamped to [0, max_seq], so [max_seq + 5, -3] acts as [max_seq, 0]."""
    max_seq = 40
    q = randn(2, 4, 64)
    k, v = _make_cache(2, max_seq, 2, 64, torch.float32, [max_seq, 0])
    wild = decode_attention(q, k, v, torch.tensor([max_seq + 5, -3], dtype=torch.int32, device=DEVICE),
                            out=poison(torch.empty_like(q)))
    clamped = torch.tensor([max_seq, 0], dtype=torch.int32, device=DEVICE)
    tame = decode_attention(q, k, v, clamped, out=poison(torch.empty_like(q)))
    assert torch.equal(wild, tame)
    assert (wild[1] == 0).all()
    assert_close(wild, decode_attention_ref(q.double(), k.double(), v.double(), clamped),
                 baseline=decode_attention_ref(q, k, v, clamped))


@pytest.mark.parametrize("rows_dtype", [torch.int32, torch.int64])
def test_decode_attention_row_map(rows_dtype):
    """rows=: query row b reads cache row rows[b] of a larger cache (a serving engine's free-row reuse);
    rows that no query maps to hold NaN everywhere, so reading one poisons the output."""
    cache_rows, max_seq, n_heads, n_kv_heads, head_dim = 5, 67, 4, 2, 32
    lens = [67, 0, 9, 1, 0]  # rows 1 and 4 are unused: all NaN
    k, v = _make_cache(cache_rows, max_seq, n_kv_heads, head_dim, torch.float32, lens)
    rows = torch.tensor([3, 0, 2], dtype=rows_dtype, device=DEVICE)  # not sorted, not 0..b-1
    seqlens = torch.tensor([lens[r] for r in rows.tolist()], dtype=torch.int32, device=DEVICE)
    q = randn(3, n_heads, head_dim)
    saved = [t.clone() for t in (q, k, v, rows)]
    got = decode_attention(q, k, v, seqlens, rows=rows, out=poison(torch.empty_like(q)))
    for before, after in zip(saved, (q, k, v, rows)):
        assert torch.equal(before.nan_to_num(7.0), after.nan_to_num(7.0)), "an input was modified"
    gathered = rows.long()
    expected = decode_attention_ref(q.double(), k[gathered].double(), v[gathered].double(), seqlens)
    assert_close(got, expected, baseline=decode_attention_ref(q, k[gathered], v[gathered], seqlens))
    assert_close(decode_attention_ref(q.double(), k.double(), v.double(), seqlens, rows=rows), expected, atol=1e-12)


def test_attention_row_map():
    """rows=: a prefill reads its keys out of chosen rows of a larger cache (padded past seq_k with NaN)."""
    q = randn(2, 17, 4, 32)
    kv = randn(2, 4, 24, 2, 32)  # k and v of a 4-row, 24-slot cache
    kv[:, :, 17:] = float("nan")  # slots past the prompt: a cut at seq_k must keep them out
    k, v = kv[0, :, :17], kv[1, :, :17]
    rows = torch.tensor([3, 1], device=DEVICE)
    got = attention(q, k, v, rows=rows, out=poison(torch.empty_like(q)))
    kg, vg = k[rows], v[rows]
    assert_close(got, attention_ref(q.double(), kg.double(), vg.double()), baseline=attention_ref(q, kg, vg))
    assert torch.equal(attention_ref(q, k, v, rows=rows), attention_ref(q, kg, vg))
    with pytest.raises(ValueError, match="pass rows="):
        attention(q, k, v)


def test_decode_attention_row_map_checks():
    k, v = _make_cache(4, 16, 1, 32, torch.float32, [16] * 4)
    q, seqlens = randn(2, 2, 32), torch.full((2,), 16, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="pass rows="):
        decode_attention(q, k, v, seqlens)
    with pytest.raises(ValueError, match=r"rows must have shape \[2\]"):
        decode_attention(q, k, v, seqlens, rows=torch.zeros(3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(TypeError, match="rows has dtype float32"):
        decode_attention(q, k, v, seqlens, rows=torch.zeros(2, device=DEVICE))


def test_decode_splits_depend_only_on_shapes(monkeypatch):
    params = inspect.signature(decode_attention_launch_config).parameters
    assert "seqlens" not in params
    # SOLAR at batch 1, 4096-token cache: 8 kv heads x 16 splits = 128 programs for 132 SMs.
    cfg = decode_attention_launch_config(1, 4096, 32, 8, 128, torch.float16, (9, 0), 132)
    assert cfg["max_splits"] == 16 and cfg["BLOCK_S"] == 16 and cfg["BLOCK_G"] >= 16
    for batch in (1, 2, 3, 8, 64):
        for max_seq in (1, 17, 100, 4096):
            c = decode_attention_launch_config(batch, max_seq, 32, 8, 128, torch.float16)
            assert 1 <= c["max_splits"] <= c["BLOCK_S"] and (c["max_splits"] - 1) * c["BLOCK_N"] < max_seq

    # The launcher itself: the same shapes with different seqlens values give the same launch.
    seen = []
    real = decode_mod.decode_attention_launch_config

    def spy(*args, **kwargs):
        cfg = real(*args, **kwargs)
        seen.append(dict(cfg))
        return cfg

    monkeypatch.setattr(decode_mod, "decode_attention_launch_config", spy)
    q = randn(2, 4, 64)
    k, v = _make_cache(2, 150, 1, 64, torch.float32, [150, 150])
    for lens in ([150, 1], [3, 150], [17, 33]):
        seqlens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
        got = decode_attention(q, k, v, seqlens, out=poison(torch.empty_like(q)))
        assert_close(got, decode_attention_ref(q.double(), k.double(), v.double(), seqlens),
                     baseline=decode_attention_ref(q, k, v, seqlens))
    assert len(seen) == 3 and seen[0] == seen[1] == seen[2] and seen[0]["max_splits"] > 1


@pytest.mark.gpu("CUDA graph capture")
def test_decode_attention_cuda_graph_replay():
    """Captured once, replayed with new seqlens values written in place: needs no host sync."""
    batch, max_seq, n_heads, n_kv_heads, head_dim = 2, 1024, 32, 8, 128
    dtype = torch.float16
    q = randn(batch, n_heads, head_dim, dtype=dtype)
    k = randn(batch, max_seq, n_kv_heads, head_dim, dtype=dtype)
    v = randn(batch, max_seq, n_kv_heads, head_dim, dtype=dtype)
    seqlens = torch.tensor([1024, 10], dtype=torch.int32, device=DEVICE)
    out = torch.empty_like(q)
    decode_attention(q, k, v, seqlens, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(q, k, v, seqlens, out=out)
    for lens in ([5, 1024], [700, 1]):
        seqlens.copy_(torch.tensor(lens, dtype=torch.int32))
        poison(out)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, decode_attention_ref(q.double(), k.double(), v.double(), seqlens),
                     baseline=decode_attention_ref(q, k, v, seqlens))


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------

def _qkv(sq=4, sk=4, h=4, hkv=2, d=64, dtype=torch.float32):
    return randn(1, sq, h, d, dtype=dtype), randn(1, sk, hkv, d, dtype=dtype), randn(1, sk, hkv, d, dtype=dtype)


def test_attention_rejects_bad_inputs():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="q has dtype int32"):
        attention(q.to(torch.int32), k, v)
    with pytest.raises(TypeError, match="share one dtype"):
        attention(q.half(), k, v)
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"n_heads 6 must be a multiple of n_kv_heads 4"):
        attention(*_qkv(h=6, hkv=4))
    with pytest.raises(ValueError, match=r"head_dim 8 unsupported.*16 <= head_dim <= 256"):
        attention(*_qkv(d=8))
    with pytest.raises(ValueError, match=r"head_dim 320 unsupported"):
        attention(*_qkv(d=320))
    with pytest.raises(ValueError, match="k head_dim 32 != q head_dim 64"):
        attention(q, k[..., :32], v[..., :32])
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        attention(q, k, v[:, :2])
    with pytest.raises(ValueError, match="contiguous last dimension"):
        attention(q.transpose(2, 3).contiguous().transpose(2, 3), k, v)
    with pytest.raises(ValueError, match=r"out must have shape \("):
        attention(q, k, v, out=torch.empty(1, 4, 4, 32, device=DEVICE))
    with pytest.raises(TypeError, match="out has dtype float16"):
        attention(q, k, v, out=torch.empty_like(q, dtype=torch.float16))
    with pytest.raises(TypeError, match="scale must be a Python int or float, got Tensor"):
        attention(q, k, v, scale=torch.tensor(0.1, device=DEVICE))  # 0-d tensor: a host sync
    with pytest.raises(ValueError, match="scale must be a finite number, got nan"):
        attention(q, k, v, scale=float("nan"))


def test_attention_rejects_grid_overflow():
    """Query blocks are grid axis 1, which CUDA caps at 65535 (the interpreter does not); batch * n_heads is
    axis 0 (2**31 - 1). Stride-0 views: the check must fire before anything is read or allocated."""
    block_m = attention_launch_config(16, torch.float32)["BLOCK_M"]
    seq = 65535 * block_m + 1
    q = torch.zeros(1, 1, 1, 16, device=DEVICE).expand(1, seq, 1, 16)
    with pytest.raises(ValueError, match=rf"query blocks of {block_m} rows = 65536 exceeds the CUDA grid limit of 65535"):
        attention(q, q[:, :1], q[:, :1], out=torch.empty(1, 1, 1, 16, device=DEVICE).expand(1, seq, 1, 16))


def test_attention_causal_reversed_blocks_cover_every_row():
    """Causal programs take their query blocks last-first (heaviest first) with heads on grid axis 0: every
    block of a ragged multi-block, multi-batch GQA case is still written (poisoned output) and right."""
    assert attention_launch_config(32, torch.float32)["BLOCK_M"] < 70
    q, k, v = randn(2, 70, 4, 32), randn(2, 75, 2, 32), randn(2, 75, 2, 32)
    got = attention(q, k, v, out=poison(torch.empty_like(q)))
    assert_close(got, attention_ref(q.double(), k.double(), v.double()), baseline=attention_ref(q, k, v))


def test_decode_attention_rejects_bad_inputs():
    q = randn(2, 4, 64)
    k = randn(2, 16, 2, 64)
    v = randn(2, 16, 2, 64)
    lens = torch.tensor([3, 16], dtype=torch.int32, device=DEVICE)
    with pytest.raises(TypeError, match="seqlens has dtype int64"):
        decode_attention(q, k, v, lens.long())
    with pytest.raises(ValueError, match=r"seqlens must have shape \[2\]"):
        decode_attention(q, k, v, torch.tensor([3, 16, 1], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="seqlens must have 1 dimensions"):
        decode_attention(q, k, v, lens[None])
    with pytest.raises(TypeError, match="share one dtype"):
        decode_attention(q.half(), k, v, lens)
    with pytest.raises(TypeError, match="q has dtype int64"):
        decode_attention(q.long(), k, v, lens)
    with pytest.raises(ValueError, match="q must have 3 dimensions"):
        decode_attention(q[:, None], k, v, lens)
    with pytest.raises(ValueError, match=r"n_heads 4 must be a multiple of n_kv_heads 3"):
        decode_attention(q, randn(2, 16, 3, 64), randn(2, 16, 3, 64), lens)
    with pytest.raises(ValueError, match=r"head_dim 8 unsupported.*16 <= head_dim <= 256"):
        decode_attention(randn(2, 4, 8), randn(2, 16, 2, 8), randn(2, 16, 2, 8), lens)
    with pytest.raises(ValueError, match="k_cache and v_cache must have the same shape"):
        decode_attention(q, k, v[:, :8], lens)
    with pytest.raises(ValueError, match="k_cache batch 1 != q batch 2"):
        decode_attention(q, k[:1], v[:1], lens)
    with pytest.raises(TypeError, match="scale must be a Python int or float, got Tensor"):
        decode_attention(q, k, v, lens, scale=torch.tensor(0.1, device=DEVICE))
    with pytest.raises(ValueError, match="scale must be a finite number, got inf"):
        decode_attention(q, k, v, lens, scale=float("inf"))
