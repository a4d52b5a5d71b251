"""generation_config.json as `model.generation_config`, applied as transformers applies it: the same checkpoint
stops where transformers' generate stops (two EOS ids, max_new_tokens from the file), explicit call arguments win,
and the file's sampling settings are used only when it (or the call) samples."""
from __future__ import annotations

import json
import logging

import hf_fixtures as F
import pytest
import torch
import transformers

from fastsolar import Solar
from fastsolar.hf.generation_config import GenerationConfig

PROMPTS = [[5, 77, 301, 12, 9, 640], [800, 3, 41, 41, 7, 19]]


def _write(d, **fields) -> None:
    (d / "generation_config.json").write_text(json.dumps(fields))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(dir, X): a checkpoint whose generation_config.json has eos_token_id [2, X] and max_new_tokens 5, X the
    third token greedy decoding gives PROMPTS[0] (new to that continuation and absent from PROMPTS[1]'s first 5)."""
    hf = F.build_hf_model(seed=5)
    d = F.save(hf, tmp_path_factory.mktemp("gencfg") / "ckpt")
    first, _ = F.greedy_ids(hf, PROMPTS[0], 5)
    second, _ = F.greedy_ids(hf, PROMPTS[1], 5)
    x = first[2]
    assert x not in first[:2] and x not in second and F.EOS_ID not in first + second, (first, second)
    _write(d, bos_token_id=1, eos_token_id=[F.EOS_ID, x], pad_token_id=F.PAD_ID, max_new_tokens=5)
    return d, x


@pytest.fixture(scope="module")
def pair(ckpt):
    d, _ = ckpt
    hf = transformers.LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    return hf, Solar.from_pretrained(d, device="cpu", dtype="float32")


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(PROMPTS), torch.ones(len(PROMPTS), len(PROMPTS[0]), dtype=torch.int64)


def test_file_is_read_at_load(pair, ckpt) -> None:
    _, model = pair
    gc = model.generation_config
    assert (gc.eos_token_id, gc.max_new_tokens, gc.pad_token_id, gc.bos_token_id) == ([F.EOS_ID, ckpt[1]], 5, 0, 1)
    assert gc.do_sample is None and gc.temperature is None


def test_stops_where_transformers_stops(pair, ckpt) -> None:
    """Row 0 reaches X at its third token, row 1 runs to the file's max_new_tokens 5; finished rows get pad."""
    hf, model = pair
    ids, mask = _batch()
    want = hf.generate(ids, attention_mask=mask)  # the file's eos ids and max_new_tokens, greedy
    got = model.generate(ids, attention_mask=mask)
    assert want.shape[1] == ids.shape[1] + 5 and want[0, ids.shape[1] + 2] == ckpt[1]
    assert torch.equal(got, want), (got.tolist(), want.tolist())
    # Row 0 alone stops at X: three new tokens in both.
    alone = model.generate(ids[:1])
    assert alone.shape[1] == ids.shape[1] + 3 and torch.equal(alone, hf.generate(ids[:1]))
    streamed = list(model.stream(ids[:1]))
    assert len(streamed) == 3


def test_call_arguments_win(pair, ckpt) -> None:
    hf, model = pair
    ids, mask = _batch()
    width = ids.shape[1]
    # A call's max_length wins over the file's max_new_tokens here; transformers lets the file's max_new_tokens
    # win (with a warning), so its reference is asked for the same length as max_new_tokens.
    for kwargs, hf_kwargs in ((dict(max_new_tokens=8, eos_token_id=F.EOS_ID), None),
                              (dict(max_length=width + 7, eos_token_id=F.EOS_ID),
                               dict(max_new_tokens=7, eos_token_id=F.EOS_ID)),
                              (dict(max_new_tokens=2), None)):
        want = hf.generate(ids, attention_mask=mask, **(hf_kwargs or kwargs))
        got = model.generate(ids, attention_mask=mask, **kwargs)
        assert torch.equal(got, want), (kwargs, got.tolist(), want.tolist())
    assert model.generate(ids, max_new_tokens=8, eos_token_id=F.EOS_ID).shape[1] == width + 8
    assert model.generate(ids, max_length=width + 7, eos_token_id=F.EOS_ID).shape[1] == width + 7


def test_sampling_settings_apply_only_when_sampling(tmp_path, ckpt) -> None:
    """do_sample true in the file: its temperature / top_k / top_p are the defaults (the call can override);
    do_sample false with a temperature in the file: greedy, as transformers."""
    d, _ = ckpt
    ids = torch.tensor(PROMPTS)
    model = Solar.from_pretrained(d, device="cpu", dtype="float32")
    greedy = model.generate(ids, max_new_tokens=6, eos_token_id=[])
    native = model.generate(ids, max_new_tokens=6, eos_token_id=[], seed=3, do_sample=True, temperature=1.7,
                            top_k=40, top_p=0.95)  # the settings given in the call, before the file has any
    model.generation_config = GenerationConfig(do_sample=True, temperature=1.7, top_k=40, top_p=0.95)
    sampled = model.generate(ids, max_new_tokens=6, eos_token_id=[], seed=3)
    assert torch.equal(sampled, native) and not torch.equal(sampled, greedy)
    # A call temperature without do_sample decides by itself (native rule): temperature 0 is greedy.
    assert torch.equal(model.generate(ids, max_new_tokens=6, eos_token_id=[], temperature=0.0), greedy)
    assert torch.equal(model.generate(ids, max_new_tokens=6, eos_token_id=[], do_sample=False), greedy)
    model.generation_config = GenerationConfig(do_sample=False, temperature=1.7, top_k=40)
    assert torch.equal(model.generate(ids, max_new_tokens=6, eos_token_id=[], seed=3), greedy)
    # ... and do_sample=True in the call takes the file's temperature / top_k.
    assert torch.equal(model.generate(ids, max_new_tokens=6, eos_token_id=[], seed=3, do_sample=True,
                                      top_p=0.95), sampled)


def test_bad_file_is_refused_and_unapplied_fields_warned(tmp_path, caplog) -> None:
    _write(tmp_path, eos_token_id="</s>")
    with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id must be a token id or a list"):
        GenerationConfig.from_pretrained(tmp_path)
    _write(tmp_path, max_new_tokens=-1)
    with pytest.raises(ValueError, match=r"max_new_tokens must be an integer >= 0, got -1"):
        GenerationConfig.from_pretrained(tmp_path)
    _write(tmp_path, num_beams=4, use_cache=True, transformers_version="5.0", top_p=0.9)
    with caplog.at_level(logging.WARNING, logger="fastsolar.hf.generation_config"):
        gc = GenerationConfig.from_pretrained(tmp_path)
    assert gc.top_p == 0.9 and "num_beams=4: beam search is not implemented" in caplog.text
    assert "use_cache" not in caplog.text
    assert GenerationConfig.from_pretrained(tmp_path / "missing") == GenerationConfig()
