"""What every fastsolar tokenizer shares, whatever its vocabulary file: `from_pretrained`, special tokens under
transformers' names, id checks, `decode` / `batch_decode`, the vocabulary lookups (`tokenize`,
`convert_ids_to_tokens`, `convert_tokens_to_ids`), chat encoding, the streaming decoder, the tokenizer_config.json
reader and `save_pretrained`.

A backend (sentencepiece's `tokenizer.model` in `tokenizer.py`, the tokenizers library's `tokenizer.json` in
`tokenizer_json.py`) supplies the vocabulary: `_encode_text` (text as it is, no special-token parsing),
`encode_specials`, `_piece_id`, `id_to_piece`, `_decode`, `_decode_content` and `_starts_with_continuation_byte`.
"""
from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fastsolar.text.chat import render_chat_template, stop_strings_for

logger = logging.getLogger(__name__)

#: transformers' `model_max_length` when tokenizer_config.json names none (`VERY_LARGE_INTEGER`, int(1e30)).
VERY_LARGE_INTEGER = int(1e30)

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")

_REPLACEMENT = "\ufffd"
# A UTF-8 character has at most 4 bytes, so at most 3 of them can be waiting for the rest.
_MAX_PENDING_BYTES = 4
# Prompt ids a StreamDecoder keeps as context: enough to start at a character boundary (a character is at most
# 4 byte pieces) with a whole piece before it; the decode rule is local beyond the text's first piece.
_CONTEXT_IDS = 8
# A StreamDecoder re-anchors its window once this many ids are emitted: one decode per token in between (a
# decode's cost is mostly per call), a window that never grows past a few dozen ids.
_SLIDE_AT = 24


class TokenizerBase:
    """The vocabulary-independent part of a tokenizer; see the module docstring. Subclasses set `vocab_file`,
    `vocab_size`,
    `bos_id`, `eos_id`, `unk_id`, `special_ids`, `special_tokens`, `chat_template`, `add_bos_token`,
    `add_eos_token`, `padding_side`, `truncation_side` and `model_max_length`."""

    #: The file in a checkpoint directory that holds the vocabulary, and the tokenizer_config.json settings the
    #: backend does not take from there.
    VOCAB_FILE: str
    CONFIG_IGNORED: tuple[str, ...] = ()

    vocab_file: Path
    vocab_size: int
    bos_id: int
    eos_id: int
    unk_id: int
    special_ids: frozenset[int]
    special_tokens: dict[str, str | None]
    chat_template: str
    add_bos_token: bool
    add_eos_token: bool
    padding_side: str
    truncation_side: str
    model_max_length: int

    # -- what a backend supplies -------------------------------------------------------------------

    def _encode_text(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_specials(self, text: str) -> list[int]:
        raise NotImplementedError

    def _piece_id(self, piece: str | None) -> int | None:
        raise NotImplementedError

    def id_to_piece(self, token_id: int) -> str:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token `token_id` adds to a decoded text in the middle of it (a byte-fallback piece its byte,
        the space marker a space); a special token's piece as it is written. What a grammar matches tokens by."""
        raise NotImplementedError

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        raise NotImplementedError

    def _save_vocabulary(self, out_dir: Path) -> list[Path]:
        path = out_dir / self.VOCAB_FILE
        if path.resolve() != self.vocab_file.resolve():
            shutil.copyfile(self.vocab_file, path)
        return [path]

    def _decode_content(self, ids: list[int]) -> str:
        """Text of ids none of which is special (what the stream decoder decodes)."""
        raise NotImplementedError

    def _plain_texts(self) -> list[str | None] | None:
        """Per id: the text its piece adds after any text that ends at a character boundary, for pieces whose
        decode is that local (None for the others); or None when the backend has no such table. The streaming
        decoder's fast path: one list lookup instead of a decode per token."""
        return None

    def _starts_with_continuation_byte(self, token_id: int) -> bool:
        """Whether the token's bytes start with a UTF-8 continuation byte (0x80-0xBF)."""
        raise NotImplementedError

    def stream_decoder(self, context: Sequence[int] = ()) -> "StreamDecoder":
        """An incremental decoder; with `context` (the prompt's ids) its text is what the tokens add after
        that prompt: decode(prompt + tokens) minus decode(prompt), as transformers' full decode and vLLM
        have it (a first token's leading space is kept after a prompt, dropped only at the very start)."""
        return StreamDecoder(self, context)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **options: Any) -> "TokenizerBase":
        """Load `VOCAB_FILE` from a checkpoint directory, with its chat template, special-token strings and
        settings from `chat_template.jinja` / `tokenizer_config.json` where present (else SOLAR's template).
        `options` (padding_side, truncation_side, add_bos_token, add_eos_token, pad_token; checked by
        `fastsolar.hf.compat.tokenizer_options`) override them."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model directory not found: {model_dir}")
        vocab_file = model_dir / cls.VOCAB_FILE
        if not vocab_file.is_file():
            raise FileNotFoundError(f"no {cls.VOCAB_FILE} in {model_dir} (expected {vocab_file})")
        template, special, settings = read_tokenizer_config(model_dir)
        for key in cls.CONFIG_IGNORED:
            settings.pop(key, None)
        if "pad_token" in options:
            special["pad_token"] = options.pop("pad_token")
        settings.update(options)
        return cls(vocab_file, chat_template=template, special_tokens=special, **settings)

    # -- special tokens (transformers' attribute names) ---------------------------------------------

    @property
    def bos_token(self) -> str:
        return self.special_tokens["bos_token"]

    @property
    def eos_token(self) -> str:
        return self.special_tokens["eos_token"]

    @property
    def unk_token(self) -> str | None:
        return self.special_tokens["unk_token"]

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens["pad_token"]

    @pad_token.setter
    def pad_token(self, piece: str | None) -> None:
        """`tokenizer.pad_token = tokenizer.eos_token`, the usual way to let a pad-less tokenizer pad."""
        if piece is not None and self._piece_id(piece) is None:
            raise ValueError(f"pad_token {piece!r} is not in the vocabulary (fastsolar cannot add tokens)")
        self.special_tokens["pad_token"] = piece

    @property
    def bos_token_id(self) -> int:
        return self.bos_id

    @property
    def eos_token_id(self) -> int:
        return self.eos_id

    @property
    def unk_token_id(self) -> int | None:
        return self.unk_id if self.unk_id >= 0 else None

    @property
    def pad_token_id(self) -> int | None:
        return self._piece_id(self.pad_token)

    @pad_token_id.setter
    def pad_token_id(self, token_id: int | None) -> None:
        self.pad_token = None if token_id is None else self.id_to_piece(token_id)

    @property
    def all_special_tokens(self) -> list[str]:
        """transformers' `all_special_tokens`: the bos / eos / unk / pad strings that are set."""
        return list(dict.fromkeys(v for k in SPECIAL_TOKEN_KEYS if (v := self.special_tokens.get(k)) is not None))

    @property
    def all_special_ids(self) -> list[int]:
        """transformers' `all_special_ids`: the ids of `all_special_tokens`."""
        return [i for t in self.all_special_tokens if (i := self._piece_id(t)) is not None]

    def __len__(self) -> int:
        return self.vocab_size

    # -- encoding ------------------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text` as it is (special-token strings are not parsed), with bos / eos if asked."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self._encode_text(text) if text else []
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(
        self,
        ids: Iterable[int] | int,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str:
        """Text of one sequence of ids (a list, a 1-D tensor or array, or one id), as transformers' `decode`:
        special ids dropped with `skip_special_tokens=True`, else written as their pieces ("<s>")."""
        if clean_up_tokenization_spaces:
            raise ValueError(
                "clean_up_tokenization_spaces=True is not supported: it strips spaces before punctuation, which "
                "corrupts the text (transformers 5 ignores it for sentencepiece/BPE tokenizers too)"
            )
        return self._decode(self._id_list(ids), skip_special_tokens)

    def batch_decode(
        self,
        sequences: Iterable[Iterable[int]],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> list[str]:
        """`decode` of each row of a `[batch, seq]` tensor or array, or of each list of ids."""
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(row, skip_special_tokens, clean_up_tokenization_spaces) for row in sequences]

    def _id_list(self, ids: Iterable[int] | int) -> list[int]:
        if hasattr(ids, "tolist"):  # torch / numpy
            shape = tuple(getattr(ids, "shape", ()))
            if len(shape) > 1:
                raise ValueError(f"decode takes one sequence, got shape {shape}; use batch_decode for a batch")
            ids = ids.tolist()
        if isinstance(ids, int) and not isinstance(ids, bool):
            ids = [ids]
        return [self._check_id(i) for i in ids]

    def _check_id(self, token_id: Any) -> int:
        if isinstance(token_id, bool) or not isinstance(token_id, int):
            try:
                token_id = int(token_id.item()) if hasattr(token_id, "item") else token_id
            except (TypeError, ValueError):
                pass
            if isinstance(token_id, bool) or not isinstance(token_id, int):
                raise TypeError(f"token ids must be integers, got {token_id!r}")
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")
        return token_id

    # -- transformers' vocabulary lookups ------------------------------------------------------------

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        """transformers' `tokenize`: the pieces of `text` (special-token strings in it become their pieces),
        with the pieces of bos / eos around them when `add_special_tokens` is set and the config adds them."""
        ids = self.encode_specials(text)
        if add_special_tokens:
            ids = [self.bos_id] * self.add_bos_token + ids + [self.eos_id] * self.add_eos_token
        return [self.id_to_piece(i) for i in ids]

    def convert_ids_to_tokens(self, ids: int | Iterable[int], skip_special_tokens: bool = False) -> str | list[str]:
        """transformers' `convert_ids_to_tokens`: the piece of one id, or the list of pieces of a list of ids
        (`all_special_ids` left out with `skip_special_tokens`)."""
        if isinstance(ids, int) and not isinstance(ids, bool):
            return self.id_to_piece(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self.id_to_piece(i) for i in self._id_list(ids) if i not in skip]

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int] | None:
        """transformers' `convert_tokens_to_ids`: the id of one piece, or the ids of a list of pieces; a piece
        not in the vocabulary gives the unk id (None when there is no unk token), as in transformers."""
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def _token_to_id(self, token: str) -> int | None:
        if not isinstance(token, str):
            raise TypeError(f"tokens must be strings, got {token!r}")
        token_id = self._piece_id(token)
        return token_id if token_id is not None else self.unk_token_id

    # -- chat --------------------------------------------------------------------------------------

    def encode_chat(self, messages: Any, add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """Token ids of the rendered conversation, starting with bos (the prompt to generate a reply from).

        Special-token strings inside the rendered text (templates that write `{{ bos_token }}`) become
        their ids (`encode_specials`); bos is prepended unless the template already starts with it.
        """
        text = render_chat_template(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens, **kwargs,
        )
        ids = self.encode_specials(text)
        if not ids or ids[0] != self.bos_id:
            ids.insert(0, self.bos_id)
        return ids

    @property
    def chat_stop_strings(self) -> tuple[str, ...]:
        """Strings that end an assistant reply besides eos: the SOLAR turn headers the template uses."""
        return stop_strings_for(self.chat_template)

    # -- saving ------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | Path) -> tuple[str, ...]:
        """transformers' `save_pretrained`: write the vocabulary file, tokenizer_config.json (special tokens,
        add_bos_token / add_eos_token, sides, model_max_length, the chat template) and special_tokens_map.json
        into `save_directory` (created if needed), so that this tokenizer and transformers' AutoTokenizer load
        it back as it is now. Returns the paths written."""
        out = Path(save_directory)
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"save_pretrained needs a directory, and {out} is a file")
        out.mkdir(parents=True, exist_ok=True)
        written = self._save_vocabulary(out)
        specials = {k: v for k, v in self.special_tokens.items() if v is not None}
        config = {
            **self._config_class(),
            **specials,
            "pad_token": self.pad_token,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
            "model_max_length": self.model_max_length,
            "clean_up_tokenization_spaces": False,
            "chat_template": self.chat_template,
        }
        for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
            path = out / name
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            written.append(path)
        return tuple(str(p) for p in written)

    def _config_class(self) -> dict[str, Any]:
        """The tokenizer_config.json entries that tell transformers which tokenizer class reads the folder."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.vocab_file)!r}, vocab_size={self.vocab_size})"


def _token_string(value: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or as serialized AddedToken dicts."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def read_tokenizer_config(model_dir: Path) -> tuple[str | None, dict[str, str], dict[str, Any]]:
    """(chat template, special-token strings, tokenizer settings) from a checkpoint's tokenizer files:
    tokenizer_config.json, and chat_template.jinja, which wins over the config's template as in transformers."""
    template: str | None = None
    special: dict[str, str] = {}
    settings: dict[str, Any] = {}
    config_path = model_dir / "tokenizer_config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path} is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{config_path} must hold a JSON object")
        for key in SPECIAL_TOKEN_KEYS:
            s = _token_string(config.get(key))
            if s is not None:
                special[key] = s
        for key in ("add_bos_token", "add_eos_token"):
            if isinstance(config.get(key), bool):
                settings[key] = config[key]
        for key in ("padding_side", "truncation_side"):
            if config.get(key) in ("left", "right"):
                settings[key] = config[key]
        max_len = config.get("model_max_length")
        if isinstance(max_len, (int, float)) and not isinstance(max_len, bool) and max_len > 0:
            settings["model_max_length"] = int(max_len)
        raw = config.get("chat_template")
        if isinstance(raw, list):  # named templates: [{"name": "default", "template": "..."}, ...]
            named = {t.get("name"): t.get("template") for t in raw if isinstance(t, Mapping)}
            raw = named.get("default")
        if raw is not None and not isinstance(raw, str):
            raise ValueError(f"{config_path}: chat_template must be a string")
        template = raw
    jinja_path = model_dir / "chat_template.jinja"
    if jinja_path.is_file():
        template = jinja_path.read_text(encoding="utf-8")
    if template is not None:
        logger.debug("using the chat template from %s", model_dir)
    return template, special, settings


class StreamDecoder:
    """Incremental detokenizer: `push(id) -> new text`, `flush() -> rest`; pieces concatenate to `decode`.

    State is a short window of content ids (specials are skipped on arrival). `_ids[:_read]` is text
    already emitted and starts at a character boundary, so decoding the window and subtracting the
    decoded emitted part yields exactly the new text, with sentencepiece's first-piece space stripping
    applied to the same piece in both (and therefore cancelling out except at the true start).
    """

    def __init__(self, tokenizer: TokenizerBase, context: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self._ids: list[int] = []
        self._read = 0  # ids[:_read] have been emitted
        self._read_text: str | None = ""  # decode(ids[:_read]); None: not made yet (see push)
        self._plain = tokenizer._plain_texts()
        if context:
            self._prime(context)

    def _prime(self, context: Sequence[int]) -> None:
        """Start as if the tail of `context` had been emitted, so that the first token's text is decoded after
        it (sentencepiece drops a leading space only at a text's first piece). The tail starts and ends at
        character boundaries: a token-id prompt cut inside a character leaves that character's bytes out."""
        tok = self.tokenizer
        ids = [int(i) for i in context[-_CONTEXT_IDS:] if 0 <= int(i) < tok.vocab_size and int(i) not in tok.special_ids]
        while ids and tok._starts_with_continuation_byte(ids[0]):
            ids.pop(0)
        text = tok._decode_content(ids)
        for _ in range(_MAX_PENDING_BYTES - 1):
            if not ids or not text.endswith(_REPLACEMENT):
                break
            ids.pop()
            text = tok._decode_content(ids)
        self._ids, self._read, self._read_text = ids, len(ids), text

    def reset(self) -> None:
        """Forget everything, context included: the next text is decoded as the start of a text."""
        self._ids, self._read, self._read_text = [], 0, ""

    def push(self, token_id: int) -> str:
        tok = self.tokenizer
        token_id = tok._check_id(token_id)
        if token_id in tok.special_ids:
            return ""
        if self._plain is not None and self._ids and self._read == len(self._ids):
            piece = self._plain[token_id]
            if piece is not None:
                # Nothing pending and the text under way: a plain piece adds its own text, no decode. The
                # window stays short; its text is decoded again only when a slow-path token needs it.
                self._ids.append(token_id)
                if len(self._ids) > 2 * _SLIDE_AT:
                    del self._ids[:-_SLIDE_AT]
                self._read, self._read_text = len(self._ids), None
                return piece
        self._ids.append(token_id)
        if self._read_text is None:
            self._read_text = tok._decode_content(self._ids[: self._read])
        text = tok._decode_content(self._ids)
        if not text.endswith(_REPLACEMENT):
            return self._emit(len(self._ids), text)
        if len(self._ids) - self._read <= _MAX_PENDING_BYTES:
            return ""  # perhaps a character still missing bytes
        # A long run ending in U+FFFD holds invalid bytes that no later token can repair. Emit up to the
        # last piece that does not start with a UTF-8 continuation byte among the tail that could still be
        # waiting: everything before such a piece decodes the same whatever follows.
        n = len(self._ids)
        cut = n
        for k in range(n - 1, n - _MAX_PENDING_BYTES, -1):
            if not tok._starts_with_continuation_byte(self._ids[k]):
                cut = k
                break
        if cut <= self._read:
            return ""
        return self._emit(cut, tok._decode_content(self._ids[:cut]))

    def _emit(self, end: int, text: str) -> str:
        new = text[len(self._read_text):]
        if self._read < _SLIDE_AT:  # text is decode(ids[:end]): the anchor grows, no second decode
            self._read, self._read_text = end, text
            return new
        # Slide the window: what was emitted before this call is dropped, this call's ids become the
        # prefix that anchors the next decode (so each decode stays short).
        dropped = self._read
        self._ids = self._ids[dropped:]
        self._read = end - dropped
        self._read_text = self.tokenizer._decode_content(self._ids[: self._read])
        return new

    def flush(self) -> str:
        """Emit whatever is held back (an unfinished character comes out as U+FFFD, as `decode` has it)."""
        if self._read == len(self._ids):
            return ""
        return self._emit(len(self._ids), self.tokenizer._decode_content(self._ids))
