"""Request bodies of the OpenAI-compatible endpoints, as strict pydantic models (validation is pydantic's).

Every field OpenAI defines either works or is refused with a 400 naming it -- never silently ignored:

- implemented: `model`, `messages` / `prompt`, `max_tokens` (`max_completion_tokens` is its newer name;
  default: what fits the context), `temperature` (default 1, as OpenAI's), `top_p`, `seed`, `stop` (a string
  or a list), `stream`, `stream_options.include_usage`, `n` (>= 1; the engine's `--max-n` bounds it),
  `presence_penalty` and `frequency_penalty` (in [-2, 2]), `logprobs` with `top_logprobs` (0-20) on chat,
  `logprobs` (0-5, the top-N) on completions;
- extra fields (as vLLM names them): `top_k` (0 = off), `repetition_penalty` (1 = off), `ignore_eos`;
- accepted only at their neutral value (so clients that always send them keep working): `echo` false and
  `best_of` 1 (completions);
- accepted and only logged: `user` (OpenAI's end-user id);
- `response_format`: `{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema", "json_schema":
  {"name", "description", "schema", "strict"}}`, enforced by constrained decoding (fastsolar.serve.grammar);
- anything else (`tools`, `logit_bias`, `suffix`, ...) is an unknown field: 400.

`temperature` is OpenAI's range, 0 to 2.

Types are strict (no "0.7" for 0.7, no 1 for true) and numbers finite, as a JSON API should be.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from fastsolar.decoding.logprobs import MAX_TOP_LOGPROBS
from fastsolar.decoding.penalties import LIMIT as PENALTY_LIMIT

ROLES = ("system", "user", "assistant")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: list[TextPart]

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [{"type": "text", "text": v}]
        if not isinstance(v, list):
            raise ValueError("must be a string or a list of text parts")
        return v

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.content)


class JsonSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")  # `schema` would shadow BaseModel's method
    strict: bool | None = None  # enforced either way: the output always follows the schema


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only allowed with it")
        return self

    def grammar_input(self) -> dict[str, Any]:
        """As plain JSON data, `fastsolar.serve.grammar.Grammars.compile`'s input."""
        return self.model_dump(by_alias=True, exclude_none=True)


class GenerationRequest(_Strict):
    """What both endpoints share."""

    # Fields accepted only at the value that means "not used"; anything else is refused naming the field.
    NEUTRAL: ClassVar[dict[str, Any]] = {}

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = None
    stop: list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None
    n: int | None = Field(None, ge=1)
    frequency_penalty: float | None = Field(None, ge=-PENALTY_LIMIT, le=PENALTY_LIMIT)
    presence_penalty: float | None = Field(None, ge=-PENALTY_LIMIT, le=PENALTY_LIMIT)
    response_format: ResponseFormat | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if v is not None and not isinstance(v, list):
            raise ValueError("must be a string or a list of strings")
        if v is not None and any(s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        return v

    @field_validator("echo", "best_of", check_fields=False)
    @classmethod
    def _neutral(cls, v: Any, info: ValidationInfo) -> Any:
        neutral = cls.NEUTRAL[info.field_name]
        if v is not None and v != neutral:
            what = "is not supported" if neutral is None else f"is only supported as {info.field_name}={neutral!r}"
            raise ValueError(f"{info.field_name}={v!r} {what} by this server")
        return v

    @model_validator(mode="after")
    def _one_budget(self) -> "GenerationRequest":
        both = self.max_tokens is not None and self.max_completion_tokens is not None
        if both and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def token_budget(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    @property
    def logprob_count(self) -> int | None:
        """How many top logprobs per token the engine reports (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(GenerationRequest):
    NEUTRAL: ClassVar[dict[str, Any]] = {**GenerationRequest.NEUTRAL, "echo": False, "best_of": 1}

    prompt: str | list[int]
    logprobs: int | None = Field(None, ge=0, le=5)  # OpenAI's legacy completions: the top-N per token
    echo: bool | None = None
    best_of: int | None = None

    @property
    def logprob_count(self) -> int | None:
        return self.logprobs

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        # OpenAI also takes a batch (a list of strings or of token lists); one prompt per request here.
        if isinstance(v, list) and v and all(isinstance(x, (str, list)) for x in v):
            if len(v) > 1:
                raise ValueError(f"a batch of {len(v)} prompts is not supported: send one prompt per request")
            v = v[0]
        if isinstance(v, list):
            bad = [x for x in v if isinstance(x, bool) or not isinstance(x, int)]
            if bad:
                raise ValueError(f"must be a string or a list of token ids (integers), got {bad[0]!r} in the list")
        elif not isinstance(v, str):
            raise ValueError("must be a string or a list of token ids")
        return v
