"""Faults of a tensor-parallel group on the CPU (gloo): ranks started differently are refused at start-up, and a
rank that dies or hangs ends the whole group with an error naming it, within the bounded timeouts."""
from __future__ import annotations

import time

import hf_fixtures as F
import pytest
import tp_workers as W

from fastsolar.parallel.launch import RankFailed, launch

pytestmark = pytest.mark.cpu_only

TIMEOUT = 8.0  # the process group's: a collective waits this long for a silent rank


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Two checkpoints of the same shapes and different weights."""
    base = tmp_path_factory.mktemp("tp-faults")
    kw = dict(num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=1)
    return [str(F.save(F.build_hf_model(seed=seed, **kw), base / f"ckpt{seed}")) for seed in (0, 1)]


def test_ranks_with_other_arguments_are_refused_before_loading(ckpts):
    with pytest.raises(RankFailed, match=r"disagree on the checkpoint, dtype and arguments: rank\(s\) \[1\]"):
        launch(W.mismatched, (ckpts[0], ckpts[0], "bfloat16"), nprocs=2, timeout=TIMEOUT, deadline=120)


def test_ranks_with_another_checkpoint_of_the_same_shapes_are_refused(ckpts):
    with pytest.raises(RankFailed, match=r"disagree on the replicated weights \(another checkpoint\?\): rank\(s\) \[1\]"):
        launch(W.mismatched, (ckpts[0], ckpts[1], "float32"), nprocs=2, timeout=TIMEOUT, deadline=120)


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_a_rank_that_dies_or_hangs_ends_the_group(ckpts, how):
    t0 = time.monotonic()
    with pytest.raises(RankFailed) as e:
        launch(W.failing, (ckpts[0], how), nprocs=2, timeout=TIMEOUT, deadline=120)
    # kill: the watchdog sees rank 1 go; hang: rank 0's collective times out, then the watchdog ends rank 1.
    expected = "rank 1 was killed by SIGKILL" if how == "kill" else "rank 0 exited with code 1"
    assert expected in str(e.value), str(e.value)
    assert time.monotonic() - t0 < 60, "the group outlived its timeouts"
