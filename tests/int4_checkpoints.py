"""Writers of GPTQ and AWQ checkpoints for the tests, following the published packing loops bit for bit
(AutoGPTQ's `QuantLinear.pack` in auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py, which GPTQModel writes too;
AutoAWQ's `WQLinear_GEMM.from_linear` in awq/modules/linear/gemm.py), independently of fastsolar's readers.

Each linear weight W [N, K] of a transformers model is quantised by round-to-nearest per group (GPTQ's error
compensation changes which integers are chosen, not how they are stored), giving integers q [K, N], zeros [G, N]
and fp16 scales [G, N] in the packers' orientation; `dequantised` is scales * (q - zeros) from those integers.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import hf_fixtures as F

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
AWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's order_map for 4 bits


def g_idx_of(k: int, group: int, perm: np.ndarray | None = None) -> np.ndarray:
    """GPTQ's g_idx: input k's group; with act-order (`perm`, the order GPTQ quantised the inputs in) input
    perm[j] is in group j // group_size."""
    g = k if group == -1 else group
    if perm is None:
        return np.arange(k) // g
    g_idx = np.empty(k, dtype=np.int64)
    g_idx[perm] = np.arange(k) // g
    return g_idx


def rtn(w: torch.Tensor, g_idx: np.ndarray, sym: bool) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """(q int64 [K, N], zeros int64 [G, N] in 1..15, scales fp16 [G, N]) for W [N, K], the groups given by g_idx."""
    n, k = w.shape
    groups = int(g_idx.max()) + 1
    wt = w.t().double()
    q = np.zeros((k, n), dtype=np.int64)
    zeros = np.zeros((groups, n), dtype=np.int64)
    scales = torch.zeros(groups, n, dtype=torch.float16)
    for i in range(groups):
        cols = torch.from_numpy(np.nonzero(g_idx == i)[0])
        blk = wt[cols]
        lo, hi = blk.min(0).values.clamp(max=0), blk.max(0).values.clamp(min=0)
        if sym:
            hi = torch.maximum(-lo, hi)
            lo = -hi
        s = ((hi - lo) / 15).clamp(min=1e-4).half()
        z = torch.full_like(lo, 8) if sym else torch.round(-lo / s.double()).clamp(1, 15)
        scales[i] = s
        zeros[i] = z.long().numpy()
        q[cols.numpy()] = torch.clamp(torch.round(blk / s.double()) + z, 0, 15).long().numpy()
    return q, zeros, scales


def dequantised(q: np.ndarray, zeros: np.ndarray, scales: torch.Tensor, g_idx: np.ndarray) -> torch.Tensor:
    """W [N, K] float64 = scales * (q - zeros) of each input's group, from the integers (not the packed bytes)."""
    w = (torch.from_numpy(q) - torch.from_numpy(zeros[g_idx])).double() * scales.double()[g_idx]
    return w.t().contiguous()


def gptq_pack(q: np.ndarray, zeros: np.ndarray, g_idx: np.ndarray, v1: bool = True) -> dict[str, torch.Tensor]:
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
    return {"qweight": torch.from_numpy(qweight.astype(np.int32)), "qzeros": torch.from_numpy(qzeros.astype(np.int32)),
            "g_idx": torch.from_numpy(g_idx.astype(np.int32))}


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


def _input_order(key: str, k: int, seed: int) -> np.ndarray:
    """A random act-order permutation of a layer's K inputs, shared by the layers that read the same input
    (q/k/v, gate/up), as GPTQ's (one Hessian per input) is."""
    layer = int(key.split(".")[2])
    role = 0 if "self_attn" in key and "o_proj" not in key else 1 if "gate_proj" in key or "up_proj" in key else key
    return np.random.default_rng([seed, layer, hash(role) % 1000 if isinstance(role, str) else role]).permutation(k)


def write(hf_model, out: Path, method: str, group: int, *, sym: bool = False, fmt: str = "gptq",
          act_order: bool = False, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    """The model saved as a `method` ("gptq" / "awq") checkpoint with transformers' quantization_config; returns
    the directory and each quantised HF weight key's dequantised weight (float64 [N, K]). lm_head stays float.
    act_order (GPTQ's desc_act): each layer's inputs quantised in a random order shared by q/k/v and gate/up."""
    from safetensors.torch import load_file, save_file

    out = F.save(hf_model, Path(out), max_shard_size="1GB")
    (path,) = list(out.glob("*.safetensors"))
    state = load_file(path)
    want = {}
    for key in [k for k in state if k.endswith(".weight") and any(f".{n}." in k for n in LINEARS)]:
        base = key.removesuffix("weight")
        w = state.pop(key)
        k = w.shape[1]
        g_idx = g_idx_of(k, group, _input_order(key, k, seed) if act_order else None)
        q, zeros, scales = rtn(w, g_idx, sym)
        want[key] = dequantised(q, zeros, scales, g_idx)
        packed = gptq_pack(q, zeros, g_idx, v1=fmt == "gptq") if method == "gptq" else awq_pack(q, zeros)
        state.update({base + name: t for name, t in packed.items()})
        state[base + "scales"] = scales
    save_file(state, path, metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    if method == "gptq":
        qc = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": act_order, "sym": sym,
              "damp_percent": 0.01, "true_sequential": True, "checkpoint_format": fmt}
    else:
        qc = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
              "modules_to_not_convert": None}
    cfg["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out, want
