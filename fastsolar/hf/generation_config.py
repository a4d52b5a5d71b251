"""A checkpoint's generation_config.json: the generation defaults its authors chose, as `model.generation_config`.

transformers reads this file at `from_pretrained` and fills every `generate` argument the call leaves out from it;
fastsolar does the same for the arguments it implements (the fields below), so a checkpoint that stops at two
EOS ids, or samples at temperature 0.6 with top_p 0.9, behaves alike in both. The call's own arguments always
win. The rules, as transformers applies them:

- eos_token_id (an int or a list), pad_token_id, repetition_penalty: the file's when the call gives none.
- length: the file's max_new_tokens, else its max_length, when the call gives neither max_new_tokens nor
  max_length (with neither anywhere, fastsolar's default of 32 new tokens).
- sampling: do_sample is the call's, else the file's when the call sets no temperature (a call temperature
  without do_sample keeps fastsolar's native rule: temperature > 0 samples). Only when sampling does the file's
  temperature / top_k / top_p fill what the call leaves out; do_sample false (or absent) in the file means greedy
  even if the file sets a temperature.
- bos_token_id is kept (transformers uses it only to start from an empty prompt).

Other fields are not applied; one the generate call would refuse (num_beams 4, ...) is named in a warning at load.
The object is mutable, as transformers' is: `model.generation_config.max_new_tokens = 64` changes the default.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastsolar.hf.compat import unsupported_generate_options

logger = logging.getLogger(__name__)

FILENAME = "generation_config.json"
SAMPLING = ("temperature", "top_k", "top_p")  # the options that matter only when sampling


@dataclass
class GenerationConfig:
    """The generation defaults fastsolar applies (None: not set). See the module docstring."""

    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    max_new_tokens: int | None = None
    max_length: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "GenerationConfig":
        """The directory's generation_config.json (all fields unset when it has none); a field of the wrong type
        is refused naming the file and the field."""
        path = Path(model_dir) / FILENAME
        if not path.is_file():
            return cls()
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not readable as JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in raw.items() if k in known})
        try:
            config.check()
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        _warn_unapplied(path, {k: v for k, v in raw.items() if k not in known})
        return config

    def check(self) -> None:
        """ValueError naming the first field whose value is not of its kind."""
        for name in ("bos_token_id", "pad_token_id", "max_new_tokens", "max_length", "top_k"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        eos = self.eos_token_id
        if eos is not None and not (_is_id(eos) or (isinstance(eos, list) and all(_is_id(e) for e in eos))):
            raise ValueError(f"eos_token_id must be a token id or a list of them, got {eos!r}")
        if self.do_sample is not None and not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be true or false, got {self.do_sample!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{name} must be a number, got {value!r}")

    def eos_ids(self) -> list[int] | None:
        """eos_token_id as a list (None when unset)."""
        eos = self.eos_token_id
        return None if eos is None else ([eos] if isinstance(eos, int) else list(eos))

    def set_fields(self) -> dict[str, Any]:
        """The fields the file (or the user) set: transformers' `to_diff_dict` for these fields."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def sampling_defaults(self) -> dict[str, float | int]:
        """What a request that sets no sampling option gets from this file, by generate's native names (for the
        server, whose requests carry temperature / top_k / top_p / repetition_penalty, no do_sample):
        do_sample true gives the file's temperature / top_k / top_p (transformers' 1.0 / 50 / 1.0 where unset),
        do_sample false gives temperature 0 (greedy), and repetition_penalty is the file's when set."""
        out: dict[str, float | int] = {}
        if self.do_sample:
            out.update(temperature=1.0 if self.temperature is None else self.temperature,
                       top_k=50 if self.top_k is None else self.top_k, top_p=1.0 if self.top_p is None else self.top_p)
        elif self.do_sample is False:
            out["temperature"] = 0.0
        if self.repetition_penalty is not None:
            out["repetition_penalty"] = self.repetition_penalty
        return out

    def fill(self, max_new_tokens: int | None, call: dict[str, Any]) -> dict[str, Any]:
        """The generate call's keyword arguments (transformers' and native names; `max_new_tokens` apart) with
        what it leaves out filled from these defaults (module docstring)."""
        given = {k: v for k, v in call.items() if v is not None}
        out = dict(call)
        for name in ("eos_token_id", "pad_token_id", "repetition_penalty"):
            if name not in given and getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if max_new_tokens is None and "max_length" not in given:
            if self.max_new_tokens is not None:
                max_new_tokens = self.max_new_tokens
            elif self.max_length is not None:
                out["max_length"] = self.max_length
        do_sample = given.get("do_sample")
        if do_sample is None and "temperature" not in given and self.do_sample is not None:
            do_sample = out["do_sample"] = self.do_sample
        if do_sample:
            for name in SAMPLING:
                if name not in given and getattr(self, name) is not None:
                    out[name] = getattr(self, name)
        out["max_new_tokens"] = max_new_tokens
        return out


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _warn_unapplied(path: Path, extra: dict[str, Any]) -> None:
    """Warn about the fields a generate call would refuse at these values (beam search, ...): fastsolar does not
    apply them, so its output may differ from transformers' for this checkpoint."""
    refused = unsupported_generate_options(extra)
    if refused:
        logger.warning("%s: not applied (fastsolar does not implement them): %s", path,
                       "; ".join(f"{k}={v!r}: {why}" for k, (v, why) in refused.items()))

