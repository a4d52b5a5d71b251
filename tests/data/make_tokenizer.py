"""Train the tiny Llama-style sentencepiece model the tokenizer and CLI tests use.

Tests call `train_tokenizer(dir)` at session scope (under a second); run this file directly to write
`tokenizer.model` into a directory of your choice for poking at by hand:

    python tests/data/make_tokenizer.py /tmp/tok

Settings mirror Llama-2's tokenizer.model (what SOLAR ships): BPE, byte fallback, digits split, identity
normalisation, dummy prefix on, whitespace kept as is, unk 0 / bos 1 / eos 2, no pad. The vocabulary is
small (384) so that plenty of text falls back to bytes, and the corpus mixes ASCII, accents, CJK and emoji.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

VOCAB_SIZE = 512

_LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today? I am fine, thank you.",
    "Once upon a time there was a little model that wanted to talk.",
    "### User:\nWhat is the capital of France?\n\n### Assistant:\nThe capital of France is Paris.",
    "### System:\nYou are a helpful assistant.\n\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 1234 3.14159 2024-01-01",
    "Café, naïve, résumé, façade, Ångström, über, señor, crème brûlée.",
    "日本語のテキストです。東京は日本の首都です。",
    "中文文本：你好，世界！今天天气很好。",
    "한국어 문장입니다. 안녕하세요!",
    "Emoji: 😀 🚀 👍 🎉 ❤️ and a euro sign € and a pound sign £.",
    "    indented code block\n\tdef f(x):\n\t\treturn x * 2\n",
    "Multiple   spaces   and\nnew lines\n\nand trailing space ",
    "def main():\n    print('hello world')\n    return 0\n",
]


def corpus() -> str:
    # Repeat so BPE sees the frequent ASCII pairs often; the rare CJK / emoji stay rare (byte fallback).
    return "\n".join(_LINES * 20) + "\n"


def train_tokenizer(out_dir: str | Path) -> Path:
    """Write `tokenizer.model` into `out_dir` and return its path."""
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus().splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        split_digits=True,
        character_coverage=0.98,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_by_unicode_script=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
        num_threads=1,
    )
    path = out_dir / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_tokenizer.py OUT_DIR")
    print(train_tokenizer(sys.argv[1]))
