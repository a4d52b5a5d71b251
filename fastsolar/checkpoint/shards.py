"""Reading safetensors shards: their headers, then their tensor data at disk speed.

A safetensors file is an 8-byte little-endian header length, a JSON header (dtype, shape and byte range of
every tensor), then the tensors' bytes. `read_tensor_headers` reads and checks the headers alone (nothing is
allocated or mapped), so the loader and Depth Up-Scaling know every shape before reading any data.

`read_tensors` then streams the data of a list of tensors, in the order given, with plain sequential reads
(`readinto`) on a reader thread while the calling thread places the previous chunk (copies it into its
parameter slice, converts its dtype, uploads it to a GPU or writes it out): disk and copy overlap, and the
kernel's sequential readahead keeps the disk busy. Chunks go either straight into their destination (the
bytes of a CPU parameter in the checkpoint's dtype: no second copy; a second thread faults the fresh
destination pages in ahead of the reader) or through a small ring of reusable staging buffers (pinned for
CUDA uploads). Nothing is memory-mapped, so reading never adds file pages to
the process's resident memory. The page cache is left as it was found: a file that was not in it when
the read began is dropped from it behind the reader (`posix_fadvise(DONTNEED)` on each range after its
last read), so loading a checkpoint neither fills host memory with pages nobody reads again nor, in a
VM, pays for fresh page-cache pages on top of the model's own (measured: twice as fast cold on a 2-core
VM); a file that was cached (`resident_bytes`, mincore) stays cached for the next start.
"""
from __future__ import annotations

import ctypes
import io
import json
import math
import mmap
import os
import struct
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

_MAX_LISTED = 20
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
# torch dtype of each safetensors dtype a checkpoint may hold.
_TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "BOOL": torch.bool,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
}
# Bytes per element of the safetensors dtypes (others are read without a size check).
_ITEMSIZE = {name: dtype.itemsize for name, dtype in _TORCH_DTYPES.items()} | {"U64": 8, "U32": 4, "U16": 2}

#: Bytes per read: large enough for full disk and PCIe speed, small enough that staging stays ~100 MB.
CHUNK_BYTES = 32 * 2**20
#: Reads in flight ahead of the chunk being placed, and staging buffers in the ring.
READ_AHEAD = 3


def listing(title: str, items: list[str], limit: int = _MAX_LISTED) -> str:
    """`"N title: a, b, ... and K more"`: error messages list at most `limit` names (20 by default); with
    `limit=0`, only `"N title"`."""
    shown = items[:limit]
    more = f", ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"{len(items)} {title}: {', '.join(shown)}{more}" if shown else f"{len(items)} {title}"


@dataclass(frozen=True)
class TensorHeader:
    """One tensor of a safetensors file as its header describes it (no data is read)."""

    file: Path
    key: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    nbytes: int
    offset: int  # where its bytes start in the file

    @property
    def itemsize(self) -> int:
        numel = math.prod(self.shape)
        return self.nbytes // numel if numel else 1

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype of the stored data; None for a dtype torch cannot hold."""
        return _TORCH_DTYPES.get(self.dtype)


def _read_header(path: Path) -> list[TensorHeader]:
    """The tensors of one safetensors file, checked against its size.

    Raises ValueError naming the file for a corrupt header or a file shorter than its header says.
    """
    def bad(why: str) -> ValueError:
        return ValueError(f"cannot read checkpoint shard {path}: {why}")

    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise bad(f"not a safetensors file (only {len(raw)} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise bad(f"not a safetensors file (header of {n} bytes)")
        if 8 + n > size:
            raise bad(f"truncated: the header needs {8 + n} bytes, the file has {size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"not a safetensors file: {e}") from None
    if not isinstance(header, dict):
        raise bad("not a safetensors file: the header is not a JSON object")
    tensors = []
    data_end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"malformed header entry for {key}: {info!r}") from None
        ints = all(isinstance(v, int) and v >= 0 for v in (*shape, start, end))
        if not (isinstance(dtype, str) and ints and start <= end):
            raise bad(f"malformed header entry for {key}: {info!r}")
        if dtype in _ITEMSIZE and end - start != math.prod(shape) * _ITEMSIZE[dtype]:
            raise bad(f"{key} is {dtype} {list(shape)} but its data_offsets span {end - start} bytes")
        tensors.append(TensorHeader(path, key, dtype, shape, end - start, 8 + n + start))
        data_end = max(data_end, end)
    if 8 + n + data_end > size:
        raise bad(f"truncated: the header declares {8 + n + data_end} bytes, the file has {size}")
    return tensors


def read_tensor_headers(shards: Iterable[Path]) -> dict[str, TensorHeader]:
    """Key -> TensorHeader for every tensor in the safetensors `shards`, read from the headers alone.

    ValueError naming the file for a corrupt or truncated shard, and one ValueError listing every key
    stored in more than one shard.
    """
    headers: dict[str, TensorHeader] = {}
    duplicates: list[str] = []
    for path in shards:
        for t in _read_header(Path(path)):
            if t.key in headers:
                duplicates.append(f"{t.key} (in {headers[t.key].file.name} and {t.file.name})")
            headers[t.key] = t
    if duplicates:
        raise ValueError("inconsistent checkpoint: " + listing("keys stored twice", duplicates))
    return headers


# --------------------------------------------------------------------------------------------------
# Reading the data
# --------------------------------------------------------------------------------------------------

class Fence(Protocol):
    """What `place` may return: the staging buffer is reused only after `synchronize()` (a CUDA event)."""

    def synchronize(self) -> None: ...


#: `place(i, start, data)`: bytes `start .. start + len(data)` of `tensors[i]` are in `data` (a uint8 CPU tensor,
#: valid until `place` returns, or until the returned fence has completed).
Place = Callable[[int, int, torch.Tensor], "Fence | None"]
#: `into(i)`: the uint8 CPU tensor of `tensors[i].nbytes` bytes to read `tensors[i]` straight into, or None.
Into = Callable[[int], "torch.Tensor | None"]


@dataclass(frozen=True)
class _Chunk:
    index: int  # into the tensors list
    start: int  # byte offset inside the tensor
    nbytes: int
    dest: torch.Tensor | None  # the final destination when read straight into it, else staged


def _chunks(tensors: Sequence[TensorHeader], into: Into | None, chunk_bytes: int) -> list[_Chunk]:
    chunks = []
    for i, t in enumerate(tensors):
        dest = into(i) if into is not None else None
        if dest is not None and (dest.dtype != torch.uint8 or dest.numel() != t.nbytes or not dest.is_contiguous()
                                 or dest.device.type != "cpu"):
            raise ValueError(f"destination for {t.key} must be {t.nbytes} contiguous bytes in host memory")
        for start in range(0, t.nbytes, chunk_bytes):
            n = min(chunk_bytes, t.nbytes - start)
            chunks.append(_Chunk(i, start, n, None if dest is None else dest[start:start + n]))
    return chunks


def read_tensors(
    tensors: Sequence[TensorHeader],
    place: Place,
    *,
    into: Into | None = None,
    pin_memory: bool = False,
    drop_behind: bool | None = None,
    progress: Callable[[int], object] | None = None,
    chunk_bytes: int | None = None,
) -> None:
    """Read the data of `tensors` (in this order; repeats allowed) and hand it to `place`, chunk by chunk.

    A reader thread reads up to READ_AHEAD chunks ahead of the one being placed. Tensors for which `into`
    gives a destination are read straight into it (once another thread has faulted its pages in) and never
    passed to `place`; the others go through
    staging buffers of `chunk_bytes` (default CHUNK_BYTES; page-locked with `pin_memory`, for asynchronous
    CUDA copies); it must be a multiple of 8, so that a chunk never splits an element. `progress(n)` is called
    after each chunk's `n` bytes are placed. `drop_behind` drops each file range from the page cache after
    its last read: True for every file, False for none, None (the default) for the files less than half
    cached, or of unknown state, when first opened. ValueError naming the file for a file that ends early.
    """
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    if chunk_bytes < 8 or chunk_bytes % 8:
        raise ValueError(f"chunk_bytes must be a positive multiple of 8, got {chunk_bytes}")
    chunks = _chunks(tensors, into, chunk_bytes)
    last_read = {(t.file, t.offset): i for i, t in enumerate(tensors)}
    staged = [c.nbytes for c in chunks if c.dest is None]
    buffer_bytes = max(staged, default=0)
    free_slots: deque[tuple[torch.Tensor, Fence | None]] = deque(
        (torch.empty(buffer_bytes, dtype=torch.uint8, pin_memory=pin_memory), None)
        for _ in range(min(READ_AHEAD, len(staged)))
    )
    can_drop = hasattr(os, "posix_fadvise")
    files: dict[Path, io.FileIO] = {}
    dropping: set[Path] = set()

    def file(path: Path) -> io.FileIO:  # opened on the calling thread only
        if path not in files:
            files[path] = f = open(path, "rb", buffering=0)  # unbuffered: readinto goes straight to the buffer
            if can_drop:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger readahead window
                cached = resident_bytes(path) if drop_behind is None else None
                if drop_behind or (drop_behind is None and (cached or 0) < path.stat().st_size // 2):
                    dropping.add(path)
        return files[path]

    def read(f: io.FileIO, t: TensorHeader, c: _Chunk, view: torch.Tensor, ready: Callable[[], object]) -> None:
        """On the reader thread, the only one that moves the files' positions."""
        ready()  # the staging buffer's previous copy has finished, or the destination's pages are in
        pos, mv = t.offset + c.start, memoryview(view.numpy())
        try:
            f.seek(pos)
            done = 0
            while done < c.nbytes:
                n = f.readinto(mv[done:])
                if not n:
                    raise ValueError(f"the file ends at byte {pos + done} (truncated while loading?)")
                done += n
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {t.key} from checkpoint shard {t.file}: {e}") from e

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastsolar-read")
    # Fresh host memory is slow to fault in (page by page on first write; far slower in a VM), and inside
    # readinto that would stall the disk: a second thread faults each destination chunk in, in order,
    # ahead of the reader, which reads into a chunk only once its pages are in.
    toucher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastsolar-fault-in")
    faulted = deque(toucher.submit(_fault_in, c.dest) for c in chunks if c.dest is not None)
    pending: deque[tuple[_Chunk, torch.Tensor | None, Future]] = deque()
    todo = iter(chunks)

    def submit() -> None:
        c = next(todo, None)
        if c is None:
            return
        t = tensors[c.index]
        if c.dest is not None:
            buf, view, ready = None, c.dest, faulted.popleft().result
        else:
            buf, fence = free_slots.popleft()
            view, ready = buf[:c.nbytes], (fence.synchronize if fence is not None else _nothing)
        pending.append((c, buf, pool.submit(read, file(t.file), t, c, view, ready)))

    try:
        for _ in range(READ_AHEAD):
            submit()
        while pending:
            c, buf, future = pending.popleft()
            future.result()
            if buf is not None:
                free_slots.append((buf, place(c.index, c.start, buf[:c.nbytes])))
            t = tensors[c.index]
            if t.file in dropping and last_read[(t.file, t.offset)] == c.index:
                os.posix_fadvise(files[t.file].fileno(), t.offset + c.start, c.nbytes, os.POSIX_FADV_DONTNEED)
            if progress is not None:
                progress(c.nbytes)
            submit()
    finally:
        toucher.shutdown(wait=True, cancel_futures=True)
        pool.shutdown(wait=True, cancel_futures=True)
        for f in files.values():
            f.close()


def _fault_in(dest: torch.Tensor) -> None:
    dest[::mmap.PAGESIZE].fill_(0)  # one write per page: the kernel maps a zeroed page


def _nothing() -> None:
    pass


def resident_bytes(path: Path) -> int | None:
    """Bytes of `path` in the page cache (mincore over a fresh mapping: no page is touched); None where the
    kernel will not tell (since Linux 5.0 only for files this process may write) or there is no mincore."""
    size = Path(path).stat().st_size
    if size == 0:
        return 0
    if not os.access(path, os.W_OK):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mmap_, mincore, munmap = libc.mmap, libc.mincore, libc.munmap
    except (OSError, AttributeError, TypeError):  # no C library to ask (Windows)
        return None
    mmap_.restype = ctypes.c_void_p
    mmap_.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
    with open(path, "rb") as f:
        addr = mmap_(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            if mincore(addr, size, vec) != 0:
                return None
        finally:
            munmap(addr, size)
    return int((np.frombuffer(vec, dtype=np.uint8) & 1).sum()) * mmap.PAGESIZE  # bit 0: resident
