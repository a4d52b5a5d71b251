"""The server's torch thread policy (fastsolar.serve.threads): on a CPU one core is left to the HTTP loop unless
--cpu-threads or OMP_NUM_THREADS says otherwise."""
from __future__ import annotations

import pytest
import torch

from fastsolar.serve import threads


@pytest.fixture(autouse=True)
def _threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cores, expected", [(1, 1), (2, 1), (3, 2), (16, 15)])
def test_cpu_default_leaves_a_core_to_the_http_loop(monkeypatch, cores, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: cores)
    assert threads.server_threads(torch.device("cpu")) == expected == torch.get_num_threads()


def test_explicit_count_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.server_threads(torch.device("cpu"), 2) == 2 == torch.get_num_threads()


def test_omp_num_threads_is_respected(monkeypatch):
    torch.set_num_threads(1)  # what torch made of OMP_NUM_THREADS=1 at start-up
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    assert threads.server_threads(torch.device("cpu")) == 1


def test_cuda_keeps_torch_default(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    torch.set_num_threads(3)
    assert threads.server_threads(torch.device("cuda")) == 3


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_bad_count_is_refused(bad):
    with pytest.raises(ValueError, match="--cpu-threads must be an integer >= 1"):
        threads.server_threads(torch.device("cpu"), bad)
