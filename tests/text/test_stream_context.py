"""The streaming decoder after a prompt (`tok.stream_decoder(context=prompt)`): its pieces join to
decode(prompt + tokens) minus decode(prompt), whatever the tokens (plain pieces, byte pieces, specials), and its
no-decode fast path for plain sentencepiece pieces adds exactly what sentencepiece's own decode adds."""
from __future__ import annotations

import random

import hf_fixtures
import pytest
import sentencepiece as spm
from helpers import joined

from fastsolar import Tokenizer


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    d = tmp_path_factory.mktemp("real_tok")
    (d / "tokenizer.model").write_bytes(hf_fixtures.real_tokenizer_path().read_bytes())
    return Tokenizer.from_pretrained(d), spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))


def test_plain_piece_table_is_what_sentencepiece_decodes_after_text(real):
    tok, sp = real
    table = tok._plain_texts()
    anchor = sp.PieceToId("\u2581the")
    plain = [i for i, t in enumerate(table) if t is not None]
    assert len(plain) > 31000 and all(table[i] is None for i in tok.special_ids)
    assert all(table[i] is None for i in range(sp.GetPieceSize()) if sp.IsByte(i))
    head = sp.DecodeIds([anchor])
    wrong = [i for i in plain if sp.DecodeIds([anchor, i]) != head + table[i]]
    assert not wrong, [(i, sp.IdToPiece(i)) for i in wrong[:5]]


def test_stream_after_a_prompt_joins_to_the_full_decode(real):
    tok, sp = real
    specials = tok.special_ids
    rng = random.Random(3)
    byte_ids = [i for i in range(sp.GetPieceSize()) if sp.IsByte(i)]
    normal = [i for i in range(3, sp.GetPieceSize()) if not sp.IsByte(i)]
    emoji = tok.encode("😀 日本", bos=False)  # byte-fallback runs among plain pieces

    def decode(ids):
        return sp.DecodeIds([i for i in ids if i not in specials])

    prompts = [tok.encode("The robot who"), [tok.bos_id], tok.encode("Café"), tok.encode("a 😀") + [tok.eos_id]]
    cut = tok.encode("x") + [byte_ids[0xE2]]  # a token-id prompt that ends inside a character
    assert decode(cut).endswith("\ufffd")
    for n, prompt in enumerate(prompts + [cut]):
        for trial in range(20):
            new = [rng.choice(normal) if rng.random() < 0.7 else rng.choice(emoji + byte_ids[:4] + [tok.eos_id])
                   for _ in range(rng.randint(1, 40))]
            d = tok.stream_decoder(prompt)
            got = "".join(d.push(i) for i in new) + d.flush()
            # The unfinished character's bytes are the prompt's, not the reply's: the context stops before them.
            context = prompt[:-1] if prompt is cut else prompt
            assert got == joined(decode, context, new), (n, trial, new)
