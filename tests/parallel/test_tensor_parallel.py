"""Tensor parallelism on the CPU (gloo): 2 and 4 ranks against one process on the same saved weights.

One process group per degree for the whole module (each rank runs every check in tp_workers.checks and writes
its results); the references are computed here, in this process, by the ordinary one-process model."""
from __future__ import annotations

import hf_fixtures as F
import pytest
import torch
import tp_workers as W
from helpers import assert_close

from fastsolar import Solar, SolarConfig, ops
from fastsolar.checkpoint.shards import read_tensor_headers
from fastsolar.model.sharding import ShardSizes
from fastsolar.parallel import plan
from fastsolar.parallel.launch import launch

pytestmark = pytest.mark.cpu_only

HEADS, KV_HEADS, LAYERS, HIDDEN, HEAD_DIM = 8, 4, 2, 64, 16  # head_dim: the attention kernels' smallest


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    hf = F.build_hf_model(num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, num_hidden_layers=LAYERS,
                          head_dim=HEAD_DIM)
    return F.save(hf, tmp_path_factory.mktemp("tp") / "ckpt")


@pytest.fixture(scope="module")
def reference(ckpt):
    """The one-process model's fp32 logits and greedy tokens, and its bf16 logits (the dtype's own error)."""
    model = Solar.from_pretrained(ckpt, dtype="float32")
    ids, mask = W.padded_batch()
    with torch.no_grad():
        logits = model(W.prompt()).logits
        bf16 = Solar.from_pretrained(ckpt, dtype="bfloat16")(W.prompt()).logits
    return dict(logits=logits, tokens=model.generate(ids, W.N_NEW, attention_mask=mask, pad_token_id=0), bf16=bf16)


@pytest.fixture(scope="module", params=[2, 4])
def ranks(request, ckpt, tmp_path_factory):
    """Every rank's results at this degree (one launch of request.param processes)."""
    n = request.param
    out = tmp_path_factory.mktemp(f"tp{n}")
    launch(W.checks, (str(ckpt), str(out), n), nprocs=n, timeout=60, deadline=240)
    return n, [torch.load(out / f"rank{r}.pt") for r in range(n)]


def test_greedy_tokens_equal_one_process(ranks, reference):
    n, results = ranks
    assert len(reference["tokens"][0]) > 13  # tokens were generated
    for r, res in enumerate(results):
        assert torch.equal(res["tokens"], reference["tokens"]), f"rank {r} of {n}"


def test_fp32_logits_match_one_process_and_every_rank_agrees(ranks, reference):
    n, results = ranks
    expected = reference["logits"]
    scale = float(expected.abs().max())
    for r, res in enumerate(results):
        assert res["logits"].shape == expected.shape
        # Partial sums joined by all-reduces: float32 in another order, a few ulps of the largest terms.
        assert_close(res["logits"], expected, rtol=1e-5, atol=1e-5 * scale, msg=f"rank {r} of {n}")
        assert torch.equal(res["logits"], results[0]["logits"]), f"rank {r} of {n} differs from rank 0"


def test_kernel_path_matches_one_process_on_its_kernel_path(ranks, ckpt):
    """The Triton kernels (under the interpreter) on the shard shapes: the fused GEMVs without the residual on
    rank 1, the decode attention over a rank's KV heads."""
    n, results = ranks
    if n != 2:
        pytest.skip("the kernel path runs at 2 ranks only (the interpreter is slow)")
    one = Solar.from_pretrained(ckpt, dtype="float32")
    with ops.force_kernels(True), torch.no_grad():
        expected = one(W.kernel_prompt()).logits
        tokens = one.generate(W.kernel_prompt(), 2)
    for r, res in enumerate(results):
        k = res["kernels"]
        assert_close(k["logits"], expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()), msg=f"rank {r}")
        assert torch.equal(k["tokens"], tokens), f"rank {r}"


def test_bf16_logits_within_twice_the_dtypes_own_error(ranks, reference):
    n, results = ranks
    for r, res in enumerate(results):
        assert res["bf16"].dtype == torch.bfloat16
        assert_close(res["bf16"], reference["logits"], baseline=reference["bf16"], msg=f"rank {r} of {n}")


def test_int8_ranks_hold_slices_of_the_one_process_quantisation(ranks, ckpt):
    """Each rank's int8 scales are its rows of one process's (o and down: the whole rows' scales, though a rank
    sees only some columns), so logits and greedy tokens match one process's int8 model."""
    n, results = ranks
    one = Solar.from_pretrained(ckpt, dtype="float32", quantize="int8")
    ids, mask = W.padded_batch()
    with torch.no_grad():
        expected = one(W.prompt()).logits
    tokens = one.generate(ids, W.N_NEW, attention_mask=mask, pad_token_id=0)
    attn = one.layers[0].attention
    d = HEAD_DIM
    q, kv = HEADS * d // n, KV_HEADS * d // n
    for r, res in enumerate(results):
        s = res["int8_scales"]
        qkv = attn.wqkv.weight_scale
        own = torch.cat([qkv[r * q:(r + 1) * q], qkv[HEADS * d + r * kv:HEADS * d + (r + 1) * kv],
                         qkv[(HEADS + KV_HEADS) * d + r * kv:(HEADS + KV_HEADS) * d + (r + 1) * kv]])
        assert torch.equal(s["wqkv"], own), f"rank {r} of {n}"
        assert torch.equal(s["wo"], attn.wo.weight_scale), f"rank {r} of {n}"
        assert torch.equal(s["w_down"], one.layers[0].feed_forward.w_down.weight_scale), f"rank {r} of {n}"
        assert_close(res["int8"], expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()), msg=f"rank {r}")
        assert torch.equal(res["int8_tokens"], tokens), f"rank {r} of {n}"


def test_each_rank_holds_its_slice_of_every_parameter(ranks, ckpt):
    """The loader's slices are plan.shard_of's slices of one process's parameters (which bench/tp_engine.py uses
    for weights made in memory)."""
    n, results = ranks
    one = Solar.from_pretrained(ckpt, dtype="float32")
    for r, res in enumerate(results):
        assert res["params"].keys() == dict(one.named_parameters()).keys()
        for name, full in one.named_parameters():
            assert torch.equal(res["params"][name], plan.shard_of(name, full, one.config, r, n)), (name, r, n)


def test_each_rank_holds_and_reads_only_its_slice(ranks, ckpt):
    n, results = ranks
    headers = read_tensor_headers(F.shard_files(ckpt))
    total = sum(h.nbytes for h in headers.values())
    replicated = sum(h.nbytes for k, h in headers.items() if k.endswith("norm.weight"))
    # The vocabulary splits unevenly (997 rows): a rank may read up to one row per rank more or less of the
    # embedding and of the lm_head than an even share.
    slack = 2 * n * HIDDEN * 4
    for r, res in enumerate(results):
        assert res["kv_heads"] == KV_HEADS // n
        assert res["qkv_rows"] == (HEADS + 2 * KV_HEADS) // n * HEAD_DIM
        share = (total - replicated) / n + replicated
        assert abs(res["bytes_read"] - share) <= slack, (r, res["bytes_read"], share)
    assert sum(res["bytes_read"] for res in results) == total + (n - 1) * replicated


def test_a_degree_that_does_not_divide_the_kv_heads_is_refused(ckpt):
    with pytest.raises(ValueError, match="tensor_parallel_size 3 does not divide the model's num_key_value_heads 4"):
        Solar.from_pretrained(ckpt, tensor_parallel_size=3)
    config = SolarConfig.from_pretrained(ckpt)
    for bad in (0, -2, True, 2.0):
        with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1"):
            ShardSizes.of(config, bad)
    with pytest.raises(RuntimeError, match="needs an initialised torch.distributed process group"):
        Solar.from_pretrained(ckpt, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1, got True"):
        Solar.from_pretrained(ckpt, tensor_parallel_size=True)
    assert Solar.from_pretrained(ckpt, tensor_parallel_size=1).shard.world_size == 1  # one process, no group


def test_every_checkpoint_tensor_has_a_split_and_the_ranks_tile_it():
    from fastsolar.checkpoint import hf_keys

    assert {ours for _, ours, _ in hf_keys.KEY_MAP} == set(plan.SPLITS)
    for split, shape, part_start in ((plan.ROWS, (12, 5), 24), (plan.COLUMNS, (5, 12), None),
                                     (plan.VOCAB, (997, 3), None), (plan.WHOLE, (7,), None)):
        for n in (1, 2, 4):
            vocab_rows = -(-shape[0] // n)
            seen = torch.zeros(shape, dtype=torch.int64)
            for r in range(n):
                s = plan.rank_slice(split, shape, part_start, r, n, vocab_rows)
                seen[(s.rows,) if s.cols is None else (s.rows, s.cols)] += 1
                assert s.dest.stop - s.dest.start == s.rows.stop - s.rows.start
                if split == plan.ROWS:
                    assert s.dest.start == part_start // n
            expected = n if split == plan.WHOLE else 1
            assert bool((seen == expected).all()), (split, n)
