"""What each spawned rank of tests/parallel runs (a module of its own: spawned processes import it by name).

Every worker writes its results to `out_dir/rank{r}.pt`; the tests compare them with a one-process model."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fastsolar import Solar, ops
from fastsolar.parallel import SliceReader, load_parallel

N_NEW = 12


def prompt() -> torch.Tensor:
    """[2, 17] token ids (the forward's input)."""
    return torch.randint(3, 997, (2, 17), generator=torch.Generator().manual_seed(5))


def kernel_prompt() -> torch.Tensor:
    """A shorter input for the kernel path: the Triton interpreter is slow."""
    return prompt()[:, :5]


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of prompts of 5, 13 and 1 tokens and its attention mask (generate's input)."""
    g = torch.Generator().manual_seed(6)
    rows = [torch.randint(3, 997, (n,), generator=g) for n in (5, 13, 1)]
    ids = torch.zeros(3, 13, dtype=torch.int64)
    mask = torch.zeros(3, 13, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, 13 - len(r):] = r
        mask[i, 13 - len(r):] = 1
    return ids, mask


def checks(ckpt: str, out_dir: str, n: int) -> None:
    """fp32 logits and greedy tokens from the library entry, the bytes each rank read, and bf16 logits."""
    reader = SliceReader()
    model = load_parallel(Solar, ckpt, n, dtype="float32", reader=reader)
    ids, mask = padded_batch()
    with torch.no_grad():
        logits = model(prompt()).logits
    tokens = model.generate(ids, N_NEW, attention_mask=mask, pad_token_id=0)
    bf16 = Solar.from_pretrained(ckpt, tensor_parallel_size=n, dtype="bfloat16")
    with torch.no_grad():
        bf16_logits = bf16(prompt()).logits
    kernels = {}
    if n == 2:  # the Triton kernels (interpreter) on the shard shapes, residual on rank 0 only: once is enough
        with ops.force_kernels(True), torch.no_grad():
            kernels = dict(logits=model(kernel_prompt()).logits, tokens=model.generate(kernel_prompt(), 2))
    int8 = Solar.from_pretrained(ckpt, tensor_parallel_size=n, dtype="float32", quantize="int8")
    with torch.no_grad():
        int8_logits = int8(prompt()).logits
    layer = int8.layers[0]
    scales = {name: getattr(layer, part).__getattr__(name).weight_scale
              for part, name in (("attention", "wqkv"), ("attention", "wo"), ("feed_forward", "w_down"))}
    torch.save(dict(logits=logits, tokens=tokens, bf16=bf16_logits, bytes_read=reader.bytes_read,
                    kv_heads=model.kv_heads, qkv_rows=model.layers[0].attention.wqkv.weight.shape[0],
                    int8=int8_logits, int8_tokens=int8.generate(ids, N_NEW, attention_mask=mask, pad_token_id=0),
                    int8_scales=scales, params=dict(model.named_parameters()), kernels=kernels),
               Path(out_dir) / f"rank{dist.get_rank()}.pt")


def mismatched(ckpt: str, other_ckpt: str, other_dtype: str) -> None:
    """Rank 1 starts with another checkpoint or another dtype than rank 0."""
    other = dist.get_rank() == 1
    load_parallel(Solar, other_ckpt if other else ckpt, 2, dtype=other_dtype if other else "float32")


def failing(ckpt: str, how: str) -> None:
    """After loading, rank 1 is killed (SIGKILL) or hangs while rank 0 generates."""
    model = load_parallel(Solar, ckpt, 2, dtype="float32")
    if dist.get_rank() == 1:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(600)
    model.generate(prompt(), N_NEW)
