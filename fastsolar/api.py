"""The public classes: `Solar` and `Tokenizer`, and transformers' names for loading them.

`Solar` is the plain model (`fastsolar.model.Transformer`: weights, config, forward / prefill / decode) with
what sits above it: `from_pretrained` (fastsolar.checkpoint.loader), `generate` / `stream`
(fastsolar.decoding.generate) and transformers' argument names for both (fastsolar.hf.compat). `Tokenizer`
is the sentencepiece tokenizer (fastsolar.text.tokenizer) with transformers' call, `apply_chat_template` and
`from_pretrained` options, and `TokenizerFast` the same over a `tokenizer.json` checkpoint. Living here keeps the model and the tokenizer free of imports from the layers
that use them.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fastsolar.checkpoint.loader import load_model
from fastsolar.config import SolarConfig
from fastsolar.decoding import generate as decoding
from fastsolar.hf.compat import (
    BatchEncoding,
    call_tokenizer,
    chat_template_call,
    generate_kwargs,
    load_kwargs,
    tokenizer_options,
)
from fastsolar.hf.generation_config import GenerationConfig
from fastsolar.model import Transformer
from fastsolar.model.sharding import Shard
from fastsolar.text.tokenizer import SentencePieceTokenizer
from fastsolar.text.tokenizer_json import JsonTokenizer


class Solar(Transformer):
    """SOLAR-10.7B and its Llama-2 / Mistral relatives, for inference (see fastsolar.model.transformer).

    `generation_config` holds the defaults `generate` / `stream` apply to what a call leaves out: the checkpoint's
    generation_config.json when loaded with `from_pretrained` (fastsolar.hf.generation_config)."""

    def __init__(self, config: SolarConfig, shard: Shard | None = None) -> None:
        super().__init__(config, shard)
        self.generation_config = GenerationConfig()

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        quantize: str | None = None,
        tensor_parallel_size: int | None = None,
        **hf_kwargs: Any,
    ) -> "Solar":
        """Load a Hugging Face checkpoint directory (sharded or single safetensors); see
        `fastsolar.checkpoint.loader`. transformers' `torch_dtype` / `device_map` are accepted too.

        `quantize="fp8"` or `"int8"` quantises the linear layers (per output channel) as they load, halving
        their memory and the bytes each decode step reads; `"int4"` (groups of 128 inputs, scales and zeros)
        takes them to about a quarter; FP8 needs sm_89+, int8 and int4 sm_80+ (fastsolar.model.quant).

        `tensor_parallel_size=N` loads this process's rank of the model split N ways (fastsolar.parallel), inside
        an initialised torch.distributed process group of N ranks (torchrun, or fastsolar.parallel.launch); every
        rank then calls the same forward / generate and gets the same full logits and tokens (N = 1: one process,
        as without it).
        """
        options = load_kwargs(device=device, dtype=dtype, **hf_kwargs)
        generation_config = GenerationConfig.from_pretrained(model_dir)  # a bad file fails before the weights load
        if tensor_parallel_size is not None and not (type(tensor_parallel_size) is int and tensor_parallel_size == 1):
            from fastsolar.parallel import load_parallel

            model = load_parallel(cls, model_dir, tensor_parallel_size, quantize=quantize, **options)
        else:
            model = load_model(cls, model_dir, quantize=quantize, **options)
        model.generation_config = generation_config
        return model

    def generate(
        self, input_ids: torch.Tensor | None = None, max_new_tokens: int | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """Prompt plus new tokens, like transformers' `generate`; see `fastsolar.decoding.generate.generate`
        for the native arguments and `fastsolar.hf.compat` for transformers' (do_sample, max_length, ...); what
        the call leaves out comes from `self.generation_config` (fastsolar.hf.generation_config)."""
        options = self.generation_config.fill(max_new_tokens, kwargs)
        return decoding.generate(self, **generate_kwargs(input_ids, **options))

    def stream(
        self, input_ids: torch.Tensor | None = None, max_new_tokens: int | None = None, **kwargs: Any
    ) -> Iterator[torch.Tensor]:
        """Yield each new step's tokens `[batch]` as they come; see `fastsolar.decoding.generate.stream` (the
        same arguments and defaults as `generate`, transformers' included)."""
        options = self.generation_config.fill(max_new_tokens, kwargs)
        return decoding.stream(self, **generate_kwargs(input_ids, **options))


class _TransformersCalls:
    """transformers' call surface, added to either tokenizer backend of the text layer."""

    def encode(self, text: str, bos: bool | None = None, eos: bool | None = None, **kwargs: Any) -> Any:
        """Native `encode(text, bos=True, eos=False)`: the ids of the text as it is. With transformers' keywords
        (`add_special_tokens=`, `max_length=`, `truncation=`, `return_tensors=`, ...) it is transformers'
        `encode`: the input_ids of `tokenizer(text, **kwargs)` (special-token strings parsed)."""
        if not kwargs:
            return super().encode(text, bos=True if bos is None else bos, eos=bool(eos))
        if bos is not None or eos is not None:
            raise TypeError("encode() takes either bos=/eos= (native) or transformers' keywords "
                            f"({', '.join(sorted(kwargs))}), not both")
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return call_tokenizer(self, text, **kwargs)["input_ids"]

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


class Tokenizer(_TransformersCalls, SentencePieceTokenizer):
    """The SOLAR / Llama-2 tokenizer (fastsolar.text.tokenizer, sentencepiece's `tokenizer.model`) with
    transformers' call surface."""

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **kwargs: Any) -> "Tokenizer | TokenizerFast":
        """The checkpoint's tokenizer with its settings: `tokenizer.model` (a `Tokenizer`) when the directory has
        one, else `tokenizer.json` (a `TokenizerFast`); transformers-style options (padding_side, pad_token,
        add_bos_token, ...) override the settings (`fastsolar.hf.compat.tokenizer_options`)."""
        options = tokenizer_options(**kwargs)
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model directory not found: {model_dir}")
        if (model_dir / "tokenizer.model").is_file():
            return super().from_pretrained(model_dir, **options)
        if (model_dir / "tokenizer.json").is_file():
            return TokenizerFast.from_pretrained(model_dir, **kwargs)
        raise FileNotFoundError(
            f"no tokenizer in {model_dir}: it has neither tokenizer.model (sentencepiece) nor tokenizer.json "
            "(the tokenizers library)"
        )


class TokenizerFast(_TransformersCalls, JsonTokenizer):
    """A `tokenizer.json` tokenizer (fastsolar.text.tokenizer_json, the `tokenizers` library; Llama-3-class
    byte-level BPE) with transformers' call surface: what `Tokenizer.from_pretrained` / `AutoTokenizer` give
    for a checkpoint without `tokenizer.model`."""

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **kwargs: Any) -> "TokenizerFast":
        """`tokenizer.json` and its settings from a checkpoint directory; options as `Tokenizer.from_pretrained`."""
        return super().from_pretrained(model_dir, **tokenizer_options(**kwargs))


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
    def from_pretrained(cls, model_dir: str | Path, *inputs: Any, **kwargs: Any) -> Tokenizer | TokenizerFast:
        if inputs:
            raise TypeError("from_pretrained() takes the checkpoint directory and keyword arguments only")
        return Tokenizer.from_pretrained(model_dir, **kwargs)


__all__ = ["AutoModelForCausalLM", "AutoTokenizer", "Solar", "Tokenizer", "TokenizerFast"]
