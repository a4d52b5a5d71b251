"""The SOLAR / Llama-2 tokenizer: sentencepiece's `tokenizer.model`, a streaming decoder, the chat format.

Encoding is sentencepiece's own (legacy Llama behaviour: the dummy prefix space is added, byte fallback
for characters outside the vocabulary, digits split), which is what transformers' Llama tokenizers
produce for SOLAR. `encode(text)` prepends bos by default, as `tokenizer(text)` does for SOLAR; it encodes
the text as it is, while `encode_specials(text)` (used by `tokenizer(text)` and `encode_chat`) first turns
the special-token strings in it ("<s>", "</s>", "<unk>") into their ids, as transformers does.

The special ids are every sentencepiece control id (bos, eos, pad) and unk. `decode(ids)` is
transformers' `decode`: with `skip_special_tokens=True` the special ids are dropped and the rest is
decoded with sentencepiece -- the leading space of the first piece (the dummy prefix) is dropped, and
byte-fallback pieces are joined into characters, an invalid or unfinished UTF-8 byte becoming one U+FFFD
per byte. With `skip_special_tokens=False` (the default, as in transformers) each special id is written as
its piece ("<s>", "</s>", "<unk>") and only the very first piece loses its dummy-prefix space, so
`[bos, "▁Hi"]` decodes to "<s> Hi".

`StreamDecoder` (from `tokenizer.stream_decoder()`) turns a token stream into text pieces whose
concatenation is exactly `decode(all ids, skip_special_tokens=True)`: it decodes a short window that
starts at the previous emit point and emits the difference, holding text back while it ends with U+FFFD
(a character whose bytes have not all arrived). Each push costs O(window), a few tokens, not O(generated
so far).

What does not depend on sentencepiece (special tokens under transformers' names, `tokenize`,
`convert_ids_to_tokens` / `convert_tokens_to_ids`, chat encoding, `save_pretrained`, tokenizer_config.json)
is `fastsolar.text.base.TokenizerBase`. The rest of transformers' tokenizer surface (`tokenizer(text, return_tensors="pt", padding=...)`,
`apply_chat_template(..., tokenize=...)`, `from_pretrained` options) is `fastsolar.Tokenizer` (fastsolar/api.py),
this class with transformers' arguments translated by `fastsolar.hf.compat`.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastsolar.text.base import VERY_LARGE_INTEGER, TokenizerBase
from fastsolar.text.chat import SOLAR_CHAT_TEMPLATE

logger = logging.getLogger(__name__)

class SentencePieceTokenizer(TokenizerBase):
    """sentencepiece model plus special ids and chat template; see the module docstring for semantics."""

    VOCAB_FILE = "tokenizer.model"

    def __init__(
        self,
        model_file: str | Path,
        *,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        padding_side: str = "left",
        truncation_side: str = "right",
        model_max_length: int = VERY_LARGE_INTEGER,
    ) -> None:
        import sentencepiece as spm

        path = Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path} is not a sentencepiece model: {e}") from None
        self.sp = sp
        self.vocab_file = self.model_file = path
        self.vocab_size: int = sp.GetPieceSize()
        self.bos_id: int = sp.bos_id()
        self.eos_id: int = sp.eos_id()
        self.unk_id: int = sp.unk_id()
        self.pad_id: int | None = sp.pad_id() if sp.pad_id() >= 0 else None
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{path} defines no bos or eos piece; a Llama-style tokenizer needs both")
        self.special_ids: frozenset[int] = frozenset(
            i for i in range(self.vocab_size) if sp.IsControl(i) or sp.IsUnknown(i)
        )
        self._byte_value: dict[int, int] = {
            i: int(sp.IdToPiece(i)[3:5], 16) for i in range(self.vocab_size) if sp.IsByte(i)
        }
        self._plain: list[str | None] | None = None  # _plain_texts(), made on first use
        self.chat_template: str = chat_template if chat_template is not None else SOLAR_CHAT_TEMPLATE
        tokens = {
            "bos_token": sp.IdToPiece(self.bos_id),
            "eos_token": sp.IdToPiece(self.eos_id),
            "unk_token": sp.IdToPiece(self.unk_id) if self.unk_id >= 0 else None,
            "pad_token": sp.IdToPiece(self.pad_id) if self.pad_id is not None else None,
        }
        tokens.update({k: v for k, v in (special_tokens or {}).items() if v is not None})
        self.special_tokens: dict[str, str | None] = tokens
        # What `tokenizer(text)` adds (transformers' add_bos_token / add_eos_token) and how it pads and cuts
        # batches: left padding by default, as generation wants (and as transformers' Llama tokenizer does).
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.model_max_length = model_max_length
        if tokens["pad_token"] is not None and self._piece_id(tokens["pad_token"]) is None:
            logger.warning("pad_token %r is not a piece of %s; the tokenizer has no pad id", tokens["pad_token"], path)

    # -- special tokens (transformers' attribute names) ---------------------------------------------

    def _piece_id(self, piece: str | None) -> int | None:
        if piece is None:
            return None
        i = self.sp.PieceToId(piece)
        return i if self.sp.IdToPiece(i) == piece else None

    # -- encoding / decoding ---------------------------------------------------------------------

    def _encode_text(self, text: str) -> list[int]:
        """sentencepiece's ids of `text` (dummy prefix added)."""
        return self.sp.EncodeAsIds(text)

    def encode_specials(self, text: str) -> list[int]:
        """Token ids of `text` (no bos/eos added) in which the special-token strings ("<s>", "</s>",
        "<unk>") become their ids, as transformers' tokenizer parses them; every other stretch is encoded
        with sentencepiece, dummy prefix included (legacy Llama behaviour, what SOLAR's tokenizer does)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        specials = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            piece = self.special_tokens.get(key)
            token_id = self._piece_id(piece)
            if piece and token_id is not None:
                specials[piece] = token_id
        ids: list[int] = []
        pos = 0
        while pos < len(text):
            hits = [(text.find(s, pos), s) for s in specials]
            hits = [(i, s) for i, s in hits if i >= 0]
            if not hits:
                ids.extend(self.encode(text[pos:], bos=False))
                break
            i, s = min(hits, key=lambda h: (h[0], -len(h[1])))
            if i > pos:
                ids.extend(self.encode(text[pos:i], bos=False))
            ids.append(specials[s])
            pos = i + len(s)
        return ids

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens:
            return self.sp.DecodeIds([i for i in ids if i not in self.special_ids])
        parts: list[str] = []
        run: list[int] = []
        for i in ids + [None]:
            if i is not None and i not in self.special_ids:
                run.append(i)
                continue
            if run:
                text = self.sp.DecodeIds(run)
                # sentencepiece drops the dummy-prefix space of a run's first piece; transformers drops it
                # only at the very start of the text, so a run after a special piece keeps it.
                if parts and self.sp.IdToPiece(run[0]).startswith("\u2581"):
                    text = " " + text
                parts.append(text)
                run = []
            if i is not None:
                parts.append(self.sp.IdToPiece(i))
        return "".join(parts)

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.IdToPiece(self._check_id(token_id))

    def is_byte(self, token_id: int) -> bool:
        return token_id in self._byte_value

    def token_bytes(self, token_id: int) -> bytes:
        b = self._byte_value.get(token_id)
        return bytes([b]) if b is not None else self.id_to_piece(token_id).replace("\u2581", " ").encode()

    def _decode_content(self, ids: list[int]) -> str:
        return self.sp.DecodeIds(ids)

    def _plain_texts(self) -> list[str | None]:
        # sentencepiece decodes a normal piece to its text with U+2581 as a space; bytes (merged into UTF-8),
        # control, unknown and unused pieces are decoded otherwise, and so is any piece at the text's start.
        if self._plain is None:
            sp = self.sp
            self._plain = [None if sp.IsByte(i) or sp.IsControl(i) or sp.IsUnknown(i) or sp.IsUnused(i)
                           else sp.IdToPiece(i).replace("\u2581", " ") for i in range(self.vocab_size)]
        return self._plain

    def _starts_with_continuation_byte(self, token_id: int) -> bool:
        b = self._byte_value.get(token_id)
        return b is not None and 0x80 <= b < 0xC0

    def _config_class(self) -> dict[str, Any]:
        # legacy=True: the dummy prefix after special tokens too, sentencepiece's own behaviour (SOLAR's setting).
        return {"tokenizer_class": "LlamaTokenizer", "legacy": True}
