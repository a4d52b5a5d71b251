"""The public classes: `Solar` and `Tokenizer`, and transformers' names for loading them.

`Solar` is the plain model (`fastsolar.model.Transformer`: weights, config, forward / prefill / decode) with
what sits above it: `from_pretrained` (fastsolar.checkpoint.loader), `generate` / `stream`
(fastsolar.decoding.generate) and transformers' argument names for both (fastsolar.hf.compat). `Tokenizer`
is the sentencepiece tokenizer (fastsolar.text.tokenizer) with transformers' call, `apply_chat_template` and
`from_pretrained` options. Living here keeps the model and the tokenizer free of imports from the layers
that use them.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fastsolar.checkpoint.loader import load_model
from fastsolar.decoding import generate as decoding
from fastsolar.hf.compat import (
    BatchEncoding,
    call_tokenizer,
    chat_template_call,
    generate_kwargs,
    load_kwargs,
    tokenizer_options,
)
from fastsolar.model import Transformer
from fastsolar.text.tokenizer import SentencePieceTokenizer


class Solar(Transformer):
    """SOLAR-10.7B and its Llama-2 / Mistral relatives, for inference (see fastsolar.model.transformer)."""

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        quantize: str | None = None,
        **hf_kwargs: Any,
    ) -> "Solar":
        """Load a Hugging Face checkpoint directory (sharded or single safetensors); see
        `fastsolar.checkpoint.loader`. transformers' `torch_dtype` / `device_map` are accepted too.

        `quantize="fp8"` or `"int8"` quantises the linear layers (per output channel) as they load, halving
        their memory and the bytes each decode step reads; `"int4"` (groups of 128 inputs, scales and zeros)
        takes them to about a quarter; FP8 needs sm_89+, int8 and int4 sm_80+ (fastsolar.model.quant).
        """
        return load_model(cls, model_dir, quantize=quantize, **load_kwargs(device=device, dtype=dtype, **hf_kwargs))

    def generate(
        self, input_ids: torch.Tensor | None = None, max_new_tokens: int | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """Prompt plus new tokens, like transformers' `generate`; see `fastsolar.decoding.generate.generate`
        for the native arguments and `fastsolar.hf.compat` for transformers' (do_sample, max_length, ...)."""
        return decoding.generate(self, **generate_kwargs(input_ids, max_new_tokens, **kwargs))

    def stream(
        self, input_ids: torch.Tensor | None = None, max_new_tokens: int | None = None, **kwargs: Any
    ) -> Iterator[torch.Tensor]:
        """Yield each new step's tokens `[batch]` as they come; see `fastsolar.decoding.generate.stream` (the
        same arguments as `generate`, transformers' included)."""
        return decoding.stream(self, **generate_kwargs(input_ids, max_new_tokens, **kwargs))


class Tokenizer(SentencePieceTokenizer):
    """The SOLAR / Llama-2 tokenizer (fastsolar.text.tokenizer) with transformers' call surface."""

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **kwargs: Any) -> "Tokenizer":
        """`tokenizer.model` and its settings from a checkpoint directory; transformers-style options
        (padding_side, pad_token, add_bos_token, ...) override them (`fastsolar.hf.compat.tokenizer_options`)."""
        return super().from_pretrained(model_dir, **tokenizer_options(**kwargs))

    def __call__(self, text: str | list[str], **kwargs: Any) -> BatchEncoding:
        """transformers' `tokenizer(text or texts, return_tensors=..., padding=..., ...)`: a BatchEncoding of
        input_ids and attention_mask; see `fastsolar.hf.compat.call_tokenizer`."""
        return call_tokenizer(self, text, **kwargs)

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any:
        """transformers' `apply_chat_template`, same arguments and defaults: `tokenize=False` gives the prompt
        text for a conversation (a list of {"role", "content"}; roles system/user/assistant); the default
        `tokenize=True` gives that text tokenized without added special tokens, as a BatchEncoding
        (`return_dict=False`: the input_ids). See `fastsolar.hf.compat.chat_template_call`."""
        return chat_template_call(self, conversation, **kwargs)


class AutoModelForCausalLM:
    """transformers' name for loading a causal LM: `from_pretrained` returns a `fastsolar.Solar`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("AutoModelForCausalLM is not instantiated; use AutoModelForCausalLM.from_pretrained(dir)")

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *model_args: Any, **kwargs: Any) -> Solar:
        if model_args:
            raise TypeError("from_pretrained() takes the checkpoint directory and keyword arguments only")
        return Solar.from_pretrained(model_dir, **kwargs)


class AutoTokenizer:
    """transformers' name for loading a tokenizer: `from_pretrained` returns a `fastsolar.Tokenizer`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("AutoTokenizer is not instantiated; use AutoTokenizer.from_pretrained(dir)")

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *inputs: Any, **kwargs: Any) -> Tokenizer:
        if inputs:
            raise TypeError("from_pretrained() takes the checkpoint directory and keyword arguments only")
        return Tokenizer.from_pretrained(model_dir, **kwargs)


__all__ = ["AutoModelForCausalLM", "AutoTokenizer", "Solar", "Tokenizer"]
