"""tokenizer.json checkpoints (fastsolar/text/tokenizer_json.py, the `tokenizers` library) against transformers'
PreTrainedTokenizerFast loading the same folder: encode, the call with padding, decode in both modes, the vocabulary
lookups, the chat template (from chat_template.jinja and from tokenizer_config.json), streaming decode,
save_pretrained; and which tokenizer `from_pretrained` picks.

The checkpoint tokenizer is a tiny Llama-3-style byte-level BPE trained by tests/data/make_tokenizer.py (400
tokens, so CJK and emoji are split into bytes across tokens), with special tokens, added non-special tokens and
a pad token.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from hf_fixtures import make_tokenizer_module
from test_tokenizer import STRINGS

from fastsolar import AutoTokenizer, Tokenizer, TokenizerFast

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.cpu_only

EXTRA = [
    "<|begin_of_text|>Hi<|eot_id|>", "a <think>b</think> c", "x<|pad|>y", "<|eot_id|><|eot_id|>",
    "<|start_header_id|>user<|end_header_id|>\n\nHello?<|eot_id|>", "not <|special|> at all", "  <think> ",
]
TEXTS = STRINGS + EXTRA
CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello? 日本 😀"},
        {"role": "assistant", "content": " Hi there. "}, {"role": "user", "content": "And   now?"}]


@pytest.fixture(scope="module", params=["chat_template.jinja", "tokenizer_config.json"])
def json_dir(request, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok_json")
    make_tokenizer_module().train_tokenizer_json(d, template_file=request.param == "chat_template.jinja")
    return d


@pytest.fixture(scope="module")
def tok(json_dir) -> TokenizerFast:
    return AutoTokenizer.from_pretrained(json_dir)


@pytest.fixture(scope="module")
def hf(json_dir):
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(json_dir))


def _plain(encoding) -> dict:
    return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in dict(encoding).items()}


def test_loads_as_transformers_does(tok, hf):
    assert isinstance(tok, TokenizerFast)
    assert len(tok) == len(hf) == 403
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<|begin_of_text|>", "<|eot_id|>", None,
                                                                           None)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (
        hf.bos_token_id, hf.eos_token_id, hf.unk_token_id, hf.pad_token_id) == (0, 4, None, None)
    assert tok.model_max_length == hf.model_max_length == 512
    assert tok.all_special_ids == hf.all_special_ids and tok.all_special_tokens == hf.all_special_tokens
    assert tok.add_bos_token and not tok.add_eos_token  # read from the post-processor
    assert tok.special_ids == {0, 1, 2, 3, 4, tok.convert_tokens_to_ids("<|pad|>")}


def test_encode_and_call_match_transformers(tok, hf):
    for text in TEXTS:
        for add in (True, False):
            assert tok.encode(text, add_special_tokens=add) == hf.encode(text, add_special_tokens=add), text
            assert _plain(tok(text, add_special_tokens=add)) == _plain(hf(text, add_special_tokens=add)), text
        assert tok.tokenize(text) == hf.tokenize(text), text
        assert tok.tokenize(text, add_special_tokens=True) == hf.tokenize(text, add_special_tokens=True), text
        # The native encode takes the text as it is: special-token strings are ordinary text there.
        assert tok.encode(text, bos=False) == hf(text, add_special_tokens=False, split_special_tokens=True).input_ids
        assert tok.encode(text) == [0] + tok.encode(text, bos=False)
        assert tok.decode(tok.encode(text, bos=False)) == text
    assert tok.encode_specials("<|eot_id|>") == [4] and 4 not in tok.encode("<|eot_id|>", bos=False)


@pytest.mark.parametrize("kwargs", [
    dict(padding=True), dict(padding="longest", padding_side="right"), dict(padding="max_length", max_length=40),
    dict(truncation=True, max_length=5, padding=True), dict(padding=True, return_tensors="pt"),
    dict(add_special_tokens=False, padding=True, pad_to_multiple_of=8),
])
def test_batch_matches_transformers(json_dir, kwargs):
    tok = AutoTokenizer.from_pretrained(json_dir, pad_token="<|pad|>")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(json_dir), pad_token="<|pad|>",
                                                              padding_side="left")
    texts = [t for t in TEXTS if t][:12]
    assert tok.pad_token_id == hf.pad_token_id == 402
    assert _plain(tok(texts, **kwargs)) == _plain(hf(texts, **kwargs))


def test_truncation_at_model_max_length(tok, hf):
    long = "Hello world, how are you today? " * 80
    assert len(hf(long).input_ids) > 512
    for kwargs in (dict(truncation=True), dict(truncation=True, add_special_tokens=False), dict(max_length=20)):
        ours = tok(long, **kwargs).input_ids
        assert ours == hf(long, **kwargs).input_ids
        assert len(ours) == kwargs.get("max_length", 512)
    assert tok(long).input_ids == hf(long).input_ids  # no truncation asked: the whole text


def test_decode_matches_transformers(tok, hf):
    rng = random.Random(0)
    cases = [hf.encode(t) + [4] for t in TEXTS]
    cases += [[rng.randrange(len(tok)) for _ in range(rng.randrange(1, 30))] for _ in range(200)]
    for ids in cases:
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids
    assert tok.batch_decode(cases[:3], skip_special_tokens=True) == hf.batch_decode(cases[:3],
                                                                                    skip_special_tokens=True)
    every = list(range(len(tok)))
    assert tok.convert_ids_to_tokens(every) == hf.convert_ids_to_tokens(every)
    assert tok.convert_ids_to_tokens(every, skip_special_tokens=True) == hf.convert_ids_to_tokens(
        every, skip_special_tokens=True)
    pieces = tok.convert_ids_to_tokens(every) + ["never-a-token", "<|eot_id|>", "<think>"]
    assert tok.convert_tokens_to_ids(pieces) == hf.convert_tokens_to_ids(pieces)
    assert tok.convert_tokens_to_ids("never-a-token") is None is hf.convert_tokens_to_ids("never-a-token")


def test_chat_template_matches_transformers(tok, hf):
    for gen in (False, True):
        text = tok.apply_chat_template(CONV, tokenize=False, add_generation_prompt=gen)
        assert text == hf.apply_chat_template(CONV, tokenize=False, add_generation_prompt=gen)
        assert text.startswith("<|begin_of_text|><|start_header_id|>system")
        assert _plain(tok.apply_chat_template(CONV, add_generation_prompt=gen)) == _plain(
            hf.apply_chat_template(CONV, add_generation_prompt=gen))
    # encode_chat (the CLI's and the server's prompt): the template writes bos itself, so it is not doubled.
    ids = tok.encode_chat(CONV)
    assert ids == hf.apply_chat_template(CONV, add_generation_prompt=True, return_dict=False)
    assert ids.count(0) == 1 and tok.chat_stop_strings == ()


def _stream(tok, ids) -> list[str]:
    d = tok.stream_decoder()
    return [d.push(i) for i in ids] + [d.flush()]


def test_stream_decoder_emits_whole_characters(tok, hf):
    for text in TEXTS:
        ids = hf.encode(text) + [4]
        pieces = _stream(tok, ids)
        assert "".join(pieces) == hf.decode(ids, skip_special_tokens=True), text
        assert not any("\ufffd" in p for p in pieces), (text, pieces)  # held until each character is whole
    emoji = tok.encode("😀", bos=False)
    assert len(emoji) > 1  # the 4 bytes span several tokens
    assert _stream(tok, emoji)[:-2] == [""] * (len(emoji) - 1)
    # Bytes that cannot become a character are let out once no later token can repair them, cut before a
    # token that starts a new character, so the text before the cut decodes as it will in the end.
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_token = {b: tok.convert_tokens_to_ids(c) for b, c in bytes_to_unicode().items()}
    ids = [byte_token[b] for b in (0x61, 0xE6, 0x97, 0xF0, 0x9F, 0x98, 0x80, 0x62)]
    pieces = _stream(tok, ids)
    assert "".join(pieces) == hf.decode(ids) == "a\ufffd😀b"
    assert pieces[5] == "\ufffd" and pieces[6] == "😀"
    rng = random.Random(1)
    for _ in range(300):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))]
        assert "".join(_stream(tok, ids)) == hf.decode(ids, skip_special_tokens=True), ids


def test_save_pretrained_round_trips(json_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(json_dir, padding_side="right", pad_token="<|pad|>")
    written = tok.save_pretrained(tmp_path / "saved")
    assert sorted(Path(p).name for p in written) == ["special_tokens_map.json", "tokenizer.json",
                                                     "tokenizer_config.json"]
    ours = AutoTokenizer.from_pretrained(tmp_path / "saved")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert isinstance(ours, TokenizerFast)
    texts = ["Hello world", "x😀y <think>", "<|eot_id|> a"]
    assert _plain(ours(texts, padding=True)) == _plain(hf(texts, padding=True)) == _plain(tok(texts, padding=True))
    for t in (ours, hf):
        assert (t.padding_side, t.pad_token_id, t.model_max_length) == ("right", 402, 512)
        assert t.apply_chat_template(CONV, tokenize=False) == tok.apply_chat_template(CONV, tokenize=False)


def test_from_pretrained_picks_by_file(json_dir, tmp_path):
    sp_dir = tmp_path / "sp"
    make_tokenizer_module().train_tokenizer(sp_dir)
    both = tmp_path / "both"
    shutil.copytree(json_dir, both)
    shutil.copy(sp_dir / "tokenizer.model", both / "tokenizer.model")
    assert type(Tokenizer.from_pretrained(both)) is Tokenizer  # tokenizer.model first, as before
    assert type(AutoTokenizer.from_pretrained(both)) is Tokenizer
    assert type(Tokenizer.from_pretrained(json_dir)) is TokenizerFast
    with pytest.raises(FileNotFoundError, match="neither tokenizer.model .* nor tokenizer.json"):
        AutoTokenizer.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="frobnicate"):
        TokenizerFast.from_pretrained(json_dir, frobnicate=1)

    bad = tmp_path / "bad"
    shutil.copytree(json_dir, bad)
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        AutoTokenizer.from_pretrained(bad)
    no_bos = tmp_path / "no_bos"
    shutil.copytree(json_dir, no_bos)
    config = json.loads((no_bos / "tokenizer_config.json").read_text())
    config["bos_token"] = "<s>"
    (no_bos / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="bos_token '<s>' is not a token"):
        AutoTokenizer.from_pretrained(no_bos)


def test_post_processor_adding_other_tokens_is_refused(json_dir, tmp_path):
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import processors

    d = tmp_path / "odd"
    shutil.copytree(json_dir, d)
    tk = RustTokenizer.from_file(str(d / "tokenizer.json"))
    tk.post_processor = processors.TemplateProcessing(
        single="$A <|end_of_text|>", special_tokens=[("<|end_of_text|>", tk.token_to_id("<|end_of_text|>"))])
    tk.save(str(d / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"adds \[\] before and \['<\|end_of_text\|>'\] after a text"):
        AutoTokenizer.from_pretrained(d)
    tk.post_processor = processors.TemplateProcessing(
        single="$A <|eot_id|>", special_tokens=[("<|eot_id|>", tk.token_to_id("<|eot_id|>"))])
    tk.save(str(d / "tokenizer.json"))
    eos_after = AutoTokenizer.from_pretrained(d)
    assert (eos_after.add_bos_token, eos_after.add_eos_token) == (False, True)
    assert eos_after("Hi").input_ids == transformers.PreTrainedTokenizerFast.from_pretrained(str(d))("Hi").input_ids
