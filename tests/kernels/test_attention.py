"""Prefill attention (kernels/attention.py) against float64 truth.

The kernel may be at most ~2x as wrong as torch at the same dtype (helpers.assert_close with baseline=).
CPU runs use the Triton interpreter with small head counts; large shapes (SOLAR's 32/8 heads, seq 1151)
run only on CUDA. bf16 runs only on CUDA: bf16 tl.dot gives garbage under the interpreter.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastsolar.kernels._common import device_properties
from fastsolar.kernels.attention import attention, attention_launch_config, attention_ref
from helpers import DEVICE, DOT_DTYPES, assert_close, case, poison, randn


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
    case(1, 1, 1, 2, 1, 64, True, id="s1-gqa2"),
    case(2, 17, 17, 4, 1, 64, True, id="s17-gqa4-causal"),
    case(1, 17, 17, 4, 4, 128, False, id="s17-mha-full"),
    case(1, 113, 113, 2, 2, 128, False, id="s113-mha-full-d128"),
    case(1, 217, 217, 8, 1, 64, True, id="s217-gqa8-causal"),
    case(1, 17, 113, 4, 2, 128, True, id="q17-k113-causal"),
    case(1, 1, 113, 4, 1, 128, True, id="q1-k113-causal"),
    case(1, 217, 217, 2, 1, 80, False, id="s217-d80-full"),
    case(1, 113, 113, 4, 2, 96, True, id="s113-d96-causal"),
    case(1, 113, 113, 4, 1, 128, True, id="solar-tiny"),  # SOLAR's group of 4, d 128
    case(2, 1151, 1151, 32, 8, 128, True, gpu=True, id="solar-s1151-causal"),
    case(1, 1151, 1151, 32, 8, 128, False, gpu=True, id="solar-s1151-full"),
    case(1, 217, 1151, 32, 8, 128, True, gpu=True, id="solar-q217-k1151"),
    case(2, 1151, 1151, 8, 1, 64, True, gpu=True, id="s1151-gqa8-d64"),
    case(1, 217, 217, 4, 2, 256, True, gpu=True, id="s217-d256"),
    case(1, 113, 113, 4, 4, 16, False, id="s113-d16"),
]


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("batch, seq_q, seq_k, n_heads, n_kv_heads, head_dim, causal", ATTN_CASES)
def test_attention_matches_reference(batch, seq_q, seq_k, n_heads, n_kv_heads, head_dim, causal, dtype):
    q = randn(batch, seq_q, n_heads, head_dim, dtype=dtype)
    k = randn(batch, seq_k, n_kv_heads, head_dim, dtype=dtype)
    v = randn(batch, seq_k, n_kv_heads, head_dim, dtype=dtype)
    _check_attention(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("seq, n_heads, n_kv_heads, head_dim", [
    case(113, 4, 1, 128, id="tiny"),
    case(1151, 32, 8, 128, gpu=True, id="solar"),
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


@pytest.mark.parametrize("dtype", [
    pytest.param(torch.float32, id="float32"),
    pytest.param(torch.float16, marks=pytest.mark.gpu("one launch per offset over 128-key tiles: too slow for the "
                                                      "Triton interpreter"), id="float16"),
])
def test_attention_causal_offset_swept_over_a_key_block(dtype):
    """Bottom-right causal with seq_k = seq_q + offset for every offset 0 .. BLOCK_N - 1 of the launcher's own key
    tile: where the unmasked/masked split of the key loop and the last visible key fall inside a tile moves
    through every position, including the tile edges a fixed offset never hits. Two query blocks, the last
    ragged, GQA group 2; the output is NaN-poisoned."""
    head_dim = 16
    cfg = attention_launch_config(head_dim, dtype, device_properties(DEVICE)[0])
    block_n, seq_q = cfg["BLOCK_N"], cfg["BLOCK_M"] + 5
    q = randn(1, seq_q, 2, head_dim, dtype=dtype)
    kv = randn(2, 1, seq_q + block_n - 1, 1, head_dim, dtype=dtype)
    for offset in range(block_n):
        k, v = kv[0, :, :seq_q + offset], kv[1, :, :seq_q + offset]
        _check_attention(q, k, v, causal=True, msg=f"seq_q {seq_q} seq_k {seq_q + offset} (BLOCK_N {block_n})")


def _padded_rows(kv_rows: int, pad: int, *shape: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v of `kv_rows` rows, each a view into a buffer with `pad` NaN rows before and after it: a row map
    that escapes [0, kv_rows) by up to `pad` reads NaN there instead of faulting, and so poisons the output."""
    bufs = []
    for _ in range(2):
        buf = poison(torch.empty(kv_rows + 2 * pad, *shape, device=DEVICE))
        buf[pad:pad + kv_rows] = randn(kv_rows, *shape)
        bufs.append(buf[pad:pad + kv_rows])
    return bufs[0], bufs[1]


def test_attention_row_map_out_of_range_is_clamped():
    """Documented: rows= values are clamped into [0, kv_rows), not checked (that would sync). -3 and -1 read row 0,
    kv_rows and kv_rows + 2 read the last row, exactly as the in-range map [0, last, 0, last] does."""
    kv_rows, seq_q, seq_k = 3, 9, 13
    k, v = _padded_rows(kv_rows, 3, seq_k, 2, 32)
    q = randn(4, seq_q, 4, 32)
    wild = torch.tensor([-3, kv_rows, -1, kv_rows + 2], device=DEVICE)
    tame = torch.tensor([0, kv_rows - 1, 0, kv_rows - 1], device=DEVICE)
    got = attention(q, k, v, rows=wild, out=poison(torch.empty_like(q)))
    assert torch.equal(got, attention(q, k, v, rows=tame, out=poison(torch.empty_like(q))))
    kg, vg = k[tame], v[tame]
    assert_close(got, attention_ref(q.double(), kg.double(), vg.double()), baseline=attention_ref(q, kg, vg))


def test_attention_contiguous_inputs_strided_out():
    """Contiguous q, k, v; the output a head slice of a wider NaN-poisoned buffer (strides not q's): only the
    slice is written."""
    q, k, v = randn(2, 17, 4, 32), randn(2, 17, 2, 32), randn(2, 17, 2, 32)
    big = poison(torch.empty(2, 17, 6, 32, device=DEVICE))
    _check_attention(q, k, v, causal=True, out=big[:, :, 1:5])
    assert big[:, :, 0].isnan().all() and big[:, :, 5].isnan().all(), "attention wrote outside out"
