"""`fastsolar serve` under vLLM's flag names: --max-num-seqs, --max-model-len, --served-model-name,
--gpu-memory-utilization and --chat-template map onto fastsolar's options and take effect (cache rows, context,
the served name, the rows that fit a memory budget, the template a chat request is rendered with); bad values
are one-line errors naming the flag. The command runs in this process with uvicorn's signal-handling `run`
replaced by a server on a thread that asks its questions and stops."""
from __future__ import annotations

import pytest

for _name in ("fastapi", "uvicorn", "httpx", "openai"):
    pytest.importorskip(_name, reason=f"the server tests need {_name}: pip install -e '.[test]'")

import openai  # noqa: E402
from helpers import running_server  # noqa: E402

from fastsolar import Solar, Tokenizer, cli, memory  # noqa: E402
from fastsolar.decoding.session import DecodeSession  # noqa: E402
from fastsolar.serve import sizing  # noqa: E402

WAIT_S = 60.0
TEMPLATE = "{{ bos_token }}{% for m in messages %}<<{{ m['role'] }}|{{ m['content'] }}>>{% endfor %}"
MESSAGES = [{"role": "user", "content": "Hello there"}]


def test_vllm_names_map_onto_the_options(serve_checkpoint):
    parse = cli.build_parser().parse_args
    base = ["serve", str(serve_checkpoint)]
    vllm = parse(base + ["--max-num-seqs", "3", "--max-model-len", "64", "--served-model-name", "x",
                         "--gpu-memory-utilization", "0.5", "--chat-template", "t.jinja", "--host", "0.0.0.0",
                         "--port", "9"])
    ours = parse(base + ["--max-batch", "3", "--max-seq", "64", "--model-name", "x"])
    for name, value in (("max_batch", 3), ("max_seq", 64), ("model_name", "x")):
        assert getattr(vllm, name) == getattr(ours, name) == value
    assert (vllm.gpu_memory_utilization, vllm.chat_template, vllm.host, vllm.port) == (0.5, "t.jinja", "0.0.0.0", 9)
    plain = parse(base)
    assert (plain.max_batch, plain.gpu_memory_utilization, plain.chat_template) == (None, None, None)


def _serve(monkeypatch, argv: list[str]) -> dict:
    """Run `fastsolar serve argv`; returns what the server answered: the engine, /v1/models, a chat reply."""
    from fastsolar.serve import server as server_mod

    seen: dict = {}

    def serve_and_ask(app, host, port, *, shutdown_timeout):
        seen["engine"] = app.state.engine
        with running_server(app, WAIT_S) as base:
            client = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=WAIT_S, max_retries=0)
            seen["models"] = [m.id for m in client.models.list().data]
            seen["chat"] = client.chat.completions.create(model=seen["models"][0], messages=MESSAGES, max_tokens=2,
                                                          temperature=0)

    monkeypatch.setattr(server_mod, "run", serve_and_ask)
    assert cli.main(["serve", *argv, "--device", "cpu"]) == 0
    return seen


def test_max_num_seqs_max_model_len_served_model_name_and_an_inline_chat_template(serve_checkpoint, monkeypatch):
    seen = _serve(monkeypatch, [str(serve_checkpoint), "--max-num-seqs", "3", "--max-model-len", "64",
                                "--served-model-name", "vllm-name", "--chat-template", TEMPLATE])
    assert (seen["engine"].max_batch, seen["engine"].context) == (3, 64)
    assert seen["models"] == ["vllm-name"]
    tok = Tokenizer.from_pretrained(serve_checkpoint)
    default = len(tok.encode_chat(MESSAGES))
    tok.chat_template = TEMPLATE
    assert seen["chat"].usage.prompt_tokens == len(tok.encode_chat(MESSAGES)) != default


def test_chat_template_from_a_file_and_bad_templates(serve_checkpoint, monkeypatch, tmp_path, capsys):
    path = tmp_path / "template.jinja"
    path.write_text(TEMPLATE)
    seen = _serve(monkeypatch, [str(serve_checkpoint), "--chat-template", str(path)])
    tok = Tokenizer.from_pretrained(serve_checkpoint)
    tok.chat_template = TEMPLATE
    assert seen["chat"].usage.prompt_tokens == len(tok.encode_chat(MESSAGES))
    assert seen["engine"].max_batch == cli.SERVE_MAX_BATCH  # no flag: the default
    for value, fragment in (("no-such-file.jinja", "neither a file nor a Jinja template"),
                            ("{% for m in messages %}", "does not render a user turn")):
        assert cli.main(["serve", str(serve_checkpoint), "--chat-template", value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--chat-template" in err[0] and fragment in err[0], err


def test_row_bytes_is_what_the_cache_allocates(serve_checkpoint):
    model = Solar.from_pretrained(serve_checkpoint)
    for rows, seq in ((1, 17), (3, 64)):
        cache = DecodeSession(model, rows, seq).cache
        assert rows * sizing.row_bytes(model, seq) == cache.k.numel() * cache.k.element_size() * 2
    assert sizing.model_bytes(model) >= sum(p.numel() * p.element_size() for p in model.parameters())
    assert sizing.rows_that_fit(model, 1.0, 64) >= 1  # this machine's RAM holds a tiny model's row


def test_gpu_memory_utilization_sizes_the_rows(serve_checkpoint, monkeypatch, capsys):
    model = Solar.from_pretrained(serve_checkpoint)
    seq = 64
    weights = sizing.model_bytes(model)
    row = sizing.row_bytes(model, seq)
    fraction = 0.5

    def total_for(rows: int) -> int:  # a device whose half holds the weights, the reserve and `rows` rows
        return int((weights + memory.margin_bytes(weights) + rows * row + row // 2) / fraction)

    for rows, extra, expected in ((5, [], 5), (5, ["--max-num-seqs", "3"], 3), (300, [], cli.SERVE_MAX_ROWS)):
        monkeypatch.setattr(sizing, "total_memory", lambda device, rows=rows: total_for(rows))
        seen = _serve(monkeypatch, [str(serve_checkpoint), "--max-model-len", str(seq), "--gpu-memory-utilization",
                                    str(fraction), *extra])
        assert seen["engine"].max_batch == expected, (rows, extra)
    monkeypatch.setattr(sizing, "total_memory", lambda device: total_for(0))
    for value, fragment in (("0.5", "one row of 64 positions takes"), ("1.5", "must be in (0, 1]"),
                            ("0", "must be in (0, 1]")):
        assert cli.main(["serve", str(serve_checkpoint), "--max-model-len", "64", "--device", "cpu",
                         "--gpu-memory-utilization", value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--gpu-memory-utilization" in err[0] and fragment in err[0], err
