"""transformers' tokenizer calls on fastsolar's Tokenizer (`tokenize`, `convert_ids_to_tokens`,
`convert_tokens_to_ids`, `encode(..., add_special_tokens=)`, `save_pretrained`, `model_max_length`), each
against transformers' own tokenizer (AutoTokenizer) on the same folder: the real Mistral/SOLAR tokenizer.model
and the small trained one (tests/data/make_tokenizer.py).

transformers 5 converts tokenizer.model into a tokenizers-library tokenizer that differs from sentencepiece on
leading spaces and runs of spaces (the project's reference there is sentencepiece, what SOLAR's transformers
4.35 gives), so `tokenize` is compared with transformers on the texts where the two tokenizations agree, and
with sentencepiece's own pieces on every text.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hf_fixtures import make_tokenizer_module, real_tokenizer_path
from test_tokenizer import STRINGS

from fastsolar import AutoTokenizer, Tokenizer
from fastsolar.text.base import VERY_LARGE_INTEGER
from fastsolar.text.chat import SOLAR_CHAT_TEMPLATE

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.cpu_only

# Leading spaces, runs of spaces and a space after a special token (sentencepiece adds its dummy prefix there
# too, legacy Llama behaviour): transformers 5's converted tokenizer differs from sentencepiece on these.
SPACE_RUNS = {
    " leading space", "  two leading spaces", "multiple   inner    spaces", " ", "   ",
    "    def f(x):\n        return x * 2\n", "Hi <s> there</s>",
}
EXTRA = ["Hi <s> there</s>", "Hi <s>there</s>", "a<unk>b", "<s>", "x😀y 日本", "tab\there\n\nnew line"]

CONFIG = {
    "tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True, "add_eos_token": False,
    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
    "clean_up_tokenization_spaces": False,
}


def _real(d: Path) -> None:
    shutil.copy(real_tokenizer_path(), d / "tokenizer.model")


def _small(d: Path) -> None:
    make_tokenizer_module().train_tokenizer(d)


@pytest.fixture(scope="module", params=["real", "small"])
def folder(request, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp(f"tok_{request.param}")
    (_real if request.param == "real" else _small)(d)
    (d / "tokenizer_config.json").write_text(json.dumps({**CONFIG, "chat_template": SOLAR_CHAT_TEMPLATE}))
    return d


@pytest.fixture(scope="module")
def pair(folder):
    return Tokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(str(folder))


def test_tokenize_matches_transformers_and_sentencepiece(pair):
    tok, hf = pair
    for text in STRINGS + EXTRA:
        pieces = tok.tokenize(text)
        assert pieces == [tok.sp.IdToPiece(i) for i in tok.encode_specials(text)]
        if "<" not in text:
            assert pieces == (tok.sp.EncodeAsPieces(text) if text else []), text
        if text not in SPACE_RUNS:
            assert pieces == hf.tokenize(text), text
            assert tok.tokenize(text, add_special_tokens=True) == hf.tokenize(text, add_special_tokens=True), text
    assert tok.tokenize("Hi", add_special_tokens=True)[0] == "<s>"


def test_convert_ids_and_tokens_match_transformers(pair):
    tok, hf = pair
    every = list(range(len(tok)))
    pieces = tok.convert_ids_to_tokens(every)
    assert pieces == hf.convert_ids_to_tokens(every)
    assert tok.convert_tokens_to_ids(pieces) == every == hf.convert_tokens_to_ids(pieces)
    assert tok.convert_ids_to_tokens(every, skip_special_tokens=True) == hf.convert_ids_to_tokens(
        every, skip_special_tokens=True) == pieces[3:]
    assert tok.convert_ids_to_tokens(5) == hf.convert_ids_to_tokens(5) == "<0x02>"
    for unknown in ("not-a-piece-at-all", "", "<S>"):
        assert tok.convert_tokens_to_ids(unknown) == hf.convert_tokens_to_ids(unknown) == tok.unk_token_id == 0
    assert tok.convert_tokens_to_ids(["<s>", "nope", "</s>"]) == hf.convert_tokens_to_ids(["<s>", "nope", "</s>"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.convert_ids_to_tokens([1, len(tok)])
    with pytest.raises(TypeError, match="strings"):
        tok.convert_tokens_to_ids(["<s>", 3])


def test_encode_with_transformers_keywords(pair):
    tok, hf = pair
    for text in [t for t in STRINGS + EXTRA if t not in SPACE_RUNS]:
        for add in (True, False):
            assert tok.encode(text, add_special_tokens=add) == hf.encode(text, add_special_tokens=add), (text, add)
    text = "Hello world, a longer sentence"
    assert tok.encode(text, max_length=4, truncation=True) == hf.encode(text, max_length=4, truncation=True)
    assert tok.encode(text, return_tensors="pt").tolist() == hf.encode(text, return_tensors="pt").tolist()
    # The native call is unchanged: the text as it is, bos by default.
    body = tok.sp.EncodeAsIds("a<s>b")
    assert tok.encode("a<s>b") == [1, *body] and tok.encode("a<s>b", bos=False, eos=True) == [*body, 2]
    assert tok.encode("a<s>b", add_special_tokens=False) == hf.encode("a<s>b", add_special_tokens=False)
    assert 1 in tok.encode("a<s>b", add_special_tokens=False)
    with pytest.raises(TypeError, match="not both"):
        tok.encode("x", bos=False, add_special_tokens=False)
    with pytest.raises(TypeError, match="frobnicate"):
        tok.encode("x", frobnicate=1)


def test_model_max_length(folder, tmp_path):
    tok, hf = Tokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
    assert tok.model_max_length == hf.model_max_length == VERY_LARGE_INTEGER  # transformers' sentinel
    d = tmp_path / "sized"
    shutil.copytree(folder, d)
    (d / "tokenizer_config.json").write_text(json.dumps({**CONFIG, "model_max_length": 4096}))
    assert Tokenizer.from_pretrained(d).model_max_length == 4096
    assert transformers.AutoTokenizer.from_pretrained(str(d)).model_max_length == 4096


def test_save_pretrained_round_trips(folder, tmp_path):
    tok = AutoTokenizer.from_pretrained(folder, padding_side="right", pad_token="</s>", add_eos_token=True)
    tok.model_max_length = 2048
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    out = tmp_path / "saved" / "nested"
    written = tok.save_pretrained(out)
    assert sorted(Path(p).name for p in written) == [
        "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]
    assert all(Path(p).parent == out for p in written)

    ours = Tokenizer.from_pretrained(out)
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    conv = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}]
    for t in (ours, hf):
        assert (t.padding_side, t.model_max_length, t.pad_token_id, t.pad_token) == ("right", 2048, 2, "</s>")
        assert (t.bos_token, t.eos_token, t.unk_token) == ("<s>", "</s>", "<unk>")
        assert t.apply_chat_template(conv, tokenize=False) == "<user>Hi there<assistant>Hello"
    texts = ["Hello world", "x😀y 日本", "Hi <s>there"]
    assert ours.add_eos_token and ours.add_bos_token
    assert ours(texts, padding=True).input_ids == hf(texts, padding=True).input_ids
    assert ours(texts, padding=True).input_ids == tok(texts, padding=True).input_ids
    assert ours.tokenize("Hello world") == tok.tokenize("Hello world") == hf.tokenize("Hello world")
    assert len(ours) == len(hf) == len(tok)

    # Saving into the folder it was loaded from keeps tokenizer.model as it is.
    again = Tokenizer.from_pretrained(out)
    again.save_pretrained(out)
    assert (out / "tokenizer.model").read_bytes() == (folder / "tokenizer.model").read_bytes()
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="file"):
        tok.save_pretrained(tmp_path / "file")
