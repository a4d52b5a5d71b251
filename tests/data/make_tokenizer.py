"""Train the tiny tokenizers the tokenizer and CLI tests use: a Llama-style sentencepiece model
(`train_tokenizer`) and a Llama-3-style byte-level BPE tokenizer.json (`train_tokenizer_json`).

Tests call them at session scope (under a second each); run this file directly to write `tokenizer.model`
(or, with --json, tokenizer.json and its tokenizer_config.json) into a directory of your choice:

    python tests/data/make_tokenizer.py /tmp/tok
    python tests/data/make_tokenizer.py --json /tmp/tok-json

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


JSON_VOCAB_SIZE = 400
JSON_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Llama-3's template, shortened: a header per message, <|eot_id|> after each, bos written by the template.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def train_tokenizer_json(out_dir: str | Path, *, template_file: bool = True) -> Path:
    """Write a Llama-3-style checkpoint tokenizer into `out_dir` and return the tokenizer.json path: byte-level
    BPE (400 tokens) with Llama-3's special tokens, two added non-special tokens (<think>, </think>) and a pad
    token, a post-processor that puts bos first, tokenizer_config.json (bos <|begin_of_text|>, eos <|eot_id|>,
    model_max_length 512) and the chat template in chat_template.jinja (`template_file=False`: in
    tokenizer_config.json instead)."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=JSON_VOCAB_SIZE, special_tokens=JSON_SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(corpus().splitlines(), trainer)
    tk.add_tokens([AddedToken("<think>", normalized=False), AddedToken("</think>", normalized=False)])
    tk.add_special_tokens([AddedToken("<|pad|>", normalized=False, special=True)])
    bos = JSON_SPECIALS[0]
    tk.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, tk.token_to_id(bos))]),
    ])
    path = out_dir / "tokenizer.json"
    tk.save(str(path))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": "<|eot_id|>",
              "model_max_length": 512, "clean_up_tokenization_spaces": False}
    if template_file:
        (out_dir / "chat_template.jinja").write_text(LLAMA3_TEMPLATE)
    else:
        config["chat_template"] = LLAMA3_TEMPLATE
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return path


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) == 2 and args[0] == "--json":
        print(train_tokenizer_json(args[1]))
    elif len(args) == 1:
        print(train_tokenizer(args[0]))
    else:
        sys.exit("usage: make_tokenizer.py [--json] OUT_DIR")
