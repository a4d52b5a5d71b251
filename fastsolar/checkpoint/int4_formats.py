"""GPTQ's and AWQ's stored int4 tensors converted to fastsolar's packed layout (kernels/_int4.py), exactly.

fastsolar:  weight int32 [N, K/8], nibble k % 8 of word [n, k // 8] is q[n, k]; scale [N, G]; zeros uint8 [N, G];
            W[n, k] = (q[n, k] - zeros[n, g]) * scale[n, g], g = k // group_size.

GPTQ (AutoGPTQ's and GPTQModel's `pack`, 4 bits): qweight int32 [K/8, N], nibble j of word [r, n] is q[8r + j, n]
(so fastsolar's weight is its transpose, word for word); qzeros int32 [G, N/8], nibble j of word [g, c] is
zero[g, 8c + j] - 1 in the "v1" format every GPTQ checkpoint on the Hub uses (written as uint32, so a zero of 0
wraps and sets the nibbles above it; readers add the 1 back to each masked nibble, and so does this) or
zero[g, 8c + j] in GPTQModel's "gptq_v2"; scales fp16 [G, N]; W = scales * (q - zero).

AWQ (AutoAWQ's WQLinear_GEMM): qweight int32 [K, N/8], nibble i of word [k, c] is q[k, 8c + ORDER[i]] with
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]; qzeros int32 [G, N/8] packed the same way, stored as is; scales fp16 [G, N].
"""
from __future__ import annotations

import torch

from fastsolar.kernels import pack_int4, unpack_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column 8c + AWQ_ORDER[i]
_AWQ_READ = tuple(AWQ_ORDER.index(j) for j in range(8))  # column 8c + j sits in nibble _AWQ_READ[j]


def _columns(words: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """uint8 [R, 8C]: the 4-bit values packed in `words` int32 [R, C], in column order."""
    nib = unpack_int4(words)
    if not interleaved:
        return nib
    r, c = words.shape
    order = torch.tensor(_AWQ_READ, device=words.device)
    return nib.view(r, c, 8)[:, :, order].reshape(r, 8 * c)


def qweight(method: str, stored: torch.Tensor) -> torch.Tensor:
    """fastsolar's packed weight [N, K/8] from a stored GPTQ ([K/8, N]) or AWQ ([K, N/8]) qweight."""
    if method == "gptq":
        return stored.t().contiguous()
    return pack_int4(_columns(stored, interleaved=True).t().contiguous(), check_range=False)


def qzeros(method: str, stored: torch.Tensor, offset: int) -> torch.Tensor:
    """Zero points uint8 [N, G] from a stored qzeros [G, N/8] (`offset`: 1 for GPTQ's v1 format, else 0)."""
    z = _columns(stored, interleaved=method == "awq")
    return (z + offset).t().contiguous() if offset else z.t().contiguous()


def scales(stored: torch.Tensor) -> torch.Tensor:
    """Scales [N, G] from a stored [G, N]."""
    return stored.t().contiguous()


def logical_stored_shape(method: str, kind: str, rows: int, k: int, groups: int) -> tuple[int, int]:
    """The shape a checkpoint stores for `kind` ("weight", "weight_scale", "weight_zeros") of a layer part
    with `rows` outputs, `k` inputs and `groups` groups per row."""
    if kind == "weight":
        return (k // 8, rows) if method == "gptq" else (k, rows // 8)
    if kind == "weight_scale":
        return (groups, rows)
    return (groups, rows // 8)


__all__ = ["AWQ_ORDER", "logical_stored_shape", "qweight", "qzeros", "scales"]
