"""The command line: help, one-line errors, generate / chat driven by a scripted stub model, and an
end-to-end run on a tiny random checkpoint (needs fastsolar.checkpoint.loader and fastsolar.decoding.generate)."""
from __future__ import annotations

import importlib.util
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastsolar import Tokenizer, cli

# Exercises no device code: CI covers it; bench/gpu_check.sh deselects it (tests/conftest.py).
pytestmark = pytest.mark.cpu_only

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    spec = importlib.util.spec_from_file_location("make_tokenizer", DATA / "make_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    d = tmp_path_factory.mktemp("cli_tok")
    module.train_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(tok_dir)


class StubModel:
    """Replays scripted token lists, one per `stream` call, and records what it was asked."""

    def __init__(self, replies, max_position_embeddings=4096):
        self.config = SimpleNamespace(max_position_embeddings=max_position_embeddings, eos_token_ids=(2,))
        self.device = torch.device("cpu")
        self.replies = list(replies)
        self.calls = []

    def stream(self, input_ids, max_new_tokens, **kwargs):
        self.calls.append(SimpleNamespace(ids=input_ids[0].tolist(), max_new_tokens=max_new_tokens, kwargs=kwargs))
        reply = self.replies.pop(0)
        return (torch.tensor([t]) for t in reply[:max_new_tokens])


@pytest.fixture
def stub(monkeypatch):
    def install(replies, **kw):
        model = StubModel(replies, **kw)
        monkeypatch.setattr(cli, "load_model", lambda args: model)
        return model

    return install


def run(argv, capsys, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *fragments):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastsolar: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


# -- help and errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["chat", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fastsolar")
    if argv[0] != "--help":
        assert "MODEL_DIR" in out and "--temperature" in out and "--max-new-tokens" in out


def test_commands_registered():
    assert {"generate", "chat", "serve", "upscale"} <= set(cli.COMMANDS)


def test_external_upscale_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["upscale", "--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: fastsolar upscale")
    rc, _, err = run(["upscale"], capsys)
    assert_one_line_error(rc, err, "required")


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["generate", "{missing}", "--prompt", "hi"], ["not found", "nowhere"]),
        (["chat", "{missing}"], ["not found", "nowhere"]),
        (["generate", "{empty}", "--prompt", "hi"], ["tokenizer.model"]),
        (["generate", "{tok}", "--prompt", "hi", "--temperature", "-1"], ["--temperature"]),
        (["generate", "{tok}", "--prompt", "hi", "--temperature", "nan"], ["--temperature"]),
        (["generate", "{tok}", "--prompt", "hi", "--top-p", "1.5"], ["--top-p"]),
        (["generate", "{tok}", "--prompt", "hi", "--top-k", "-3"], ["--top-k"]),
        (["generate", "{tok}", "--prompt", "hi", "--max-new-tokens", "0"], ["--max-new-tokens"]),
        (["generate", "{tok}", "--prompt", "hi", "--repetition-penalty", "0"], ["--repetition-penalty"]),
        (["generate", "{tok}", "--prompt", "hi", "--dtype", "float8"], ["--dtype"]),
        (["generate", "{tok}", "--prompt", "hi", "--quantize", "nf4"], ["--quantize", "nf4", "fp8", "int8", "int4"]),
        (["chat", "{tok}", "--quantize", "nf4"], ["--quantize", "nf4"]),
        (["generate", "{tok}", "--prompt", "hi", "--system", "s"], ["--chat"]),
        (["generate", "{tok}", "--prompt", "hi", "--top-p", "abc"], ["--top-p", "abc"]),
        (["chat", "{tok}", "--temperature", "-0.5"], ["--temperature"]),
        (["generate"], ["MODEL_DIR"]),
        (["frobnicate"], ["frobnicate"]),
        ([], ["COMMAND"]),
    ],
)
def test_one_line_errors(argv, fragments, tok_dir, tmp_path, capsys):
    paths = {"{missing}": str(tmp_path / "nowhere"), "{empty}": str(tmp_path), "{tok}": str(tok_dir)}
    rc, out, err = run([paths.get(a, a) for a in argv], capsys)
    assert_one_line_error(rc, err, *fragments)
    assert out == ""


@pytest.mark.parametrize("extra", [["--prompt", "hi"], ["--prompt", "hi", "--temperature", "-1"]])
def test_errors_in_a_real_process(extra, tmp_path):
    """`python -m fastsolar` itself: exit status 2, one stderr line, no traceback."""
    model_dir = tmp_path / "missing" if "--temperature" not in extra else tmp_path
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "fastsolar", "generate", str(model_dir), *extra],
                       capture_output=True, text=True, env=env, timeout=60)
    assert_one_line_error(p.returncode, p.stderr, str(model_dir) if "--temperature" not in extra else "-1")
    assert p.stdout == ""


# -- generate and chat with a stub model -------------------------------------------------------------

def test_generate_streams_text(stub, tok_dir, tok, capsys):
    reply = tok.encode("Paris, of course! 😀 日本", bos=False) + [2] + tok.encode("never shown", bos=False)
    model = stub([reply])
    rc, out, err = run(["generate", tok_dir, "--prompt", "The capital of France is", "--max-new-tokens", "50",
                        "--seed", "3", "--top-k", "5"], capsys)
    assert rc == 0, err
    assert out == "Paris, of course! 😀 日本\n"
    (call,) = model.calls
    assert call.ids == tok.encode("The capital of France is")
    assert call.max_new_tokens == 50
    # Options not given are left out: model.stream takes them from the checkpoint's generation_config.json.
    assert call.kwargs == dict(top_k=5, seed=3, eos_token_id=2)


def test_generate_prompt_from_stdin(stub, tok_dir, tok, capsys, monkeypatch):
    model = stub([tok.encode("ok", bos=False)])
    rc, out, _ = run(["generate", tok_dir, "--temperature", "0.8"], capsys, stdin="from stdin\n", monkeypatch=monkeypatch)
    assert rc == 0 and out == "ok\n"
    assert model.calls[0].ids == tok.encode("from stdin\n")
    assert model.calls[0].kwargs["temperature"] == 0.8


def test_generate_chat_stops_at_turn_marker(stub, tok_dir, tok, capsys):
    model = stub([tok.encode("Sure!\n\n### User:\nand more", bos=False)])
    rc, out, _ = run(["generate", tok_dir, "--chat", "--system", "Be nice.", "--prompt", "Hi"], capsys)
    assert rc == 0 and out == "Sure!\n\n\n"
    assert model.calls[0].ids == tok.encode_chat(
        [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"}])
    assert tok.decode(model.calls[0].ids).endswith("### User:\nHi\n\n### Assistant:\n")


def test_generate_fits_the_context(stub, tok_dir, tok, capsys, caplog):
    prompt_len = len(tok.encode("Hello world"))
    model = stub([tok.encode("x", bos=False)], max_position_embeddings=prompt_len + 5)
    rc, _, err = run(["generate", tok_dir, "--prompt", "Hello world", "--max-new-tokens", "100"], capsys)
    assert rc == 0 and model.calls[0].max_new_tokens == 5
    assert "lowered to 5" in caplog.text
    stub([[]], max_position_embeddings=prompt_len)
    rc, _, err = run(["generate", tok_dir, "--prompt", "Hello world"], capsys)
    assert_one_line_error(rc, err, "context")


def test_chat_keeps_the_conversation(stub, tok_dir, tok, capsys, monkeypatch):
    replies = [
        tok.encode("Hello there! 😀", bos=False) + [2],
        tok.encode("Fine, thanks.\n\n### User:\nI am the model talking", bos=False),
        tok.encode("Bye", bos=False),
    ]
    model = stub(replies)
    stdin = "Hi\n\nHow are you?\n/reset\nNew start\n/exit\nnever read\n"
    rc, out, err = run(["chat", tok_dir, "--system", "You are kind.", "--seed", "1"], capsys,
                       stdin=stdin, monkeypatch=monkeypatch)
    assert rc == 0, err
    assert out == "Hello there! 😀\nFine, thanks.\n\n\nBye\n"
    system = {"role": "system", "content": "You are kind."}
    assert [c.ids for c in model.calls] == [
        tok.encode_chat([system, {"role": "user", "content": "Hi"}]),
        tok.encode_chat([system, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello there! 😀"},
                         {"role": "user", "content": "How are you?"}]),
        tok.encode_chat([system, {"role": "user", "content": "New start"}]),  # after /reset
    ]
    assert all(c.kwargs["temperature"] == 0.7 and c.kwargs["seed"] == 1 for c in model.calls)


def test_chat_drops_old_turns_to_fit(stub, tok_dir, tok, capsys, monkeypatch):
    turns = ["first question here", "second question", "third"]
    answers = ["first answer", "second answer", "third answer"]
    msgs = []
    for q, a in zip(turns[:2], answers[:2]):
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    full = tok.encode_chat(msgs + [{"role": "user", "content": turns[2]}])
    dropped = tok.encode_chat(msgs[2:] + [{"role": "user", "content": turns[2]}])
    assert len(dropped) < len(full)
    max_new = 16
    assert all(len(tok.encode(a, bos=False)) <= max_new for a in answers)
    model = stub([tok.encode(a, bos=False) for a in answers], max_position_embeddings=len(dropped) + max_new)
    rc, out, err = run(["chat", tok_dir, "--max-new-tokens", str(max_new)], capsys,
                       stdin="\n".join(turns) + "\n", monkeypatch=monkeypatch)
    assert rc == 0, err
    assert model.calls[2].ids == dropped
    assert all(len(c.ids) + c.max_new_tokens <= len(dropped) + max_new for c in model.calls)


def test_chat_message_too_long_is_refused_and_chat_goes_on(stub, tok_dir, tok, capsys, monkeypatch):
    model = stub([tok.encode("ok", bos=False)], max_position_embeddings=24)
    rc, out, err = run(["chat", tok_dir], capsys, stdin="word " * 50 + "\nhi\n", monkeypatch=monkeypatch)
    assert rc == 0
    assert "fastsolar: error:" in err and "context" in err
    assert out == "ok\n" and len(model.calls) == 1


# -- end to end on a tiny random checkpoint -----------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_checkpoint(tok_dir, tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    d = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(d)
    shutil.copy(tok_dir / "tokenizer.model", d / "tokenizer.model")
    return d


def test_generate_end_to_end(tiny_checkpoint, tok, capsys):
    from fastsolar import Solar

    prompt = "The capital of France is"
    rc, out, err = run(["generate", tiny_checkpoint, "--prompt", prompt, "--max-new-tokens", "12",
                        "--device", "cpu", "--dtype", "float32"], capsys)
    assert rc == 0, err
    model = Solar.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32")
    ids = tok.encode(prompt)
    new = model.generate(torch.tensor([ids]), 12, eos_token_id=2)[0, len(ids):].tolist()
    if 2 in new:
        new = new[: new.index(2)]
    assert out == tok.decode(new) + "\n"


@pytest.mark.parametrize("flag, mode, stored", [("INT8", "int8", torch.int8), ("int4", "int4", torch.int32)])
def test_generate_quantized_end_to_end(tiny_checkpoint, tok, capsys, monkeypatch, flag, mode, stored):
    from fastsolar import Solar

    loaded = []
    real = Solar.from_pretrained.__func__
    monkeypatch.setattr(Solar, "from_pretrained",
                        classmethod(lambda cls, *a, **kw: loaded.append(real(cls, *a, **kw)) or loaded[-1]))
    prompt = "Quantised weights"
    rc, out, err = run(["generate", tiny_checkpoint, "--prompt", prompt, "--max-new-tokens", "8", "--device", "cpu",
                        "--dtype", "float32", "--quantize", flag], capsys)
    assert rc == 0, err
    assert len(loaded) == 1 and loaded[0].lm_head.weight.dtype == stored, "--quantize did not reach the loader"
    monkeypatch.undo()
    model = Solar.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32", quantize=mode)
    assert model.layers[0].feed_forward.w_down.weight.dtype == stored
    ids = tok.encode(prompt)
    new = model.generate(torch.tensor([ids]), 8, eos_token_id=2)[0, len(ids):].tolist()
    if 2 in new:
        new = new[: new.index(2)]
    assert out == tok.decode(new) + "\n"


@pytest.fixture(scope="session")
def tiny_json_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Llama whose only tokenizer is a Llama-3-style byte-level BPE tokenizer.json."""
    pytest.importorskip("transformers")
    from hf_fixtures import build_json_checkpoint

    return build_json_checkpoint(tmp_path_factory.mktemp("tiny_llama_json"))


@pytest.mark.parametrize("chat", [False, True])
def test_generate_end_to_end_with_tokenizer_json(tiny_json_checkpoint, capsys, chat):
    """The CLI on a tokenizer.json checkpoint prints what transformers' tokenizer and greedy generate give."""
    import transformers

    prompt = "The capital of France is 日本 😀"
    rc, out, err = run(["generate", tiny_json_checkpoint, "--prompt", prompt, "--max-new-tokens", "12",
                        "--device", "cpu", "--dtype", "float32", *(["--chat"] if chat else [])], capsys)
    assert rc == 0, err
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(tiny_json_checkpoint))
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tiny_json_checkpoint), dtype=torch.float32).eval()
    if chat:
        ids = hf_tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_dict=False)
    else:
        ids = hf_tok(prompt).input_ids
    assert ids[0] == 0 and ids.count(0) == 1
    new = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=4)[0, len(ids):]
    assert len(new) > 0
    assert out == hf_tok.decode(new, skip_special_tokens=True) + "\n"


def test_generate_takes_defaults_from_generation_config(tmp_path, capsys):
    """Without --max-new-tokens the checkpoint's generation_config.json decides the length (as transformers'
    generate on the same folder); the command line wins over it."""
    import json

    import transformers
    from hf_fixtures import build_json_checkpoint

    d = build_json_checkpoint(tmp_path / "ckpt")
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 4, "max_new_tokens": 3}))
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(d))
    hf = transformers.LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    prompt = "The capital of France is"
    ids = torch.tensor([hf_tok(prompt).input_ids])
    for extra, want in (([], hf.generate(ids)), (["--max-new-tokens", "7"], hf.generate(ids, max_new_tokens=7))):
        rc, out, err = run(["generate", d, "--prompt", prompt, "--device", "cpu", *extra], capsys)
        assert rc == 0, err
        new = want[0, ids.shape[1]:]
        assert len(new) == (3 if not extra else 7) and 4 not in new.tolist()
        assert out == hf_tok.decode(new, skip_special_tokens=True) + "\n"


def test_chat_end_to_end(tiny_checkpoint, capsys, monkeypatch):
    seen = []
    real = Tokenizer.encode_chat

    def spy(self, messages, *a, **kw):
        seen.append([dict(m) for m in messages])
        return real(self, messages, *a, **kw)

    monkeypatch.setattr(Tokenizer, "encode_chat", spy)
    rc, out, err = run(["chat", tiny_checkpoint, "--max-new-tokens", "6", "--temperature", "0", "--device", "cpu"],
                       capsys, stdin="Hello\nHow are you?\n", monkeypatch=monkeypatch)
    assert rc == 0, err
    assert len(seen) == 2 and [m["role"] for m in seen[1]] == ["user", "assistant", "user"]
    first_reply = seen[1][1]["content"]
    assert out.startswith(first_reply + "\n")
