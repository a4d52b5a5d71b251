"""`model(input_ids, attention_mask=None, labels=None)` against transformers' LlamaForCausalLM on the same saved
float32 weights: the output's shape and indexing, the logits, the loss with -100 labels, and padded batches
(left and right) whose rows get what they get alone."""
from __future__ import annotations

import hf_fixtures as F
import pytest
import torch
from helpers import DEVICE, assert_close, left_pad

from fastsolar import Solar

RTOL, ATOL = 1e-5, 1e-4  # float32 sums in another order: a few ulps of logits of magnitude ~10


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = F.build_hf_model(seed=3)
    d = F.save(hf, tmp_path_factory.mktemp("fwd") / "ckpt")
    return hf.to(DEVICE), Solar.from_pretrained(d, device=DEVICE, dtype="float32")


def _rows(lengths: list[int], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, F.VOCAB, (n,), generator=g) for n in lengths]


def _labels(ids: torch.Tensor, mask: torch.Tensor, seed: int) -> torch.Tensor:
    """ids as labels, -100 at the pads, at each row's first token (it would be predicted from a pad position,
    whose logits mean nothing) and at a few random real positions (as a prompt mask would put)."""
    g = torch.Generator().manual_seed(seed)
    drop = (torch.rand(ids.shape, generator=g) < 0.25).to(ids.device)
    first = torch.zeros_like(drop).scatter_(1, mask.argmax(dim=1, keepdim=True), True)
    return torch.where((mask == 0) | drop | first, torch.full_like(ids, -100), ids)


def test_logits_loss_and_indexing_match_transformers(pair) -> None:
    hf, model = pair
    ids = torch.stack(_rows([17, 17], seed=1)).to(DEVICE)
    labels = _labels(ids, torch.ones_like(ids), seed=2)
    with torch.no_grad():
        want = hf(input_ids=ids, labels=labels)
        got = model(ids, labels=labels)
        plain = model(ids)
    assert torch.isfinite(want.loss) and (labels == -100).any() and (labels != -100).any()
    assert_close(got.logits, want.logits, rtol=RTOL, atol=ATOL, msg="logits")
    assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6, msg="loss")
    assert got.loss.dtype == torch.float32 and got.loss.dim() == 0
    # Indexed as transformers' ModelOutput: with labels, [0] is the loss and [1] the logits; without, [0] is
    # the logits (transformers' own adds its KV cache after them).
    assert list(got.keys()) == list(want.keys())[:2] == ["loss", "logits"]
    assert got[0] is got.loss and got[1] is got.logits and got["logits"] is got.logits
    assert list(plain.keys()) == ["logits"] and plain.loss is None and plain[0] is plain.logits
    assert len(plain.to_tuple()) == 1
    assert torch.equal(plain.logits, got.logits)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_rows_get_what_they_get_alone(pair, side: str) -> None:
    """Each row of a padded batch (with its attention_mask): at its real tokens, the logits transformers gives
    the row alone, and the loss transformers gives the padded batch with position ids counted from each row's
    first token."""
    hf, model = pair
    rows = _rows([13, 5, 9, 1], seed=4)
    ids, mask = left_pad(rows, F.PAD_ID)
    if side == "right":  # the same rows with their pads moved to the end
        ids = torch.stack([torch.cat([r.to(DEVICE), ids.new_full((ids.shape[1] - len(r),), F.PAD_ID)]) for r in rows])
        mask = torch.stack([torch.cat([torch.ones(len(r)), torch.zeros(ids.shape[1] - len(r))]) for r in rows])
        mask = mask.to(DEVICE, torch.int64)
    labels = _labels(ids, mask, seed=5)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = model(ids, attention_mask=mask, labels=labels)
        want = hf(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels)
        for i, r in enumerate(rows):
            alone = hf(input_ids=r[None].to(DEVICE)).logits[0]
            real = mask[i].bool()
            assert_close(got.logits[i, real], alone, rtol=RTOL, atol=ATOL, msg=f"{side} row {i} ({len(r)} tokens)")
            # ... and what fastsolar gives the row alone
            assert_close(got.logits[i, real], model(r[None].to(DEVICE)).logits[0], rtol=RTOL, atol=ATOL)
    assert torch.isfinite(got.logits).all(), "pad positions must hold finite logits too"
    assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6, msg=f"{side}-padded loss")
    if side == "left":  # without the mask the left pads are tokens before the row's: its logits differ
        with torch.no_grad():
            unmasked = model(ids).logits
        assert (unmasked[1, mask[1].bool()] - got.logits[1, mask[1].bool()]).abs().max() > 1e-2


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(attention_mask=torch.tensor([[1, 0, 1, 1]])), ValueError, "a 0 between two 1s"),
        (dict(attention_mask=torch.tensor([[0, 0, 0, 0]])), ValueError, r"attention_mask rows \[0\] have no tokens"),
        (dict(attention_mask=torch.tensor([[1, 1, 2, 1]])), ValueError, "only 0 and 1"),
        (dict(attention_mask=torch.ones(1, 3, dtype=torch.int64)), ValueError, r"shape of input_ids \(1, 4\)"),
        (dict(labels=torch.ones(1, 3, dtype=torch.int64)), ValueError, r"labels must have the shape of input_ids"),
        (dict(labels=torch.tensor([[1, -100, F.VOCAB, 2]])), ValueError, f"token id {F.VOCAB} is outside"),
        (dict(labels=torch.ones(1, 4)), TypeError, "labels must be an int64"),
    ],
)
def test_bad_mask_or_labels_are_refused(pair, kwargs: dict, error: type, message: str) -> None:
    _, model = pair
    ids = torch.tensor([[5, 6, 7, 8]], device=DEVICE)
    with pytest.raises(error, match=message), torch.no_grad():
        model(ids, **{k: v.to(DEVICE) for k, v in kwargs.items()})
