"""Chat formatting for SOLAR-10.7B-Instruct, plus the text-side helpers a chat loop needs.

SOLAR_CHAT_TEMPLATE is, verbatim, the `chat_template` of upstage/SOLAR-10.7B-Instruct-v1.0's
tokenizer_config.json (cross-checked against three independent public copies used as test fixtures by
Jinja re-implementations). It renders

    ### System:\\n{system}\\n\\n          (only when the system content is non-empty)
    ### User:\\n{user}\\n\\n
    ### Assistant:\\n{assistant}          (no separator after an assistant turn)
    ### Assistant:\\n                     (the generation prompt, after the last message)

No bos/eos text appears in it: the bos token is added when the prompt is encoded, as the model card's
`tokenizer(prompt)` does. The model ends a reply with eos; it sometimes runs on into a new "### User:"
turn instead, so chat generation also stops at CHAT_STOP_STRINGS.

Templates are rendered the way transformers renders them: a sandboxed Jinja environment with
trim_blocks/lstrip_blocks and loop controls, `raise_exception`, `tojson`, `strftime_now`, the
`{% generation %}` block, and the bos/eos/unk/pad token strings as variables.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

SOLAR_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content']%}{{'### System:\\n' + message['content']+'\\n\\n'}}{% endif %}"
    "{% elif message['role'] == 'user' %}{{'### User:\\n' + message['content']+'\\n\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'### Assistant:\\n'  + message['content']}}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
    "{% endfor %}"
)

# Turn headers of the SOLAR format that end an assistant reply when the model writes them itself.
CHAT_STOP_STRINGS: tuple[str, ...] = ("### User:", "### System:")

ROLES = ("system", "user", "assistant")


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check a conversation: a non-empty list of {"role": system|user|assistant, "content": str}.

    Returns plain-dict copies (extra keys kept). Raises ValueError (TypeError for a non-list) naming
    the offending message.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: a conversation needs at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        missing = [k for k in ("role", "content") if k not in m]
        if missing:
            raise ValueError(f"messages[{i}] lacks {' and '.join(repr(k) for k in missing)}")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}] has role {m['role']!r}; roles are {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"messages[{i}] content must be a string, got {type(m['content']).__name__}")
        out.append(dict(m))
    return out


class _TemplateError(Exception):
    pass


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(Extension):
        # transformers' AssistantTracker marks `{% generation %}` spans; for rendering they are transparent.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise _TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not parse: {e.message} (line {e.lineno})") from None


def render_chat_template(
    template: str,
    messages: Any,
    *,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str | None] | None = None,
    **kwargs: Any,
) -> str:
    """Render `template` for validated `messages` as transformers' `apply_chat_template(tokenize=False)`."""
    import jinja2

    messages = validate_messages(messages)
    variables = {"tools": None, "documents": None, **(special_tokens or {}), **kwargs}
    try:
        return _compile(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )
    except _TemplateError as e:
        raise ValueError(f"chat template refused the conversation: {e}") from None
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template failed: {e}") from None


def stop_strings_for(template: str) -> tuple[str, ...]:
    """The SOLAR turn headers that a template uses (so a reply stops where the next turn would begin)."""
    return tuple(s for s in CHAT_STOP_STRINGS if s in template)


class StopStringFilter:
    """Streams text through, cutting it at the first stop string.

    `push(text)` returns `(shown, stopped)`: the text now safe to show (a tail that could still grow
    into a stop string is held back) and whether a stop string was found, after which everything from
    the stop string on is dropped. `flush()` returns the held-back tail at the end of a stream.
    Memory is bounded by the longest stop string.
    """

    def __init__(self, stop_strings: Iterable[str] = ()) -> None:
        self.stop_strings = tuple(s for s in stop_strings if s)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None

    def push(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        buf = self._held + text
        if not self.stop_strings:
            self._held = ""
            return buf, False
        hits = [(buf.find(s), s) for s in self.stop_strings]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            i, s = min(hits)
            self.stopped, self.matched, self._held = True, s, ""
            return buf[:i], True
        keep = 0
        for s in self.stop_strings:
            # The longest tail of buf that begins s starts at the first s[0] among buf's last len(s) - 1 chars
            # from which the rest of buf is a prefix of s (a find per candidate, not an endswith per length).
            i = buf.find(s[0], max(0, len(buf) - len(s) + 1))
            while 0 <= i and len(buf) - i > keep:
                if s.startswith(buf[i:]):
                    keep = len(buf) - i
                    break
                i = buf.find(s[0], i + 1)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held


class TextStream:
    """Token ids in, reply text out: incremental detokenization (`tokenizer.stream_decoder()`) followed by a
    StopStringFilter, so the pieces are final text, cut at the first stop string.

    `push(token)` returns `(text, stopped)`; `finish()` returns `(tail, stopped)` at the end of generation
    (what was held back, itself cut if the last characters completed a stop string). The concatenation of
    the pieces is the same however the tokens were grouped, so streamed and whole replies agree. With
    `context` (the prompt's ids) the text is what the tokens add after the prompt (`stream_decoder`).
    """

    def __init__(self, tokenizer: Any, stop_strings: Iterable[str] = (), context: Sequence[int] = ()) -> None:
        self.decoder = tokenizer.stream_decoder(context)
        self.stops = StopStringFilter(stop_strings)

    def push(self, token: int) -> tuple[str, bool]:
        return self.stops.push(self.decoder.push(token))

    def finish(self) -> tuple[str, bool]:
        shown, stopped = self.stops.push(self.decoder.flush())
        return shown + self.stops.flush(), stopped


def stream_text(
    model: Any,
    tokenizer: Any,
    input_ids: Sequence[int],
    max_new_tokens: int,
    *,
    stop_strings: Sequence[str] = (),
    eos_token_ids: Sequence[int] | None = None,
    **sampling: Any,
) -> Iterator[str]:
    """Generate from one prompt and yield the decoded text as it becomes final.

    Stops at an eos id (never shown) or at a stop string (cut off, not shown). The concatenation of the
    yielded pieces is the reply. `sampling` goes to `model.stream` (temperature, top_k, top_p,
    repetition_penalty, seed).
    """
    import torch

    if eos_token_ids is None:
        eos_token_ids = tuple(getattr(model.config, "eos_token_ids", ())) or (tokenizer.eos_id,)
    eos = set(int(e) for e in eos_token_ids)
    eos_arg: int | list[int] = next(iter(eos)) if len(eos) == 1 else sorted(eos)
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=getattr(model, "device", None))
    text = TextStream(tokenizer, stop_strings)
    steps = model.stream(ids, max_new_tokens, eos_token_id=eos_arg, **sampling)
    try:
        for step in steps:
            token = int(step.reshape(-1)[0])
            if token in eos:
                break
            shown, stopped = text.push(token)
            if shown:
                yield shown
            if stopped:
                return
        tail, _ = text.finish()
        if tail:
            yield tail
    finally:
        close = getattr(steps, "close", None)
        if close is not None:
            close()
