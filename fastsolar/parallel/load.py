"""Load one tensor-parallel rank's slices of a Hugging Face safetensors checkpoint, and nothing else.

The headers are checked strictly against the whole model (the same plan, and the same one-line errors, as
fastsolar.checkpoint.loader), then each rank builds its own slice of the model (fastsolar.model.sharding) and
reads, for every tensor, only the bytes of its slice (fastsolar.parallel.plan): one positioned read for a block
of rows, one per row for a block of columns. No rank ever holds a whole weight, in memory or in its reads;
`SliceReader.bytes_read` counts what was read. Before anything is allocated, the ranks check that they were
started alike (fastsolar.parallel.group.check_same: config, dtype, the checkpoint's tensor list and the caller's
arguments).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from fastsolar.checkpoint import quant_load
from fastsolar.checkpoint.loader import (_allocate, _check_memory, _plan, _SkipInitOnMeta, checkpoint_headers,
                                        resolve_dtype)
from fastsolar.checkpoint.shards import TensorHeader
from fastsolar.config import SolarConfig, read_config_json
from fastsolar.model import quant
from fastsolar.model.sharding import ShardSizes
from fastsolar.parallel import plan as splits
from fastsolar.parallel.group import TensorParallel, check_same

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=nn.Module)


class SliceReader:
    """Positioned reads of parts of checkpoint tensors (no memory map, no whole tensor), counting the bytes."""

    def __init__(self) -> None:
        self.bytes_read = 0
        self._fds: dict[Path, int] = {}

    def read(self, header: TensorHeader, rows: slice, cols: slice | None) -> torch.Tensor:
        """Rows `rows` (and of each, columns `cols`; None: all) of the tensor, as a CPU tensor of its dtype."""
        fd = self._fds.get(header.file)
        if fd is None:
            fd = self._fds[header.file] = os.open(header.file, os.O_RDONLY)
        row_elems = math.prod(header.shape[1:])
        item = header.itemsize
        n = rows.stop - rows.start
        if cols is None:
            out = bytearray(n * row_elems * item)
            self._pread(fd, out, header.offset + rows.start * row_elems * item)
            shape = (n, *header.shape[1:])
        else:
            width = (cols.stop - cols.start) * item
            out = bytearray(n * width)
            view = memoryview(out)
            for i in range(n):
                self._pread(fd, view[i * width:(i + 1) * width],
                            header.offset + ((rows.start + i) * row_elems + cols.start) * item)
            shape = (n, cols.stop - cols.start)
        if not out:
            return torch.empty(shape, dtype=header.torch_dtype)
        return torch.frombuffer(out, dtype=header.torch_dtype).view(shape)

    def _pread(self, fd: int, buf: bytearray | memoryview, offset: int) -> None:
        got = os.preadv(fd, [buf], offset)
        if got != len(buf):
            raise ValueError(f"checkpoint shard truncated: wanted {len(buf)} bytes at offset {offset}, got {got}")
        self.bytes_read += got

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _fingerprint(config: SolarConfig, dtype: torch.dtype, headers: dict[str, TensorHeader], extra: str) -> str:
    tensors = sorted((k, h.dtype, list(h.shape), h.nbytes) for k, h in headers.items())
    return json.dumps([config.__dict__, str(dtype), tensors, extra], sort_keys=True, default=str)


def load_sharded(
    cls: type[M],
    model_dir: str | Path,
    tp: TensorParallel,
    *,
    device: torch.device,
    dtype: torch.dtype | str | None = None,
    quantize: str | None = None,
    reader: SliceReader | None = None,
    fingerprint: str = "",
) -> M:
    """This rank's slice of `cls(config, tp)` from a checkpoint directory, in eval mode without gradients.

    Refuses (on every rank, before reading a weight) a degree that does not split the heads or the MLP (naming
    both numbers), quantised checkpoints, a checkpoint that does not match its config, and ranks that disagree on
    the checkpoint, the dtype or `fingerprint` (the caller's own arguments). `reader` counts the bytes read.
    `quantize` ("fp8", "int8") quantises each rank's linear slices once loaded, per output row with the whole
    row's scale (a column slice's rows take their absmax over every rank), so each rank holds exactly its slice
    of what one process would hold; int4 is refused."""
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    config = SolarConfig.from_pretrained(model_dir)
    sizes = ShardSizes.of(config, tp.world_size)
    stored = quant_load.read_quantization(read_config_json(model_dir))
    if stored is not None:
        raise ValueError(f"{model_dir} is a quantised checkpoint ({stored.mode}); tensor parallelism loads "
                         "unquantised (fp32 / fp16 / bf16) checkpoints only")
    quantize = quant.check_mode(quantize)
    if quantize == "int4":
        raise ValueError("quantize='int4' is not supported with tensor parallelism yet (fp8 and int8 are)")
    quant.check_device(quantize, device)
    dtype = resolve_dtype(dtype if dtype is not None else config.torch_dtype)
    _, headers = checkpoint_headers(model_dir)
    check_same(tp, "the checkpoint, dtype and arguments",
               _fingerprint(config, dtype, headers, f"{quantize}:{fingerprint}"))
    with torch.device("meta"), _SkipInitOnMeta():
        whole = cls(config)  # the strict checks run against the whole model's shapes
        model = cls(config, tp)
    plan = _plan(whole, config, headers)
    _check_memory(model_dir, model, device, dtype)  # this rank's slices
    _allocate(model, device, dtype)

    params = dict(model.named_parameters())
    reader = reader if reader is not None else SliceReader()
    before = reader.bytes_read
    with torch.no_grad():
        for name, p in params.items():  # the last rank's padding rows of the vocabulary
            if splits.SPLITS[splits.pattern_of(name)] == splits.VOCAB:
                p.zero_()
        try:
            for copy in plan:
                pattern = splits.pattern_of(copy.name)
                part_start = copy.rows.start if copy.rows is not None else None
                s = splits.rank_slice(splits.SPLITS[pattern], copy.header.shape, part_start, tp.rank, tp.world_size,
                                      sizes.vocab)
                data = reader.read(copy.header, s.rows, s.cols)
                params[copy.name][s.dest].copy_(data)
        finally:
            reader.close()
    # Same shapes are not the same weights: the tensors every rank holds whole must agree too.
    whole_params = [p for n, p in sorted(params.items()) if splits.SPLITS[splits.pattern_of(n)] == splits.WHOLE]
    check_same(tp, "the replicated weights (another checkpoint?)",
               "".join(hashlib.sha256(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest() for p in whole_params))
    if quantize is not None:
        def row_absmax(name: str, weight: torch.Tensor) -> torch.Tensor | None:
            if splits.SPLITS[splits.pattern_of(f"{name}.weight")] != splits.COLUMNS:
                return None
            return tp.all_reduce_max(weight.detach().abs().amax(dim=1).float())

        quant.quantize(model, quantize, row_absmax=row_absmax)
    model.eval()
    model.requires_grad_(False)
    read = reader.bytes_read - before
    logger.info("rank %d of %d: loaded its slice of %s (%.3f GB read of %.3f GB) onto %s as %s in %.1f s",
                tp.rank, tp.world_size, model_dir, read / 1e9, sum(c.header.nbytes for c in plan) / 1e9, device,
                dtype, time.perf_counter() - t0)
    return model
