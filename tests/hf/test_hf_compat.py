"""The transformers-shaped surface (fastsolar.hf.compat): the SOLAR model cards' code runs with only the import
changed and prints what transformers prints; each alias gives what its native argument gives; each refused
argument is refused by name.

The checkpoint is a tiny random Llama (hidden 64, 2 layers) with the real 32000-piece SOLAR/Mistral
tokenizer.model from the mistral-common wheel, and an EOS planted where greedy decoding of the Instruct
card's prompt reaches it after a few tokens (so `max_length=4096` ends early, as a real model's reply does).
transformers' LlamaForCausalLM.generate on the same input ids is the reference for tokens; sentencepiece,
not transformers 5's tokenizer, is the reference for tokenization (they differ on runs of spaces), so
tokenizer parity checks use texts without such runs.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from hf_fixtures import EOS_ID, build_hf_model, plant_eos, real_tokenizer_path, save

from fastsolar import AutoModelForCausalLM, AutoTokenizer, BatchEncoding, Solar, Tokenizer
from fastsolar.decoding.generate import generate as native_generate
from fastsolar.decoding.sampling import Sampler
from fastsolar.decoding.session import DecodeSession
from fastsolar.hf.compat import resolve_device_map
from fastsolar.text.chat import SOLAR_CHAT_TEMPLATE

transformers = pytest.importorskip("transformers")

# The model cards' code, verbatim but for the import line and the checkpoint name (MODEL_DIR).
SOLAR_CARD = '''
import torch
from fastsolar import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, device_map="auto", torch_dtype=torch.float16)
inputs = tokenizer("Hi, my name is ", return_tensors="pt")
outputs = model.generate(**inputs, max_new_tokens=64)
print(tokenizer.decode(outputs[0], skip_special_tokens=True))
'''
SOLAR_INSTRUCT_CARD = '''
import torch
from fastsolar import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, device_map="auto", torch_dtype=torch.float16)
conversation = [ {'role': 'user', 'content': 'Hello?'} ]
prompt = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
outputs = model.generate(**inputs, use_cache=True, max_length=4096)
output_text = tokenizer.decode(outputs[0])
print(output_text)
'''
INSTRUCT_PROMPT = "### User:\nHello?\n\n### Assistant:\n"


@pytest.fixture(scope="module")
def card(tmp_path_factory):
    """(checkpoint dir, new tokens up to and including the planted EOS for the Instruct prompt)."""
    tok_path = real_tokenizer_path()
    hf = build_hf_model(vocab_size=32000, max_position_embeddings=4096, num_hidden_layers=2, pad_token_id=None)
    prompt_ids = Tokenizer(tok_path).encode(INSTRUCT_PROMPT)
    n_eos = plant_eos(hf, prompt_ids, after=6, within=20)
    d = save(hf, tmp_path_factory.mktemp("solar_card"), max_shard_size="8MB")
    shutil.copy(tok_path, d / "tokenizer.model")
    # SOLAR-10.7B-Instruct-v1.0's tokenizer_config.json settings (LlamaTokenizer, bos added, no pad token).
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": True,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "clean_up_tokenization_spaces": False, "chat_template": SOLAR_CHAT_TEMPLATE,
    }))
    return d, n_eos


@pytest.fixture(scope="module")
def tok(card) -> Tokenizer:
    return Tokenizer.from_pretrained(card[0])


@pytest.fixture(scope="module")
def model(card) -> Solar:
    return Solar.from_pretrained(card[0], device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def hf32(card):
    return transformers.LlamaForCausalLM.from_pretrained(str(card[0]), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tok(card):
    """transformers' tokenizer of the same checkpoint: a reference for decoding and for padding/truncation
    rules (tokenization itself is compared only on texts without runs of spaces)."""
    try:
        return transformers.AutoTokenizer.from_pretrained(str(card[0]))
    except Exception as e:  # conversion of tokenizer.model needs sentencepiece + protobuf
        pytest.skip(f"transformers cannot build a tokenizer from tokenizer.model here: {e}")


def run_card(source: str, model_dir, capsys) -> tuple[dict, str]:
    ns = {"MODEL_DIR": str(model_dir)}
    exec(compile(source, "model_card", "exec"), ns)
    return ns, capsys.readouterr().out


def hf_reference(ns: dict, **kwargs) -> torch.Tensor:
    """transformers' greedy generate on the card's own input ids, in the card's dtype, on the card's device."""
    model = ns["model"]
    hf = transformers.LlamaForCausalLM.from_pretrained(ns["MODEL_DIR"], dtype=model.dtype).to(model.device).eval()
    inputs = {k: v.to(model.device) for k, v in ns["inputs"].items()}
    return hf.generate(**inputs, do_sample=False, **kwargs)


# ------------------------------------------------------------------------------------------ the model cards

def test_solar_card_runs_and_matches_transformers(card, capsys):
    ns, printed = run_card(SOLAR_CARD, card[0], capsys)
    model, inputs, outputs = ns["model"], ns["inputs"], ns["outputs"]
    assert isinstance(model, Solar) and model.dtype == torch.float16 and isinstance(ns["tokenizer"], Tokenizer)
    sp = ns["tokenizer"].sp
    assert inputs["input_ids"].tolist() == [[1] + sp.EncodeAsIds("Hi, my name is ")]  # sentencepiece's ids
    assert inputs["attention_mask"].tolist() == [[1] * inputs["input_ids"].shape[1]]
    expected = hf_reference(ns, max_new_tokens=64)
    assert outputs.tolist() == expected.tolist()
    assert outputs.shape[1] > inputs["input_ids"].shape[1] + 8  # a real continuation, not an immediate EOS
    assert printed == ns["tokenizer"].decode(expected[0], skip_special_tokens=True) + "\n"


def test_solar_instruct_card_runs_and_matches_transformers(card, capsys, hf_tok):
    ns, printed = run_card(SOLAR_INSTRUCT_CARD, card[0], capsys)
    assert ns["prompt"] == INSTRUCT_PROMPT
    prompt_len = ns["inputs"]["input_ids"].shape[1]
    expected = hf_reference(ns, use_cache=True, max_length=4096)
    assert ns["outputs"].tolist() == expected.tolist()
    assert ns["outputs"].shape[1] == prompt_len + card[1]  # stopped at the EOS, long before 4096
    assert printed == ns["output_text"] + "\n"
    assert ns["output_text"] == hf_tok.decode(expected[0])  # transformers' decode, specials written out
    assert ns["output_text"].startswith("<s> " + INSTRUCT_PROMPT) and ns["output_text"].endswith("</s>")


# ---------------------------------------------------------------------------------------------- tokenizer

TEXTS = ["Hi", "Hello there friend", "a<s>b</s>c<unk>d", ""]
CALLS = [
    dict(),
    dict(padding=True),
    dict(padding="longest", padding_side="right"),
    dict(padding="max_length", max_length=12),
    dict(max_length=3),  # implies truncation, as in transformers
    dict(truncation=True, max_length=3, padding=True),
    dict(add_special_tokens=False, padding=True),
    dict(padding=True, pad_to_multiple_of=4),
    dict(padding=True, return_tensors="pt"),
    dict(padding=True, return_tensors="np"),
    dict(return_attention_mask=False),
    dict(split_special_tokens=True, padding=True),
]


def _plain(encoding) -> dict:
    return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in encoding.items()}


@pytest.mark.parametrize("kwargs", CALLS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "plain")
def test_call_matches_transformers(card, hf_tok, kwargs):
    tok = Tokenizer.from_pretrained(card[0])
    tok.pad_token = tok.eos_token
    hf_tok.pad_token = hf_tok.eos_token
    assert tok.pad_token_id == hf_tok.pad_token_id == EOS_ID
    ours = tok(TEXTS, **kwargs)
    assert isinstance(ours, BatchEncoding)
    assert _plain(ours) == _plain(hf_tok(TEXTS, **kwargs))
    for text in TEXTS:
        assert _plain(tok(text, **kwargs)) == _plain(hf_tok(text, **kwargs))


def test_call_defaults_and_batch_encoding(tok):
    enc = tok("Hi, my name is ", return_tensors="pt")
    assert enc.input_ids is enc["input_ids"] and enc.input_ids.dtype == torch.int64
    assert enc.input_ids.tolist() == [tok.encode("Hi, my name is ")]  # bos + sentencepiece
    assert set(dict(**enc)) == {"input_ids", "attention_mask"}
    assert enc.to("cpu") is enc and enc.to(torch.device("cpu")).input_ids.device.type == "cpu"
    with pytest.raises(AttributeError):
        enc.token_type_ids
    assert tok("a<s>b").input_ids == [1, *tok.encode("a", bos=False), 1, *tok.encode("b", bos=False)]
    assert tok.padding_side == "left" and tok.truncation_side == "right"
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (1, 2, 0, None)
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", None)
    assert len(tok) == 32000


def test_decode_matches_transformers(tok, hf_tok):
    e = tok.sp.EncodeAsIds
    byte = tok.sp.PieceToId("<0xE2>")
    cases = [
        [1] + e("Hello world") + [2], e("Hello") + [2] + e("world"), [1, 2, 0], [0] + e("Hi"),
        [1] + e("  two spaces") + [2], [1] + e("\n\nx") + [2], e("日本😀") + [2] + e("😀"),
        [1] + e("x") + [2, byte, 2], [1] + e(" ### User:") + [0, 0] + e("Hi. "), [1, tok.sp.PieceToId("\u2581")],
    ]
    for ids in cases:
        assert tok.decode(ids) == hf_tok.decode(ids), ids
        assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True), ids
    assert tok.batch_decode(torch.tensor([cases[2], cases[2]])) == hf_tok.batch_decode([cases[2], cases[2]])


def test_apply_chat_template_matches_transformers(tok, hf_tok):
    conv = [{"role": "user", "content": "Hello?"}]
    for gen in (False, True):
        text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
        assert text == hf_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
        ours = tok.apply_chat_template(conv, add_generation_prompt=gen)  # tokenize=True, return_dict=True
        assert isinstance(ours, BatchEncoding)
        assert _plain(ours) == _plain(hf_tok.apply_chat_template(conv, add_generation_prompt=gen))
        assert ours.input_ids == tok(text, add_special_tokens=False).input_ids  # no bos: SOLAR's template has none
    ids = tok.apply_chat_template(conv, return_dict=False, return_tensors="pt")
    assert ids.tolist() == [tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False).input_ids]
    tok2 = Tokenizer.from_pretrained(tok.model_file.parent, pad_token="</s>")
    batch = tok2.apply_chat_template([conv, conv + [{"role": "assistant", "content": "Hi"}]], padding=True,
                                     return_tensors="pt")
    assert batch.input_ids.shape[0] == 2 and batch.attention_mask[0, 0] == 0  # left padded


def test_tokenizer_refusals(tok, card):
    for kwargs, match in [
        (dict(text_pair="x"), "text_pair"),
        (dict(return_tensors="tf"), "return_tensors"),
        (dict(is_split_into_words=True), "is_split_into_words"),
        (dict(return_offsets_mapping=True), "return_offsets_mapping"),
        (dict(return_token_type_ids=True), "return_token_type_ids"),
        (dict(padding="bogus"), "padding"),
        (dict(truncation="only_second", max_length=2), "truncation"),
        (dict(padding=True), "pad_token"),  # SOLAR's tokenizer has none, as in transformers
        (dict(padding="max_length"), "pad_token"),
    ]:
        with pytest.raises(ValueError, match=match):
            tok(["Hi", "Hello there"], **kwargs)
    with pytest.raises(TypeError, match="frobnicate"):
        tok("Hi", frobnicate=1)
    with pytest.raises(ValueError, match="padding=True"):
        tok(["Hi", "Hello there"], return_tensors="pt")
    with pytest.raises(TypeError, match=r"text\[1\]"):
        tok(["Hi", 3])
    with pytest.raises(ValueError, match="continue_final_message"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], continue_final_message=True)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.pad_token = "[PAD]"
    with pytest.raises(ValueError, match="legacy"):
        AutoTokenizer.from_pretrained(card[0], legacy=False)
    with pytest.raises(TypeError, match="frobnicate"):
        AutoTokenizer.from_pretrained(card[0], frobnicate=True)
    with pytest.raises(TypeError, match="from_pretrained"):
        AutoTokenizer()
    left = AutoTokenizer.from_pretrained(card[0], padding_side="right", pad_token="</s>", use_fast=True)
    assert isinstance(left, Tokenizer) and left.padding_side == "right" and left.pad_token_id == EOS_ID


# --------------------------------------------------------------------------------------------- generate

@pytest.fixture(scope="module")
def prompt(tok) -> torch.Tensor:
    return torch.tensor([tok.encode(INSTRUCT_PROMPT)])


def test_generate_aliases_equal_native(model, prompt):
    w = prompt.shape[1]
    greedy = model.generate(prompt, 6)
    assert torch.equal(model.generate(prompt, 6, do_sample=False, temperature=0.9, top_k=5, top_p=0.5), greedy)
    assert torch.equal(model.generate(inputs=prompt, max_new_tokens=6), greedy)
    assert torch.equal(model.generate(prompt, max_length=w + 6), greedy)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, max_length=w + 20), greedy)  # max_new_tokens wins
    for use_cache in (True, False):  # always cached; False recomputes nothing and means the same tokens
        assert torch.equal(model.generate(prompt, 6, use_cache=use_cache, num_beams=1, bos_token_id=1), greedy)
    sampled = model.generate(prompt, 8, do_sample=True, seed=3)
    assert torch.equal(sampled, model.generate(prompt, 8, temperature=1.0, top_k=50, top_p=1.0, seed=3))
    assert torch.equal(model.generate(prompt, 8, do_sample=True, temperature=0.7, top_p=0.9, seed=3),
                       model.generate(prompt, 8, temperature=0.7, top_k=50, top_p=0.9, seed=3))
    assert torch.equal(model.generate(prompt, 8, min_length=w + 5), model.generate(prompt, 8, min_new_tokens=5))
    streamed = torch.stack(list(model.stream(prompt, max_length=w + 6, do_sample=False)), dim=1)
    assert torch.equal(streamed, greedy[:, w:])


def test_min_new_tokens_matches_transformers(model, hf32, prompt, card):
    n_eos = card[1]
    ours = model.generate(prompt, max_new_tokens=n_eos + 4)
    assert ours[0, -1] == EOS_ID and ours.shape[1] == prompt.shape[1] + n_eos
    for kwargs in (dict(min_new_tokens=n_eos + 3), dict(min_length=prompt.shape[1] + n_eos + 2),
                   dict(min_new_tokens=n_eos + 3, min_length=1)):
        ours = model.generate(prompt, max_new_tokens=n_eos + 8, **kwargs)
        theirs = hf32.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_eos + 8,
                               do_sample=False, **kwargs)
        assert ours.tolist() == theirs.tolist()
        assert EOS_ID not in ours[0, prompt.shape[1]: prompt.shape[1] + n_eos + 2].tolist()
    for seed in range(4):  # sampling: never an EOS among the first min_new_tokens
        out = model.generate(prompt, max_new_tokens=12, min_new_tokens=10, do_sample=True, temperature=2.0, seed=seed)
        assert EOS_ID not in out[0, prompt.shape[1]: prompt.shape[1] + 10].tolist()


def test_min_new_tokens_boundary_matches_transformers(model, hf32, prompt, card):
    """The planted EOS is the greedy pick at new-token step card[1] - 1. min_new_tokens = card[1] - 1 lifts the ban
    exactly at that step, so generation still ends there; min_new_tokens = card[1] bans it at that step only. Both
    against transformers' generate on the same weights."""
    n_eos, width = card[1], prompt.shape[1]
    for min_new, ends_at_planted_eos in ((n_eos - 1, True), (n_eos, False)):
        ours = model.generate(prompt, max_new_tokens=n_eos + 4, min_new_tokens=min_new)
        theirs = hf32.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_eos + 4,
                               do_sample=False, min_new_tokens=min_new)
        assert ours.tolist() == theirs.tolist(), min_new
        assert (ours[0, width + n_eos - 1] == EOS_ID) == ends_at_planted_eos, (min_new, ours[0, width:].tolist())
        assert (ours.shape[1] == width + n_eos) == ends_at_planted_eos, (min_new, ours[0, width:].tolist())


def test_min_new_tokens_processing_matches_transformers_processor():
    """The Sampler's EOS ban, step by step, against transformers' own processors (MinNewTokensLengthLogitsProcessor,
    and MinLengthLogitsProcessor with min_length = prompt + min_new_tokens) as the reference, with an EOS id the
    argmax of every row at every step: greedy rows pick the argmax of transformers' processed scores, no row ever
    picks a token transformers bans, and at the boundary step (the first one the ban no longer covers) every row
    takes its EOS. Greedy alone and greedy mixed with sampled rows."""
    from transformers.generation.logits_process import MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor

    b, v, prompt_len, min_new, eos = 3, 50, 5, 3, [2, 7]
    processors = [MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=prompt_len, min_new_tokens=min_new,
                                                    eos_token_id=eos),
                  MinLengthLogitsProcessor(min_length=prompt_len + min_new, eos_token_id=eos)]
    g = torch.Generator().manual_seed(0)
    for temperature in (0.0, [0.0, 1.0, 0.7]):
        sampler = Sampler(b, v, "cpu")
        sampler.reset(temperature=temperature, seed=1, min_new_tokens=min_new, eos_token_ids=eos)
        greedy = torch.tensor(temperature if isinstance(temperature, list) else [temperature] * b) == 0
        for t in range(min_new + 2):  # t tokens chosen so far: the prefill's pick is step 0
            logits = torch.randn(b, v, generator=g)
            logits[[0, 1, 2], [2, 7, 2]] = 30.0  # an EOS far ahead of every other token
            history = torch.randint(3, v, (b, prompt_len + t), generator=g)
            theirs = [proc(history, logits.clone()) for proc in processors]
            assert torch.equal(theirs[0], theirs[1])
            before = logits.clone()
            picked = sampler(logits)
            assert torch.equal(logits, before), "the sampler must not modify the logits"
            assert torch.isfinite(theirs[0].gather(1, picked[:, None])).all(), (t, picked.tolist())
            assert torch.equal(picked[greedy], theirs[0].argmax(-1)[greedy]), (t, picked.tolist())
            if t < min_new:
                assert not set(picked.tolist()) & set(eos), (t, picked.tolist())
            else:
                assert picked.tolist() == [2, 7, 2], (t, picked.tolist())


def test_min_new_tokens_on_the_graph_step_path(model, prompt, card, monkeypatch):
    """The CUDA-graph step's bookkeeping (warm-up runs, then state restored) must not advance the EOS ban's
    step counter: the static-buffer path (capture=False on CPU) gives the eager tokens."""
    import fastsolar.decoding.generate as gen
    from fastsolar.decoding.graphs import CudaGraphLoop

    # Just enough to block the planted EOS (step card[1] - 1): a counter off by the warm-up runs would not.
    kwargs = dict(max_new_tokens=card[1] + 6, min_new_tokens=card[1])
    eager = model.generate(prompt, **kwargs)
    assert eager.shape[1] > prompt.shape[1] + card[1]
    monkeypatch.setattr(gen, "_make_advance",
                        lambda s, sampler, loop, cuda_graphs: CudaGraphLoop(s, sampler, loop, capture=False))
    session = DecodeSession(model, 1, prompt.shape[1] + kwargs["max_new_tokens"])
    assert torch.equal(model.generate(prompt, session=session, **kwargs), eager)
    assert session.sampler(1).mode[-1] is True  # the ban is part of the graph key


def test_batch_from_tokenizer_padding_matches_transformers(model, hf32, card):
    tok = AutoTokenizer.from_pretrained(card[0], pad_token="</s>")
    inputs = tok(["Hi, my name is", INSTRUCT_PROMPT], padding=True, return_tensors="pt")
    ours = model.generate(**inputs, max_new_tokens=card[1] + 4)
    theirs = hf32.generate(**inputs, max_new_tokens=card[1] + 4, do_sample=False)
    assert ours.tolist() == theirs.tolist()
    # Finished rows carry pad_token_id, the alias and the native argument alike.
    with_pad = model.generate(**inputs, max_new_tokens=card[1] + 4, pad_token_id=5)
    native = native_generate(model, inputs.input_ids, card[1] + 4, attention_mask=inputs.attention_mask,
                             pad_token_id=5)
    assert torch.equal(with_pad, native)
    done = with_pad[1, inputs.input_ids.shape[1] + card[1]:]
    assert done.numel() > 0 and (done == 5).all()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_beams=4), ValueError, "num_beams=4.*beam search"),
    (dict(num_return_sequences=2), ValueError, "num_return_sequences"),
    (dict(streamer=object()), ValueError, "streamer.*model.stream"),
    (dict(return_dict_in_generate=True), ValueError, "return_dict_in_generate"),
    (dict(output_scores=True), ValueError, "output_scores"),
    (dict(stop_strings=["x"]), ValueError, "stop_strings"),
    (dict(typical_p=0.5), ValueError, "typical_p"),
    (dict(do_sample="yes"), ValueError, "do_sample must be a bool"),
    (dict(do_sample=True, temperature=0.0), ValueError, "temperature > 0"),
    (dict(max_new_tokens=None, max_length=13), ValueError, "max_length 13 leaves no room"),
    (dict(use_cache="yes"), ValueError, "use_cache must be a bool"),
    (dict(min_new_tokens=-1), ValueError, "min_new_tokens must be an integer >= 0"),
    (dict(min_length=-2), ValueError, "min_length"),
    (dict(pad_token_id=10**6), ValueError, "pad_token_id"),
    (dict(frobnicate=1), TypeError, "frobnicate"),
    (dict(inputs=torch.ones(1, 3, dtype=torch.long)), TypeError, "inputs and input_ids"),
])
def test_generate_refusals(model, prompt, kwargs, error, match):
    kwargs = {"max_new_tokens": 4, **kwargs}
    assert prompt.shape[1] == 13
    with pytest.raises(error, match=match):
        model.generate(prompt, **kwargs)


def test_generate_needs_a_prompt(model):
    with pytest.raises(ValueError, match="needs input_ids"):
        model.generate(max_new_tokens=3)


# ------------------------------------------------------------------------------------------ from_pretrained

def test_from_pretrained_aliases(card, model):
    d = card[0]
    half = Solar.from_pretrained(d, device="cpu", dtype=torch.float16)
    via_alias = AutoModelForCausalLM.from_pretrained(d, device_map="cpu", torch_dtype=torch.float16)
    assert isinstance(via_alias, Solar) and via_alias.dtype == torch.float16
    for a, b in zip(half.state_dict().values(), via_alias.state_dict().values()):
        assert torch.equal(a, b)
    assert AutoModelForCausalLM.from_pretrained(d, torch_dtype="auto", device_map="auto").dtype == model.dtype
    same = Solar.from_pretrained(d, device="cpu", device_map="cpu", dtype="float16", torch_dtype=torch.float16)
    assert same.dtype == torch.float16  # both spellings given, agreeing
    for device_map in ("cpu", torch.device("cpu"), {"": "cpu"}, {"model.embed_tokens": "cpu", "lm_head": "cpu"}):
        m = Solar.from_pretrained(d, device_map=device_map, dtype="float32", low_cpu_mem_usage=True,
                                  trust_remote_code=False)
        assert m.device == torch.device("cpu")


def test_resolve_device_map():
    assert resolve_device_map("auto") is None  # the native default: CUDA when there is one, else CPU
    assert resolve_device_map(0) == torch.device("cuda", 0)
    assert resolve_device_map("cuda:1") == torch.device("cuda", 1)
    assert resolve_device_map({"a": 1, "b": "cuda:1"}) == torch.device("cuda", 1)
    for bad, match in [("balanced", "several devices"), ("sequential", "several devices"),
                       ({"model": 0, "lm_head": 1}, r"several devices \(cuda:0, cuda:1\)"),
                       ({"model": 0, "lm_head": "cpu"}, "several devices"), ("disk", "disk"),
                       ({"": "disk"}, "disk"), ("gpu please", "not a device"), (True, "not a device"), ({}, "empty")]:
        with pytest.raises(ValueError, match=match):
            resolve_device_map(bad)


def test_from_pretrained_refusals(card):
    d = card[0]
    for kwargs, error, match in [
        (dict(device_map="balanced"), ValueError, "several devices"),
        (dict(torch_dtype=torch.float16, dtype=torch.float32), ValueError, "disagree"),
        (dict(device="cpu", device_map="cuda"), ValueError, "disagree"),
        (dict(load_in_8bit=True), ValueError, "load_in_8bit"),
        (dict(attn_implementation="flash_attention_2"), ValueError, "attn_implementation"),
        (dict(revision="main"), ValueError, "revision"),
        (dict(trust_remote_code="yes"), ValueError, "trust_remote_code"),
        (dict(frobnicate=1), TypeError, "frobnicate"),
    ]:
        with pytest.raises(error, match=match):
            AutoModelForCausalLM.from_pretrained(d, **kwargs)
    with pytest.raises(TypeError, match="from_pretrained"):
        AutoModelForCausalLM()
    with pytest.raises(TypeError, match="keyword"):
        AutoModelForCausalLM.from_pretrained(d, "positional")
