"""Writers of GPTQ and AWQ checkpoints for the tests, following the published packing loops bit for bit
(AutoGPTQ's `QuantLinear.pack` in auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py, which GPTQModel writes too;
AutoAWQ's `WQLinear_GEMM.from_linear` in awq/modules/linear/gemm.py), independently of fastsolar's readers.

Each linear weight W [N, K] of a transformers model is quantised by round-to-nearest per group (GPTQ's error
compensation changes which integers are chosen, not how they are stored), giving integers q [K, N], zeros [G, N]
and fp16 scales [G, N] in the packers' orientation; `dequantised` is scales * (q - zeros) from those integers.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

import hf_fixtures as F

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
AWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's order_map for 4 bits


def rtn(w: torch.Tensor, group: int, sym: bool) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """(q int64 [K, N], zeros int64 [G, N] in 1..15, scales fp16 [G, N]) for W [N, K]."""
    n, k = w.shape
    g = k if group == -1 else group
    groups = math.ceil(k / g)
    wt = w.t().double()
    q = np.zeros((k, n), dtype=np.int64)
    zeros = np.zeros((groups, n), dtype=np.int64)
    scales = torch.zeros(groups, n, dtype=torch.float16)
    for i in range(groups):
        blk = wt[i * g:(i + 1) * g]
        lo, hi = blk.min(0).values.clamp(max=0), blk.max(0).values.clamp(min=0)
        if sym:
            hi = torch.maximum(-lo, hi)
            lo = -hi
        s = ((hi - lo) / 15).clamp(min=1e-4).half()
        z = torch.full_like(lo, 8) if sym else torch.round(-lo / s.double()).clamp(1, 15)
        scales[i] = s
        zeros[i] = z.long().numpy()
        q[i * g:(i + 1) * g] = torch.clamp(torch.round(blk / s.double()) + z, 0, 15).long().numpy()
    return q, zeros, scales


def dequantised(q: np.ndarray, zeros: np.ndarray, scales: torch.Tensor, group: int) -> torch.Tensor:
    """W [N, K] float64 = scales * (q - zeros), group by group, from the integers (not the packed bytes)."""
    k = q.shape[0]
    g_of_k = np.arange(k) // (k if group == -1 else group)
    w = (torch.from_numpy(q) - torch.from_numpy(zeros[g_of_k])).double() * scales.double()[g_of_k]
    return w.t().contiguous()


def gptq_pack(q: np.ndarray, zeros: np.ndarray, group: int, v1: bool = True) -> dict[str, torch.Tensor]:
    """AutoGPTQ's pack for 4 bits: qweight [K/8, N], qzeros [G, N/8] (v1: zeros - 1, as uint32), g_idx."""
    intweight = q.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * 4, intweight.shape[1]), dtype=np.uint32)
    i = 0
    row = 0
    while row < qweight.shape[0]:
        for j in range(i, i + (32 // 4)):
            qweight[row] |= intweight[j] << (4 * (j - i))
        i += 32 // 4
        row += 1
    z = zeros - 1 if v1 else zeros.copy()
    z = z.astype(np.uint32)
    qzeros = np.zeros((z.shape[0], z.shape[1] // 32 * 4), dtype=np.uint32)
    i = 0
    col = 0
    while col < qzeros.shape[1]:
        for j in range(i, i + (32 // 4)):
            qzeros[:, col] |= z[:, j] << (4 * (j - i))
        i += 32 // 4
        col += 1
    k = q.shape[0]
    g = k if group == -1 else group
    return {"qweight": torch.from_numpy(qweight.astype(np.int32)), "qzeros": torch.from_numpy(qzeros.astype(np.int32)),
            "g_idx": torch.tensor([i // g for i in range(k)], dtype=torch.int32)}


def awq_pack(q: np.ndarray, zeros: np.ndarray) -> dict[str, torch.Tensor]:
    """AutoAWQ's WQLinear_GEMM packing: qweight [K, N/8] and qzeros [G, N/8], nibbles in order_map's order."""
    intweight = torch.from_numpy(q).to(torch.int32)
    qweight = torch.zeros((intweight.shape[0], intweight.shape[1] // 32 * 4), dtype=torch.int32)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + AWQ_ORDER_MAP[i]] << (i * 4)
    z = torch.from_numpy(zeros).to(torch.int32)
    qzeros = torch.zeros((z.shape[0], z.shape[1] // 32 * 4), dtype=torch.int32)
    for col in range(z.shape[1] // 8):
        for i in range(8):
            qzeros[:, col] |= z[:, col * 8 + AWQ_ORDER_MAP[i]] << (i * 4)
    return {"qweight": qweight, "qzeros": qzeros}


def write(hf_model, out: Path, method: str, group: int, *, sym: bool = False, fmt: str = "gptq"
          ) -> tuple[Path, dict[str, torch.Tensor]]:
    """The model saved as a `method` ("gptq" / "awq") checkpoint with transformers' quantization_config; returns
    the directory and each quantised HF weight key's dequantised weight (float64 [N, K]). lm_head stays float."""
    from safetensors.torch import load_file, save_file

    out = F.save(hf_model, Path(out), max_shard_size="1GB")
    (path,) = list(out.glob("*.safetensors"))
    state = load_file(path)
    want = {}
    for key in [k for k in state if k.endswith(".weight") and any(f".{n}." in k for n in LINEARS)]:
        base = key.removesuffix("weight")
        q, zeros, scales = rtn(state.pop(key), group, sym)
        want[key] = dequantised(q, zeros, scales, group)
        packed = gptq_pack(q, zeros, group, v1=fmt == "gptq") if method == "gptq" else awq_pack(q, zeros)
        state.update({base + name: t for name, t in packed.items()})
        state[base + "scales"] = scales
    save_file(state, path, metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    if method == "gptq":
        qc = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False, "sym": sym,
              "damp_percent": 0.01, "true_sequential": True, "checkpoint_format": fmt}
    else:
        qc = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
              "modules_to_not_convert": None}
    cfg["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out, want
