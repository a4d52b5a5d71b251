"""Tokenizer: sentencepiece round trips, the streaming decoder, the SOLAR chat format.

Most tests use a small sentencepiece model trained at session scope by tests/data/make_tokenizer.py
(Llama-2 settings, 512 pieces, byte fallback), so much of the Unicode below goes through byte pieces.
The real Mistral-7B tokenizer.model that SOLAR ships (hf_fixtures.real_tokenizer_path) is checked against
sentencepiece itself on ordinary and whitespace-heavy texts (the last section). Reference: sentencepiece (what
transformers 4.35.2, SOLAR's pin, gives), never transformers 5.x's converted tokenizer, which differs on runs
of spaces and leading spaces.
"""
from __future__ import annotations

import importlib.util
import json
import random
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from hf_fixtures import real_tokenizer_path

from fastsolar import Tokenizer
from fastsolar.text.chat import SOLAR_CHAT_TEMPLATE, StopStringFilter
from fastsolar.text.base import _SLIDE_AT

# Exercises no device code: CI covers it; bench/gpu_check.sh deselects it (tests/conftest.py).
pytestmark = pytest.mark.cpu_only

DATA = Path(__file__).parents[1] / "data"

STRINGS = [
    "Hello world",
    "The capital of France is Paris.",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "trailing spaces   ",
    "multiple   inner    spaces",
    " ",
    "   ",
    "",
    "\n",
    "line one\nline two\n\nline four\n",
    "\ttabs\tand\r\nCRLF",
    "Café naïve résumé crème brûlée Ångström",
    "emoji 😀🚀 👍🏽 and ❤️ and a flag 🇰🇷",
    "日本語のテキストです。",
    "中文：你好，世界！",
    "한국어 문장입니다",
    "mixed 日本 café 😀 123 4567.89",
    "€5 £3 ¥100",
    "### User:\nHi\n\n### Assistant:\n",
    "a",
    "😀",
    "x😀y",
    "    def f(x):\n        return x * 2\n",
    "\u200bzero width\u200b and combining e\u0301",
]


def _make_tokenizer_module():
    spec = importlib.util.spec_from_file_location("make_tokenizer", DATA / "make_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    _make_tokenizer_module().train_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def tok(model_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def hf_tok(model_dir):
    """transformers' tokenizer for the same tokenizer.model (converted by AutoTokenizer), if it builds. Used only
    to render chat templates (transformers' jinja environment), never as a tokenization reference."""
    transformers = pytest.importorskip("transformers")
    try:
        t = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # conversion needs sentencepiece + protobuf; the API moves between versions
        pytest.skip(f"transformers cannot build a tokenizer from tokenizer.model here: {e}")
    if len(t) != 512:
        pytest.skip(f"transformers built a {len(t)}-token vocabulary instead of 512")
    return t


def _stream(tok: Tokenizer, ids) -> tuple[list[str], str]:
    d = tok.stream_decoder()
    pieces = [d.push(i) for i in ids]
    pieces.append(d.flush())
    return pieces, "".join(pieces)


def _piece_ids(tok: Tokenizer, *pieces: str) -> list[int]:
    ids = [tok.sp.PieceToId(p) for p in pieces]
    assert all(i != tok.unk_id for i in ids), pieces
    return ids


# -- basics ----------------------------------------------------------------------------------------

def test_special_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (1, 2, 0, None)
    assert tok.vocab_size == 512
    assert tok.special_ids == {0, 1, 2}
    assert tok.special_tokens["bos_token"] == "<s>" and tok.special_tokens["eos_token"] == "</s>"


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="sentencepiece"):
        Tokenizer.from_pretrained(tmp_path)


def test_encode_bos_eos(tok):
    body = tok.sp.EncodeAsIds("Hello world")
    assert tok.encode("Hello world") == [1] + body
    assert tok.encode("Hello world", bos=False) == body
    assert tok.encode("Hello world", eos=True) == [1] + body + [2]
    assert tok.encode("Hello world", bos=False, eos=True) == body + [2]
    assert tok.encode("") == [1]
    assert tok.encode("", bos=False) == []
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


def test_dummy_prefix_and_byte_fallback(tok):
    first = tok.id_to_piece(tok.encode("Hello", bos=False)[0])
    assert first.startswith("\u2581")  # the dummy prefix space, as Llama's sentencepiece adds it
    ids = tok.encode("😀", bos=False)
    assert [tok.id_to_piece(i) for i in ids] == ["\u2581", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert tok.encode("12", bos=False)[-2:] == _piece_ids(tok, "1", "2")  # split digits


@pytest.mark.parametrize("text", STRINGS)
def test_round_trip(tok, text):
    ids = tok.encode(text, eos=True)
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok.encode(text, bos=False)) == text  # no special ids: both modes agree


def test_decode_special_tokens_and_checks_ids(tok):
    a, b = tok.encode("Hello", bos=False), tok.encode("world", bos=False)
    skip = dict(skip_special_tokens=True)
    assert tok.decode([1] + a + [2, 0] + b + [2], **skip) == tok.decode(a + b) == "Hello world"
    assert tok.decode([1, 2, 0], **skip) == ""
    assert tok.decode(torch.tensor([1] + a), **skip) == "Hello"
    # transformers' default: special pieces written out; the space of a piece after one is kept.
    assert tok.decode([1] + a + [2, 0] + b + [2]) == "<s> Hello</s><unk> world</s>"
    assert tok.decode([1, 2, 0]) == "<s></s><unk>"
    assert tok.decode(torch.tensor([1] + a)) == "<s> Hello"
    assert tok.decode(2) == "</s>"
    assert tok.batch_decode(torch.tensor([[1] + a, a + [2]])) == ["<s> Hello", "Hello</s>"]
    assert tok.batch_decode([[1] + a, b], skip_special_tokens=True) == ["Hello", "world"]
    with pytest.raises(ValueError, match="batch_decode"):
        tok.decode(torch.tensor([[1] + a]))
    with pytest.raises(ValueError, match="clean_up_tokenization_spaces"):
        tok.decode(a, clean_up_tokenization_spaces=True)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([5, 512])
    with pytest.raises(ValueError):
        tok.decode([-1])
    with pytest.raises(TypeError):
        tok.decode(["a"])


def test_leading_space_rules(tok):
    sp_the = _piece_ids(tok, "\u2581the")
    assert tok.decode(sp_the) == "the"  # the first piece loses its dummy-prefix space ...
    assert tok.decode(sp_the + sp_the) == "the the"  # ... only the first
    assert tok.decode([1] + sp_the, skip_special_tokens=True) == "the"  # bos does not count as the first piece
    assert tok.decode([1] + sp_the) == "<s> the"  # unless written out, as transformers does
    assert tok.decode(_piece_ids(tok, "\u2581", "\u2581")) == " "
    assert _stream(tok, [1] + sp_the + sp_the)[1] == "the the"
    assert _stream(tok, _piece_ids(tok, "\u2581", "x"))[0] == ["", "x", ""]


# -- streaming -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", STRINGS)
def test_stream_matches_decode(tok, text):
    ids = tok.encode(text, eos=True)
    pieces, joined = _stream(tok, ids)
    assert joined == tok.decode(ids, skip_special_tokens=True) == text
    assert all("\ufffd" not in p for p in pieces)  # never shows half a character


def test_stream_byte_fallback_character(tok):
    euro = _piece_ids(tok, "<0xE2>", "<0x82>", "<0xAC>")
    d = tok.stream_decoder()
    assert [d.push(i) for i in euro] == ["", "", "\u20ac"]
    assert d.flush() == ""
    # A character split across tokens after text, and an unfinished one at the end of the stream.
    ids = tok.encode("ab", bos=False) + euro + euro[:2]
    pieces, joined = _stream(tok, ids)
    assert joined == tok.decode(ids) == "ab\u20ac\ufffd\ufffd"
    assert pieces[-1] == "\ufffd\ufffd"  # held back until flush
    # 4-byte emoji arriving byte by byte.
    ids = tok.encode("x😀", bos=False)
    pieces, joined = _stream(tok, ids)
    assert joined == "x😀" and "😀" in pieces


def test_stream_random_ids(tok):
    rng = random.Random(1234)
    byte_of = {i: int(tok.id_to_piece(i)[3:5], 16) for i in range(tok.vocab_size) if tok.is_byte(i)}
    cont = [i for i, v in byte_of.items() if 0x80 <= v < 0xC0]
    lead = [i for i, v in byte_of.items() if v >= 0xC0]
    pools = [
        list(range(tok.vocab_size)),
        list(byte_of),
        cont + lead,
        cont + lead + [0, 1, 2] + tok.encode(" the world", bos=False),
    ]
    for trial in range(1500):
        pool = pools[trial % len(pools)]
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 40))]
        assert _stream(tok, ids)[1] == tok.decode(ids, skip_special_tokens=True), ids


def test_stream_long_generation_window_stays_small(tok):
    rng = random.Random(7)
    normal = [i for i in range(3, tok.vocab_size) if not tok.is_byte(i)]
    ids = [rng.choice(normal) for _ in range(3000)]
    d = tok.stream_decoder()
    pieces, widest = [], 0
    for i in ids:
        pieces.append(d.push(i))
        widest = max(widest, len(d._ids))
    pieces.append(d.flush())
    assert "".join(pieces) == tok.decode(ids)
    assert widest <= 2 * _SLIDE_AT + 1  # O(window), not O(tokens so far)
    assert d.flush() == ""  # idempotent


def test_stream_continues_after_flush(tok):
    d = tok.stream_decoder()
    a, b = tok.encode("Hello", bos=False), tok.encode("world", bos=False)
    out = "".join(d.push(i) for i in a) + d.flush() + "".join(d.push(i) for i in b) + d.flush()
    assert out == tok.decode(a + b)


# -- chat template rendering against transformers' --------------------------------------------------

def test_chat_template_matches_transformers_rendering(tok, hf_tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    custom = "{% for m in messages %}\n  {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}\n{{ bos_token }}"
    for template in (SOLAR_CHAT_TEMPLATE, custom):
        for gen in (False, True):
            ours = Tokenizer(tok.model_file, chat_template=template).apply_chat_template(
                messages, tokenize=False, add_generation_prompt=gen)
            theirs = hf_tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                add_generation_prompt=gen)
            assert ours == theirs


# -- chat format -----------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello, how are you?"},
    {"role": "assistant", "content": "I'm doing great. How can I help you today?"},
    {"role": "user", "content": "I'd like to show off how chat templating works!"},
]
SOLAR_TEXT = (
    "### System:\nYou are a helpful assistant.\n\n"
    "### User:\nHello, how are you?\n\n"
    "### Assistant:\nI'm doing great. How can I help you today?"
    "### User:\nI'd like to show off how chat templating works!\n\n"
)


def test_solar_template_exact(tok):
    text = dict(tokenize=False)
    assert tok.apply_chat_template(CONVERSATION, **text) == SOLAR_TEXT  # transformers' default: no prompt
    assert tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, **text) == SOLAR_TEXT + "### Assistant:\n"
    # The public rendering of SOLAR-10.7B-Instruct-v1.0's template (no system message).
    assert tok.apply_chat_template(CONVERSATION[1:], add_generation_prompt=False, **text) == (
        "### User:\nHello, how are you?\n\n### Assistant:\nI'm doing great. How can I help you today?"
        "### User:\nI'd like to show off how chat templating works!\n\n"
    )
    # An empty system message is left out.
    empty_system = [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(empty_system, add_generation_prompt=True, **text) == "### User:\nHi\n\n### Assistant:\n"
    assert tok.chat_stop_strings == ("### User:", "### System:")


def test_encode_chat_solar(tok):
    text = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    ids = tok.encode_chat(CONVERSATION)
    assert ids == tok.encode(text) and ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_custom_template_from_tokenizer_config(model_dir, tmp_path):
    shutil.copy(model_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ raise_exception('no system messages, please') }}{% endif %}"
        "[{{ m['role'] }}] {{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
        "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    config = {"chat_template": template, "bos_token": {"content": "<s>", "__type": "AddedToken"}, "eos_token": "</s>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_pretrained(tmp_path)
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
            {"role": "user", "content": "Bye"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<s>[user] Hi\n[assistant] Yo</s>\n[user] Bye\n[assistant]")
    assert tok.apply_chat_template(msgs, tokenize=False) == "<s>[user] Hi\n[assistant] Yo</s>\n[user] Bye\n"
    ids = tok.encode_chat(msgs)
    # bos / eos strings in the rendered text become their ids (one bos, not the characters "<s>").
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1 and ids.count(tok.eos_id) == 1
    e = ids.index(tok.eos_id)
    assert ids[1:e] == tok.encode("[user] Hi\n[assistant] Yo", bos=False)
    assert tok.chat_stop_strings == ()
    with pytest.raises(ValueError, match="no system messages, please"):
        tok.apply_chat_template([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])
    # chat_template.jinja (transformers' newer save format) takes precedence.
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}<{{ m['content'] }}>{% endfor %}")
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template(msgs, tokenize=False) == "<Hi><Yo><Bye>"
    # Named templates (an older transformers format).
    (tmp_path / "chat_template.jinja").unlink()
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template(msgs, tokenize=False) == "D"


def test_template_syntax_error(tok):
    bad = Tokenizer(tok.model_file, chat_template="{% for m in messages %}")
    with pytest.raises(ValueError, match="chat template"):
        bad.apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    "messages, error, match",
    [
        ("hello", TypeError, "list"),
        ({"role": "user", "content": "x"}, TypeError, "list"),
        ([], ValueError, "empty"),
        (["hello"], ValueError, r"messages\[0\]"),
        ([{"role": "user"}], ValueError, "content"),
        ([{"content": "x"}], ValueError, "role"),
        ([{"role": "tool", "content": "x"}], ValueError, "tool"),
        ([{"role": "user", "content": "ok"}, {"role": "user", "content": 3}], ValueError, r"messages\[1\]"),
    ],
)
def test_bad_messages(tok, messages, error, match):
    with pytest.raises(error, match=match):
        tok.apply_chat_template(messages)


def test_stop_string_filter():
    f = StopStringFilter(["### User:", "### System:"])
    shown = []
    for piece in ["Sure", "! #", "## Us", "e", "r:", " more"]:
        text, stopped = f.push(piece)
        shown.append(text)
        if stopped:
            break
    assert "".join(shown) == "Sure! "
    assert stopped and f.matched == "### User:"
    assert f.push("anything") == ("", True) and f.flush() == ""

    f = StopStringFilter(["### User:"])
    assert f.push("a #") == ("a ", False)  # "#" might start the stop string
    assert f.push("# B") == ("## B", False)  # it did not
    assert f.push("##") == ("", False)
    assert f.flush() == "##"  # the end of the stream releases what was held

    f = StopStringFilter([])
    assert f.push("### User:") == ("### User:", False)


# -- the real tokenizer (Mistral-7B's, SOLAR's) against sentencepiece ----------------------------------

# Ordinary and whitespace-heavy texts: where transformers 5.x's converted tokenizer parts from sentencepiece.
REAL_TEXTS = [
    "Hello world",
    "The capital of France is Paris.",
    "SOLAR-10.7B is a 48-layer model; it was made by Depth Up-Scaling Mistral-7B.",
    "Hello  world",  # double space
    "a  b   c    d",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "trailing spaces   ",
    " ",
    "   ",
    "",
    "\n",
    "\n\n\n",
    " \n \n ",
    "line one\nline two\n\nline four\n",
    "\ttab\t\tand\r\nCRLF\r\n",
    "def f(x):\n    return x * 2\n",
    "    def f(x):\n        if x:\n            return [i  for i in x]\n        return None\n",
    "class A:\n\tdef g(self):\n\t\tpass\n",
    "    leading indent\n  then less\n",
    "x = {\n  'a': 1,\n  'b': [1,  2],\n}\n",
    "### User:\nHi there!\n\n### Assistant:\n",
    "Café naïve résumé crème brûlée Ångström",
    "日本語のテキストです。 中文：你好，世界！ 한국어 문장입니다",
    "emoji 😀🚀 👍🏽 ❤️ 🇰🇷",
    "mixed  日本  café 😀 123 4567.89 €5",
    "\u200bzero width\u200b and combining e\u0301",
    "1234567890 3.14159 -42 1e-5",
]


@pytest.fixture(scope="module")
def real():
    """(fastsolar's Tokenizer, a separate sentencepiece processor) on the real tokenizer.model."""
    path = real_tokenizer_path()
    return Tokenizer(path), spm.SentencePieceProcessor(model_file=str(path))


def test_real_tokenizer_specials(real):
    tok, sp = real
    assert tok.vocab_size == sp.vocab_size() == 32000
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (1, 2, 0, None)
    assert tok.special_tokens["bos_token"] == "<s>" and tok.special_tokens["eos_token"] == "</s>"


@pytest.mark.parametrize("text", REAL_TEXTS)
def test_real_tokenizer_matches_sentencepiece(real, text):
    tok, sp = real
    want = sp.encode(text)
    assert tok.encode(text, bos=False) == want
    assert tok.encode(text, eos=True) == [sp.bos_id()] + want + [sp.eos_id()]
    assert tok.decode(want) == sp.decode(want) == text  # identity normalizer: an exact round trip
    pieces, joined = _stream(tok, [sp.bos_id()] + want + [sp.eos_id()])  # the stream skips bos/eos
    assert joined == text
    assert all("\ufffd" not in p for p in pieces)


def test_real_tokenizer_whitespace_pieces(real):
    """Pinned ids for runs of spaces, leading spaces and indentation: sentencepiece's (and transformers 4.35.2's)
    answer, where transformers 5.x's converted tokenizer differs. A change here changes what SOLAR sees."""
    tok, _ = real
    cases = {
        "Hello world": [22557, 1526],
        "Hello  world": [22557, 28705, 1526],
        "  two leading": [259, 989, 5374],
        " ": [259],
        "\n\n": [28705, 13, 13],
        "    def f(x):\n        return x\n": [260, 801, 285, 28732, 28744, 1329, 13, 5390, 604, 1318, 13],
    }
    for text, ids in cases.items():
        assert tok.encode(text, bos=False) == ids, (text, [tok.id_to_piece(i) for i in tok.encode(text, bos=False)])
        assert tok.decode(ids) == text
    assert [tok.id_to_piece(i) for i in cases["Hello world"]] == ["\u2581Hello", "\u2581world"]


def test_real_tokenizer_stream_of_generated_ids(real):
    """Streaming decode of arbitrary id sequences (byte pieces, specials, multi-byte characters split across
    tokens) gives sentencepiece's decode of the content ids (the stream skips bos/eos/unk)."""
    tok, sp = real
    rng = random.Random(5)
    byte_ids = [i for i in range(sp.vocab_size()) if sp.is_byte(i)]
    text_ids = tok.encode("".join(REAL_TEXTS), bos=False)
    for trial in range(300):
        pool = (byte_ids, text_ids, byte_ids + text_ids + [0, 1, 2], list(range(sp.vocab_size())))[trial % 4]
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 24))]
        content = [i for i in ids if i not in (0, 1, 2)]
        assert _stream(tok, ids)[1] == tok.decode(content) == sp.decode(content), ids
