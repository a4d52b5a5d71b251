"""transformers-shaped arguments, translated onto fastsolar's native API in this one place.

Model-card code ports with one changed import (`from fastsolar import AutoModelForCausalLM, AutoTokenizer`).
Each transformers argument either means here exactly what it means in transformers (5.24, the version the
tests compare with), or it is refused by name with the reason: nothing is silently dropped. The
arguments and what they become:

`from_pretrained` (`Solar`, `AutoModelForCausalLM`)
    torch_dtype        -> dtype ("auto" = the checkpoint's torch_dtype, the native default)
    device_map         -> device: "auto" (CUDA when there is one, else CPU), "cpu", "cuda[:i]", a
                          torch.device, an int (CUDA index), or a dict whose values all name one device.
                          Maps that spread the model over several devices ("balanced", "sequential", a dict
                          naming two devices, "disk") are refused: fastsolar runs a model on one device.
    low_cpu_mem_usage, trust_remote_code, use_safetensors=True: accepted, no effect (loading always
                          streams safetensors shard by shard and never runs code from the checkpoint).

`generate` / `stream` (`Solar`)
    inputs             -> input_ids
    do_sample          None: the native rule (temperature > 0 samples). False: greedy whatever the
                          temperature/top_k/top_p. True: sample, with transformers' defaults for what is
                          not given (temperature 1.0, top_k 50, top_p 1.0).
    max_length         -> max_new_tokens = max_length - input_ids.shape[-1] (max_new_tokens wins if both)
    min_length         -> min_new_tokens = max(0, min_length - input_ids.shape[-1]) (min_new_tokens wins)
    min_new_tokens, pad_token_id: native (EOS banned on the device for the first min_new_tokens tokens)
    use_cache          accepted, no effect: decoding always uses the static KV cache, and use_cache=False
                          would only recompute the same tokens more slowly.
    num_beams=1, num_return_sequences=1 and the neutral values of the other generation options are
    accepted; beam search, streamers, logits processors, stopping criteria, dict outputs and the
    sampling variants fastsolar lacks are refused (see _GENERATE_REFUSED).
    Neither max_new_tokens nor max_length: the native default of 32 new tokens (transformers: 20 in total).
    What a call leaves out comes first from the model's generation_config.json (fastsolar.hf.generation_config).

`tokenizer(text, ...)` (`Tokenizer.__call__`)
    text: a str or a list of str. add_special_tokens (bos/eos as the tokenizer config says; SOLAR: bos),
    padding (False/"do_not_pad", True/"longest", "max_length"), truncation (True/"longest_first"/
    "only_first"/False; implied by max_length as in transformers), max_length, pad_to_multiple_of,
    padding_side (default the tokenizer's, "left"), return_tensors (None, "pt", "np"),
    return_attention_mask, split_special_tokens. Special-token strings in the text ("<s>", "</s>",
    "<unk>") become their ids unless split_special_tokens=True. Returns a BatchEncoding.
`tokenizer.encode(text, add_special_tokens=..., ...)`: transformers' `encode`, the input_ids of that call (the
    native `encode(text, bos=, eos=)` stays as it is when no transformers keyword is given).
`tokenizer.apply_chat_template(...)`: transformers' signature and defaults (tokenize=True with
    return_dict=True returns a BatchEncoding of the rendered text tokenized without added specials).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from fastsolar.checkpoint.loader import resolve_dtype
from fastsolar.decoding.generate import OPTIONS as GENERATE_OPTIONS
from fastsolar.text.base import VERY_LARGE_INTEGER
from fastsolar.text.chat import render_chat_template

if TYPE_CHECKING:
    from fastsolar.text.base import TokenizerBase as Tokenizer

logger = logging.getLogger(__name__)

_NONE = (None,)
_OFF = (None, False)


def _is_one_of(value: Any, allowed: tuple) -> bool:
    # `is` for None/bools; `==` only between plain non-bool scalars (tensors and arbitrary objects must never
    # be compared with `==`, and True must not pass for 1).
    scalar = (int, float, str)
    return any(
        value is a or (type(value) in scalar and type(a) in scalar and value == a) for a in allowed
    )


def _refuse(where: str, given: Mapping[str, Any], table: Mapping[str, tuple[tuple, str]]) -> None:
    """Raise TypeError for arguments not in `table`; ValueError, naming it and why, for an argument in
    `table` given a value other than its neutral ones (the values that do nothing in transformers either)."""
    unknown = sorted(k for k in given if k not in table)
    if unknown:
        raise TypeError(f"{where} got unexpected keyword argument(s): {', '.join(unknown)}")
    for name, value in given.items():
        neutral, why = table[name]
        if not _is_one_of(value, neutral):
            raise ValueError(f"{where}: {name}={value!r} is not supported: {why}")


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------- from_pretrained

_SEVERAL_DEVICES = ("balanced", "balanced_low_0", "sequential")

_LOAD_ACCEPTED = {"low_cpu_mem_usage", "trust_remote_code"}  # bools with no effect here (see module doc)
_LOAD_REFUSED: dict[str, tuple[tuple, str]] = {
    "use_safetensors": ((None, True), "fastsolar loads safetensors checkpoints only"),
    "attn_implementation": (_NONE, "fastsolar runs its own attention kernels"),
    "quantization_config": (_NONE, "transformers' quantizers are not implemented; fastsolar's own weight-only "
                                   "quantisation is quantize='fp8' or quantize='int8'"),
    "load_in_8bit": (_OFF, "bitsandbytes is not implemented; quantize='int8' is fastsolar's (weight-only) int8"),
    "load_in_4bit": (_OFF, "4-bit loading is not implemented; quantize='fp8' or 'int8' halve the weights"),
    "max_memory": (_NONE, "fastsolar places the whole model on one device"),
    "offload_folder": (_NONE, "fastsolar places the whole model on one device"),
    "offload_state_dict": (_OFF, "fastsolar places the whole model on one device"),
    "config": (_NONE, "the config is read from the checkpoint's config.json"),
    "revision": (_NONE, "fastsolar loads a local checkpoint directory, not a hub revision"),
    "subfolder": ((None, ""), "pass the checkpoint directory itself"),
    "cache_dir": (_NONE, "fastsolar loads a local checkpoint directory, nothing is downloaded"),
    "token": (_NONE, "fastsolar loads a local checkpoint directory, nothing is downloaded"),
    "force_download": (_OFF, "fastsolar loads a local checkpoint directory, nothing is downloaded"),
    "local_files_only": ((None, False, True), ""),  # always local: every value means the same here
    "variant": (_NONE, "fastsolar reads the checkpoint's standard safetensors names"),
}


def resolve_device_map(device_map: Any) -> torch.device | None:
    """transformers' device_map as one device (None = the native default: CUDA if available, else CPU).

    Refuses maps that spread the model over several devices (or onto disk/meta), naming them."""
    if isinstance(device_map, torch.device):
        return device_map
    if isinstance(device_map, bool):
        raise ValueError(f"device_map={device_map!r} is not a device")
    if isinstance(device_map, int):
        if device_map < 0:
            raise ValueError(f"device_map={device_map} is not a device index")
        return torch.device("cuda", device_map)
    if isinstance(device_map, str):
        if device_map == "auto":
            return None
        if device_map in _SEVERAL_DEVICES:
            raise ValueError(
                f"device_map={device_map!r} spreads the model over several devices; fastsolar runs a model on "
                'one device: use device_map="auto", "cuda", "cuda:1" or "cpu"'
            )
        if device_map in ("disk", "meta"):
            raise ValueError(f"device_map={device_map!r}: fastsolar keeps the whole model in device memory")
        try:
            return torch.device(device_map)
        except RuntimeError:
            raise ValueError(
                f'device_map={device_map!r} is not a device; use "auto", "cpu", "cuda", "cuda:1", an int or a '
                "torch.device"
            ) from None
    if isinstance(device_map, Mapping):
        if not device_map:
            raise ValueError("device_map is an empty dict")
        devices = {str(resolve_device_map(v)) for v in device_map.values()}
        if len(devices) > 1:
            raise ValueError(
                f"device_map spreads the model over several devices ({', '.join(sorted(devices))}); "
                "fastsolar runs a model on one device"
            )
        return resolve_device_map(next(iter(device_map.values())))
    raise ValueError(f"device_map={device_map!r} is not a device")


def _same_device(a: torch.device, b: torch.device | None) -> bool:
    # "cuda" names the current CUDA device, so it matches any "cuda:i"; None ("auto") matches nothing given.
    return b is not None and a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def load_kwargs(
    *, device: Any = None, dtype: Any = None, torch_dtype: Any = None, device_map: Any = None, **kwargs: Any
) -> dict[str, Any]:
    """Native `device` / `dtype` for `load_model` from native and transformers-style `from_pretrained` args."""
    def canonical(value: Any) -> Any:
        return "auto" if isinstance(value, str) and value == "auto" else resolve_dtype(value)

    if torch_dtype is not None:
        if dtype is not None and canonical(dtype) != canonical(torch_dtype):
            raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass one of them")
        dtype = torch_dtype
    if dtype == "auto":
        dtype = None  # the checkpoint's torch_dtype
    if device_map is not None:
        mapped = resolve_device_map(device_map)
        if device is not None and not _same_device(torch.device(device), mapped):
            raise ValueError(f"device={device!r} and device_map={device_map!r} disagree; pass one of them")
        device = mapped
    for name in [k for k in kwargs if k in _LOAD_ACCEPTED]:
        value = kwargs.pop(name)
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"from_pretrained: {name} must be a bool, got {value!r}")
    _refuse("from_pretrained()", kwargs, _LOAD_REFUSED)
    return dict(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------- generate

# transformers' GenerationConfig defaults for do_sample=True.
SAMPLING_DEFAULTS = dict(temperature=1.0, top_k=50, top_p=1.0)

_BEAMS = "beam search is not implemented (greedy and sampling only; num_beams=1)"
_NO_PROCESSORS = "custom logits processors / stopping criteria are not supported"
_GENERATE_REFUSED: dict[str, tuple[tuple, str]] = {
    "num_beams": ((None, 1), _BEAMS),
    "num_beam_groups": ((None, 1), _BEAMS),
    "diversity_penalty": ((None, 0.0), _BEAMS),
    "length_penalty": ((None, 1.0), _BEAMS),
    "early_stopping": (_OFF, _BEAMS),
    "penalty_alpha": (_NONE, "contrastive search is not implemented"),
    "num_return_sequences": (
        (None, 1), "generate once per sequence, or repeat the prompt rows (input_ids.repeat_interleave(n, 0))"),
    "typical_p": ((None, 1.0), "typical sampling is not implemented (temperature, top_k, top_p are)"),
    "min_p": (_NONE, "min-p sampling is not implemented (temperature, top_k, top_p are)"),
    "epsilon_cutoff": ((None, 0.0), "epsilon sampling is not implemented (temperature, top_k, top_p are)"),
    "eta_cutoff": ((None, 0.0), "eta sampling is not implemented (temperature, top_k, top_p are)"),
    "no_repeat_ngram_size": ((None, 0), "n-gram blocking is not implemented"),
    "encoder_repetition_penalty": ((None, 1.0), "decoder-only model: there is no encoder"),
    "bad_words_ids": (_NONE, _NO_PROCESSORS),
    "force_words_ids": (_NONE, _BEAMS),
    "sequence_bias": (_NONE, _NO_PROCESSORS),
    "suppress_tokens": (_NONE, _NO_PROCESSORS),
    "begin_suppress_tokens": (_NONE, _NO_PROCESSORS),
    "forced_bos_token_id": (_NONE, _NO_PROCESSORS),
    "forced_eos_token_id": (_NONE, _NO_PROCESSORS),
    "exponential_decay_length_penalty": (_NONE, _NO_PROCESSORS),
    "renormalize_logits": (_OFF, _NO_PROCESSORS),
    "remove_invalid_values": (_OFF, _NO_PROCESSORS),
    "guidance_scale": ((None, 1.0), "classifier-free guidance is not implemented"),
    "logits_processor": (_NONE, _NO_PROCESSORS),
    "stopping_criteria": (_NONE, _NO_PROCESSORS),
    "prefix_allowed_tokens_fn": (_NONE, _NO_PROCESSORS),
    "stop_strings": (_NONE, "stop at strings on the text side (fastsolar.text.chat.StopStringFilter over model.stream)"),
    "max_time": (_NONE, "stop on time on the caller's side, over model.stream(...)"),
    "streamer": (_NONE, "iterate model.stream(...) and decode with tokenizer.stream_decoder()"),
    "generation_config": (_NONE, "pass the generation options as keyword arguments"),
    "assistant_model": (_NONE, "assisted (speculative) decoding is not implemented"),
    "prompt_lookup_num_tokens": (_NONE, "prompt-lookup decoding is not implemented"),
    "synced_gpus": (_OFF, "fastsolar runs a model on one device"),
    "return_dict_in_generate": (_OFF, "generate returns the token tensor only"),
    "output_scores": (_OFF, "generate returns the token tensor only"),
    "output_logits": (_OFF, "generate returns the token tensor only"),
    "output_attentions": (_OFF, "generate returns the token tensor only"),
    "output_hidden_states": (_OFF, "generate returns the token tensor only"),
    "past_key_values": (_NONE, "fastsolar keeps its own static KV cache"),
    "cache_implementation": (_NONE, "fastsolar keeps its own static KV cache"),
    "inputs_embeds": (_NONE, "generation starts from token ids"),
    "position_ids": (_NONE, "positions follow from attention_mask"),
    "token_type_ids": (_NONE, "Llama models take no token type ids"),
    "negative_prompt_ids": (_NONE, "classifier-free guidance is not implemented"),
    "negative_prompt_attention_mask": (_NONE, "classifier-free guidance is not implemented"),
    "custom_generate": (_NONE, "custom generation loops are not supported"),
}
_GENERATE_NATIVE = set(GENERATE_OPTIONS)  # generate's own keyword options pass through as they are


def unsupported_generate_options(options: Mapping[str, Any]) -> dict[str, tuple[Any, str]]:
    """{name: (value, why)} for the options generate() would refuse at these values (names it does not know at
    all are left out: a generation_config.json holds bookkeeping fields too)."""
    return {k: (v, _GENERATE_REFUSED[k][1]) for k, v in options.items()
            if k in _GENERATE_REFUSED and not _is_one_of(v, _GENERATE_REFUSED[k][0])}


def _given(value: Any, default: Any) -> bool:
    return value is not None and not _is_one_of(value, (default,))


def generate_kwargs(
    input_ids: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    *,
    inputs: torch.Tensor | None = None,
    do_sample: bool | None = None,
    max_length: int | None = None,
    min_length: int | None = None,
    use_cache: bool | None = None,
    bos_token_id: int | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """The native keyword arguments of `fastsolar.decoding.generate.generate` / `stream` for a transformers-style call.

    bos_token_id is accepted and unused, as in transformers when a prompt is given (it only starts a prompt
    from nothing)."""
    if inputs is not None:
        if input_ids is not None:
            raise TypeError("generate() got both inputs and input_ids; pass the prompt once")
        input_ids = inputs
    if input_ids is None:
        raise ValueError("generate() needs input_ids, a [batch, seq] tensor of prompt token ids")
    refused = {k: kwargs.pop(k) for k in list(kwargs) if k not in _GENERATE_NATIVE}
    _refuse("generate()", refused, _GENERATE_REFUSED)
    if use_cache is not None and not isinstance(use_cache, bool):
        raise ValueError(f"use_cache must be a bool, got {use_cache!r}")
    width = input_ids.shape[-1] if isinstance(input_ids, torch.Tensor) and input_ids.dim() >= 1 else 0

    if max_length is not None:
        _check_int("max_length", max_length, 1)
        if max_new_tokens is not None:
            logger.warning("both max_new_tokens (%d) and max_length (%d) are set; max_new_tokens takes precedence",
                           max_new_tokens, max_length)
        elif max_length <= width:
            raise ValueError(
                f"max_length {max_length} leaves no room for new tokens: the prompt already has {width} "
                "(input_ids.shape[-1]); raise max_length or set max_new_tokens"
            )
        else:
            max_new_tokens = max_length - width
    if min_length is not None:
        _check_int("min_length", min_length, 0)
        if kwargs.get("min_new_tokens") is not None:
            logger.warning("both min_new_tokens and min_length are set; min_new_tokens takes precedence")
        else:
            kwargs["min_new_tokens"] = max(0, min_length - width)
    if kwargs.get("min_new_tokens", 0) is None:
        del kwargs["min_new_tokens"]

    if do_sample is not None and not isinstance(do_sample, bool):
        raise ValueError(f"do_sample must be a bool, got {do_sample!r}")
    if do_sample is False:
        ignored = [k for k, d in (("temperature", 1.0), ("top_k", 50), ("top_p", 1.0)) if _given(kwargs.get(k), d)]
        if ignored:
            logger.warning("do_sample=False: %s ignored (greedy decoding)", ", ".join(ignored))
        kwargs.update(temperature=0.0, top_k=None, top_p=None)
    elif do_sample is True:
        for name, default in SAMPLING_DEFAULTS.items():
            if kwargs.get(name) is None:
                kwargs[name] = default
        temps = kwargs["temperature"]
        temps = temps.flatten().tolist() if isinstance(temps, torch.Tensor) else temps
        if any(t == 0 for t in (temps if isinstance(temps, Sequence) else [temps])):
            raise ValueError("do_sample=True needs temperature > 0 (temperature 0 is greedy: use do_sample=False)")

    native = dict(input_ids=input_ids, **kwargs)
    if max_new_tokens is not None:
        native["max_new_tokens"] = max_new_tokens
    return native


# ------------------------------------------------------------------------------------------------ tokenizer


class BatchEncoding(dict):
    """What `tokenizer(...)` returns, as transformers' BatchEncoding: a dict of `input_ids` and
    `attention_mask` (so `model.generate(**inputs)` works) with attribute access and `.to(device)`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: str | torch.device | int, *, non_blocking: bool = False) -> "BatchEncoding":
        """Move every tensor to `device` (in place, as transformers does) and return self."""
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device, non_blocking=non_blocking)
        return self


_TOKENIZER_REFUSED: dict[str, tuple[tuple, str]] = {
    "text_pair": (_NONE, "sentence pairs are for encoder models; pass the text(s) alone"),
    "text_target": (_NONE, "targets are for encoder-decoder models"),
    "text_pair_target": (_NONE, "targets are for encoder-decoder models"),
    "is_split_into_words": (_OFF, "pass the text as a string"),
    "stride": ((None, 0), "overflowing windows are not implemented"),
    "return_overflowing_tokens": (_OFF, "overflowing windows are not implemented"),
    "return_token_type_ids": (_OFF, "Llama models take no token type ids"),
    "return_special_tokens_mask": (_OFF, "not implemented; special ids are tokenizer.special_ids"),
    "return_offsets_mapping": (_OFF, "character offsets are not implemented"),
    "return_length": (_OFF, "not implemented; use attention_mask.sum(-1)"),
    "sanitize_control_tokens": (_OFF, "not implemented; use split_special_tokens=True to encode them as text"),
    "verbose": ((None, True, False), ""),  # logging only: every value means the same here
}
_PADDING = {False: None, None: None, "do_not_pad": None, True: "longest", "longest": "longest",
            "max_length": "max_length"}
_TRUNCATION = {False: False, "do_not_truncate": False, True: True, "longest_first": True, "only_first": True}
_TENSORS = (None, "pt", "np")


def _choice(name: str, value: Any, table: Mapping) -> Any:
    key = getattr(value, "value", value)  # transformers' PaddingStrategy / TruncationStrategy enums
    if isinstance(key, (bool, str, type(None))) and key in table:
        return table[key]
    raise ValueError(f"{name}={value!r} is not supported; use one of {', '.join(repr(k) for k in table)}")


def _side(name: str, value: str) -> str:
    if value not in ("left", "right"):
        raise ValueError(f"{name} must be 'left' or 'right', got {value!r}")
    return value


def call_tokenizer(
    tok: "Tokenizer",
    text: str | Sequence[str],
    *,
    add_special_tokens: bool = True,
    padding: bool | str = False,
    truncation: bool | str | None = None,
    max_length: int | None = None,
    pad_to_multiple_of: int | None = None,
    padding_side: str | None = None,
    return_tensors: str | None = None,
    return_attention_mask: bool | None = None,
    split_special_tokens: bool = False,
    **kwargs: Any,
) -> BatchEncoding:
    """transformers' `tokenizer(text, ...)` on the sentencepiece tokenizer; see the module docstring."""
    _refuse("tokenizer()", kwargs, _TOKENIZER_REFUSED)
    batched = isinstance(text, (list, tuple))
    texts = list(text) if batched else [text]
    if batched and not texts:
        raise ValueError("tokenizer() got an empty list of texts")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            where = f"text[{i}]" if batched else "text"
            raise TypeError(f"{where} must be a str, got {type(t).__name__}")
    pad_to = _choice("padding", padding, _PADDING)
    do_truncate = max_length is not None if truncation is None else _choice("truncation", truncation, _TRUNCATION)
    # truncation=True without max_length cuts at the tokenizer's model_max_length, as in transformers (which
    # leaves the text whole when that is its "no limit" sentinel).
    cut_at = max_length if max_length is not None or tok.model_max_length >= VERY_LARGE_INTEGER else (
        tok.model_max_length)
    if max_length is not None:
        _check_int("max_length", max_length, 1)
    if pad_to_multiple_of is not None:
        _check_int("pad_to_multiple_of", pad_to_multiple_of, 1)
    side = _side("padding_side", padding_side if padding_side is not None else tok.padding_side)
    return_tensors = getattr(return_tensors, "value", return_tensors)
    if return_tensors not in _TENSORS:
        raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'pt', 'np' or None")

    head = [tok.bos_id] if add_special_tokens and tok.add_bos_token else []
    tail = [tok.eos_id] if add_special_tokens and tok.add_eos_token else []
    rows = []
    for t in texts:
        ids = tok.encode(t, bos=False) if split_special_tokens else tok.encode_specials(t)
        if do_truncate and cut_at is not None:
            room = cut_at - len(head) - len(tail)
            if room < 0:
                raise ValueError(f"max_length {cut_at} is shorter than the {len(head) + len(tail)} special tokens")
            if len(ids) > room:
                ids = ids[:room] if _side("truncation_side", tok.truncation_side) == "right" else ids[len(ids) - room:]
        rows.append(head + ids + tail)
    masks = [[1] * len(r) for r in rows]

    if pad_to is not None:
        pad_id = tok.pad_token_id
        if pad_id is None:
            raise ValueError(
                "asking to pad but the tokenizer has no pad_token; set one, e.g. tokenizer.pad_token = "
                "tokenizer.eos_token (the padding is masked out by attention_mask)"
            )
        if pad_to == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            width = max_length
        else:
            width = max(len(r) for r in rows)
        if pad_to_multiple_of is not None:
            width = math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of
        for i, r in enumerate(rows):
            n = max(0, width - len(r))
            if side == "left":
                rows[i], masks[i] = [pad_id] * n + r, [0] * n + masks[i]
            else:
                rows[i], masks[i] = r + [pad_id] * n, masks[i] + [0] * n

    out: dict[str, Any] = {"input_ids": rows}
    if return_attention_mask is not False:
        out["attention_mask"] = masks
    if return_tensors is not None:
        if len({len(r) for r in rows}) > 1:
            raise ValueError(
                f"texts of {sorted({len(r) for r in rows})} tokens cannot form one tensor; pass padding=True "
                "(and truncation=True with max_length to cut them)"
            )
        if return_tensors == "pt":
            out = {k: torch.tensor(v, dtype=torch.int64) for k, v in out.items()}
        else:
            import numpy as np

            out = {k: np.array(v, dtype=np.int64) for k, v in out.items()}
    elif not batched:
        out = {k: v[0] for k, v in out.items()}
    return BatchEncoding(out)


def chat_template_call(
    tok: "Tokenizer",
    conversation: Any,
    *,
    tools: Any = None,
    documents: Any = None,
    chat_template: str | None = None,
    add_generation_prompt: bool = False,
    continue_final_message: bool = False,
    tokenize: bool = True,
    padding: bool | str = False,
    truncation: bool = False,
    max_length: int | None = None,
    return_tensors: str | None = None,
    return_dict: bool = True,
    return_assistant_tokens_mask: bool = False,
    tokenizer_kwargs: Mapping[str, Any] | None = None,
    sanitize_control_tokens: bool = False,
    **template_vars: Any,
) -> Any:
    """transformers' `apply_chat_template`: the rendered text (tokenize=False), or the text tokenized
    without added special tokens (tokenize=True) as a BatchEncoding (return_dict=True) or its input_ids."""
    _refuse("apply_chat_template()", dict(
        continue_final_message=continue_final_message, return_assistant_tokens_mask=return_assistant_tokens_mask,
        sanitize_control_tokens=sanitize_control_tokens,
    ), {
        "continue_final_message": (_OFF, "end the conversation with the partial reply and strip what follows it"),
        "return_assistant_tokens_mask": (_OFF, "assistant token masks are not implemented"),
        "sanitize_control_tokens": (_OFF, "not implemented"),
    })
    batched = isinstance(conversation, (list, tuple)) and bool(conversation) and isinstance(
        conversation[0], (list, tuple))
    template = chat_template if chat_template is not None else tok.chat_template
    texts = [
        render_chat_template(template, c, add_generation_prompt=add_generation_prompt,
                             special_tokens=tok.special_tokens, tools=tools, documents=documents, **template_vars)
        for c in (conversation if batched else [conversation])
    ]
    text: str | list[str] = texts if batched else texts[0]
    if not tokenize:
        return text
    out = call_tokenizer(tok, text, add_special_tokens=False, padding=padding, truncation=truncation,
                         max_length=max_length, return_tensors=return_tensors, **dict(tokenizer_kwargs or {}))
    return out if return_dict else out["input_ids"]


_TOKENIZER_LOAD_REFUSED: dict[str, tuple[tuple, str]] = {
    "use_fast": ((None, True, False), ""),  # the checkpoint's files pick the tokenizer either way
    "trust_remote_code": ((None, True, False), ""),  # nothing from the checkpoint is ever run
    "legacy": ((None, True), "fastsolar encodes as sentencepiece does, with the dummy prefix after special "
                             "tokens too (transformers' legacy=True, SOLAR's setting)"),
    "clean_up_tokenization_spaces": (_OFF, "transformers 5 ignores it for sentencepiece/BPE tokenizers too"),
    "revision": (_NONE, "fastsolar loads a local checkpoint directory, not a hub revision"),
    "cache_dir": (_NONE, "fastsolar loads a local checkpoint directory, nothing is downloaded"),
    "token": (_NONE, "fastsolar loads a local checkpoint directory, nothing is downloaded"),
    "local_files_only": ((None, False, True), ""),
}


def tokenizer_options(
    *,
    padding_side: str | None = None,
    truncation_side: str | None = None,
    add_bos_token: bool | None = None,
    add_eos_token: bool | None = None,
    pad_token: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Tokenizer attributes set by transformers-style `AutoTokenizer.from_pretrained(dir, ...)` arguments."""
    _refuse("Tokenizer.from_pretrained()", kwargs, _TOKENIZER_LOAD_REFUSED)
    options: dict[str, Any] = {}
    if padding_side is not None:
        options["padding_side"] = _side("padding_side", padding_side)
    if truncation_side is not None:
        options["truncation_side"] = _side("truncation_side", truncation_side)
    for name, value in (("add_bos_token", add_bos_token), ("add_eos_token", add_eos_token)):
        if value is not None:
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")
            options[name] = value
    if pad_token is not None:
        options["pad_token"] = pad_token
    return options
