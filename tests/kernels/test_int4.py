"""The packed int4 layout (kernels/_int4.py): packing, unpacking and the dequantising reference, on known bits."""
from __future__ import annotations

import pytest
import torch

from fastsolar.kernels._int4 import check_int4, dequantize_int4, pack_int4, unpack_int4
from helpers import DEVICE, int4_weights


def test_pack_known_words():
    """Nibble k % 8 of word k // 8, lowest first: 0..7 is 0x76543210, 8..15 is 0xFEDCBA98 (int32's sign bit set)."""
    q = torch.arange(16).view(1, 16)
    words = pack_int4(q)
    assert words.tolist() == [[0x76543210, 0xFEDCBA98 - 2**32]]
    assert torch.equal(unpack_int4(words), q.to(torch.uint8))


def test_pack_roundtrip_and_bounds():
    q = torch.randint(0, 16, (5, 24))
    assert torch.equal(unpack_int4(pack_int4(q)), q.to(torch.uint8))
    with pytest.raises(ValueError, match="multiple of 8, got K = 12"):
        pack_int4(torch.zeros(2, 12, dtype=torch.int64))
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.full((1, 8), 16))


def test_dequantize_known_values():
    """Two groups of 8 (the second of K = 16 partial when group_size = 12): (q - zero) * scale per group."""
    q = torch.tensor([[15, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
    scales = torch.tensor([[0.5, -2.0]], dtype=torch.float16)
    zeros = torch.tensor([[1, 10]], dtype=torch.uint8)
    w = dequantize_int4(pack_int4(q), scales, zeros, 12, torch.float64)
    want = [7.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, -2.0, -4.0, -6.0, -8.0]
    assert w.tolist() == [want]
    assert dequantize_int4(pack_int4(q), scales, zeros, 12, torch.bfloat16).dtype == torch.bfloat16


def test_dequantize_rounds_once():
    """fp16 result: (q - z) * s in fp32, one rounding (a scale of 1/3 in fp32 times 7 is not fp16(1/3) * 7)."""
    p = int4_weights(3, 16, 8, scale_dtype=torch.float32, seed=1)
    w16 = dequantize_int4(p["weight"], p["scale"], p["zeros"], 8, torch.float16)
    w64 = dequantize_int4(p["weight"], p["scale"], p["zeros"], 8, torch.float64)
    assert torch.equal(w16, w64.float().half())


def test_check_int4_names_the_limit():
    p = int4_weights(4, 32, 16, seed=2)
    w, s, z = p["weight"], p["scale"], p["zeros"]
    assert check_int4(w, s, z, 16, kernel=False) == (4, 32)
    with pytest.raises(ValueError, match=r"scales must have shape \[4, 2\]"):
        check_int4(w, s[:, :1], z, 16, kernel=False)
    with pytest.raises(ValueError, match=r"zeros must have shape \[4, 4\]"):
        check_int4(w, torch.ones(4, 4, dtype=torch.float16, device=DEVICE), z, 8, kernel=False)
    with pytest.raises(TypeError, match="zeros must be a 2-d tensor of uint8"):
        check_int4(w, s, z.to(torch.int32), 16, kernel=False)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        check_int4(w, s, z, 0, kernel=False)
