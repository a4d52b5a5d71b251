"""Structured output: OpenAI's `response_format` enforced by constrained decoding, with llguidance.

`{"type": "json_object"}` (any JSON object) and `{"type": "json_schema", "json_schema": {"name", "schema",
"strict"}}` become an llguidance grammar (`Grammars.compile`); `{"type": "text"}` is no constraint. A schema
llguidance cannot enforce exactly (a `format` it does not know, a `$ref` it cannot resolve, ...) is refused with
GrammarError naming it, instead of being half-enforced: the output of a constrained request always parses and
validates against its schema, whatever the model's logits (`strict` false is enforced just as strictly).

Why llguidance (over xgrammar and outlines-core, which install here too): no grammar compilation step (a mask
is computed lazily per step: ~30 us per row and step for a JSON schema over SOLAR's 32000 tokens, measured on
the 2-core dev machine; the first step ~4 ms, the tokenizer index 0.17 s once per server),
it refuses unsupported schema features instead of ignoring them, and it has no Python dependencies. Its mask
is the same 32-bit bitmask the others use ([rows, ceil(V/32)] int32, bit i of word w allows token 32w+i).

How it enters a decode step (`fastsolar.serve.token_mask`): the host fills one bitmask row per batch row
between steps -- a constrained row from its matcher, a free row all ones -- into a pinned host buffer, copies
it into a fixed device buffer, and the step reads that buffer: `TokenMask.apply(logits)` sets disallowed tokens to -inf
before the sampler's processing, inside the captured step. A batch without constrained rows skips the apply
(the mask's host flag is part of the graph key), so free batches pay nothing. EOS is allowed by the matcher
only where the grammar is complete; the engine ends a row as soon as its grammar is complete and nothing
else may follow (`Constraint.finished`).

The tokenizer side (`Grammars`): every token's bytes (`token_bytes`: byte-fallback pieces `<0x0A>` are their
byte, the ▁ marker a space, byte-level BPE pieces their bytes), special tokens marked so that no text
matches them, ids past the tokenizer's vocabulary (a padded embedding) never allowed.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llguidance
import torch

if TYPE_CHECKING:
    from fastsolar.text.base import TokenizerBase

#: llguidance's marker for a special token's bytes: no grammar text matches a token that starts with it.
SPECIAL_PREFIX = b"\xff"
#: A JSON object, as `{"type": "json_object"}` asks (OpenAI: "ensures the message is valid JSON").
ANY_OBJECT: dict[str, Any] = {"type": "object"}


class GrammarError(ValueError):
    """A response_format that cannot be enforced; `param` is the field of the request it concerns."""

    def __init__(self, message: str, param: str = "response_format") -> None:
        super().__init__(message)
        self.param = param


class _Vocabulary:
    """The token bytes llguidance's tokenizer is built from (what `llguidance.TokenizerWrapper` reads), and
    the tokenization it asks for when the grammar forces bytes: greedy longest match over the token bytes.
    (The model's own `encode` would not do: sentencepiece adds its dummy-prefix space, which the grammar would
    then have to accept.)"""

    def __init__(self, tokenizer: "TokenizerBase", vocab_size: int, eos_ids: Sequence[int]) -> None:
        special = set(tokenizer.special_ids)
        known = min(tokenizer.vocab_size, vocab_size)
        raw = [tokenizer.token_bytes(i) for i in range(known)]
        self.tokens = [SPECIAL_PREFIX + b if i in special else b for i, b in enumerate(raw)]
        self.tokens += [b""] * (vocab_size - known)
        self.special_token_ids = sorted(i for i in special if i < vocab_size)
        self.eos_token_id = min(eos_ids)
        self.bos_token_id = tokenizer.bos_id
        # bytes -> id; a later id wins, so a piece beats the byte-fallback token of the same byte.
        self._ids = {b: i for i, b in enumerate(raw) if b and i not in special}
        self._longest = max(map(len, self._ids))

    def __call__(self, text: bytes) -> list[int]:
        ids, pos = [], 0
        while pos < len(text):
            for n in range(min(self._longest, len(text) - pos), 0, -1):
                token = self._ids.get(text[pos:pos + n])
                if token is not None:
                    ids.append(token)
                    pos += n
                    break
            else:
                raise ValueError(f"no token spells byte {text[pos]:#04x}")
        return ids


class Grammars:
    """A model's llguidance tokenizer (built once: it indexes the vocabulary) and what compiles and runs
    grammars over it. `eos_ids`: the ids that end generation (the matcher allows them where the grammar is
    complete)."""

    def __init__(self, tokenizer: "TokenizerBase", vocab_size: int, eos_ids: Sequence[int]) -> None:
        if not eos_ids:
            raise ValueError("constrained decoding needs at least one EOS id")
        self.eos_ids = sorted(eos_ids)
        wrapper = llguidance.TokenizerWrapper(_Vocabulary(tokenizer, vocab_size, eos_ids))
        self.tokenizer = llguidance.LLTokenizer(wrapper, n_vocab=vocab_size, eos_token=self.eos_ids)

    def compile(self, response_format: dict[str, Any] | None) -> str | None:
        """The llguidance grammar of an OpenAI `response_format` (a plain dict, already shape-checked by the
        request schema), or None for free text. Raises GrammarError naming what cannot be enforced."""
        if response_format is None or response_format["type"] == "text":
            return None
        if response_format["type"] == "json_object":
            schema, param = ANY_OBJECT, "response_format"
        else:
            schema, param = response_format["json_schema"]["schema"], "response_format.json_schema.schema"
        try:
            # Defaults are the tightest output: no free whitespace, so a model cannot ramble in it forever.
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        except ValueError as e:
            raise GrammarError(f"the JSON schema is not valid: {e}", param) from None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error or messages:  # a warning means something of the schema would not be enforced
            raise GrammarError(f"unsupported JSON schema: {'; '.join(messages)}", param)
        return grammar

    def matcher(self, grammar: str) -> "Constraint":
        """A fresh matcher of a compiled grammar, at its start."""
        return Constraint(llguidance.LLMatcher(self.tokenizer, grammar, log_level=0))

    def constraint(self, response_format: dict[str, Any]) -> "Constraint | None":
        """`compile` then `matcher`: a request's constraint, None for free text."""
        grammar = self.compile(response_format)
        return None if grammar is None else self.matcher(grammar)


@dataclass
class Constraint:
    """One request's grammar state on the host: advanced with every accepted token."""

    matcher: Any  # llguidance.LLMatcher

    def copy(self) -> "Constraint":
        """An independent matcher in the same state (cheap: no grammar is rebuilt)."""
        return Constraint(self.matcher.deep_copy())

    def fill(self, row: torch.Tensor) -> None:
        """Write the allowed next tokens into `row` (a contiguous int32 CPU tensor of ceil(V/32) words)."""
        self.matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def advance(self, token: int) -> None:
        """Accept a sampled token; raises RuntimeError when the grammar refuses it (a masking fault)."""
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The grammar is complete and nothing but EOS may follow."""
        return self.matcher.is_stopped()

    @property
    def complete(self) -> bool:
        """What was generated so far is a whole sentence of the grammar."""
        return self.matcher.is_accepting()
