"""The server's defaults for what a request leaves out come from the checkpoint's generation_config.json: a request
without temperature / repetition_penalty / max_tokens gets what transformers' generate gives on the same folder
(greedy because the file says do_sample false, its repetition penalty, its max_new_tokens), and the request's own
fields still win."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

for _name in ("fastapi", "uvicorn", "httpx"):
    pytest.importorskip(_name, reason=f"the server tests need {_name}: pip install -e '.[test]'")
import httpx  # noqa: E402
import transformers  # noqa: E402
from helpers import joined, running_server  # noqa: E402

from fastsolar import Solar, Tokenizer  # noqa: E402
from fastsolar.serve.api import create_app  # noqa: E402
from fastsolar.serve.engine import Engine  # noqa: E402

WAIT_S = 60.0
FILE = {"bos_token_id": 1, "eos_token_id": [2, 0], "do_sample": False, "temperature": 0.9,
        "repetition_penalty": 1.3, "max_new_tokens": 6}


def test_request_defaults_come_from_generation_config(serve_checkpoint, tmp_path) -> None:
    d = shutil.copytree(serve_checkpoint, tmp_path / "ckpt")
    (d / "generation_config.json").write_text(json.dumps(FILE))
    tok = Tokenizer.from_pretrained(d)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    ids = tok.encode("Depth up-scaling")
    want = hf.generate(torch.tensor([ids]))[0, len(ids):].tolist()  # the file's settings
    plain = hf.generate(torch.tensor([ids]), repetition_penalty=1.0, max_new_tokens=9)[0, len(ids):].tolist()
    assert len(want) == FILE["max_new_tokens"] and not {0, 2} & set(want + plain)
    assert want != plain[:len(want)], "the file's repetition penalty must change these tokens"
    engine = Engine(Solar.from_pretrained(d, device="cpu", dtype="float32"), tok, max_batch=2, max_queue=2)
    with running_server(create_app(engine, tok, "tiny"), WAIT_S) as base, httpx.Client(base_url=base,
                                                                                      timeout=WAIT_S) as http:
        def complete(**fields) -> dict:
            r = http.post("/v1/completions", json={"model": "tiny", "prompt": ids, **fields})
            assert r.status_code == 200, r.text
            return r.json()

        got = complete()
        assert got["usage"]["completion_tokens"] == len(want)
        assert got["choices"][0]["text"] == joined(tok.decode, ids, want) and got["choices"][0]["finish_reason"] == "length"
        explicit = complete(temperature=0, repetition_penalty=1.0, max_tokens=9)
        assert explicit["choices"][0]["text"] == joined(tok.decode, ids, plain)
