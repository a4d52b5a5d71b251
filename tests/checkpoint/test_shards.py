"""fastsolar.checkpoint.shards.read_tensors, the one reader of safetensors data (the loader's and Depth Up-Scaling's):
every byte arrives once per request, in order, through staging buffers or straight into a destination;
buffers are refilled only after the consumer's fence; errors name the file and stop the reader thread."""
from __future__ import annotations

import importlib
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fastsolar.checkpoint import shards
from fastsolar.checkpoint.shards import read_tensor_headers, read_tensors


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[list[Path], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    d = tmp_path_factory.mktemp("shards")
    first = {"a": torch.randn(37, 5, generator=g), "b": torch.randn(3, generator=g).to(torch.bfloat16)}
    second = {"c": torch.randn(11, 13, generator=g).to(torch.float16), "d": torch.randn(1, generator=g)}
    save_file(first, d / "one.safetensors")
    save_file(second, d / "two.safetensors")
    return [d / "one.safetensors", d / "two.safetensors"], first | second


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


class Collect:
    """A consumer that reassembles each requested tensor from its chunks, checking they arrive in order."""

    def __init__(self, n: int) -> None:
        self.parts: list[bytearray] = [bytearray() for _ in range(n)]
        self.calls = 0

    def __call__(self, i: int, start: int, data: torch.Tensor) -> None:
        assert data.dtype == torch.uint8 and data.device.type == "cpu"
        assert start == len(self.parts[i]), "chunks of a tensor must arrive in order"
        self.parts[i] += data.numpy().tobytes()
        self.calls += 1


@pytest.mark.parametrize("chunk_bytes", [8, 24, 1 << 20])
def test_every_byte_in_order_with_repeats(files, chunk_bytes):
    paths, tensors = files
    headers = read_tensor_headers(paths)
    wanted = ["c", "a", "d", "a", "b", "c"]  # across files, out of file order, with repeats (as upscale asks)
    collect = Collect(len(wanted))
    seen = []
    read_tensors([headers[k] for k in wanted], collect, chunk_bytes=chunk_bytes, progress=seen.append)
    for i, k in enumerate(wanted):
        assert bytes(collect.parts[i]) == _bytes(tensors[k]), k
    assert sum(seen) == sum(headers[k].nbytes for k in wanted)
    if chunk_bytes == 8:
        assert collect.calls == sum(-(-headers[k].nbytes // 8) for k in wanted)


def test_straight_into_destination(files):
    paths, tensors = files
    headers = read_tensor_headers(paths)
    keys = ["a", "b", "c", "d"]
    dest = {k: torch.full((headers[k].nbytes,), 0xAB, dtype=torch.uint8) for k in ("a", "c")}
    collect = Collect(len(keys))
    read_tensors([headers[k] for k in keys], collect, into=lambda i: dest.get(keys[i]), chunk_bytes=16)
    assert bytes(dest["a"].numpy()) == _bytes(tensors["a"]) and bytes(dest["c"].numpy()) == _bytes(tensors["c"])
    assert collect.parts[0] == b"" and collect.parts[2] == b""  # never staged
    assert bytes(collect.parts[1]) == _bytes(tensors["b"]) and bytes(collect.parts[3]) == _bytes(tensors["d"])
    with pytest.raises(ValueError, match="destination for a must be 740 contiguous bytes in host memory"):
        read_tensors([headers["a"]], collect, into=lambda i: torch.empty(3, dtype=torch.uint8))


def test_destination_faulted_in_before_it_is_read_into(files, monkeypatch):
    """The fault-in thread writes to each destination chunk; the reader must come strictly after it, or
    those writes would land on the data (here a slow fault-in that writes 0xEE over the whole chunk)."""
    paths, tensors = files
    headers = read_tensor_headers(paths)
    touched = []

    def slow_fault_in(dest):
        time.sleep(0.002)
        dest.fill_(0xEE)
        touched.append(dest.numel())

    monkeypatch.setattr(shards, "_fault_in", slow_fault_in)
    dest = {k: torch.empty(headers[k].nbytes, dtype=torch.uint8) for k in "ac"}
    read_tensors([headers[k] for k in "ac"], Collect(2), into=lambda i: dest["ac"[i]], chunk_bytes=64)
    assert bytes(dest["a"].numpy()) == _bytes(tensors["a"]) and bytes(dest["c"].numpy()) == _bytes(tensors["c"])
    assert sum(touched) == headers["a"].nbytes + headers["c"].nbytes


class DeferredCopy:
    """An asynchronous consumer, like a CUDA copy on a side stream: place() only queues the copy, and the
    bytes are taken from the staging buffer when the fence is synchronized. A reader that refilled a buffer
    before synchronizing its fence would hand over the wrong bytes."""

    def __init__(self, n: int) -> None:
        self.collect = Collect(n)
        self.waiting: list[DeferredCopy.Fence] = []

    class Fence:
        def __init__(self, owner: "DeferredCopy", args) -> None:
            self.owner, self.args, self.done = owner, args, False

        def synchronize(self) -> None:
            if not self.done:
                self.done = True
                i, start, data = self.args
                self.owner.collect(i, start, data)

    def __call__(self, i: int, start: int, data: torch.Tensor) -> "DeferredCopy.Fence":
        fence = DeferredCopy.Fence(self, (i, start, data))
        self.waiting.append(fence)
        return fence

    def finish(self) -> None:
        for f in self.waiting:
            f.synchronize()


def test_staging_buffer_refilled_only_after_its_fence(files):
    paths, tensors = files
    headers = read_tensor_headers(paths)
    keys = ["a", "c", "a", "b", "d"]
    consumer = DeferredCopy(len(keys))
    read_tensors([headers[k] for k in keys], consumer, chunk_bytes=32)
    synced_by_reader = sum(f.done for f in consumer.waiting)
    assert synced_by_reader == len(consumer.waiting) - shards.READ_AHEAD  # every reuse waited for its fence
    consumer.finish()
    for i, k in enumerate(keys):
        assert bytes(consumer.collect.parts[i]) == _bytes(tensors[k]), k


def test_file_ending_early_names_the_file_and_stops_the_reader(files, tmp_path):
    paths, _ = files
    short = tmp_path / "short.safetensors"
    short.write_bytes(paths[0].read_bytes())
    headers = read_tensor_headers([short])
    os.truncate(short, headers["a"].offset + 100)  # shortened after its header was read
    threads = threading.active_count()
    with pytest.raises(ValueError, match=r"cannot read a from checkpoint shard .*short\.safetensors: the file ends "
                                         rf"at byte {headers['a'].offset + 100}"):
        read_tensors([headers["a"], headers["b"]], Collect(2), chunk_bytes=16)
    assert threading.active_count() == threads


def test_consumer_error_stops_the_reader(files):
    paths, _ = files
    headers = read_tensor_headers(paths)
    calls = []

    def place(i, start, data):
        calls.append(i)
        if len(calls) == 2:
            raise RuntimeError("placement failed")

    threads = threading.active_count()
    with pytest.raises(RuntimeError, match="placement failed"):
        read_tensors([headers[k] for k in "abcd"], place, chunk_bytes=8)
    assert len(calls) == 2 and threading.active_count() == threads


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="posix_fadvise and /proc (Linux)")
def test_drop_behind_each_range_after_its_last_read(files, monkeypatch):
    paths, _ = files
    headers = read_tensor_headers(paths)
    advice = []
    real = os.posix_fadvise

    def record(fd, offset, length, how):
        advice.append((Path(os.readlink(f"/proc/self/fd/{fd}")).name, offset, length, how))
        real(fd, offset, length, how)

    monkeypatch.setattr(os, "posix_fadvise", record)
    keys = ["a", "c", "a", "d"]
    read_tensors([headers[k] for k in keys], lambda i, s, d: None, chunk_bytes=64, drop_behind=True)
    dropped = [(name, off, n) for name, off, n, how in advice if how == os.POSIX_FADV_DONTNEED]
    expected = []
    for i, k in enumerate(keys):
        if i == 0:
            continue  # "a" is read again later: kept until then
        t = headers[k]
        expected += [(t.file.name, t.offset + s, min(64, t.nbytes - s)) for s in range(0, t.nbytes, 64)]
    assert dropped == expected
    advice.clear()
    read_tensors([headers["a"]], lambda i, s, d: None)
    assert all(how != os.POSIX_FADV_DONTNEED for *_, how in advice)  # only when asked


def test_bad_chunk_size(files):
    headers = read_tensor_headers(files[0])
    with pytest.raises(ValueError, match="multiple of 8"):
        read_tensors([headers["a"]], Collect(1), chunk_bytes=12)


@pytest.mark.skipif(sys.platform != "linux", reason="mincore and posix_fadvise as Linux has them")
def test_page_cache_left_as_found(tmp_path):
    """By default a file that was cached stays cached and one that was not is dropped behind the reader."""
    g = torch.Generator().manual_seed(1)
    for name in ("warm", "cold"):
        save_file({"w": torch.randn(256, 1024, generator=g)}, tmp_path / f"{name}.safetensors")
    warm, cold = tmp_path / "warm.safetensors", tmp_path / "cold.safetensors"
    size = cold.stat().st_size
    fd = os.open(cold, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    warm.read_bytes()
    assert shards.resident_bytes(cold) == 0 and shards.resident_bytes(warm) == -(-size // 4096) * 4096
    read_tensors([read_tensor_headers([cold])["w"]], lambda i, s, d: None)
    assert shards.resident_bytes(cold) < 64 * 1024  # only the header's pages may stay
    read_tensors([read_tensor_headers([warm])["w"]], lambda i, s, d: None)
    assert shards.resident_bytes(warm) == -(-size // 4096) * 4096


def test_upscale_streams_identically_when_dropping_behind(tmp_path, monkeypatch):
    """Depth Up-Scaling through the reader: the same bytes with tiny chunks and drop-behind as without."""
    import hf_fixtures as F

    upscale = importlib.import_module("fastsolar.checkpoint.upscale")
    base = F.save(F.build_hf_model(num_hidden_layers=4, seed=2), tmp_path / "base", max_shard_size="100KB")
    upscale.upscale(base, tmp_path / "plain", drop=1, max_shard_size="150KB", progress=False)
    monkeypatch.setattr(shards, "CHUNK_BYTES", 1000)
    monkeypatch.setattr(shards, "resident_bytes", lambda path: 0)  # the base looks cold: dropped behind
    upscale.upscale(base, tmp_path / "dropped", drop=1, max_shard_size="150KB", progress=False)
    names = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "dropped").iterdir()) and len(names) > 3
    for name in names:
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "dropped" / name).read_bytes(), name
