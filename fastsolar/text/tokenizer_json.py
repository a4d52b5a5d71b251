"""Checkpoints that ship only `tokenizer.json` (Llama-3-class byte-level BPE and other Llama-family ones), read
with the maintained `tokenizers` library, which is what transformers' fast tokenizers run.

Encoding is `tokenizers`' own: its added tokens (special and not) are matched in the text, its post-processor
decides what `tokenizer(text)` adds around the ids (`add_bos_token` / `add_eos_token` are read from it: a
post-processor that adds anything but bos / eos is refused). `encode(text)` (the native call) encodes the text
as it is: special-token strings in it are split into ordinary pieces, as transformers'
`split_special_tokens=True` does. bos / eos / unk / pad strings and the chat template come from
tokenizer_config.json and chat_template.jinja (`fastsolar.text.base.read_tokenizer_config`); a tokenizer.json
without a chat template in its folder gets SOLAR's, as the sentencepiece tokenizer does.

`decode(ids, skip_special_tokens=)` is `tokenizers`' decode: with `skip_special_tokens=True` every added token
marked special is dropped (transformers' fast `decode` does the same). The stream decoder is the shared one
(`fastsolar.text.base.StreamDecoder`): text comes out only at complete UTF-8 characters, and the pieces
concatenate to `decode(ids, skip_special_tokens=True)`.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastsolar.text.base import SPECIAL_TOKEN_KEYS, VERY_LARGE_INTEGER, TokenizerBase
from fastsolar.text.chat import SOLAR_CHAT_TEMPLATE

logger = logging.getLogger(__name__)

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_level_values() -> dict[str, int]:
    """The byte-level alphabet (GPT-2's bytes_to_unicode) inverted: character of a piece -> the byte it stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class JsonTokenizer(TokenizerBase):
    """A `tokenizer.json` tokenizer plus special tokens and chat template; see the module docstring."""

    VOCAB_FILE = "tokenizer.json"
    # The post-processor in tokenizer.json decides what `tokenizer(text)` adds, as in transformers' fast
    # tokenizers; the config's add_bos_token / add_eos_token are not read (from_pretrained's options still are).
    CONFIG_IGNORED = ("add_bos_token", "add_eos_token")

    def __init__(
        self,
        tokenizer_file: str | Path,
        *,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        padding_side: str = "left",
        truncation_side: str = "right",
        model_max_length: int = VERY_LARGE_INTEGER,
    ) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        path = Path(tokenizer_file)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            self.tk = RustTokenizer.from_file(str(path))
            # A second copy that splits special-token strings into ordinary pieces (the native `encode`): a flag
            # on one shared object would be state that concurrent callers (the server's threads) race on.
            self._tk_plain = RustTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises its own Exception subclass on a malformed file
            raise ValueError(f"{path} is not a tokenizers tokenizer.json: {e}") from None
        self._tk_plain.encode_special_tokens = True
        self.vocab_file = path
        self.vocab_size: int = self.tk.get_vocab_size(with_added_tokens=True)
        tokens = dict.fromkeys(SPECIAL_TOKEN_KEYS)
        tokens.update({k: v for k, v in (special_tokens or {}).items() if v is not None})
        self.special_tokens: dict[str, str | None] = tokens
        for key in ("bos_token", "eos_token"):
            if tokens[key] is None or self._piece_id(tokens[key]) is None:
                raise ValueError(
                    f"{path.parent}: {key} {tokens[key]!r} is not a token of {path.name}; a Llama-style tokenizer "
                    "needs both bos and eos (tokenizer_config.json's bos_token / eos_token)"
                )
        self.bos_id: int = self._piece_id(tokens["bos_token"])
        self.eos_id: int = self._piece_id(tokens["eos_token"])
        unk = self._piece_id(tokens["unk_token"])
        self.unk_id: int = -1 if unk is None else unk
        self.pad_id: int | None = self._piece_id(tokens["pad_token"])
        # What `decode(skip_special_tokens=True)` drops: the added tokens marked special.
        self.special_ids: frozenset[int] = frozenset(
            i for i, t in self.tk.get_added_tokens_decoder().items() if t.special
        )
        self._byte_level = _uses_byte_level(path)
        self.chat_template: str = chat_template if chat_template is not None else SOLAR_CHAT_TEMPLATE
        head, tail = self._post_processor_affixes()
        self.add_bos_token = head == [self.bos_id] if add_bos_token is None else add_bos_token
        self.add_eos_token = tail == [self.eos_id] if add_eos_token is None else add_eos_token
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.model_max_length = model_max_length
        if tokens["pad_token"] is not None and self.pad_id is None:
            logger.warning("pad_token %r is not a token of %s; the tokenizer has no pad id", tokens["pad_token"], path)

    def _post_processor_affixes(self) -> tuple[list[int], list[int]]:
        """The ids the post-processor puts before and after a single sequence."""
        probe = "a"
        body = self.tk.encode(probe, add_special_tokens=False).ids
        full = self.tk.encode(probe, add_special_tokens=True).ids
        for start in range(len(full) - len(body) + 1):
            if full[start:start + len(body)] == body:
                head, tail = full[:start], full[start + len(body):]
                if head not in ([], [self.bos_id]) or tail not in ([], [self.eos_id]):
                    raise ValueError(
                        f"{self.vocab_file}: the post-processor adds {self.convert_ids_to_tokens(head)} before and "
                        f"{self.convert_ids_to_tokens(tail)} after a text; fastsolar supports bos before and eos after"
                    )
                return head, tail
        raise ValueError(f"{self.vocab_file}: the post-processor changes the text's own ids")

    # -- the vocabulary --------------------------------------------------------------------------------

    def _piece_id(self, piece: str | None) -> int | None:
        return None if piece is None else self.tk.token_to_id(piece)

    def id_to_piece(self, token_id: int) -> str:
        return self.tk.id_to_token(self._check_id(token_id))

    def token_bytes(self, token_id: int) -> bytes:
        piece = self.id_to_piece(token_id)
        if token_id in self.special_ids:
            return piece.encode()
        if (m := _BYTE_PIECE.fullmatch(piece)) is not None:  # byte fallback
            return bytes([int(m.group(1), 16)])
        if self._byte_level:
            values = _byte_level_values()
            return bytes(values[c] for c in piece) if all(c in values for c in piece) else piece.encode()
        return piece.replace("\u2581", " ").encode()  # sentencepiece-style metaspace

    def _encode_text(self, text: str) -> list[int]:
        return self._tk_plain.encode(text, add_special_tokens=False).ids

    def encode_specials(self, text: str) -> list[int]:
        """Token ids of `text` (no bos/eos added), its added tokens ("<|eot_id|>", ...) matched as transformers'
        fast tokenizers match them."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self.tk.encode(text, add_special_tokens=False).ids if text else []

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def _decode_content(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=False)

    def _starts_with_continuation_byte(self, token_id: int) -> bool:
        piece = self.tk.id_to_token(token_id)
        if not piece:
            return False
        m = _BYTE_PIECE.fullmatch(piece)
        if m is not None:  # byte fallback
            first = int(m.group(1), 16)
        elif self._byte_level and piece[0] in _byte_level_values():
            first = _byte_level_values()[piece[0]]
        else:
            return False
        return 0x80 <= first < 0xC0

    def _config_class(self) -> dict[str, Any]:
        return {"tokenizer_class": "PreTrainedTokenizerFast"}



def _uses_byte_level(path: Path) -> bool:
    """Whether the decoder maps pieces through the byte-level alphabet (Llama-3, GPT-2 style vocabularies)."""
    decoder = json.loads(path.read_text(encoding="utf-8")).get("decoder") or {}
    parts = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    return any(isinstance(p, Mapping) and p.get("type") == "ByteLevel" for p in parts)
