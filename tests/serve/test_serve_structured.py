"""`response_format` through the real openai client: a random tiny model, whose free output is not JSON, gives
schema-valid JSON (jsonschema validates it) for every schema (the openai client's completions take it through
extra_body, as with vLLM), sampled and greedy, streamed and not, chat and
completions, alone and in a batch that mixes constrained and free rows (the free rows' text is what `generate`
gives them alone); max_tokens cuts a constrained reply with finish_reason "length"; unsupported schemas and
bad values are 400s naming the field. Below the server: the token bytes the grammar matches (byte-fallback
pieces, the ▁ marker, byte-level BPE) and the device bitmask's unpacking."""
from __future__ import annotations

import json
import threading
import time

import pytest
import torch

for _name in ("fastapi", "uvicorn", "httpx", "openai", "jsonschema", "llguidance"):
    pytest.importorskip(_name, reason=f"the server tests need {_name}: pip install -e '.[test]'")

import httpx  # noqa: E402
import jsonschema  # noqa: E402
import openai  # noqa: E402
from helpers import DEVICE, joined, running_server  # noqa: E402
from hf_fixtures import build_json_checkpoint  # noqa: E402

from fastsolar import Solar, Tokenizer  # noqa: E402
from fastsolar.serve.api import create_app  # noqa: E402
from fastsolar.decoding.sampling import RowParams  # noqa: E402
from fastsolar.serve.engine import Engine, Request  # noqa: E402
from fastsolar.serve.grammar import Grammars  # noqa: E402
from fastsolar.serve.token_mask import TokenMask  # noqa: E402

MODEL = "tiny"
WAIT_S = 60.0

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "admin": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "a b", "ü\n"]}, "maxItems": 3},
    },
    "required": ["name", "age", "admin", "tags"],
    "additionalProperties": False,
}
CHOICE = {"type": "object", "properties": {"answer": {"enum": ["yes", "no", "maybe"]},
                                           "score": {"type": "integer", "minimum": -5, "maximum": 5}},
          "required": ["answer", "score"], "additionalProperties": False}
LIST = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 2, "maxItems": 5}
SCHEMAS = {"person": PERSON, "choice": CHOICE, "list": LIST}


def json_schema(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


@pytest.fixture(scope="module")
def served(serve_checkpoint):
    tok = Tokenizer.from_pretrained(serve_checkpoint)
    model = Solar.from_pretrained(serve_checkpoint)
    delay = {"s": 0.0, "bias": None}
    decode, prefill = model.decode, model.prefill

    def biased(logits):
        return logits if delay["bias"] is None else logits + delay["bias"].to(logits.dtype)

    def slow_decode(*args, **kwargs):  # a slower model while a test needs requests to overlap; a biased one
        if delay["s"]:
            time.sleep(delay["s"])
        return biased(decode(*args, **kwargs))

    model.decode = slow_decode
    model.prefill = lambda *args, **kwargs: biased(prefill(*args, **kwargs))
    engine = Engine(model, tok, max_batch=6, max_queue=8)
    with running_server(create_app(engine, tok, MODEL), WAIT_S) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=WAIT_S, max_retries=0)
        yield base, client, engine, tok, Solar.from_pretrained(serve_checkpoint), delay


def _validate(text: str, schema: dict) -> object:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


def test_free_output_of_the_random_model_is_not_json(served):
    """The premise of the tests below: without the grammar this model's replies do not parse."""
    _, client, *_ = served
    for prompt in ("Reply in JSON:", "{", "Hello"):
        text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0).choices[0].text
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_completions_always_validate(served, name):
    _, client, *_ = served
    for i, temperature in enumerate((0.0, 1.0, 2.0)):
        reply = client.completions.create(model=MODEL, prompt=f"Give {name} #{i}:", max_tokens=120,
                                          temperature=temperature, seed=i,
                                          extra_body={"response_format": json_schema(name)})
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", (temperature, choice)
        _validate(choice.text, SCHEMAS[name])


def test_json_schema_chat_whole_and_streamed(served):
    _, client, *_ = served
    messages = [{"role": "user", "content": "Describe a person as JSON."}]
    for seed in range(2):
        kw = dict(model=MODEL, messages=messages, max_tokens=120, temperature=1.0, seed=seed,
                  response_format=json_schema("person"))
        whole = client.chat.completions.create(**kw).choices[0]
        assert whole.finish_reason == "stop"
        value = _validate(whole.message.content, PERSON)
        pieces, finish = [], None
        for chunk in client.chat.completions.create(stream=True, **kw):
            for c in chunk.choices:
                pieces.append(c.delta.content or "")
                finish = c.finish_reason or finish
        assert finish == "stop" and _validate("".join(pieces), PERSON) == value  # same seed, same reply


def test_json_object_parses_to_an_object(served):
    """A model biased towards `"`, `{` and `}` (which alone writes no JSON: strings of them) writes JSON
    objects through the grammar; the random model alone would fill strings until max_tokens."""
    _, client, engine, tok, *_ , delay = served
    bias = torch.zeros(engine.vocab_size)
    bias[[i for i in range(tok.vocab_size) if tok.token_bytes(i).strip() in (b'"', b"{", b"}")]] = 100.0
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "JSON please"}], max_tokens=60, temperature=1.0)
    delay["bias"] = bias
    try:
        free = client.chat.completions.create(seed=0, **kw).choices[0].message.content
        assert set(free) & set('"{}') and free.count('"') + free.count("}") > len(free) // 2, free
        with pytest.raises(json.JSONDecodeError):
            json.loads(free)
        for seed in range(3):
            choice = client.chat.completions.create(seed=seed, response_format={"type": "json_object"},
                                                    **kw).choices[0]
            assert choice.finish_reason == "stop", choice
            assert isinstance(json.loads(choice.message.content), dict), choice
    finally:
        delay["bias"] = None
    # {"type": "text"} is free text: exactly what no response_format gives.
    kw = dict(model=MODEL, prompt="Hello", max_tokens=20, temperature=0)
    assert (client.completions.create(**kw, extra_body={"response_format": {"type": "text"}}).choices[0].text
            == client.completions.create(**kw).choices[0].text)


def test_max_tokens_cuts_a_constrained_reply_with_length(served):
    _, client, *_ = served
    reply = client.completions.create(model=MODEL, prompt="x", max_tokens=3, temperature=0,
                                      extra_body={"response_format": json_schema("person")})
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and reply.usage.completion_tokens == 3
    assert choice.text and '{"name"'.startswith(choice.text)  # the schema's forced beginning, cut


def test_constrained_and_free_rows_in_one_batch(served):
    base, client, engine, tok, ref, delay = served
    free_prompts = ["Once upon a time", "The quick brown fox", "Hello, world!"]
    results: dict = {}

    def constrained(i: int) -> None:
        results[("c", i)] = client.completions.create(
            model=MODEL, prompt=f"Person {i}:", max_tokens=120, temperature=1.0, seed=i,
            extra_body={"response_format": json_schema("person")}).choices[0]

    def free(i: int) -> None:
        results[("f", i)] = client.completions.create(
            model=MODEL, prompt=free_prompts[i], max_tokens=30, temperature=0, extra_body={"ignore_eos": True}
        ).choices[0]

    before = httpx.get(base + "/stats", timeout=WAIT_S).json()["decode_steps_by_batch_size"]
    finished_before = engine.stats["requests_finished"]
    delay["s"] = 0.5  # slow steps until all six run, so that they overlap however slow the machine is
    try:
        threads = [threading.Thread(target=f, args=(i,)) for i in range(3) for f in (constrained, free)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + WAIT_S
        while engine.metrics()["running"] + engine.stats["requests_finished"] - finished_before < 6:
            assert time.monotonic() < deadline, engine.metrics()
            time.sleep(0.01)
        delay["s"] = 0.02
        for t in threads:
            t.join(WAIT_S)
        assert not any(t.is_alive() for t in threads)
    finally:
        delay["s"] = 0.0
    after = httpx.get(base + "/stats", timeout=WAIT_S).json()["decode_steps_by_batch_size"]
    assert after.get("6", 0) > before.get("6", 0), after  # all six decoded together
    for i in range(3):
        assert results[("c", i)].finish_reason == "stop"
        _validate(results[("c", i)].text, PERSON)
        ids = tok.encode(free_prompts[i])
        new = ref.generate(torch.tensor([ids]), 30, eos_token_id=[])[0, len(ids):].tolist()
        assert results[("f", i)].text == joined(lambda x: tok.decode(x, skip_special_tokens=True), ids, new), i  # the mask left them alone


BAD = [
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_object", "json_schema": {"name": "a", "schema": {}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "extra": 1}}},
     "response_format.json_schema.extra"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
]
UNSUPPORTED = [  # schemas llguidance cannot enforce: refused, the message naming what
    ({"type": "string", "format": "color"}, "format"),
    ({"$ref": "#/definitions/missing"}, "missing"),
    ({"type": "object", "properties": {"a": {"type": "strin"}}}, "strin"),
]


def test_bad_values_get_400_naming_the_field(served):
    base, *_ = served
    with httpx.Client(base_url=base, timeout=WAIT_S) as http:
        for path, head in (("/v1/completions", {"prompt": "hi"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
            for extra, param in BAD:
                r = http.post(path, json={"model": MODEL, "max_tokens": 4, **head, **extra})
                assert r.status_code == 400, (extra, r.text)
                assert r.json()["error"]["param"] == param, (extra, r.json())
            for schema, fragment in UNSUPPORTED:
                body = {"model": MODEL, "max_tokens": 4, **head,
                        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}
                r = http.post(path, json=body)
                assert r.status_code == 400, (schema, r.text)
                err = r.json()["error"]
                assert err["param"] == "response_format.json_schema.schema" and fragment in err["message"], err
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "temperature": 2})
        assert r.status_code == 200  # 2 is OpenAI's upper bound, allowed


# -- below the server ---------------------------------------------------------------------------------

def test_token_bytes_of_both_tokenizer_kinds(serve_checkpoint, tmp_path):
    sp = Tokenizer.from_pretrained(serve_checkpoint)
    newline = sp.convert_tokens_to_ids("<0x0A>")
    assert sp.token_bytes(newline) == b"\n"
    the = sp.encode(" the", bos=False)
    assert [sp.token_bytes(i) for i in the if sp.id_to_piece(i).startswith("\u2581")]  # a ▁ piece is there
    bj = Tokenizer.from_pretrained(build_json_checkpoint(tmp_path / "json"))
    for tok in (sp, bj):
        # Every text the tokenizer encodes is the concatenation of its tokens' bytes (sentencepiece's dummy
        # prefix aside: its first space is not in the text).
        for text in ("Hello, world!", "Café naïve\n\ttab 日本語 😀", "  two  spaces", "{\"a\": [1, 2]}"):
            ids = tok.encode(text, bos=False)
            joined = b"".join(tok.token_bytes(i) for i in ids)
            if tok is sp:
                assert joined[:1] == b" "
                joined = joined[1:]
            assert joined == text.encode(), (tok, text, joined)
        for i in tok.special_ids:
            assert tok.token_bytes(i) == tok.id_to_piece(i).encode()


def test_grammar_masks_follow_a_schema_for_any_logits(serve_checkpoint):
    """Random logits (a model that knows nothing), masked: every sampled path is schema-valid JSON; ids past the
    tokenizer's vocabulary (a padded embedding) are never allowed."""
    tok = Tokenizer.from_pretrained(serve_checkpoint)
    vocab = tok.vocab_size + 9  # not a multiple of 32, and wider than the tokenizer
    grammars = Grammars(tok, vocab, [tok.eos_id])
    grammar = grammars.compile(json_schema("person"))
    mask = TokenMask(3, vocab, "cpu")
    gen = torch.Generator().manual_seed(0)
    for trial in range(4):
        constraints = [grammars.matcher(grammar), None, grammars.matcher(grammar)]
        ids: list[list[int]] = [[], [], []]
        done = [False, False, False]
        for _ in range(300):
            mask.set([c.fill if c is not None and not d else None for c, d in zip(constraints, done)])
            logits = torch.randn(3, vocab, generator=gen)
            masked = mask.apply(logits)
            assert torch.equal(masked[1], logits[1])  # the free row is untouched
            for r in (0, 2):
                if done[r]:
                    continue
                allowed = torch.isfinite(masked[r])
                assert not allowed[tok.vocab_size:].any()
                assert bool(allowed[tok.eos_id]) == constraints[r].complete  # EOS only where the JSON is whole
                token = int(torch.multinomial(allowed.float(), 1, generator=gen))
                if token == tok.eos_id:
                    done[r] = True
                    continue
                constraints[r].advance(token)
                ids[r].append(token)
                done[r] = constraints[r].finished
            if done[0] and done[2]:
                break
        for r in (0, 2):
            assert done[r], trial
            _validate(tok.decode(ids[r], skip_special_tokens=True), PERSON)


def test_token_mask_unpacks_bits_exactly():
    vocab = 77  # three words, the last one partial
    mask = TokenMask(4, vocab, "cpu")
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(-2**31, 2**31, ((vocab + 31) // 32,), dtype=torch.int64, generator=gen).to(torch.int32)
            for _ in range(3)]

    def filler(words):
        return lambda row: row.copy_(words)

    mask.set([filler(rows[0]), None, filler(rows[2])])
    assert mask.active
    logits = torch.randn(3, vocab, generator=gen)
    out = mask.apply(logits)
    for r in range(3):
        for token in range(vocab):
            allowed = r == 1 or (int(rows[r][token // 32]) >> (token % 32)) & 1 == 1
            assert (out[r, token] == logits[r, token]) if allowed else out[r, token] == float("-inf"), (r, token)
    mask.set([None, None])
    assert not mask.active and mask.apply(logits) is logits


def test_engine_mixes_constrained_and_free_rows_in_its_step(serve_checkpoint):
    """The engine alone (no HTTP), on the test device: constrained and free requests decode in one batch through
    the static-buffer step (on CUDA: captured graphs, keyed with and without the mask), the free ones equal to
    `generate` alone, the constrained ones schema-valid."""
    tok = Tokenizer.from_pretrained(serve_checkpoint)
    ref = Solar.from_pretrained(serve_checkpoint, device=DEVICE)
    engine = Engine(Solar.from_pretrained(serve_checkpoint, device=DEVICE), tok, max_batch=4).start()
    try:
        grammars = Grammars(tok, engine.vocab_size, sorted(engine.eos))
        done = {i: threading.Event() for i in range(4)}
        outs: dict = {i: [] for i in range(4)}

        def sink(i):
            def put(out):
                outs[i].append(out)
                if out.finish_reason is not None:
                    done[i].set()
            return put

        prompts = ["Once upon a time", "Hello", "The quick brown fox", "Person:"]
        for i, p in enumerate(prompts):
            constraint = grammars.constraint(json_schema("person")) if i % 2 else None
            engine.submit(Request(f"r{i}", tok.encode(p), 40 if constraint is None else 120,
                                  RowParams(temperature=0.0 if constraint is None else 1.0, seed=i),
                                  ignore_eos=constraint is None, constraint=constraint), sink(i))
        for i in range(4):
            assert done[i].wait(WAIT_S)
            text = "".join(o.text for o in outs[i])
            if i % 2:
                assert outs[i][-1].finish_reason == "stop"
                _validate(text, PERSON)
            else:
                ids = tok.encode(prompts[i])
                new = ref.generate(torch.tensor([ids], device=DEVICE), 40, eos_token_id=[])[0, len(ids):].tolist()
                assert text == joined(lambda x: tok.decode(x, skip_special_tokens=True), ids, new), i
        assert engine.batch_sizes[4] > 0  # the four decoded together
        done[0].clear()
        engine.submit(Request("free", tok.encode("Hi"), 3, RowParams(temperature=0.0)), sink(0))
        assert done[0].wait(WAIT_S)
        masked = {e.key.sampler_mode[-1] for e in engine.step.pool.entries.values()}
        assert masked == {True, False}  # steps with the mask, and without it for a batch of free rows
        assert all((e.graph is not None) == engine.cuda_graphs for e in engine.step.pool.entries.values())
    finally:
        engine.stop()


def test_openai_parse_helper_gets_a_pydantic_object(served):
    """The openai client's structured-output helper: it sends its strict schema of a pydantic model and parses
    the reply into the model."""
    from typing import Annotated, Literal

    import pydantic

    class Pet(pydantic.BaseModel):
        name: Annotated[str, pydantic.Field(min_length=1, max_length=8)]
        kind: Literal["cat", "dog"]
        age: Annotated[int, pydantic.Field(ge=0, le=30)]

    class Owner(pydantic.BaseModel):
        pets: Annotated[list[Pet], pydantic.Field(max_length=2)]
        vip: bool

    _, client, *_ = served
    for seed in range(2):
        reply = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "pets?"}],
                                              max_tokens=120, temperature=1.0, seed=seed, response_format=Owner)
        message = reply.choices[0].message
        assert reply.choices[0].finish_reason == "stop" and isinstance(message.parsed, Owner), message
        assert message.parsed == Owner.model_validate_json(message.content)
