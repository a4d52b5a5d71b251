"""`fastsolar.pipeline("text-generation", ...)`: transformers' text-generation pipeline over a fastsolar model.

    pipe = fastsolar.pipeline("text-generation", "SOLAR-10.7B-Instruct-v1.0")   # or model=Solar, tokenizer=...
    pipe("Depth Up-Scaling is", max_new_tokens=32)          # [{"generated_text": prompt + completion}]
    pipe([{"role": "user", "content": "Hello?"}])           # [{"generated_text": [...conversation, assistant reply]}]

The call takes what transformers' (5.x) does: a string, a list of strings, a conversation (a list of
{"role", "content"} dicts) or a list of conversations; one input gives a list of one record, a list of inputs a
list of such lists. A string is tokenized as the tokenizer's call does (BOS added as configured), a conversation
through the chat template with the generation prompt (one ending in an assistant message would be continued, as
transformers does, but fastsolar's apply_chat_template refuses `continue_final_message`). Records are
{"generated_text": ...}: for a
string the prompt followed by the completion (`return_full_text=False`: the completion alone), for a
conversation the conversation with the reply appended as an assistant message. The completion is the new tokens
decoded without special tokens.

Generation options (max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, seed, ...) go to
`model.generate`, the call's over those given to `pipeline(...)`; what neither gives comes from the model's
generation_config, then the pipeline's defaults, as transformers 5 sets them: max_new_tokens 256, do_sample True
with temperature 0.7 (the sampling defaults only when sampling), and the tokenizer's pad id. Each input is
generated on its own (transformers' default batch_size of 1; `batch_size=` is accepted), so its text is what it
gets alone.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fastsolar.api import Solar, Tokenizer, TokenizerFast
from fastsolar.hf.generation_config import SAMPLING

TASK = "text-generation"
#: transformers' TextGenerationPipeline._default_generation_config, with the tokenizer's pad id added at init.
DEFAULTS: dict[str, Any] = dict(max_new_tokens=256, do_sample=True, temperature=0.7)
_REFUSED = {
    "return_tensors": "token ids: call model.generate", "return_text": "use return_full_text",
    "return_type": "use return_full_text", "prefix": "put it in the prompt", "stop_sequence": "not implemented",
    "handle_long_generation": "not implemented", "tokenizer_encode_kwargs": "not implemented",
    "tools": "not implemented", "documents": "not implemented", "truncation": "not implemented",
    "padding": "each input is generated on its own",
}
_NO_EFFECT = ("batch_size", "num_workers")  # accepted: each input is generated on its own, with the same result


def pipeline(
    task: str = TASK,
    model: str | Path | Solar | None = None,
    tokenizer: str | Path | Tokenizer | TokenizerFast | None = None,
    *,
    device: Any = None,
    device_map: Any = None,
    dtype: Any = None,
    torch_dtype: Any = None,
    **generate_kwargs: Any,
) -> "TextGenerationPipeline":
    """transformers' `pipeline("text-generation", model, tokenizer=None, ...)`: `model` a checkpoint directory
    (loaded with `Solar.from_pretrained`, on `device` / `device_map`, in `dtype` / `torch_dtype`) or a loaded
    `Solar`; `tokenizer` a directory or a tokenizer (default: the model's directory's). Other keyword arguments
    are generation options for every call."""
    if task != TASK:
        raise ValueError(f"task {task!r} is not supported; fastsolar has the {TASK!r} pipeline only")
    if model is None:
        raise ValueError("pipeline() needs model=: a checkpoint directory or a fastsolar Solar")
    _refuse(generate_kwargs)
    if isinstance(device, int) and not isinstance(device, bool):  # transformers' -1 = CPU, i = CUDA device i
        device = "cpu" if device < 0 else f"cuda:{device}"
    load = {k: v for k, v in dict(device=device, device_map=device_map, dtype=dtype, torch_dtype=torch_dtype).items()
            if v is not None}
    if isinstance(model, (str, Path)):
        model_dir = model
        model = Solar.from_pretrained(model_dir, **load)
        tokenizer = model_dir if tokenizer is None else tokenizer
    elif not isinstance(model, Solar):
        raise TypeError(f"model must be a checkpoint directory or a fastsolar Solar, got {type(model).__name__}")
    elif load:
        raise ValueError(f"{', '.join(load)} apply to a model loaded from its directory; this one is already "
                         f"loaded (on {model.device}, {model.dtype})")
    if tokenizer is None:
        raise ValueError("pipeline() needs tokenizer= (a directory or a tokenizer) for a model passed as a Solar")
    if isinstance(tokenizer, (str, Path)):
        tokenizer = Tokenizer.from_pretrained(tokenizer)
    return TextGenerationPipeline(model, tokenizer, **generate_kwargs)


class TextGenerationPipeline:
    """`pipe(inputs, **options)` as transformers' TextGenerationPipeline (module docstring)."""

    def __init__(self, model: Solar, tokenizer: Tokenizer | TokenizerFast, **generate_kwargs: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.generate_kwargs = generate_kwargs

    def __call__(
        self,
        text_inputs: str | Sequence[Any],
        *,
        return_full_text: bool = True,
        continue_final_message: bool | None = None,
        add_special_tokens: bool | None = None,
        skip_special_tokens: bool = True,
        **generate_kwargs: Any,
    ) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """[{"generated_text": ...}] for one input, a list of those for a list of inputs (module docstring)."""
        _refuse(generate_kwargs)
        options = dict(return_full_text=return_full_text, continue_final_message=continue_final_message,
                       add_special_tokens=add_special_tokens, skip_special_tokens=skip_special_tokens,
                       generate_kwargs=self._generate_kwargs(generate_kwargs))
        if isinstance(text_inputs, str) or _is_chat(text_inputs):
            return self._one(text_inputs, **options)
        batch = isinstance(text_inputs, (list, tuple)) and all(isinstance(t, str) or _is_chat(t) for t in text_inputs)
        if not batch:
            raise TypeError("text_inputs must be a string, a conversation (a list of {'role', 'content'} dicts) "
                            f"or a list of either, got {type(text_inputs).__name__}")
        return [self._one(t, **options) for t in text_inputs]

    def _generate_kwargs(self, call: dict[str, Any]) -> dict[str, Any]:
        """The options for model.generate: the call's over the pipeline's, plus the pipeline's defaults for
        what neither they nor the model's generation_config set (transformers' `_prepare_generate_kwargs`)."""
        given = {**self.generate_kwargs, **call}
        set_params = {**self.model.generation_config.set_fields(), **{k: v for k, v in given.items() if v is not None}}
        defaults = dict(DEFAULTS)
        if self.tokenizer.pad_token_id is not None:
            defaults["pad_token_id"] = self.tokenizer.pad_token_id
        added = {k: v for k, v in defaults.items()
                 if k not in set_params and not (k == "max_new_tokens" and "max_length" in set_params)}
        if not {**set_params, **added}.get("do_sample"):
            added = {k: v for k, v in added.items() if k not in SAMPLING}
        return {**given, **added}

    def _one(self, prompt: str | Sequence[Mapping[str, str]], *, return_full_text: bool,
             continue_final_message: bool | None, add_special_tokens: bool | None, skip_special_tokens: bool,
             generate_kwargs: dict[str, Any]) -> list[dict[str, Any]]:
        chat = not isinstance(prompt, str)
        if chat:
            messages = [dict(m) for m in prompt]
            if continue_final_message is None:
                continue_final_message = messages[-1]["role"] == "assistant"
            inputs = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=not continue_final_message,
                continue_final_message=continue_final_message, return_dict=True, return_tensors="pt")
        else:
            extra = {} if add_special_tokens is None else dict(add_special_tokens=add_special_tokens)
            inputs = self.tokenizer(prompt, return_tensors="pt", **extra)
        ids = inputs["input_ids"].to(self.model.device)
        out = self.model.generate(ids, attention_mask=inputs["attention_mask"].to(self.model.device), **generate_kwargs)
        text = self.tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=skip_special_tokens)
        if not return_full_text:
            return [{"generated_text": text}]
        if not chat:
            return [{"generated_text": prompt + text}]
        if continue_final_message:
            last = messages[-1]
            return [{"generated_text": messages[:-1] + [{**last, "content": last["content"] + text}]}]
        return [{"generated_text": messages + [{"role": "assistant", "content": text}]}]


def _is_chat(value: Any) -> bool:
    """A conversation: a non-empty list of dicts with a role (what transformers' pipeline takes as a Chat)."""
    return (isinstance(value, (list, tuple)) and bool(value)
            and all(isinstance(m, Mapping) and "role" in m for m in value))


def _refuse(kwargs: dict[str, Any]) -> None:
    """Drop the options without effect here; TypeError for the transformers options fastsolar lacks."""
    for name in _NO_EFFECT:
        kwargs.pop(name, None)
    for name in kwargs:
        if name in _REFUSED:
            raise TypeError(f"pipeline option {name!r} is not supported: {_REFUSED[name]}")
