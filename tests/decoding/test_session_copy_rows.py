"""DecodeSession.copy_rows: rows that get a prefilled row's cache decode exactly as that row does."""
from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, assert_close

from fastsolar import Solar
from fastsolar.config import SolarConfig
from fastsolar.decoding.session import DecodeSession


def test_copied_rows_decode_as_the_prefilled_row():
    config = SolarConfig(vocab_size=101, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         torch_dtype="float32")
    torch.manual_seed(0)
    model = Solar(config).to(DEVICE).eval().requires_grad_(False)
    session = DecodeSession(model, 5, 32)
    with torch.inference_mode():
        session.cache.k.fill_(float("nan"))  # unused slots poisoned: a row not copied would decode NaN
        session.cache.v.fill_(float("nan"))
        ids = torch.randint(0, 101, (1, 13), generator=torch.Generator().manual_seed(1)).to(DEVICE)
        session.prefill(ids, torch.tensor([13], device=DEVICE), rows=torch.tensor([2], device=DEVICE))
        session.copy_rows(2, [0, 4], 13)
        rows = torch.tensor([0, 2, 4], device=DEVICE)
        out = session.decode(torch.full((3,), 7, device=DEVICE), torch.full((3,), 13, device=DEVICE), rows)
        assert not out.isnan().any()
        assert torch.equal(out[0], out[1]) and torch.equal(out[2], out[1])
        assert session.cache.k[:, 1].isnan().all() and session.cache.k[:, 3].isnan().all()  # others untouched
        fresh = DecodeSession(model, 1, 32).prefill(torch.cat([ids, torch.tensor([[7]], device=DEVICE)], 1),
                                                    torch.tensor([14], device=DEVICE))
        assert_close(out[1], fresh[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("src, dst, length, message", [
    (0, [0, 1], 4, "distinct cache rows"), (0, [5], 4, r"in \[0, 5\)"), (0, [1, 1], 4, "distinct"),
    (0, [1], 0, r"length must be an integer in \[1, 32\]"), (0, [1], 33, "length"),
])
def test_copy_rows_refuses_bad_rows(src, dst, length, message):
    config = SolarConfig(vocab_size=11, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         torch_dtype="float32")
    session = DecodeSession(Solar(config).to(DEVICE).eval(), 5, 32)
    with pytest.raises(ValueError, match=message):
        session.copy_rows(src, dst, length)
