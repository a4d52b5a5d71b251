"""fastsolar serve with a tokenizer.json checkpoint (fastsolar.TokenizerFast): the server takes whatever tokenizer
it is given, and its replies are what transformers' tokenizer, greedy generate and decode give on the same
checkpoint."""
from __future__ import annotations

import pytest
import torch

for _name in ("fastapi", "uvicorn", "httpx", "openai", "transformers"):
    pytest.importorskip(_name, reason=f"the server tests need {_name}: pip install -e '.[test]'")

import openai  # noqa: E402
import transformers  # noqa: E402
from helpers import joined, running_server  # noqa: E402
from hf_fixtures import build_json_checkpoint  # noqa: E402

from fastsolar import Solar, Tokenizer, TokenizerFast  # noqa: E402
from fastsolar.serve.api import create_app  # noqa: E402
from fastsolar.serve.engine import Engine  # noqa: E402

WAIT_S = 60.0  # bound on any wait (the shared CPU can be slow)
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_json_checkpoint(tmp_path_factory.mktemp("serve_json"))


@pytest.fixture(scope="module")
def url(checkpoint):
    tok = Tokenizer.from_pretrained(checkpoint)
    assert isinstance(tok, TokenizerFast)
    engine = Engine(Solar.from_pretrained(checkpoint, device="cpu", dtype="float32"), tok, max_batch=2, max_queue=4)
    with running_server(create_app(engine, tok, "tiny-json"), WAIT_S) as base:
        yield base


def _reference(checkpoint, ids: list[int]) -> str:
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(checkpoint))
    hf = transformers.LlamaForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    new = hf.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=4)[0, len(ids):]
    return joined(lambda x: hf_tok.decode(x, skip_special_tokens=True), ids, new.tolist())


def test_chat_and_completion_match_transformers(checkpoint, url):
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(checkpoint))
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=WAIT_S, max_retries=0)
    messages = [{"role": "user", "content": "Hello? 日本 😀"}]
    expected = _reference(checkpoint, hf_tok.apply_chat_template(messages, add_generation_prompt=True,
                                                                 return_dict=False))
    reply = client.chat.completions.create(model="tiny-json", messages=messages, max_tokens=MAX_TOKENS,
                                           temperature=0)
    assert reply.choices[0].message.content == expected
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny-json", messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True) if c.choices)
    assert streamed == expected

    prompt = "The capital of France is"
    done = client.completions.create(model="tiny-json", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert done.choices[0].text == _reference(checkpoint, hf_tok(prompt).input_ids)
