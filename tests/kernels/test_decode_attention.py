"""Decode attention (kernels/decode_attention.py) against float64 truth.

The kernel may be at most ~2x as wrong as torch at the same dtype (helpers.assert_close with baseline=).
CPU runs use the Triton interpreter with small head counts; large shapes (SOLAR's 32/8 heads, 4096-token
caches) run only on CUDA. bf16 runs only on CUDA: bf16 tl.dot gives garbage under the interpreter.
Unused cache slots hold NaN, so reading one poisons the output.
"""
from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from fastsolar.kernels._workspace import workspace
from fastsolar.kernels.decode_attention import (
    decode_attention,
    decode_attention_launch_config,
    decode_attention_ref,
)
from helpers import DEVICE, DOT_DTYPES, assert_close, case, poison, randn

# fastsolar.kernels re-exports the function `decode_attention`, which shadows the submodule of the same
# name as a package attribute; import_module returns the module itself.
decode_mod = importlib.import_module("fastsolar.kernels.decode_attention")


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
    case(130, 4, 1, 64, [1, 17, 113, 130], id="gqa4-d64"),
    case(113, 2, 2, 128, [113, 1, 17, 60], id="mha-d128"),
    case(217, 8, 1, 128, [217, 5, 100], id="gqa8-d128"),
    case(100, 4, 2, 80, [37, 100], id="d80"),
    case(256, 4, 1, 128, [256, 129], id="solar-tiny"),
    case(4096, 32, 8, 128, [4096], gpu=True, id="solar-b1-full"),
    case(4096, 32, 8, 128, [1234], gpu=True, id="solar-b1-partial"),
    case(4096, 32, 8, 128, [1, 17, 113, 4096], gpu=True, id="solar-b4"),
    case(1151, 32, 8, 128, [1151, 1, 600, 1000, 17, 2, 1150, 333], gpu=True, id="solar-b8"),
    case(300, 16, 16, 256, [300, 7], id="mha-d256"),
    case(4096, 32, 1, 128, [4096, 2049], gpu=True, id="mqa-group32"),
]


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("max_seq, n_heads, n_kv_heads, head_dim, seqlens", DECODE_CASES)
def test_decode_attention_matches_reference(max_seq, n_heads, n_kv_heads, head_dim, seqlens, dtype):
    batch = len(seqlens)
    q = randn(batch, n_heads, head_dim, dtype=dtype)
    k, v = _make_cache(batch, max_seq, n_kv_heads, head_dim, dtype, seqlens)
    _check_decode(q, k, v, torch.tensor(seqlens, dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("dtype", DOT_DTYPES[1:])
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


def test_decode_attention_row_map_out_of_range_is_clamped():
    """Documented: rows= values are clamped into [0, cache_rows), not checked (that would sync). The caches are views
    into buffers with 3 NaN rows on each side, so an unclamped -3, -1, cache_rows or cache_rows + 2 reads NaN and
    poisons the output; clamped they read row 0 or the last row, exactly as the in-range map does."""
    cache_rows, max_seq, pad = 3, 40, 3
    lens = [40, 0, 23]  # row 1 is never mapped to: all NaN
    bufs = [poison(torch.empty(cache_rows + 2 * pad, max_seq, 2, 32, device=DEVICE)) for _ in range(2)]
    k, v = (buf[pad:pad + cache_rows] for buf in bufs)
    k[:], v[:] = _make_cache(cache_rows, max_seq, 2, 32, torch.float32, lens)
    q = randn(4, 4, 32)
    wild = torch.tensor([-3, cache_rows, -1, cache_rows + 2], dtype=torch.int32, device=DEVICE)
    tame = torch.tensor([0, cache_rows - 1, 0, cache_rows - 1], dtype=torch.int32, device=DEVICE)
    seqlens = torch.tensor([lens[r] for r in tame.tolist()], dtype=torch.int32, device=DEVICE)
    got = decode_attention(q, k, v, seqlens, rows=wild, out=poison(torch.empty_like(q)))
    assert torch.equal(got, decode_attention(q, k, v, seqlens, rows=tame, out=poison(torch.empty_like(q))))
    kg, vg = k[tame.long()], v[tame.long()]
    assert_close(got, decode_attention_ref(q.double(), kg.double(), vg.double(), seqlens),
                 baseline=decode_attention_ref(q, kg, vg, seqlens))


def test_decode_attention_contiguous_inputs_strided_out():
    """Contiguous q and caches; the output a head slice of a wider NaN-poisoned buffer (strides not q's): only the
    slice is written, by the direct store (one split) and by the split combine (a long row) alike."""
    q = randn(2, 4, 32)
    k, v = _make_cache(2, 150, 2, 32, torch.float32, [150, 3])
    big = poison(torch.empty(2, 7, 32, device=DEVICE))
    _check_decode(q, k, v, torch.tensor([150, 3], dtype=torch.int32, device=DEVICE), out=big[:, 2:6])
    assert big[:, :2].isnan().all() and big[:, 6:].isnan().all(), "decode_attention wrote outside out"
